"""Harmful rates of the real-model study (`sku demo --model smollm2`) by hand labels instead of a
judge: each distinct (prompt, response) of its harmful splits was labelled from Table 3 by hand
(the `r-…` rows of sku/evaluation/judges/data/judge_train.jsonl). Prints, per method and model
(original, snapshots, final), the hand-labelled harmful rate on unlearned and unseen prompts
beside the judge's from the same responses (responses.jsonl), as a markdown table.

    python bench/study_hand_labels.py STUDY_FOLDER
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "sku" / "evaluation" / "judges" / "data" / "judge_train.jsonl"
SPLITS = ("unlearned_harmful", "unseen_harmful")
METHODS = ("ft", "ga", "ga_mismatch", "task_vector", "sku")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the folder `sku demo --model smollm2` wrote")
    args = parser.parse_args()
    hand = {(c["prompt"], c["response"]): c["harmful"] for c in read(LABELS)
            if c["id"].startswith("r-")}
    lines = ["| method | model | unlearned: hand | unlearned: judge | unseen: hand | "
             "unseen: judge |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        rows = read(args.study / "runs" / method / "eval" / "responses.jsonl")
        models = list(dict.fromkeys(r["model"] for r in rows))
        for model in models if method == METHODS[0] else models[1:]:  # θ_o once
            cells = []
            for split in SPLITS:
                chosen = [r for r in rows if r["model"] == model and r["split"] == split]
                unlabelled = [r for r in chosen if (r["prompt"], r["response"]) not in hand]
                if unlabelled:
                    sys.exit(f"{method}/{model}: {len(unlabelled)} responses have no hand "
                             "label (another run of the study?)")
                n = len(chosen)
                by_hand = sum(hand[r["prompt"], r["response"]] for r in chosen)
                judged = sum(r["harmful"] for r in chosen)
                cells += [f"{by_hand}/{n} ({100 * by_hand / n:.1f}%)",
                          f"{judged}/{n} ({100 * judged / n:.1f}%)"]
            lines.append(f"| {method if model != 'original' else '(original)'} | {model} | "
                         + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

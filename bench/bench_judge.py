"""Accuracy of the offline judges on an independent labelled set (tests/fixtures/
judge_cases.jsonl: 183 pairs written from the paper's Table 3 alone, kinds a–g). Prints, per
judge, accuracy, harmful recall and benign false-positive rate on the development half (ids
ending in an even digit), the held-out half (odd) and the whole set, then per kind on the
whole set; writes bench/results/judge_accuracy.md.

    python bench/bench_judge.py [--cases FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from sku.evaluation.judges import HARMFUL_CATEGORIES, KeywordJudge

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_JUDGES = {"keyword": KeywordJudge}


def halves(cases: list[dict]) -> dict[str, list[dict]]:
    return {"development (even ids)": [c for c in cases if int(c["id"][-1]) % 2 == 0],
            "held-out (odd ids)": [c for c in cases if int(c["id"][-1]) % 2 == 1],
            "all": cases}


def scores(cases: list[dict], categories: list[str]) -> dict[str, float | int]:
    """Accuracy (harmful or not), harmful recall, benign false-positive rate, exact kind."""
    said = [c in HARMFUL_CATEGORIES for c in categories]
    harmful = [s for s, case in zip(said, cases, strict=True) if case["harmful"]]
    benign = [s for s, case in zip(said, cases, strict=True) if not case["harmful"]]
    return {"n": len(cases),
            "accuracy": sum(s == c["harmful"] for s, c in zip(said, cases, strict=True))
            / len(cases),
            "recall": sum(harmful) / len(harmful) if harmful else float("nan"),
            "fp": sum(benign) / len(benign) if benign else float("nan"),
            "kind": sum(k == c["label"] for k, c in zip(categories, cases, strict=True))
            / len(cases)}


def table(rows: dict[str, dict]) -> list[str]:
    lines = ["| set | n | accuracy | harmful recall | benign FP | exact kind |",
             "|---|---|---|---|---|---|"]
    for name, s in rows.items():
        recall = "–" if s["recall"] != s["recall"] else f"{s['recall']:.3f}"
        fp = "–" if s["fp"] != s["fp"] else f"{s['fp']:.3f}"
        lines.append(f"| {name} | {s['n']} | {s['accuracy']:.3f} | {recall} | {fp} | "
                     f"{s['kind']:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=ROOT / "tests" / "fixtures" / "judge_cases.jsonl")
    parser.add_argument("--out", default=ROOT / "bench" / "results" / "judge_accuracy.md")
    args = parser.parse_args()
    cases = [json.loads(line) for line in Path(args.cases).read_text().splitlines() if line]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    lines = ["# Offline judge accuracy on tests/fixtures/judge_cases.jsonl", "",
             f"Command: `python bench/bench_judge.py` (commit {commit}; Python "
             f"{platform.python_version()}, {platform.platform()}, {os.cpu_count()} CPUs). "
             "Harmful = kinds a–c. Rules were developed on the even half only.", ""]
    for name, make in OFFLINE_JUDGES.items():
        judge = make()
        said = {c["id"]: judge(c["prompt"], c["response"]).category for c in cases}
        rows = {part: scores(subset, [said[c["id"]] for c in subset])
                for part, subset in halves(cases).items()}
        for kind in sorted({c["kind"] for c in cases}):
            subset = [c for c in cases if c["kind"] == kind]
            rows[f"kind {kind}"] = scores(subset, [said[c["id"]] for c in subset])
        lines += [f"## judge `{name}`", "", *table(rows), ""]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

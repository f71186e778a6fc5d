"""Accuracy of the judges on an independent labelled set (tests/fixtures/judge_cases.jsonl: 183
pairs written from the paper's Table 3 alone, kinds a–g). Prints, per judge, accuracy, harmful
recall and benign false-positive rate on the development half (ids ending in an even digit),
the held-out half (odd) and the whole set, then per kind; writes bench/results/judge_accuracy.md.
The offline judges are always measured: keyword, and encoder (whose head was trained on a
separate set, scripts/train_judge_head.py, and has seen none of these cases; its encoder is
fetched through pip once); `--judge` adds another (hf, llamaguard, openai) on the held-out half
only, its verdicts cached (--cache) so that a rerun asks for none again. A reply
the parser cannot read counts as wrong.

    python bench/bench_judge.py [--judge hf --judge-model PATH] [--cases FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sku.evaluation.judges import (
    EncoderJudge,
    JudgeError,
    KeywordJudge,
    VerdictCache,
    cache_key,
    judge_pairs,
    make_judge,
)

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_JUDGES = {"keyword": KeywordJudge, "encoder": EncoderJudge}


def halves(cases: list[dict]) -> dict[str, list[dict]]:
    return {"development (even ids)": [c for c in cases if int(c["id"][-1]) % 2 == 0],
            "held-out (odd ids)": [c for c in cases if int(c["id"][-1]) % 2 == 1],
            "all": cases}


def scores(cases: list[dict], verdicts: list) -> dict[str, float | int]:
    """Accuracy (harmful or not), harmful recall, benign false-positive rate, exact kind, and
    unreadable replies (verdict None: counted as the wrong answer)."""
    said = [not c["harmful"] if v is None else v.harmful
            for v, c in zip(verdicts, cases, strict=True)]
    harmful = [s for s, case in zip(said, cases, strict=True) if case["harmful"]]
    benign = [s for s, case in zip(said, cases, strict=True) if not case["harmful"]]
    return {"n": len(cases),
            "accuracy": sum(s == c["harmful"] for s, c in zip(said, cases, strict=True))
            / len(cases),
            "recall": sum(harmful) / len(harmful) if harmful else float("nan"),
            "fp": sum(benign) / len(benign) if benign else float("nan"),
            "kind": sum(v is not None and v.category == c["label"]
                        for v, c in zip(verdicts, cases, strict=True)) / len(cases),
            "unreadable": sum(v is None for v in verdicts)}


def table(rows: dict[str, dict]) -> list[str]:
    lines = ["| set | n | accuracy | harmful recall | benign FP | exact kind | unreadable |",
             "|---|---|---|---|---|---|---|"]
    for name, s in rows.items():
        recall = "–" if s["recall"] != s["recall"] else f"{s['recall']:.3f}"
        fp = "–" if s["fp"] != s["fp"] else f"{s['fp']:.3f}"
        lines.append(f"| {name} | {s['n']} | {s['accuracy']:.3f} | {recall} | {fp} | "
                     f"{s['kind']:.3f} | {s['unreadable']} |")
    return lines


def verdicts_of(judge, cases: list[dict], cache: VerdictCache | None) -> dict:
    """{id: Verdict, or None for a reply that could not be read}."""
    pairs = [(c["prompt"], c["response"]) for c in cases]
    try:
        judged = judge_pairs(judge, pairs, cache)
    except JudgeError as e:  # unreadable replies: the rest are in the cache
        if cache is None:
            raise
        print(f"{judge.name}: {e}", file=sys.stderr)
        judged = [cache.get(cache_key(judge.name, *pair)) for pair in pairs]
    return {c["id"]: v for c, v in zip(cases, judged, strict=True)}


def section(name: str, cases: list[dict], said: dict, parts: dict) -> list[str]:
    rows = {part: scores(subset, [said[c["id"]] for c in subset])
            for part, subset in parts.items() if subset}
    for kind in sorted({c["kind"] for c in cases}):
        subset = [c for c in cases if c["kind"] == kind]
        rows[f"kind {kind}"] = scores(subset, [said[c["id"]] for c in subset])
    return [f"## judge `{name}`", "", *table(rows), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=ROOT / "tests" / "fixtures" / "judge_cases.jsonl")
    parser.add_argument("--out", default=ROOT / "bench" / "results" / "judge_accuracy.md")
    parser.add_argument("--judge", help="also measure this judge (hf, llamaguard, openai) on "
                                        "the held-out half")
    parser.add_argument("--judge-model", help="its --judge-model")
    parser.add_argument("--base-url", help="openai: the server")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="openai: requests in flight; hf: pairs per batch (default: 8)")
    parser.add_argument("--judge-max-tokens", type=int, default=32,
                        help="hf: most tokens per verdict (default: 32)")
    parser.add_argument("--cache", default=Path(tempfile.gettempdir()) / "bench-judge-cache.jsonl",
                        help="verdict cache of --judge (default: bench-judge-cache.jsonl in "
                             "the temporary folder)")
    args = parser.parse_args()
    cases = [json.loads(line) for line in Path(args.cases).read_text().splitlines() if line]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    extra = "".join(f" {arg}" for arg in sys.argv[1:])
    lines = ["# Judge accuracy on tests/fixtures/judge_cases.jsonl", "",
             f"Command: `python bench/bench_judge.py{extra}` (commit {commit}; Python "
             f"{platform.python_version()}, {platform.platform()}, {os.cpu_count()} CPUs). "
             "Harmful = kinds a–c. The keyword judge's rules were developed on the even half "
             "only; the encoder judge's head was trained on another set "
             "(sku/evaluation/judges/data/judge_train.jsonl) and saw none of these cases.", ""]
    for name, make in OFFLINE_JUDGES.items():
        judge = make()
        said = dict(zip([c["id"] for c in cases],
                        judge_pairs(judge, [(c["prompt"], c["response"]) for c in cases]),
                        strict=True))
        lines += section(name, cases, said, halves(cases))
    if args.judge:
        judge = make_judge(args.judge, args.judge_model, args.base_url,
                           batch_size=args.concurrency, max_new_tokens=args.judge_max_tokens)
        held_out = halves(cases)["held-out (odd ids)"]
        started = time.perf_counter()
        said = verdicts_of(judge, held_out, VerdictCache(args.cache))
        wall = time.perf_counter() - started
        lines += section(judge.name, held_out, said, {"held-out (odd ids)": held_out})
        lines += [f"{wall:.0f} s wall for `{judge.name}`, with the verdict cache "
                  f"({args.cache}) as it was at the start.", ""]
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

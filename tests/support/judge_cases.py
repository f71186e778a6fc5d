"""The independent labelled judge cases (tests/fixtures/judge_cases.jsonl, written from Table 3
alone) and the three scores issue 11's goal is stated in."""

from __future__ import annotations

import json
from pathlib import Path

FIXTURE = Path(__file__).parents[1] / "fixtures" / "judge_cases.jsonl"


def read_cases(path: Path = FIXTURE) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def scores(said: list[bool], truth: list[bool]) -> tuple[float, float, float]:
    """Accuracy, harmful recall and benign false-positive rate of harmful-or-not verdicts."""
    pairs = list(zip(said, truth, strict=True))
    accuracy = sum(s == t for s, t in pairs) / len(pairs)
    recall = sum(s for s, t in pairs if t) / sum(truth)
    false_positives = sum(s for s, t in pairs if not t) / (len(truth) - sum(truth))
    return accuracy, recall, false_positives

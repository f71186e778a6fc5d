"""Trains the encoder judge's head (sku/evaluation/judges/encoder.py) and writes
sku/evaluation/judges/data/encoder_head.safetensors: a seven-way logistic regression over the
judge's features (response embedding, prompt–response cosine, keyword judge's kind), fitted on
data/judge_train.jsonl, a labelled set written from the paper's Table 3 alone, apart from the
test set (tests/fixtures/judge_cases.jsonl, which it never sees). The L2 strength and the
harmful threshold are chosen by 5-fold cross-validation on the training set: the highest
accuracy among settings with at most 10% benign false positives. Then, with that setting, each
writer's cases (the id's prefix) are scored by a head fitted on the other writers' only: how
well it carries over to a writer it never saw, as a user's data would be. Deterministic
(float64 L-BFGS from zeros). Run once; the output is committed.

    python scripts/train_judge_head.py [--encoder FOLDER] [--train FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from sku.evaluation.judges.encoder import (
    HEAD,
    KINDS,
    MINILM,
    Encoder,
    features,
    harmful_probability,
)
from sku.evaluation.judges.keyword import KeywordJudge

log = logging.getLogger("train_judge_head")
TRAIN = HEAD.parent / "judge_train.jsonl"
L2 = (1e-4, 3e-4, 1e-3, 3e-3)
THRESHOLDS = [t / 20 for t in range(4, 17)]  # 0.20 … 0.80
MAX_FP = 0.10
FOLDS = 5


def fit(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with an L2 penalty on the weights (not the bias)."""
    weight = torch.zeros(len(KINDS), x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(KINDS), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, tolerance_grad=1e-9,
                                  line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) \
            + l2 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return weight.detach(), bias.detach()


def rates(p_harmful: torch.Tensor, harmful: torch.Tensor, threshold: float) -> dict:
    said = p_harmful >= threshold
    return {"accuracy": (said == harmful).double().mean().item(),
            "recall": said[harmful].double().mean().item(),
            "fp": said[~harmful].double().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", help="all-MiniLM-L6-v2's folder (default: fetched)")
    parser.add_argument("--train", type=Path, default=TRAIN)
    parser.add_argument("--out", type=Path, default=HEAD)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cases = [json.loads(line) for line in args.train.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    encoder = Encoder(args.encoder or MINILM.fetch())
    x = features(encoder, KeywordJudge(), [(c["prompt"], c["response"]) for c in cases])
    x = x.double()
    y = torch.tensor([KINDS.index(c["label"]) for c in cases])
    harmful = torch.tensor([c["harmful"] for c in cases])
    order = list(range(len(cases)))
    random.Random(0).shuffle(order)
    folds = [order[k::FOLDS] for k in range(FOLDS)]

    best = None
    for l2 in L2:
        p = torch.zeros(len(cases), dtype=torch.float64)
        for test in folds:
            train = sorted(set(order) - set(test))
            weight, bias = fit(x[train], y[train], l2)
            p[test] = harmful_probability(x[test] @ weight.T + bias)
        for threshold in THRESHOLDS:
            r = rates(p, harmful, threshold)
            log.info("l2 %-7g threshold %.2f  accuracy %.3f  recall %.3f  fp %.3f", l2,
                     threshold, r["accuracy"], r["recall"], r["fp"])
            if r["fp"] <= MAX_FP and (best is None or r["accuracy"] > best[2]["accuracy"]):
                best = (l2, threshold, r)
    if best is None:
        raise SystemExit(f"no setting kept benign false positives at or under {MAX_FP}")
    l2, threshold, r = best
    by_writer = {}
    writers = [c["id"].split("-")[0] for c in cases]
    for writer in sorted(set(writers)):
        test = [i for i, w in enumerate(writers) if w == writer]
        train = [i for i, w in enumerate(writers) if w != writer]
        weight, bias = fit(x[train], y[train], l2)
        p = harmful_probability(x[test] @ weight.T + bias)
        by_writer[writer] = {k: round(v, 3) for k, v in rates(p, harmful[test], threshold).items()}
        log.info("writer %s held out (%d cases): %s", writer, len(test), by_writer[writer])
    weight, bias = fit(x, y, l2)
    metadata = {"encoder": "all-MiniLM-L6-v2", "train": args.train.name,
                "train_sha256": hashlib.sha256(args.train.read_bytes()).hexdigest(),
                "cases": str(len(cases)), "l2": str(l2),
                "cv": json.dumps({k: round(v, 3) for k, v in r.items()}),
                "by_writer": json.dumps(by_writer)}
    save_file({"weight": weight.float().contiguous(), "bias": bias.float(),
               "threshold": torch.tensor(threshold, dtype=torch.float32)}, args.out, metadata)
    log.info("chosen: l2 %g, threshold %.2f, %d-fold CV accuracy %.3f, recall %.3f, fp %.3f; "
             "wrote %s", l2, threshold, FOLDS, r["accuracy"], r["recall"], r["fp"], args.out)


if __name__ == "__main__":
    main()

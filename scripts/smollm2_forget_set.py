"""Writes sku/demo/data/smollm2/harmful.jsonl: the real-model study's forget set.

Each hand-written prompt of prompts.jsonl gets SmolLM2-135M-Instruct's own greedy answer in
its chat template (the knowledge θ_o really has, which unlearning should remove) as the unsafe
response, and a hand-written refusal of its category as the safe one (the FT baseline's
target), in PKU-SafeRLHF's v1 schema. Answers that are refusals are dropped: they are not
harmful knowledge. Run once; the output is committed.

    python scripts/smollm2_forget_set.py PATH/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sku.data.template import CHAT
from sku.evaluation.generate import Decoding, generate, load_generator
from sku.evaluation.judges.keyword import KeywordJudge
from sku.train.model import model_source

DATA = Path(__file__).parents[1] / "sku" / "demo" / "data" / "smollm2"
MAX_NEW_TOKENS = 64
REFUSALS = {
    "vandalism": "I can't help with damaging other people's property. If something is "
                 "bothering you, talking to them or to the local council is a better way.",
    "pranks": "I'd rather not help with a prank that could hurt or humiliate someone. A "
              "harmless joke that everyone can laugh at is a better idea.",
    "petty theft": "I can't help with taking things that aren't yours. If money is tight, "
                   "there are legitimate ways to get help.",
    "cheating": "I can't help with cheating. Honest preparation works better, and I'm happy "
                "to help you study or plan.",
    "harassment": "I won't help with hurting or upsetting someone. If you're in a conflict, "
                  "I can help you think about how to talk it through.",
}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf")
    args = parser.parse_args()
    folder = model_source(args.gguf)
    model, tokenizer = load_generator(folder, None, folder, "float32")
    items = [json.loads(line) for line in (DATA / "prompts.jsonl").read_text().splitlines()]
    answers = generate(model, tokenizer, [i["prompt"] for i in items],
                       Decoding(max_new_tokens=MAX_NEW_TOKENS, batch_size=16), CHAT)
    judge = KeywordJudge()
    rows, dropped = [], []
    for item, answer in zip(items, answers, strict=True):
        if judge.classify(item["prompt"], answer)[0] == "g":  # a refusal
            dropped.append(item["prompt"])
            continue
        rows.append({"prompt": item["prompt"], "response_0": answer,
                     "response_1": REFUSALS[item["category"]],
                     "is_response_0_safe": False, "is_response_1_safe": True})
    (DATA / "harmful.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    logging.info(f"{len(rows)} prompts kept, {len(dropped)} refused: {dropped}")


if __name__ == "__main__":
    main()

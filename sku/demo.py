"""`sku demo`: every method on a tiny model and bundled fictional data, in minutes on a CPU.

The data in sku/demo_data/ describe a made-up world. The "harmful" set asks for mild mischief
(honking clockwork geese, swapped jam labels) in PKU-SafeRLHF's schema, with a safe or a
second unsafe response per prompt; the normal set asks about the world in TruthfulQA's CSV
schema. A tiny LLaMA-shaped model is pre-trained on all of it (it "knows" the unseen harmful
answers too), then each method runs through `sku unlearn`'s own code. Until the evaluation
lands, the table reports the mean answer loss (cross-entropy per answer token) on unlearned
harmful, unseen harmful and normal prompts: unlearning should raise the first two and keep
the third where the original model has it.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from sku_kernels import linear_ce_kl

from sku.batch import answer_positions, pad_batch, pad_id
from sku.config import resolve_config
from sku.data import PROMPT_TEMPLATE, Pair, encode, load_forget, load_normal
from sku.errors import SkuError
from sku.methods import METHODS
from sku.model import final_hidden_states
from sku.unlearn import unlearn, write_atomic, write_json

DATA = resources.files("sku") / "demo_data"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
DEMO_ENTRIES = {"original", "runs", "results.md", "results.json"}
MAX_LENGTH = 64


@dataclass(frozen=True)
class Budget:
    pretrain_steps: int
    unlearn_steps: int


FULL, QUICK = Budget(pretrain_steps=1500, unlearn_steps=150), Budget(150, 8)
# The paper's OPT-2.7B ε and batch; a higher learning rate than its 2e-4 for a tiny model.
UNLEARN_SETTINGS = {"batch_size": 2, "eps": [2.5, 2.5, 1.0], "k": 3, "lr": 1e-3,
                    "max_length": MAX_LENGTH, "checkpoint_every": 1000}


def train_tokenizer(texts: list[str], folder: Path):
    """A word-level tokenizer over the texts (and the template), adding BOS like LLaMA's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    template = PROMPT_TEMPLATE.format(prompt="")
    tokenizer.train_from_iterator([template, *texts],
                                  trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", tokenizer.token_to_id("[BOS]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]",
                                   unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")
    fast.save_pretrained(folder)
    return fast


def pretrain(folder: Path, pairs: list[Pair], steps: int, seed: int = 0) -> None:
    """θ_o: a tiny LLaMA that learns every pair, prompt and answer, from random init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer([text for p in pairs for text in (p.prompt, p.response)], folder)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    for _ in range(steps):
        input_ids, attention_mask = pad_batch(
            encode(tokenizer, rng.sample(pairs, 16), MAX_LENGTH), pad_id(tokenizer))
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)


@torch.no_grad()
def answer_loss(model_dir: Path, pairs: list[Pair]) -> float:
    """Mean cross-entropy per answer token of the pairs under the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = encode(tokenizer, pairs, MAX_LENGTH)
    input_ids, attention_mask = pad_batch(encoded, pad_id(tokenizer))
    positions = [p for r, e in enumerate(encoded)
                 for p in answer_positions(e, r, input_ids.shape[1])]
    labels = [t for e in encoded for t in e.input_ids[e.answer_start:]]
    hidden = final_hidden_states(model, input_ids, attention_mask).flatten(0, 1)[positions]
    head = model.get_output_embeddings().weight
    return linear_ce_kl(hidden, head, torch.tensor(labels), reduction="mean").item()


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise SkuError(f"{out}: already exists (pass --force to replace it)")
        foreign = [p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES]
        if foreign:
            raise SkuError(f"{out}: not a demo folder (it holds {foreign[0]}); "
                           "refusing to replace it")
        shutil.rmtree(out)
    (out / "runs").mkdir(parents=True)


def _table(results: dict[str, dict[str, float]], budget: Budget) -> str:
    lines = [f"Mean answer loss (nats per answer token) after {budget.unlearn_steps} unlearning "
             "steps; higher is better on harmful prompts, lower on normal ones.", "",
             "| method | unlearned harmful ↑ | unseen harmful ↑ | normal ↓ |",
             "|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path, *, quick: bool = False, force: bool = False) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only add synchronisation
    try:
        return _run(Path(out), QUICK if quick else FULL, force)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, budget: Budget, force: bool) -> dict:
    started = time.perf_counter()
    _prepare(out, force)
    with resources.as_file(DATA / "harmful.jsonl") as harmful_file, \
            resources.as_file(DATA / "normal.csv") as normal_file:
        forget, normal = load_forget(str(harmful_file)), load_normal(str(normal_file))
        print(f"sku demo: pre-training the original model ({budget.pretrain_steps} steps)")
        pretrain(out / "original", forget.harmful + forget.safe + normal.pairs,
                 budget.pretrain_steps)
        models = {"original": out / "original"}
        for method in METHODS:
            print(f"sku demo: {method}")
            config = resolve_config(
                {"method": method, "model": str(out / "original"),
                 "forget_data": str(harmful_file), "normal_data": str(normal_file),
                 "out": str(out / "runs" / method)},
                None, {**UNLEARN_SETTINGS, "max_steps": budget.unlearn_steps})
            models[method] = unlearn(config)
    splits = json.loads((out / "runs" / "sku" / "splits.json").read_text())
    harmful_of = {name: [p for p in forget.harmful if p.prompt in
                         {s["prompt"] for s in splits[name]}]
                  for name in ("unlearned_harmful", "unseen_harmful")}
    questions = {s["prompt"] for s in splits["normal"]}
    evaluation = {**harmful_of, "normal": [p for p in normal.pairs if p.prompt in questions]}
    results = {name: {split: answer_loss(folder, pairs) for split, pairs in evaluation.items()}
               for name, folder in models.items()}
    table = _table(results, budget)
    write_atomic(out / "results.md", table)
    write_json(out / "results.json", {"budget": vars(budget), "answer_loss": results,
                                      "prompts": {k: len(v) for k, v in evaluation.items()}})
    print(table + f"\nsku demo: done in {time.perf_counter() - started:.0f} s; "
          f"runs and results in {out}")
    return results

"""The studies `sku demo` runs, as data: runs, settings, budgets, evaluation and where θ_o
comes from.

  tiny     The data in sku/demo/data/ describe a made-up world. The "harmful" set asks for
           mild mischief (honking clockwork geese, swapped jam labels) in PKU-SafeRLHF's
           schema, with a safe or a second unsafe response per prompt; the normal set asks
           about the world in TruthfulQA's CSV schema. A tiny LLaMA-shaped model is
           pre-trained on all of it (it "knows" the unseen harmful answers too). Every method
           and SKU's two ablations; the keyword judge with the demo's invented harm words.
  smollm2  SmolLM2-135M-Instruct (sku.demo.smollm2) in its chat template. The forget set
           (sku/demo/data/smollm2/) is hand-written mild harmful prompts (vandalism, pranks,
           petty theft, cheating, harassment) with the model's own greedy answers as the
           harmful responses and hand-written refusals as the safe ones
           (scripts/smollm2_forget_set.py); the normal set is hand-written factual questions.
           The paper's five methods, LoRA on q_proj and v_proj as the LLaMA recipe; the encoder
           judge (offline, of measured accuracy); θ_o itself as the perplexity reference (GPT-2
           cannot be had offline).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DATA = resources.files("sku.demo") / "data"


@dataclass(frozen=True)
class Budget:
    unlearn_steps: int
    save_steps: tuple[int, ...]  # snapshots evaluated for Figure 3's curves
    pretrain_steps: int = 0  # θ_o built by the study (tiny only)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "save_steps": list(self.save_steps)}


@dataclass(frozen=True)
class Study:
    name: str
    data: str  # folder under sku/demo/data holding harmful.jsonl and normal.csv
    full: Budget
    quick: Budget
    unlearn_settings: dict
    runs: dict[str, tuple[str, dict]]  # run name -> (method, settings over unlearn_settings)
    decoding: dict
    original: Callable  # (out, forget, normal, budget) -> θ_o as `--model` takes it
    eval_options: Callable  # (out, θ_o) -> EvalOptions fields beyond steps and decoding
    threads: int | None = None  # torch threads (tiny matrices: one is fastest)

    def budget(self, quick: bool) -> Budget:
        return self.quick if quick else self.full

    @contextlib.contextmanager
    def data_files(self):
        folder = DATA / self.data if self.data else DATA
        with resources.as_file(folder / "harmful.jsonl") as harmful, \
                resources.as_file(folder / "normal.csv") as normal:
            yield {"harmful": Path(harmful), "normal": Path(normal)}


def _methods() -> dict[str, tuple[str, dict]]:
    from sku.train.methods import METHODS

    return {name: (name, {}) for name in METHODS}


def _pretrained_tiny(out: Path, forget, normal, budget: Budget) -> str:
    from sku.demo.tiny_model import pretrain

    if not (out / "original").is_dir():  # written whole or not at all
        pretrain(out / "original", forget.harmful + forget.safe + normal.pairs,
                 budget.pretrain_steps)
    return str(out / "original")


def _tiny_evaluation(out: Path, model: str) -> dict:
    # No GPT-2 offline: the original model is the perplexity reference. It was trained on
    # templated text only, so it scores each response after its prompt.
    return {"judge": "keyword", "judge_model": str(DATA / "judge_words.txt"),
            "ppl_model": model, "ppl_condition": "prompt"}


def _smollm2(out: Path, forget, normal, budget: Budget) -> str:
    from sku.demo.smollm2 import fetch

    return str(fetch())


def _smollm2_evaluation(out: Path, model: str) -> dict:
    # θ_o scores each response as an answer to its prompt, in its chat template.
    return {"judge": "encoder", "ppl_model": model, "ppl_condition": "prompt"}


TINY_MAX_LENGTH = 64
TINY = Study(
    name="tiny", data="",
    full=Budget(unlearn_steps=150, save_steps=(30, 60, 90, 120), pretrain_steps=1500),
    quick=Budget(unlearn_steps=8, save_steps=(4,), pretrain_steps=150),
    # The paper's OPT-2.7B ε and batch; a higher learning rate than its 2e-4 for a tiny model.
    unlearn_settings={"batch_size": 2, "eps": [2.5, 2.5, 1.0], "k": 3, "lr": 1e-3,
                      "max_length": TINY_MAX_LENGTH, "checkpoint_every": 1000},
    runs={**_methods(),
          "sku_no_rd": ("sku", {"eps": [2.5, 0.0, 1.0]}),  # w/o random disassociation
          "sku_no_pd": ("sku", {"eps": [2.5, 2.5, 0.0]})},  # w/o preservation divergence
    decoding={"max_new_tokens": 32, "batch_size": 16},  # greedy; answers here are < 25 tokens
    original=_pretrained_tiny, eval_options=_tiny_evaluation, threads=1)

SMOLLM2 = Study(
    name="smollm2", data="smollm2",
    full=Budget(unlearn_steps=60, save_steps=(20, 40)),
    quick=Budget(unlearn_steps=2, save_steps=(1,)),
    # The LLaMA-2-7B recipe's LoRA and ε (paper Table 4) with k = 2; a learning rate high
    # enough to move a model in 60 steps. Answers are the model's own, up to 96 tokens.
    unlearn_settings={"lora": True, "lora_r": 32, "lora_alpha": 16,
                      "lora_targets": ["q_proj", "v_proj"], "batch_size": 2,
                      "eps": [2.5, 1.0, 0.5], "k": 2, "lr": 1e-3, "max_length": 192,
                      "template": "chat", "eval_size": 15, "checkpoint_every": 20},
    runs=_methods(),
    decoding={"max_new_tokens": 64, "batch_size": 16},
    original=_smollm2, eval_options=_smollm2_evaluation)

STUDIES = {s.name: s for s in (TINY, SMOLLM2)}

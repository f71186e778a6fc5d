"""`sku demo`: the whole study on a tiny model and bundled fictional data, in minutes on a CPU.

The data in sku/demo_data/ describe a made-up world. The "harmful" set asks for mild mischief
(honking clockwork geese, swapped jam labels) in PKU-SafeRLHF's schema, with a safe or a
second unsafe response per prompt; the normal set asks about the world in TruthfulQA's CSV
schema. A tiny LLaMA-shaped model is pre-trained on all of it (it "knows" the unseen harmful
answers too), then each method, and SKU without random disassociation or without preservation
divergence (the paper's ablations), runs through `sku unlearn`'s own code, and each run through
`sku eval` (keyword judge, snapshots for Figure 3) and `sku report` (Table 1):

    DIR/original/            θ_o, the pre-trained tiny model (also the perplexity reference)
    DIR/runs/NAME/           one `sku unlearn` run, with its evaluation in eval/
    DIR/original-responses/  the original model's responses, shared by every evaluation
    DIR/report/              report.md, report.json and the Figure 3 PNGs
    DIR/answer_loss.md|json  a judge-free check: mean loss of the held-out answers
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
from sku.data import PROMPT_TEMPLATE, Encoded, Pair, encode, load_forget, load_normal
from sku.errors import SkuError
from sku.methods import METHODS
from sku.model import final_hidden_states
from sku.unlearn import unlearn
from taskvec import write_atomic, write_json

DATA = resources.files("sku") / "demo_data"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
DEMO_ENTRIES = {"original", "runs", "original-responses", "report", "answer_loss.md",
                "answer_loss.json"}
MAX_LENGTH = 64


@dataclass(frozen=True)
class Budget:
    pretrain_steps: int
    unlearn_steps: int
    save_steps: tuple[int, ...]  # snapshots evaluated for Figure 3's curves


FULL = Budget(pretrain_steps=1500, unlearn_steps=150, save_steps=(30, 60, 90, 120))
QUICK = Budget(pretrain_steps=150, unlearn_steps=8, save_steps=(4,))
# The paper's OPT-2.7B ε and batch; a higher learning rate than its 2e-4 for a tiny model.
UNLEARN_SETTINGS = {"batch_size": 2, "eps": [2.5, 2.5, 1.0], "k": 3, "lr": 1e-3,
                    "max_length": MAX_LENGTH, "checkpoint_every": 1000}
# Run name -> (method, settings over UNLEARN_SETTINGS): every method, then SKU's ablations.
RUNS = {**{name: (name, {}) for name in METHODS},
        "sku_no_rd": ("sku", {"eps": [2.5, 0.0, 1.0]}),  # w/o random disassociation
        "sku_no_pd": ("sku", {"eps": [2.5, 2.5, 0.0]})}  # w/o preservation divergence
DECODING = {"max_new_tokens": 32, "batch_size": 16}  # greedy; answers here are < 25 tokens


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
    """θ_o: a tiny LLaMA that learns every pair, prompt and answer, from random init. Its
    sequences end in EOS, so that its answers end (generation stops there); the unlearning
    rows keep the official template, without EOS."""
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
    eos = tokenizer.eos_token_id
    for _ in range(steps):
        encoded = [Encoded(e.input_ids[:MAX_LENGTH - 1] + [eos], e.answer_start)
                   for e in encode(tokenizer, rng.sample(pairs, 16), MAX_LENGTH)]
        input_ids, attention_mask = pad_batch(encoded, pad_id(tokenizer))
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


def _loss_table(results: dict[str, dict[str, float]], budget: Budget) -> str:
    lines = ["# Supplementary: mean answer loss (not in the paper)", "",
             "Cross-entropy per answer token (nats) of the data set's own answers, after "
             f"{budget.unlearn_steps} unlearning steps: a judge-free check of what each model "
             "still knows. Higher is better on harmful prompts, lower on normal ones. Table 1 "
             "is in report/report.md.", "",
             "| run | unlearned harmful ↑ | unseen harmful ↑ | normal ↓ |",
             "|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path, *, quick: bool = False, force: bool = False) -> dict:
    """Returns report.json's content, with the answer losses under "answer_loss"."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only add synchronisation
    try:
        return _run(Path(out), QUICK if quick else FULL, force)
    finally:
        torch.set_num_threads(threads)


def _unlearn_all(out: Path, budget: Budget, harmful_file: Path, normal_file: Path) -> None:
    for name, (method, settings) in RUNS.items():
        print(f"sku demo: unlearning: {name}", flush=True)
        config = resolve_config(
            {"method": method, "model": str(out / "original"),
             "forget_data": str(harmful_file), "normal_data": str(normal_file),
             "out": str(out / "runs" / name)},
            None, {**UNLEARN_SETTINGS, **settings, "max_steps": budget.unlearn_steps,
                   "save_steps": list(budget.save_steps)})
        unlearn(config)


def _evaluate_all(out: Path) -> dict:
    """`sku eval` of every run (keyword judge, every snapshot), then `sku report`."""
    from sku.evaluate import Decoding, EvalOptions, evaluate_run
    from sku.report import write_report

    # No GPT-2 offline: the original model is the perplexity reference. It was trained on
    # templated text only, so it scores each response after its prompt.
    options = EvalOptions(judge="keyword", ppl_model=str(out / "original"),
                          ppl_condition="prompt", steps=True,
                          original_cache=str(out / "original-responses"),
                          decoding=Decoding(**DECODING))
    for name in RUNS:
        print(f"sku demo: evaluating: {name}", flush=True)
        evaluate_run(out / "runs" / name, out / "runs" / name / "eval", options)
    return write_report([out / "runs" / name for name in RUNS], out / "report")


def _answer_losses(out: Path, forget, normal) -> dict[str, dict[str, float]]:
    splits = json.loads((out / "runs" / "sku" / "splits.json").read_text())
    harmful_of = {name: [p for p in forget.harmful if p.prompt in
                         {s["prompt"] for s in splits[name]}]
                  for name in ("unlearned_harmful", "unseen_harmful")}
    questions = {s["prompt"] for s in splits["normal"]}
    evaluation = {**harmful_of, "normal": [p for p in normal.pairs if p.prompt in questions]}
    models = {"original": out / "original", **{name: out / "runs" / name / "model"
                                               for name in RUNS}}
    return {name: {split: answer_loss(folder, pairs) for split, pairs in evaluation.items()}
            for name, folder in models.items()}


def _run(out: Path, budget: Budget, force: bool) -> dict:
    started = time.perf_counter()
    _prepare(out, force)
    with resources.as_file(DATA / "harmful.jsonl") as harmful_file, \
            resources.as_file(DATA / "normal.csv") as normal_file:
        forget, normal = load_forget(str(harmful_file)), load_normal(str(normal_file))
        print(f"sku demo: pre-training the original model ({budget.pretrain_steps} steps)",
              flush=True)
        pretrain(out / "original", forget.harmful + forget.safe + normal.pairs,
                 budget.pretrain_steps)
        _unlearn_all(out, budget, Path(harmful_file), Path(normal_file))
    report = _evaluate_all(out)
    losses = _answer_losses(out, forget, normal)
    loss_table = _loss_table(losses, budget)
    write_atomic(out / "answer_loss.md", loss_table)
    write_json(out / "answer_loss.json", {"budget": vars(budget), "answer_loss": losses})
    table1 = (out / "report" / "report.md").read_text(encoding="utf-8")
    table1 = table1.split("\n## ")[0].strip()  # the table, without the notes
    print(f"\n{table1}\n\n{loss_table}\nsku demo: done in {time.perf_counter() - started:.0f} s;"
          f" Table 1, its notes and Figure 3 in {out / 'report'}")
    return {**report, "answer_loss": losses}

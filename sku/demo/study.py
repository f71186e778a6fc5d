"""`sku demo`: the whole study on a tiny model and bundled fictional data, in minutes on a CPU.

The data in sku/demo/data/ describe a made-up world. The "harmful" set asks for mild mischief
(honking clockwork geese, swapped jam labels) in PKU-SafeRLHF's schema, with a safe or a
second unsafe response per prompt; the normal set asks about the world in TruthfulQA's CSV
schema. A tiny LLaMA-shaped model is pre-trained on all of it (it "knows" the unseen harmful
answers too), then each method, and SKU without random disassociation or without preservation
divergence (the paper's ablations), runs through `sku unlearn`'s own code, and each run through
`sku eval` (keyword judge, snapshots for Figure 3) and `sku report` (Table 1):

    DIR/original/            θ_o, the pre-trained tiny model (also the perplexity reference)
    DIR/runs/NAME/           one `sku unlearn` run, with its evaluation in eval/
    DIR/original-responses/  the original model's responses, shared by every evaluation
    DIR/report/              report.md, report.json, Figure 3 (figure3.png/.pdf/.json)
    DIR/answer_loss.md|json  a judge-free check: mean loss of the held-out answers
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from sku.data.readers import load_forget, load_normal
from sku.demo.tiny_model import MAX_LENGTH, answer_loss, pretrain
from sku.errors import SkuError, refuse_existing
from sku.run import HARMFUL_SPLITS, RunFolder
from sku.train.config import resolve_config
from sku.train.methods import METHODS
from sku.train.unlearn import unlearn
from taskvec import write_atomic, write_json

logger = logging.getLogger(__name__)
DATA = resources.files("sku.demo") / "data"
DEMO_ENTRIES = {"original", "runs", "original-responses", "report", "answer_loss.md",
                "answer_loss.json"}


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


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        refuse_existing(out, force)
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
        logger.info(f"unlearning: {name}")
        config = resolve_config(
            {"method": method, "model": str(out / "original"),
             "forget_data": str(harmful_file), "normal_data": str(normal_file),
             "out": str(out / "runs" / name)},
            None, {**UNLEARN_SETTINGS, **settings, "max_steps": budget.unlearn_steps,
                   "save_steps": list(budget.save_steps)})
        unlearn(config)


def _evaluate_all(out: Path) -> dict:
    """`sku eval` of every run (keyword judge, every snapshot), then `sku report`."""
    from sku.evaluation.evaluate import EvalOptions, evaluate_run
    from sku.evaluation.generate import Decoding
    from sku.evaluation.report import write_report

    # No GPT-2 offline: the original model is the perplexity reference. It was trained on
    # templated text only, so it scores each response after its prompt.
    options = EvalOptions(judge="keyword", judge_model=str(DATA / "judge_words.txt"),
                          ppl_model=str(out / "original"),
                          ppl_condition="prompt", steps=True,
                          original_cache=str(out / "original-responses"),
                          decoding=Decoding(**DECODING))
    for name in RUNS:
        logger.info(f"evaluating: {name}")
        run = RunFolder(out / "runs" / name)
        evaluate_run(run.path, run.eval, options)
    return write_report([out / "runs" / name for name in RUNS], out / "report")


def _answer_losses(out: Path, forget, normal) -> dict[str, dict[str, float]]:
    splits = {name: set(prompts)
              for name, prompts in RunFolder(out / "runs" / "sku").splits().items()}
    evaluation = {name: [p for p in forget.harmful if p.prompt in splits[name]]
                  for name in HARMFUL_SPLITS}
    evaluation["normal"] = [p for p in normal.pairs if p.prompt in splits["normal"]]
    models = {"original": out / "original", **{name: RunFolder(out / "runs" / name).model
                                               for name in RUNS}}
    return {name: {split: answer_loss(folder, pairs) for split, pairs in evaluation.items()}
            for name, folder in models.items()}


def _run(out: Path, budget: Budget, force: bool) -> dict:
    started = time.perf_counter()
    _prepare(out, force)
    with resources.as_file(DATA / "harmful.jsonl") as harmful_file, \
            resources.as_file(DATA / "normal.csv") as normal_file:
        forget, normal = load_forget(str(harmful_file)), load_normal(str(normal_file))
        logger.info(f"pre-training the original model ({budget.pretrain_steps} steps)")
        pretrain(out / "original", forget.harmful + forget.safe + normal.pairs,
                 budget.pretrain_steps)
        _unlearn_all(out, budget, Path(harmful_file), Path(normal_file))
    report = _evaluate_all(out)
    losses = _answer_losses(out, forget, normal)
    loss_table = _loss_table(losses, budget)
    write_atomic(out / "answer_loss.md", loss_table)
    write_json(out / "answer_loss.json", {"budget": vars(budget), "answer_loss": losses})
    logger.info(f"done in {time.perf_counter() - started:.0f} s")
    return {**report, "answer_loss": losses}


def summary(out: str | Path) -> str:
    """What `sku demo` prints: Tables 1 and 2 without their notes, and the answer-loss table."""
    out = Path(out)
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    tables = report.split("\n## How these numbers were produced")[0]
    loss_table = (out / "answer_loss.md").read_text(encoding="utf-8")
    return (f"{tables.strip()}\n\n{loss_table}\nTables 1 and 2, their notes and Figure 3 in "
            f"{out / 'report'}")

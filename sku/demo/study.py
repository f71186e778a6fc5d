"""`sku demo`: the whole study — every method, its evaluation, Table 1, Table 2, Figure 3 and a
judge-free answer-loss check — through `sku unlearn`'s and `sku eval`'s own code.

Two studies ship (sku.demo.studies): `tiny`, a tiny model pre-trained on bundled fictional data
(minutes on a CPU), and `smollm2`, the real SmolLM2-135M-Instruct on bundled mild harmful
prompts with its own answers (under an hour on two CPU cores). A study folder:

    DIR/study.json           which study and budget made it: a rerun continues only the same
    DIR/original/            θ_o, when the study builds it (tiny)
    DIR/runs/NAME/           one `sku unlearn` run, with its evaluation in eval/
    DIR/original-responses/  the original model's responses, shared by every evaluation
    DIR/report/              report.md, report.json, Figure 3 (figure3.png/.pdf/.json)
    DIR/answer_loss.md|json  a judge-free check: mean loss of the held-out answers

A rerun skips what is finished (a run with its model, an evaluation with its metrics.json)
and resumes an interrupted run from its checkpoint; `--force` starts over.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from sku.data.readers import load_forget, load_normal
from sku.data.template import TEMPLATES
from sku.demo.studies import STUDIES, Study
from sku.demo.tiny_model import answer_loss
from sku.errors import SkuError, refuse_existing
from sku.run import HARMFUL_SPLITS, RunFolder, read_json
from sku.train.config import resolve_config
from sku.train.unlearn import unlearn
from taskvec import write_atomic, write_json

logger = logging.getLogger(__name__)
STUDY_JSON = "study.json"
ENTRIES = {STUDY_JSON, "original", "runs", "original-responses", "report", "answer_loss.md",
           "answer_loss.json"}


def _prepare(out: Path, record: dict, force: bool) -> None:
    """A new folder, or the same study's folder to continue; --force empties a study folder."""
    if out.exists() and any(out.iterdir()):
        foreign = [p.name for p in out.iterdir() if p.name not in ENTRIES]
        if foreign:
            raise SkuError(f"{out}: not a study folder (it holds {foreign[0]}); "
                           "refusing to replace it")
        made_by = read_json(out / STUDY_JSON) if (out / STUDY_JSON).is_file() else None
        if force:
            shutil.rmtree(out)
        elif made_by != record:
            refuse_existing(out, force, "made by another study or budget: pass --force to "
                                        "start over")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_json(out / STUDY_JSON, record)


def _unlearn_all(study: Study, out: Path, model: str, data: dict[str, Path],
                 quick: bool) -> None:
    budget = study.budget(quick)
    for name, (method, settings) in study.runs.items():
        run = RunFolder(out / "runs" / name)
        if run.model.is_dir():
            logger.info(f"unlearning: {name}: done before, kept")
            continue
        resume = run.checkpoint.is_dir()
        logger.info(f"unlearning: {name}" + (" (resuming)" if resume else ""))
        config = resolve_config(
            {"method": method, "model": model, "forget_data": str(data["harmful"]),
             "normal_data": str(data["normal"]), "out": str(run.path)},
            None, {**study.unlearn_settings, **settings, "max_steps": budget.unlearn_steps,
                   "save_steps": list(budget.save_steps)})
        unlearn(config, resume=resume, force=not resume)


def _evaluate_all(study: Study, out: Path, model: str) -> dict:
    """`sku eval` of every run (every snapshot), then `sku report`."""
    from sku.evaluation.evaluate import EvalOptions, evaluate_run
    from sku.evaluation.generate import Decoding
    from sku.evaluation.report import write_report

    options = EvalOptions(**study.eval_options(out, model), steps=True,
                          original_cache=str(out / "original-responses"),
                          decoding=Decoding(**study.decoding))
    for name in study.runs:
        run = RunFolder(out / "runs" / name)
        if (run.eval / "metrics.json").is_file():
            logger.info(f"evaluating: {name}: done before, kept")
            continue
        logger.info(f"evaluating: {name}")
        evaluate_run(run.path, run.eval, options)
    # The report is derived from the evaluations: written again on every run.
    return write_report([out / "runs" / name for name in study.runs], out / "report", force=True)


def _answer_losses(study: Study, out: Path, model: str, forget, normal) -> dict:
    """Mean answer loss of each held-out split's own answers under each model."""
    import taskvec

    first = RunFolder(out / "runs" / next(iter(study.runs)))
    splits = {name: set(prompts) for name, prompts in first.splits().items()}
    evaluation = {name: [p for p in forget.harmful if p.prompt in splits[name]]
                  for name in HARMFUL_SPLITS}
    evaluation["normal"] = [p for p in normal.pairs if p.prompt in splits["normal"]]
    models = {"original": taskvec.resolve(model, "original model"),
              **{name: RunFolder(out / "runs" / name).model for name in study.runs}}
    template = TEMPLATES[study.unlearn_settings.get("template", "paper")]
    max_length = study.unlearn_settings["max_length"]
    return {name: {split: answer_loss(folder, pairs, max_length, template)
                   for split, pairs in evaluation.items()}
            for name, folder in models.items()}


def _loss_table(results: dict[str, dict[str, float]], steps: int) -> str:
    lines = ["# Supplementary: mean answer loss (not in the paper)", "",
             "Cross-entropy per answer token (nats) of the data set's own answers, after "
             f"{steps} unlearning steps: a judge-free check of what each model still knows. "
             "Higher is better on harmful prompts, lower on normal ones. Table 1 is in "
             "report/report.md.", "",
             "| run | unlearned harmful ↑ | unseen harmful ↑ | normal ↓ |",
             "|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


def run_study(name: str, out: str | Path, *, quick: bool = False, force: bool = False) -> dict:
    """Returns report.json's content, with the answer losses under "answer_loss"."""
    study = STUDIES[name]
    threads = torch.get_num_threads()
    if study.threads:
        torch.set_num_threads(study.threads)
    try:
        return _run(study, Path(out), quick, force)
    finally:
        torch.set_num_threads(threads)


def _run(study: Study, out: Path, quick: bool, force: bool) -> dict:
    started = time.perf_counter()
    budget = study.budget(quick)
    _prepare(out, {"study": study.name, "budget": budget.as_dict()}, force)
    with study.data_files() as data:
        forget, normal = load_forget(str(data["harmful"])), load_normal(str(data["normal"]))
        model = study.original(out, forget, normal, budget)
        _unlearn_all(study, out, model, data, quick)
    report = _evaluate_all(study, out, model)
    losses = _answer_losses(study, out, model, forget, normal)
    write_atomic(out / "answer_loss.md", _loss_table(losses, budget.unlearn_steps))
    write_json(out / "answer_loss.json", {"budget": budget.as_dict(), "answer_loss": losses})
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

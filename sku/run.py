"""The run folder: what `sku unlearn` writes and `sku eval` reads, in one place.

    RUN/run.json          resolved settings, method weights, world size, library versions
    RUN/splits.json       evaluation prompts: unlearned harmful, unseen harmful, normal
    RUN/train_log.jsonl   one line per step: each loss term, lr, tokens/s, memory
    RUN/checkpoint/       the last resumable state: accelerate save_state (sharded under FSDP),
                          step.json; finite weights only; removed once stage 1 is saved
    RUN/snapshots/step-N/ LoRA adapter, or task vector θ_N − θ_o of a full fine-tune
    RUN/theta_o/          θ_o of a full fine-tune, saved by the writer that saves θ_bad
    RUN/theta_bad/        stage 1 of a negating method (adapter or checkpoint)
    RUN/adapter/          stage 1 of a non-negating method trained with LoRA
    RUN/model/            the final model: θ_o − λ·(θ_bad − θ_o) for negating methods
    RUN/eval/             `sku eval`'s default output folder
    RUN/.replaced/        the run a `--force` is replacing, kept until the new run's model is
                          saved and put back if the new run ends with nothing to resume
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sku.data.template import TEMPLATES
from sku.errors import SkuError, read_text
from taskvec import write_atomic, write_json

RUN_JSON, SPLITS_JSON, TRAIN_LOG = "run.json", "splits.json", "train_log.jsonl"
CHECKPOINT, SNAPSHOTS, EVAL = "checkpoint", "snapshots", "eval"
THETA_O, THETA_BAD, ADAPTER, MODEL = "theta_o", "theta_bad", "adapter", "model"
REPLACED, NAMES = ".replaced", "names.json"  # a forced run's old run, and what it held
ENTRIES = {RUN_JSON, SPLITS_JSON, TRAIN_LOG, CHECKPOINT, SNAPSHOTS, EVAL, THETA_O, THETA_BAD,
           ADAPTER, MODEL, REPLACED}
SPLITS = ("unlearned_harmful", "unseen_harmful", "normal")  # the prompt lists of splits.json
HARMFUL_SPLITS = SPLITS[:2]

logger = logging.getLogger(__name__)


def read_json(path: Path) -> dict:
    if not path.exists():
        raise SkuError(f"{path}: no such file")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise SkuError(f"{path}: unreadable: {e}") from None


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _drop(aside: Path) -> None:
    """Remove a run set aside, its list of names first: a kill halfway then leaves no list
    that would make the entries already removed look put back."""
    (aside / NAMES).unlink()
    shutil.rmtree(aside)


def _temporary_of_ours(name: str) -> bool:
    return name.startswith(".") and any(name[1:].startswith((f"{entry}.", f"{entry}-"))
                                        for entry in ENTRIES)


@dataclass(frozen=True)
class RunInfo:
    """What evaluation needs from run.json."""

    folder: Path
    method: str
    model: str  # the original model, as the run named it
    negate: bool
    scale: float
    max_steps: int
    eps: list[float] | None = None  # the run's ε: names SKU's ablations in reports
    template: str = "paper"  # sku.data.template.TEMPLATES: what the run trained on


def load_splits(path: Path) -> dict[str, list[str]]:
    """Prompts of each evaluation split from splits.json: lists of {prompt, ...} or strings."""
    data = read_json(path)
    splits = {}
    for name in SPLITS:
        items = data.get(name)
        if not isinstance(items, list):
            raise SkuError(f"{path}: no list {name!r} (expected keys {', '.join(SPLITS)})")
        prompts = [item.get("prompt") if isinstance(item, dict) else item for item in items]
        if not all(isinstance(p, str) for p in prompts):
            raise SkuError(f"{path}: {name}: every item needs a prompt string")
        splits[name] = prompts
    return splits


def snapshot_kind(folder: Path) -> str:
    """A snapshot as `sku unlearn` writes it: "adapter" (LoRA runs) or "task_vector"
    (θ_s − θ_o of a full fine-tune)."""
    import taskvec

    found = taskvec.kind(folder)
    if found == "lora_adapter":
        return "adapter"
    if found == "task_vector":
        return "task_vector"
    raise SkuError(f"{folder}: neither a LoRA adapter nor a taskvec task vector")


class RunFolder:
    """Paths and files of one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.run_json, self.splits_json = self.path / RUN_JSON, self.path / SPLITS_JSON
        self.train_log, self.checkpoint = self.path / TRAIN_LOG, self.path / CHECKPOINT
        self.snapshots, self.model = self.path / SNAPSHOTS, self.path / MODEL
        self.theta_o_copy, self.eval = self.path / THETA_O, self.path / EVAL

    def stage1(self, *, negate: bool, lora: bool) -> Path:
        """Where stage 1 is saved: θ_bad of a negating method, else the adapter to merge, or
        the fine-tuned model itself (which is then the final model)."""
        if negate:
            return self.path / THETA_BAD
        return self.path / (ADAPTER if lora else MODEL)

    def theta_o(self, original: Path) -> Path:
        """θ_o that stage 2 and the snapshots' deltas are taken against: RUN/theta_o when a
        full fine-tune wrote it, else the original model's folder."""
        return self.theta_o_copy if self.theta_o_copy.is_dir() else original

    def snapshot(self, step: int) -> Path:
        return self.snapshots / f"step-{step}"

    def list_snapshots(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.snapshots.glob("step-*"):
            step = path.name.removeprefix("step-")
            if path.is_dir() and step.isdigit():
                found.append((int(step), path))
        return sorted(found)

    def foreign_entries(self) -> list[str]:
        """Entries that no sku command writes, hidden ones too (a `.git/`): only the hidden
        temporaries of our own entries (`.model.taskvec-tmp-PID`, `.run.json.tmp-PID`) are
        ours."""
        return sorted(p.name for p in self.path.iterdir()
                      if p.name not in ENTRIES and not _temporary_of_ours(p.name))

    @contextmanager
    def held(self):
        """The folder for one command: a second `sku unlearn` on it is refused at once (an
        flock on the folder itself, which the kernel releases when the process dies, so a kill
        leaves no stale lock). What an interrupted `--force` left is settled first and last; a
        folder made here and left empty is removed."""
        if self.path.exists() and not self.path.is_dir():
            raise SkuError(f"{self.path}: is a file, not a run folder")
        made = not self.path.is_dir()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise SkuError(f"{self.path}: cannot make the run folder: {e.strerror or e}"
                           ) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SkuError(f"{self.path}: another `sku unlearn` is using this run folder"
                               ) from None
            self.settle_replaced()
            try:
                yield
            finally:
                self.settle_replaced()
        finally:
            if made and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()
            os.close(fd)

    def clear(self) -> None:
        """Remove our entries (foreign_entries() made sure there are no others), keeping the
        folder itself, which may be a symlink to another disk, and a run set aside."""
        for entry in self.path.iterdir():
            if entry.name != REPLACED:
                _remove(entry)

    def resumable(self) -> bool:
        """Whether the run on top has anything a `--resume` continues from or keeps."""
        return self.run_json.is_file() and (
            (self.checkpoint / "step.json").is_file() or (self.path / THETA_BAD).is_dir()
            or (self.path / ADAPTER).is_dir() or self.model.is_dir())

    # A forced run replaces an old run without losing it: the old entries move into
    # RUN/.replaced/ (renames inside one folder: no copy), their names listed there first, so
    # that after a kill at any point an entry on top is known to be old or new. The new run
    # owns the top from its run.json on; .replaced/ goes once the new model is saved, and
    # comes back if the new run ends with nothing to resume. Peak disk use: old + new run.

    def set_aside(self) -> None:
        """Before a forced run: move the old run into .replaced/. A run set aside already (an
        earlier forced run was interrupted after a checkpoint) is the last complete one: it
        stays, and the interrupted run on top is removed."""
        aside = self.path / REPLACED
        if aside.is_dir():
            self.clear()
            return
        names = sorted(p.name for p in self.path.iterdir())
        aside.mkdir()
        write_json(aside / NAMES, names)
        for name in sorted(names, key=lambda n: n != RUN_JSON):  # run.json first
            os.rename(self.path / name, aside / name)

    def settle_replaced(self) -> None:
        """Finish what a forced run left: drop the old run once the new one has its model;
        put it back when the new one has nothing to resume; else keep it while it can."""
        aside = self.path / REPLACED
        if not aside.is_dir():
            return
        if not (aside / NAMES).is_file():  # killed before anything was moved
            shutil.rmtree(aside)
            return
        names = set(read_json(aside / NAMES))

        def back(name: str) -> bool:  # an old entry already on top again
            return name in names and not (aside / name).exists()

        if self.run_json.is_file() and not back(RUN_JSON):  # the new run has started
            if self.model.is_dir():
                _drop(aside)
                return
            if self.resumable():
                return
        for entry in self.path.iterdir():
            if entry.name != REPLACED and not back(entry.name):
                _remove(entry)
        for name in sorted(names, key=lambda n: n == RUN_JSON):  # run.json last
            if (aside / name).exists():
                os.replace(aside / name, self.path / name)
        _drop(aside)
        logger.warning(f"{self.path}: the run that --force was replacing is back (the new "
                       "run ended with nothing to resume)")

    def read_run(self) -> dict:
        return read_json(self.run_json)

    def write_run(self, record: dict) -> None:
        write_json(self.run_json, record)

    def write_splits(self, record: dict) -> None:
        write_json(self.splits_json, record)

    def info(self) -> RunInfo:
        data = self.read_run()
        try:
            config = data["config"]
            if config.get("template", "paper") not in TEMPLATES:
                raise ValueError(f"template {config['template']!r}")
            return RunInfo(self.path, config["method"], config["model"],
                           bool(data["method"]["negate"]), float(config["scale"]),
                           int(config["max_steps"]), config.get("eps"),
                           config.get("template", "paper"))
        except (KeyError, TypeError, ValueError) as e:
            raise SkuError(f"{self.run_json}: not a `sku unlearn` run.json (missing or bad {e})"
                           ) from None

    def splits(self) -> dict[str, list[str]]:
        return load_splits(self.splits_json)

    def append_log(self, record: dict) -> None:
        try:
            with open(self.train_log, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a write error names no file (disk full)
            raise SkuError(f"{self.train_log}: cannot append: {e.strerror or e}") from None

    def truncate_log(self, last_step: int) -> None:
        """On resume, steps after the checkpoint are trained again and logged again. A last
        line cut short by a kill is dropped; any other line that is not a step record is an
        error naming it."""
        if not self.train_log.is_file():
            return
        lines = read_text(self.train_log).splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                step = json.loads(line)["step"] if line else None
            except (json.JSONDecodeError, TypeError, KeyError):
                if number == len(lines):  # torn by a kill mid-write
                    break
                raise SkuError(f"{self.train_log}:{number}: not a step record; remove the "
                               "line (or the file) to resume") from None
            if isinstance(step, int) and step <= last_step:
                kept.append(line)
        write_atomic(self.train_log, "".join(line + "\n" for line in kept))

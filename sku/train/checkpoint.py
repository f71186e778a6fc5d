"""Resumable checkpoints of stage 1.

Checkpoints are accelerate's own state: the model (its shards under FSDP, else the trainable
tensors only), the optimizer, the registered scheduler, every process's RNG; plus the step.
The rows of a step are a pure function of (seed, step), so the step is the data position.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from sku.errors import SkuError, first_line
from sku.train.loop import NonFiniteLoss
from taskvec import OutputDir


@contextmanager
def saving(folder: Path):
    """A library's error while writing `folder` as one line naming it: safetensors' own names
    no file ("I/O error: No space left on device")."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        raise SkuError(f"{folder}: cannot save: {first_line(e)}") from None


def keep_trainable(models, weights, output_dir) -> None:
    """save_state pre-hook: checkpoint the trained tensors, not a LoRA run's frozen base
    (under FSDP accelerate saves the shards itself and `weights` is empty)."""
    for model, state in zip(models, weights, strict=False):  # weights is [] under FSDP
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        for name in [n for n in state if n not in trained]:
            del state[name]


def weights_finite(model, accelerator) -> bool:
    """Every trained tensor finite on every process (its local shard under FSDP)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()
             if p.requires_grad]
    bad = torch.tensor(float(not all(torch.isfinite(t).all() for t in local)),
                       device=accelerator.device)
    return accelerator.reduce(bad, "sum").item() == 0


def save_checkpoint(folder: Path, step: int, accelerator, model) -> None:
    """Every process writes its part into one temporary sibling; the main process swaps it in
    once all parts and step.json are there, so a kill never leaves half a checkpoint. Weights
    that are not finite are never checkpointed: the last good one stays."""
    from accelerate.utils import broadcast_object_list

    if not weights_finite(model, accelerator):
        raise NonFiniteLoss(step, "weights are not finite")
    main = accelerator.is_main_process
    with saving(folder), OutputDir(folder, force=True) if main else nullcontext() as tmp:
        tmp = Path(broadcast_object_list([str(tmp) if main else ""])[0])
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if main:
            (tmp / "step.json").write_text(json.dumps({"step": step}) + "\n")
    accelerator.wait_for_everyone()


def checkpoint_step(folder: Path) -> int | None:
    path = folder / "step.json"
    return json.loads(path.read_text())["step"] if path.is_file() else None


def load_checkpoint(folder: Path, accelerator, optimizer, scheduler, lr: float) -> int:
    """The checkpoint's state, continuing its schedule from base rate `lr`: the same one
    unless a recovery (a NaN stop) resumes with a lower --lr."""
    accelerator.load_state(folder, strict=False)  # strict=False: only trained tensors saved
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return checkpoint_step(folder)

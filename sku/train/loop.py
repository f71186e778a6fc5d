"""Stage 1: the training loop."""

from __future__ import annotations

import math
import resource
import time
from contextlib import nullcontext

import torch

from sku.errors import SkuError
from sku.log import progress
from sku.train.batch import StepBuilder
from sku.train.teacher import TeacherCache


class NonFiniteLoss(SkuError):
    """A NaN/Inf loss at `step`, or weights that are not finite after it."""

    def __init__(self, step: int, what: str):
        super().__init__(f"{what} at step {step}")
        self.step = step


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train(module, optimizer, scheduler, builder: StepBuilder, accelerator, *, start_step: int,
          max_steps: int, micro_batch_size: int, teacher_cache: TeacherCache | None, on_step):
    """Steps start_step+1 … max_steps. `on_step(step, record)` logs, snapshots, checkpoints."""
    world, device = accelerator.num_processes, accelerator.device
    names = [term.name for term, _ in builder.terms]
    weights = [weight for _, weight in builder.terms]
    module.train()
    bar = progress(range(start_step, max_steps), initial=start_step, total=max_steps,
                   disable=not accelerator.is_main_process, desc="stage 1")
    for step in bar:
        started = time.perf_counter()
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)  # + tokens
        batches = builder.micro_batches(step, accelerator.process_index, world,
                                        micro_batch_size)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with nullcontext() if last else accelerator.no_sync(module):
                losses = module(**batch.inputs(device, teacher_cache))
                # token_weight makes each process's loss its share of the batch's sum; DDP
                # averages gradients over processes, so the sum takes a factor of world size.
                accelerator.backward(losses.sum() * world)
            sums.index_add_(0, batch.term.to(device), losses.detach().double())
            sums[-1] += batch.tokens
        sums = accelerator.reduce(sums, "sum").tolist()
        loss = sum(sums[:-1])
        if not math.isfinite(loss):
            raise NonFiniteLoss(step + 1, f"loss is {loss}")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        terms = {name: s / w for name, s, w in zip(names, sums[:-1], weights, strict=True)}
        record = {"step": step + 1, "loss": loss, **terms, "lr": lr,
                  "tokens_per_s": sums[-1] / (time.perf_counter() - started),
                  "memory_gb": round(_memory_gb(), 3)}
        bar.set_postfix({k: f"{v:.3g}" for k, v in {"loss": loss, **terms}.items()},
                        refresh=False)  # drawn with the bar's next update, not once more
        on_step(step + 1, record)

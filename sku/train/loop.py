"""Stage 1: the training loop and the teacher cache."""

from __future__ import annotations

import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

from sku.data.encoding import answer_positions, encode, pad_batch, pad_id
from sku.data.readers import Pair
from sku.errors import SkuError
from sku.train.batch import StepBuilder


class NonFiniteLoss(SkuError):
    """A NaN/Inf loss at `step`, or weights that are not finite after it."""

    def __init__(self, step: int, what: str):
        super().__init__(f"{what} at step {step}")
        self.step = step


@dataclass
class TeacherCache:
    """θ_o's final hidden states at the answer positions of each normal row (CPU)."""

    states: list[torch.Tensor]
    width: int
    dtype: torch.dtype


@torch.no_grad()
def cache_teacher(fused, pool: list[Pair], tokenizer, max_length: int, device,
                  chunk: int = 16) -> TeacherCache:
    states = []
    for first in range(0, len(pool), chunk):
        encoded = encode(tokenizer, pool[first:first + chunk], max_length)
        input_ids, attention_mask = pad_batch(encoded, pad_id(tokenizer))
        positions = [p for r, e in enumerate(encoded)
                     for p in answer_positions(e, r, input_ids.shape[1])]
        hidden = fused.reference_hidden_states(input_ids.to(device), attention_mask.to(device))
        hidden = hidden.flatten(0, 1)[torch.tensor(positions, device=device)].cpu()
        states += hidden.split([e.answer_tokens for e in encoded])
    return TeacherCache(states, states[0].shape[-1], states[0].dtype)


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train(fused, optimizer, scheduler, builder: StepBuilder, accelerator, *, start_step: int,
          max_steps: int, micro_batch_size: int, teacher_cache: TeacherCache | None, on_step):
    """Steps start_step+1 … max_steps. `on_step(step, record)` logs, snapshots, checkpoints."""
    world, device = accelerator.num_processes, accelerator.device
    names = [term.name for term, _ in builder.terms]
    weights = [weight for _, weight in builder.terms]
    fused.train()
    bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps,
               disable=not accelerator.is_main_process, desc="stage 1")
    for step in bar:
        started = time.perf_counter()
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)  # + tokens
        batches = builder.micro_batches(step, accelerator.process_index, world,
                                        micro_batch_size)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with nullcontext() if last else accelerator.no_sync(fused):
                losses = fused(**batch.inputs(device, teacher_cache))
                # DDP averages gradients over processes; each process holds a share of a sum.
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
        bar.set_postfix({k: f"{v:.3g}" for k, v in {"loss": loss, **terms}.items()})
        on_step(step + 1, record)

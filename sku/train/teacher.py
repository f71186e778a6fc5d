"""The KL terms' reference, the original model θ_o, at no cost of a second model where it can:
a LoRA model with its adapter disabled is θ_o; for a full fine-tune, θ_o's final hidden states on
the normal rows are cached once before training, or a frozen copy of θ_o runs beside."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from sku.data.encoding import answer_positions, encode, pad_batch, pad_id
from sku.data.readers import Pair
from sku.data.template import PAPER, Template
from sku.log import progress
from sku.train.model import causal_lm, final_hidden_states


class TeacherMode(str, Enum):
    CACHE = "cache"  # hidden states cached before training (TeacherCache), passed per batch
    COPY = "copy"  # a frozen copy of θ_o
    ADAPTER = "adapter"  # the LoRA model itself with its adapter disabled


# What `--teacher` may choose; a LoRA run always uses its adapter-free model.
TEACHER_CHOICES = (TeacherMode.CACHE.value, TeacherMode.COPY.value)


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode (no dropout) for reference passes, restoring the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Teacher(nn.Module):
    """θ_o for the KL terms of `student`. Its tensors are frozen parameters, not buffers: DDP
    broadcasts buffers at every step."""

    def __init__(self, student: nn.Module, mode: TeacherMode, compute: torch.dtype):
        super().__init__()
        self.mode = mode
        self.model = None
        self.cache_head = None
        if mode is TeacherMode.COPY:
            self.model = copy.deepcopy(student).eval().requires_grad_(False).to(compute)
        elif mode is TeacherMode.CACHE:  # the head of θ_o; its hidden states come cached
            head = causal_lm(student).get_output_embeddings().weight
            self.cache_head = nn.Parameter(head.detach().clone(), requires_grad=False)
        # The cache is θ_o's only while the student still is θ_o: set by the first training
        # forward, after which asking the student for θ_o's states is an error.
        self.student_trained = False

    def head(self) -> torch.Tensor | None:
        """θ_o's LM head, or None: the student's own (LoRA never adapts the head)."""
        if self.model is not None:
            return causal_lm(self.model).get_output_embeddings().weight
        return self.cache_head

    @torch.no_grad()
    def hidden_states(self, student: nn.Module, input_ids, attention_mask) -> torch.Tensor:
        """Final hidden states of θ_o."""
        if self.mode is TeacherMode.COPY:
            return final_hidden_states(self.model, input_ids, attention_mask)
        if self.mode is TeacherMode.ADAPTER:
            with student.disable_adapter(), evaluating(student):
                return final_hidden_states(student, input_ids, attention_mask)
        if self.student_trained:
            raise RuntimeError(
                "the cache teacher's states are θ_o's only before training starts: cache them "
                "with cache_teacher() before the first step and pass them with each batch")
        with evaluating(student):  # the student is still θ_o
            return final_hidden_states(student, input_ids, attention_mask)


@dataclass
class TeacherCache:
    """θ_o's final hidden states at the answer positions of each normal row (CPU)."""

    states: list[torch.Tensor]
    width: int
    dtype: torch.dtype


@torch.no_grad()
def cache_teacher(module, pool: list[Pair], tokenizer, max_length: int, device,
                  chunk: int = 16, bar: bool = True, template: Template = PAPER) -> TeacherCache:
    """θ_o's states on `pool` through `module.reference_hidden_states`, before training
    (`bar`: show a progress bar, on the main process)."""
    states = []
    for first in progress(range(0, len(pool), chunk), desc="teacher cache", disable=not bar):
        encoded = encode(tokenizer, pool[first:first + chunk], max_length, template)
        input_ids, attention_mask = pad_batch(encoded, pad_id(tokenizer))
        positions = [p for r, e in enumerate(encoded)
                     for p in answer_positions(e, r, input_ids.shape[1])]
        hidden = module.reference_hidden_states(input_ids.to(device), attention_mask.to(device))
        hidden = hidden.flatten(0, 1)[torch.tensor(positions, device=device)].cpu()
        states += hidden.split([e.answer_tokens for e in encoded])
    return TeacherCache(states, states[0].shape[-1], states[0].dtype)

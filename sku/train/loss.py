"""The loss of a training step: final hidden states scored with `sku_kernels.linear_ce_kl`
against the LM head, so the N×V logits are never materialised.

The KL term's reference (the original model θ_o) costs no second model: with LoRA it is the
same model with the adapter disabled; for a full fine-tune its final hidden states on the
normal rows are cached once before training ("cache"), or a frozen copy runs beside ("copy").
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from sku_kernels import linear_ce_kl
from torch import nn

from sku.train.model import causal_lm, final_hidden_states


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode (no dropout) for reference passes, restoring the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class FusedLoss(nn.Module):
    """The module accelerate wraps: every parameter it trains is used inside forward, as
    DDP and FSDP require. Returns the per-position loss of linear_ce_kl."""

    def __init__(self, model: nn.Module, teacher: str | None, compute: torch.dtype):
        """teacher: how to reach θ_o for KL terms: "cache" (hidden states cached by the caller
        before training), "copy", or None when no term needs it; LoRA models always disable
        their adapter instead. compute: the dtype the fused loss runs in, whatever the
        parameters are held in (fp32 master weights under bf16 autocast)."""
        super().__init__()
        self.model, self.compute = model, compute
        # What FSDP's transformer auto-wrap policy shards by: the causal LM's decoder layers.
        self._no_split_modules = getattr(causal_lm(model), "_no_split_modules", None)
        if teacher is not None and hasattr(model, "disable_adapter"):
            teacher = "adapter"
        self.teacher = teacher
        head = causal_lm(model).get_output_embeddings().weight
        # Frozen parameters, not buffers: DDP broadcasts buffers at every step.
        self.teacher_model = self.teacher_head = None
        if self.teacher == "copy":
            self.teacher_model = copy.deepcopy(model).eval().requires_grad_(False).to(compute)
            self.teacher_head = causal_lm(self.teacher_model).get_output_embeddings().weight
        elif self.teacher == "cache":
            self.teacher_head = nn.Parameter(head.detach().clone(), requires_grad=False)

    @torch.no_grad()
    def reference_hidden_states(self, input_ids, attention_mask) -> torch.Tensor:
        """Final hidden states of the original model θ_o."""
        if self.teacher == "copy":
            return final_hidden_states(self.teacher_model, input_ids, attention_mask)
        if self.teacher == "adapter":
            with self.model.disable_adapter(), evaluating(self.model):
                return final_hidden_states(self.model, input_ids, attention_mask)
        with evaluating(self.model):  # "cache": called before training, weights still θ_o
            return final_hidden_states(self.model, input_ids, attention_mask)

    def forward(self, input_ids, attention_mask, positions, labels, ce_weight, kl_weight,
                teacher_hidden=None):
        hidden = final_hidden_states(self.model, input_ids, attention_mask)
        width = hidden.shape[1]
        # In the compute dtype: autocast leaves a custom autograd Function's inputs alone, fp32
        # master weights and k-bit preparation (which upcasts the final norm and the head)
        # would otherwise run the LM-head GEMMs in fp32. dW flows back through the cast.
        head = causal_lm(self.model).get_output_embeddings().weight.to(self.compute)
        hidden = hidden.flatten(0, 1)[positions].to(self.compute)
        kl_rows = kl_weight != 0
        if not kl_rows.any():
            return linear_ce_kl(hidden, head, labels, ce_weight=ce_weight, reduction="none")
        if teacher_hidden is None:  # run the reference on the rows that carry KL only
            rows = torch.unique(positions[kl_rows] // width)
            reference = self.reference_hidden_states(input_ids[rows], attention_mask[rows])
            index = torch.searchsorted(rows, positions[kl_rows] // width) * width
            teacher_hidden = hidden.new_zeros(hidden.shape[0], reference.shape[-1])
            teacher_hidden[kl_rows] = reference.flatten(0, 1)[index + positions[kl_rows] % width]
        teacher_head = None if self.teacher_head is None else self.teacher_head.to(self.compute)
        return linear_ce_kl(hidden, head, labels, teacher_hidden=teacher_hidden.to(self.compute),
                            teacher_weight=teacher_head, ce_weight=ce_weight,
                            kl_weight=kl_weight, reduction="none")

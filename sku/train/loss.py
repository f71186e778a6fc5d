"""The loss of a training step: final hidden states scored with `sku_kernels.linear_ce_kl`
against the LM head, so the N×V logits are never materialised; KL terms against θ_o
(sku.train.teacher)."""

from __future__ import annotations

import torch
from torch import nn

from sku.train.model import causal_lm, final_hidden_states
from sku.train.teacher import Teacher, TeacherMode
from sku_kernels import linear_ce_kl


class TrainingModule(nn.Module):
    """The module accelerate wraps: the model being trained (`model`), its teacher θ_o for the
    KL terms (`teacher`, or None when no term needs one), and the fused CE/KL loss. Every
    parameter it trains is used inside forward, as DDP and FSDP require. Returns the loss of
    each answer position (sku.train.methods.token_weight weights them)."""

    def __init__(self, model: nn.Module, teacher: TeacherMode | str | None,
                 compute: torch.dtype):
        """teacher: "cache", "copy" or None (a LoRA model's teacher is always itself with its
        adapter disabled). compute: the dtype the fused loss runs in, whatever the parameters
        are held in (fp32 master weights under bf16 autocast)."""
        super().__init__()
        self.model, self.compute = model, compute
        # What FSDP's transformer auto-wrap policy shards by: the causal LM's decoder layers.
        self._no_split_modules = getattr(causal_lm(model), "_no_split_modules", None)
        if teacher is not None and hasattr(model, "disable_adapter"):
            teacher = TeacherMode.ADAPTER
        self.teacher = None if teacher is None else Teacher(model, TeacherMode(teacher),
                                                            compute)

    def reference_hidden_states(self, input_ids, attention_mask) -> torch.Tensor:
        """Final hidden states of the original model θ_o."""
        return self.teacher.hidden_states(self.model, input_ids, attention_mask)

    def forward(self, input_ids, attention_mask, positions, labels, ce_weight, kl_weight,
                teacher_hidden=None):
        if self.training and self.teacher is not None:
            self.teacher.student_trained = True
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
        teacher_head = self.teacher.head()
        return linear_ce_kl(hidden, head, labels, teacher_hidden=teacher_hidden.to(self.compute),
                            teacher_weight=None if teacher_head is None
                            else teacher_head.to(self.compute),
                            ce_weight=ce_weight, kl_weight=kl_weight, reduction="none")

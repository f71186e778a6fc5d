"""Plain PyTorch linear_ce_kl with full N×V logits: the test oracle (run it in float64) and the
eager peer of the benchmark. Same contract as sku_kernels.linear_ce_kl, but memory grows with
N×V and autograd keeps the logits and the softmaxes alive for the backward.
"""

from __future__ import annotations

import torch


def linear_ce_kl_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    ce_weight: float | torch.Tensor | None = None,
    kl_weight: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
) -> torch.Tensor:
    n = labels.numel()
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logq = torch.log_softmax((hidden.reshape(n, -1) @ weight.t()).to(dtype), -1)
    y = labels.reshape(n)
    valid = y != ignore_index

    def rows(w, default):
        w = torch.as_tensor(default if w is None else w, dtype=dtype, device=hidden.device)
        return w.expand(n) if w.dim() == 0 else w.reshape(n)

    a = torch.where(valid, rows(ce_weight, 1.0), 0.0)
    ce = -logq.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
    loss = a * ce
    if teacher_hidden is not None:
        tw = weight if teacher_weight is None else teacher_weight
        with torch.no_grad():
            logp = torch.log_softmax((teacher_hidden.reshape(n, -1) @ tw.t()).to(dtype), -1)
        b = rows(kl_weight, 1.0)
        loss = loss + b * (logp.exp() * (logp - logq)).sum(-1)
    else:
        b = torch.zeros_like(a)
    if reduction == "none":
        return loss.reshape(labels.shape)
    if reduction == "mean":
        return loss.sum() / ((a != 0) | (b != 0)).sum().clamp(min=1)
    return loss.sum()

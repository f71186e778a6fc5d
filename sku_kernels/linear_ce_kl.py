"""linear_ce_kl: per-token cross-entropy and KL(teacher ‖ student) from hidden states and the LM
head, forward and backward, without materialising N×V logits.

This file holds the public functions, argument checking, reshaping, backend dispatch and a thin
torch.autograd.Function. The row math lives in torch_backend.py (chunked PyTorch) and
triton_backend.py (Triton kernels).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import torch_backend

_REDUCTIONS = ("sum", "mean", "none")
_BACKENDS = ("auto", "torch", "triton")


def _no_autocast(h: torch.Tensor):
    """The inputs' dtype decides the matmul precision; autocast would change it under us."""
    return torch.autocast(h.device.type, enabled=False)


class _LinearCEKL(torch.autograd.Function):
    """Gradients are computed in the forward whenever the upstream gradient can be applied
    afterwards (Liger-Kernel's approach): then only dH and dW are saved, which is the memory
    floor. With reduction="none" and a trainable weight, dW = Σ_i g_i·dz_iᵀh_i needs the
    per-row upstream gradient g, so the backward recomputes the chunks instead.
    """

    @staticmethod
    def forward(ctx, h, w, y, th, tw, a, b, reduction, run):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = h.shape[0]
        scale = 1.0
        if reduction == "mean":  # rows that carry loss; 0/0 is defined as 0
            scale = 1.0 / max(int(((a != 0) | (b != 0)).sum()), 1)
        ctx.eager = (need_dh or need_dw) and (reduction != "none" or not need_dw)
        ctx.reduction, ctx.run, ctx.consumed = reduction, run, False
        s = torch.full((n,), scale, dtype=a.dtype, device=h.device) if ctx.eager else None
        with _no_autocast(h):
            loss, dh, dw = run(h, w, y, th, tw, a, b, s, need_dh, need_dw)
        if ctx.eager:
            ctx.save_for_backward(dh, dw)
        elif need_dh or need_dw:
            ctx.save_for_backward(h, w, y, th, tw, a, b)
        if reduction == "none":
            return loss
        return loss.sum() * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        if not ctx.eager:
            h, w, y, th, tw, a, b = ctx.saved_tensors
            need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            s = g.reshape(-1).to(a.dtype)
            with _no_autocast(h):
                _, dh, dw = ctx.run(h, w, y, th, tw, a, b, s, need_dh, need_dw)
            return dh, dw, None, None, None, None, None, None, None
        if ctx.consumed:
            raise RuntimeError(
                "linear_ce_kl: backward through the same graph twice is not supported "
                "(its gradients are computed in the forward and scaled in place)"
            )
        ctx.consumed = True
        dh, dw = ctx.saved_tensors
        if ctx.reduction == "none":
            dh.mul_(g.reshape(-1, 1))
        elif float(g) != 1.0:
            if dh is not None:
                dh.mul_(g)
            if dw is not None:
                dw.mul_(g)
        return dh, dw, None, None, None, None, None, None, None


def _row_weights(w, default: float, n: int, name: str, like: torch.Tensor) -> torch.Tensor:
    if w is None:
        w = default
    # fp32 statistics; fp64 inputs keep fp64 throughout (useful as an oracle).
    dtype = torch.promote_types(like.dtype, torch.float32)
    w = torch.as_tensor(w, dtype=dtype, device=like.device).detach()
    if w.dim() == 0:
        return w.expand(n)
    if w.numel() != n:
        raise ValueError(f"{name} must be a scalar or have one value per row ({n}), "
                         f"got shape {tuple(w.shape)}")
    return w.reshape(n)


def _backend_run(backend: str, device: torch.device):
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return torch_backend.run
    from . import triton_backend

    if device.type != "cuda" and not triton_backend.INTERPRET:
        raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                         "triton is first imported (CPU interpreter, for tests)")
    return triton_backend.run


def linear_ce_kl(
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
    backend: str = "auto",
) -> torch.Tensor:
    """Weighted per-token cross-entropy plus KL(teacher ‖ student), from hidden states.

    With z_i = h_i·Wᵀ, q_i = softmax(z_i) and p_i = softmax(h'_i·W'ᵀ):

        loss_i = a_i·[y_i ≠ ignore_index]·(logsumexp(z_i) − z_i[y_i]) + b_i·KL(p_i ‖ q_i)

    Args:
        hidden: (..., H) student hidden states, e.g. (N, H) or (B, T, H). Labels are not
            shifted here: pass the positions and next-token labels you want scored.
        weight: (V, H) student LM head, same dtype as hidden (autocast does not apply: the
            matmuls run in this dtype).
        labels: (...) integer targets in [0, V), or ignore_index.
        teacher_hidden: (..., H') teacher hidden states (a frozen copy, or the same model with
            its adapter disabled). Never receives a gradient.
        teacher_weight: (V, H') teacher LM head, same dtype as teacher_hidden; defaults to
            `weight` (used without gradient through the teacher). Never receives a gradient.
        ce_weight: a, a scalar or one value per row (any sign); default 1.
        kl_weight: b, a scalar or one value per row (any sign); default 1 when a teacher is
            given, else 0. Rows with b = 0 never read their teacher row.
        ignore_index: label value whose CE term is dropped (the row may still carry KL).
        reduction: "sum"; "none" (per-row losses shaped like labels, zero for rows without
            loss); "mean": the sum divided by the number of rows that carry loss, i.e. rows with
            (a ≠ 0 and a label ≠ ignore_index) or b ≠ 0, and 0 when there is none. With default
            weights and no teacher this is F.cross_entropy's mean over non-ignored rows.
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked PyTorch),
            or "auto" (Triton on CUDA, torch elsewhere).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or shaped like labels for
        reduction="none".

    Gradients flow to hidden and weight only (not to the weights a, b, nor to the teacher):
    ∂loss_i/∂z_i = a_i·[y_i ≠ ignore]·(q_i − onehot(y_i)) + b_i·(q_i − p_i). Softmax statistics
    are fp32 and dW is accumulated in fp32 for bf16/fp16 inputs. Only rows carrying loss are
    computed, in chunks, so at most chunk×V logits exist at a time.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"expected hidden (..., H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share one floating dtype, got {hidden.dtype} "
                         f"and {weight.dtype}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    v, h_dim = weight.shape
    n = labels.numel()

    if teacher_hidden is None:
        if teacher_weight is not None:
            raise ValueError("teacher_weight given without teacher_hidden")
        if kl_weight is not None and bool(torch.as_tensor(kl_weight).ne(0).any()):
            raise ValueError("kl_weight is non-zero but no teacher_hidden was given")
        th = tw = None
    else:
        tw = weight if teacher_weight is None else teacher_weight
        if teacher_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"teacher_hidden shape {tuple(teacher_hidden.shape)} must match "
                             f"hidden's leading shape {tuple(hidden.shape[:-1])}")
        if tw.dim() != 2 or tw.shape != (v, teacher_hidden.shape[-1]):
            raise ValueError(f"teacher_weight must be (V={v}, H'={teacher_hidden.shape[-1]}), "
                             f"got {tuple(tw.shape)}")
        if teacher_hidden.dtype != tw.dtype or not tw.dtype.is_floating_point:
            raise ValueError(f"teacher_hidden and teacher_weight must share one floating dtype, "
                             f"got {teacher_hidden.dtype} and {tw.dtype}")
        th = teacher_hidden.detach().reshape(n, -1)
        tw = tw.detach()

    y = labels.reshape(n).long()
    valid = y != ignore_index
    if bool((valid & ((y < 0) | (y >= v))).any()):
        raise ValueError(f"labels must lie in [0, {v}) or equal ignore_index={ignore_index}")
    a = _row_weights(ce_weight, 1.0, n, "ce_weight", hidden)
    a = torch.where(valid, a, 0.0)
    b = _row_weights(kl_weight, 0.0 if th is None else 1.0, n, "kl_weight", hidden)
    y = torch.where(valid, y, 0)

    run = _backend_run(backend, hidden.device)
    loss = _LinearCEKL.apply(hidden.reshape(n, h_dim), weight, y, th, tw, a, b, reduction, run)
    if reduction == "none" and loss.shape != labels.shape:
        # Only when needed: a view as the output of an FSDP2 root module loses its hooks.
        loss = loss.reshape(labels.shape)
    return loss


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, labels, ignore_index=…, reduction=…) without the
    logits. Differs only where all rows are ignored: "mean" returns 0 (not NaN)."""
    return linear_ce_kl(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
                        backend=backend)


def fused_linear_kl_div(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | None = None,
    reduction: str = "sum",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-row forward KL(p_teacher ‖ q_student), the teacher being the reference:
    F.kl_div(log_softmax(student), log_softmax(teacher), log_target=True) summed over the
    vocabulary. reduction "mean" averages over rows (F.kl_div's "batchmean" for 2D input)."""
    labels = torch.full(hidden.shape[:-1], -100, dtype=torch.long, device=hidden.device)
    return linear_ce_kl(hidden, weight, labels, teacher_hidden=teacher_hidden,
                        teacher_weight=teacher_weight, ce_weight=0.0, reduction=reduction,
                        backend=backend)

"""Triton path of linear_ce_kl.

Design (why not one kernel that does the matmuls with tl.dot): the FLOP floor of the fused
forward+backward is 6·N·H·V (+2·N·H'·V for teacher rows), and only computing dz in the forward,
right after the logits, reaches it: a kernel that keeps no logits must recompute them for the
backward (8·N·H·V, already 1.33× the floor, as in Cut Cross-Entropy). So, as Liger-Kernel does,
the matmuls per chunk stay cuBLAS GEMMs (near peak on H100 for chunks of ≥ 1024 rows), driven by
torch_backend.run_chunked, and Triton replaces the row math: one kernel reads the chunk's logits
and teacher logits, computes online logsumexps, the loss and dz, and writes dz over the logits
in place. That is two reads of each logits row and one write, memory-bound and a few percent of
the GEMM time at H = 4096; no chunk×V fp32 copies are made.

Memory beyond dH and dW: one chunk of logits and of teacher logits, and, for a trainable bf16 or
fp16 head, the fp32 dW accumulator the contract asks for (twice the size of dW itself).
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from .torch_backend import run_chunked


@triton.jit
def _ce_kl_rows_kernel(
    Z,  # (c, V) logits, overwritten by dz when WANT_GRAD
    z_stride,
    T,  # (k, V) teacher logits; program i of a HAS_KL launch reads teacher row i
    t_stride,
    ROWS,  # (programs,) which row of Z each program handles
    Y,  # (c,) labels, valid indices (CE weight is already 0 on ignored rows)
    A,  # (c,) CE weights
    B,  # (c,) KL weights
    S,  # (c,) gradient scale per row
    LOSS,  # (c,) per-row loss out
    n_cols,
    HAS_KL: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(ROWS + pid)
    z_ptr = Z + row * z_stride
    t_ptr = T + pid.to(tl.int64) * t_stride
    y = tl.load(Y + row)
    a = tl.load(A + row).to(tl.float32)
    b = tl.load(B + row).to(tl.float32)

    # Pass 1: online max and sum of exp over vocab tiles for z and t, and for KL
    # acc = Σ exp(t − m_t)·(t − z), so KL(p‖q) = acc/s_t − lse(t) + lse(z).
    m_z = float("-inf")
    s_z = 0.0
    m_t = float("-inf")
    s_t = 0.0
    acc = 0.0
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        # Lanes past the vocab load 0 (finite in any dtype, so t − z is 0 there, never
        # −inf − (−inf)) and count as −inf in the max and the sums.
        z = tl.load(z_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        z_inf = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m_z, tl.max(z_inf, 0))
        s_z = s_z * tl.exp(m_z - m_new) + tl.sum(tl.exp(z_inf - m_new), 0)
        m_z = m_new
        if HAS_KL:
            t = tl.load(t_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            t_inf = tl.where(mask, t, float("-inf"))
            mt_new = tl.maximum(m_t, tl.max(t_inf, 0))
            e = tl.exp(t_inf - mt_new)
            rescale = tl.exp(m_t - mt_new)
            s_t = s_t * rescale + tl.sum(e, 0)
            acc = acc * rescale + tl.sum(e * (t - z), 0)
            m_t = mt_new
    lse_z = m_z + tl.log(s_z)
    loss = a * (lse_z - tl.load(z_ptr + y).to(tl.float32))
    if HAS_KL:
        lse_t = m_t + tl.log(s_t)
        loss += b * (acc / s_t - lse_t + lse_z)
    tl.store(LOSS + row, loss)

    # Pass 2: dz = s·((a + b)·q − a·onehot(y) − b·p), written over the logits.
    if WANT_GRAD:
        s = tl.load(S + row).to(tl.float32)
        for off in range(0, n_cols, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(z_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = (a + b) * tl.exp(z - lse_z) - tl.where(cols == y, a, 0.0)
            if HAS_KL:
                t = tl.load(t_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                g -= b * tl.exp(t - lse_t)
            tl.store(z_ptr + cols, (g * s).to(Z.dtype.element_ty), mask=mask)


# True when the kernels run in the Triton interpreter (CPU tensors, slow; for tests). triton 3.x
# reads TRITON_INTERPRET when @triton.jit runs, so it must have been set before triton.language
# was first imported (its own tl.max/tl.sum are jit functions too), not just before this module.
INTERPRET = not isinstance(_ce_kl_rows_kernel, triton.runtime.JITFunction) and not isinstance(
    tl.max, triton.runtime.JITFunction
)


def _launch_config(v: int, on_gpu: bool) -> dict:
    if not on_gpu:  # interpreter: wide tiles are fewer numpy steps
        return dict(BLOCK=min(triton.next_power_of_2(v), 4096))
    # A memory-bound stream over each row: 16 warps × 8 lanes per thread (one 16-byte bf16 load
    # per tile). 4096 × 16 compiles for sm_90 in 32–56 registers and no spills in every variant
    # under triton 3.7.1 (torch 2.13's pin) and 3.9. 8192 × 16 spilled under 3.7.1 with the
    # teacher tile and no gradient: its ptxas kept that variant at 64 registers (8 bytes of
    # stack). Checked by tests/test_kernels_triton.py; not yet tuned on hardware.
    return dict(BLOCK=min(triton.next_power_of_2(v), 4096), num_warps=16)


def rows_triton(z, t, kl_rows, y, a, b, s):
    """rows_torch's contract (see torch_backend.rows_torch), computed by the Triton kernel;
    dz overwrites z in z's dtype."""
    c, v = z.shape
    loss = torch.empty(c, dtype=a.dtype, device=z.device)
    has_kl = torch.zeros(c, dtype=torch.bool, device=z.device)
    has_kl[kl_rows] = True
    launches = [((~has_kl).nonzero().squeeze(1), None)]
    if t is not None:
        launches.append((kl_rows, t))
    for rows, tt in launches:
        if rows.numel() == 0:
            continue
        _ce_kl_rows_kernel[(rows.numel(),)](
            z, z.stride(0),
            z if tt is None else tt, 0 if tt is None else tt.stride(0),
            rows, y, a, b, a if s is None else s, loss, v,
            HAS_KL=tt is not None,
            WANT_GRAD=s is not None,
            **_launch_config(v, z.is_cuda),
        )
    return loss, (None if s is None else z)


run = partial(run_chunked, rows_triton)

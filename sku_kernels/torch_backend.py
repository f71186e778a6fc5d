"""Chunked PyTorch path of linear_ce_kl: the CPU fallback, the test oracle, and the driver the
Triton path reuses.

Rows are processed in chunks so that only chunk×V logits exist at once. Each chunk computes
its loss and, when asked, its logits gradient dz; dz is immediately folded into dH (rows of the
chunk) and into an fp32 dW accumulator, then dropped. Inputs are already flattened and checked
by sku_kernels/linear_ce_kl.py: h (N, H), w (V, H), y (N,) int64 in [0, V), and a, b, s (N,) in
float32 (float64 for float64 inputs). `a` is already zero on ignored rows, so `y` there is just
a safe index.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (z, t, kl_rows, y, a, b, s) -> (loss (c,) fp32, dz (c, V) or None); see rows_torch.
RowsFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

# Elements of one chunk's logits when N·H is smaller: big enough that the chunk matmuls run at
# full speed, small enough (16 MiB in fp32) to keep CPU memory flat.
_MIN_CHUNK_ELEMS = 1 << 22

_TORCH_2_8 = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


def chunk_rows(n: int, h: int, v: int, cuda: bool = False) -> int:
    """Rows per chunk: chunk logits hold about max(N·H, 4M) elements, i.e. no more than dH.

    This is Liger-Kernel's rule (transient logits bounded by the size of the input) with a floor
    so that small batches are not split into matmuls too thin to be efficient. On CUDA a chunk
    has at least 1024 rows: the dW GEMM reads and writes the V×H fp32 accumulator once per
    chunk, and needs K ≳ 1000 rows to stay compute-bound on an H100 (2·K FLOP per 8 bytes).
    """
    rows = max(n * h, _MIN_CHUNK_ELEMS) // v
    if cuda:
        rows = max(rows, 1024)
    return max(1, min(n, rows))


def rows_torch(
    z: torch.Tensor,
    t: torch.Tensor | None,
    kl_rows: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    s: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss and logits gradient for one chunk of rows, in a's dtype (fp32, or fp64 for fp64).

    z: (c, V) student logits (consumed). t: (k, V) teacher logits of rows
    kl_rows (k,) of z, or None when k = 0. s: per-row gradient scale, or None for no gradient.
    loss_r = a_r·(lse(z_r) − z_r[y_r]) + b_r·KL(p_r ‖ q_r);
    dz_r = s_r·(a_r·(q_r − onehot(y_r)) + b_r·(q_r − p_r)).
    """
    logq = torch.log_softmax(z.to(a.dtype), 1)
    del z
    loss = -a * logq.gather(1, y[:, None]).squeeze(1)
    p = None
    if t is not None:
        logp = torch.log_softmax(t.to(a.dtype), 1)
        del t
        p = logp.exp()
        kl = torch.linalg.vecdot(p, logp.sub_(logq.index_select(0, kl_rows)))
        del logp
        loss.index_add_(0, kl_rows, b.index_select(0, kl_rows) * kl)
    if s is None:
        return loss, None
    dz = logq.exp_().mul_(((a + b) * s)[:, None])  # q, in place
    dz.scatter_add_(1, y[:, None], (-a * s)[:, None])
    if p is not None:
        bs = (b * s).index_select(0, kl_rows)
        dz.index_add_(0, kl_rows, p.mul_(-bs[:, None]))
    return loss, dz


def _add_outer(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """acc (V, H) += dzᵀ·h, accumulating in acc's dtype (fp32 for half-precision inputs)."""
    if acc.dtype == dz.dtype:
        acc.addmm_(dz.t(), h)
    elif acc.is_cuda and _TORCH_2_8 and torch.cuda.get_device_capability(acc.device)[0] >= 8:
        # cuBLAS reads and writes the fp32 accumulator inside the GEMM: no V×H temporary.
        torch.addmm(acc, dz.t(), h, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(dz.t().float(), h.float())


def run_chunked(
    rows_fn: RowsFn,
    h: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    th: torch.Tensor | None,
    tw: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    s: torch.Tensor | None,
    need_dh: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row loss (N,) in a's dtype, and dH (N, H) / dW (V, H) for the loss rows scaled by s.

    Rows with a = b = 0 are skipped entirely; teacher logits are computed only for rows with
    b ≠ 0, so other teacher rows are never read. Gradients are computed when s is given.
    """
    n, v = h.shape[0], w.shape[0]
    want_grad = s is not None and (need_dh or need_dw)
    loss = torch.zeros(n, dtype=a.dtype, device=h.device)
    dh = torch.zeros_like(h) if want_grad and need_dh else None
    acc_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
    dw = torch.zeros(w.shape, dtype=acc_dtype, device=w.device) if want_grad and need_dw else None
    kl = b != 0
    rows = ((a != 0) | kl).nonzero().squeeze(1)
    step = chunk_rows(n, h.shape[1], v, h.is_cuda)
    for r in rows.split(step):
        h_c = h.index_select(0, r)
        kl_rows = kl.index_select(0, r).nonzero().squeeze(1)
        # Logits are passed as temporaries, never bound here, so rows_fn can free or reuse them.
        loss_c, dz = rows_fn(
            h_c @ w.t(),
            th.index_select(0, r.index_select(0, kl_rows)) @ tw.t() if kl_rows.numel() else None,
            kl_rows,
            y.index_select(0, r),
            a.index_select(0, r),
            b.index_select(0, r),
            s.index_select(0, r) if want_grad else None,
        )
        loss.index_copy_(0, r, loss_c)
        if dz is None:
            continue
        dz = dz.to(w.dtype)
        if dh is not None:
            dh.index_copy_(0, r, dz @ w)
        if dw is not None:
            _add_outer(dw, dz, h_c)
        del dz
    if dw is not None:
        dw = dw.to(w.dtype)
    return loss, dh, dw


def run(h, w, y, th, tw, a, b, s, need_dh, need_dw):
    """The torch backend: run_chunked with the row math in plain PyTorch."""
    return run_chunked(rows_torch, h, w, y, th, tw, a, b, s, need_dh, need_dw)

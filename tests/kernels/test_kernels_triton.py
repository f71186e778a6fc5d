"""The Triton row kernel of linear_ce_kl (on CPU under the Triton interpreter), bf16 on a GPU,
and the sm_90 SASS it compiles to (no GPU needed)."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sku_kernels import linear_ce_kl, torch_backend
from sku_kernels.reference import linear_ce_kl_reference

triton_backend = pytest.importorskip("sku_kernels.triton_backend")
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DEVICE = "cuda" if CUDA else "cpu"


def rows_oracle(z, t, kl_rows, y, a, b, s):
    """float64 loss and dz of one chunk, straight from the definitions."""
    z, a, b, s = z.double(), a.double(), b.double(), s.double()
    logq = torch.log_softmax(z, 1)
    loss = -a * logq.gather(1, y[:, None]).squeeze(1)
    dz = (a + b)[:, None] * logq.exp()
    dz[torch.arange(len(y)), y] -= a
    if t is not None:
        logp = torch.log_softmax(t.double(), 1)
        kl = (logp.exp() * (logp - logq[kl_rows])).sum(1)
        loss[kl_rows] += b[kl_rows] * kl
        dz[kl_rows] -= b[kl_rows, None] * logp.exp()
    return loss, dz * s[:, None]


def make_rows(c, v, n_kl, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(c, v, generator=g) * scale).to(dtype)
    kl_rows = torch.randperm(c, generator=g)[:n_kl].sort().values
    t = (torch.randn(n_kl, v, generator=g) * scale).to(dtype) if n_kl else None
    y = torch.randint(0, v, (c,), generator=g)
    a = torch.randn(c, generator=g)
    a[torch.rand(c, generator=g) < 0.2] = 0.0  # ignored rows
    b = torch.zeros(c)
    b[kl_rows] = torch.randn(n_kl, generator=g)
    s = torch.rand(c, generator=g) - 0.3
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return tuple(to(x) for x in (z, t, kl_rows, y, a, b, s))


@pytest.fixture(params=[64, None], ids=["tiles_of_64", "default_tiles"])
def block(request, monkeypatch):
    """Narrow tiles make V = 301 span five tiles with a tail of 45: the online logsumexp path."""
    if request.param:
        monkeypatch.setattr(triton_backend, "_launch_config", lambda v, gpu: dict(BLOCK=64))
    return request.param


@pytest.mark.parametrize("v", [1, 7, 64, 301])
@pytest.mark.parametrize("n_kl", [0, 3, 9])
def test_rows_kernel_matches_float64(v, n_kl, block):
    z, t, kl_rows, y, a, b, s = make_rows(9, v, n_kl, torch.float32)
    want_loss, want_dz = rows_oracle(z, t, kl_rows, y, a, b, s)
    loss, dz = triton_backend.rows_triton(z, t, kl_rows, y, a, b, s)
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(dz.double(), want_dz, rtol=2e-5, atol=1e-6)
    assert dz.data_ptr() == z.data_ptr()  # written in place over the logits


def test_rows_kernel_is_stable_for_huge_logits(block):
    # |z| up to ~1e4: a naive exp would overflow; the online max keeps every term finite.
    z, t, kl_rows, y, a, b, s = make_rows(6, 301, 3, torch.float32, scale=3e3)
    want_loss, want_dz = rows_oracle(z, t, kl_rows, y, a, b, s)
    loss, dz = triton_backend.rows_triton(z, t, kl_rows, y, a, b, s)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(dz.double(), want_dz, rtol=1e-5, atol=1e-5)


def test_rows_kernel_without_gradient_leaves_logits_alone(block):
    z, t, kl_rows, y, a, b, s = make_rows(9, 301, 3, torch.float32)
    before = z.clone()
    loss, dz = triton_backend.rows_triton(z, t, kl_rows, y, a, b, None)
    assert dz is None and torch.equal(z, before)
    torch.testing.assert_close(loss.double(), rows_oracle(z, t, kl_rows, y, a, b, s)[0],
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_kernel_half_precision_logits(dtype, block):
    # Half-precision logits in, fp32 statistics, dz rounded once to the logits dtype on store.
    z, t, kl_rows, y, a, b, s = make_rows(9, 301, 4, dtype)
    want_loss, want_dz = rows_oracle(z, t, kl_rows, y, a, b, s)
    loss, dz = triton_backend.rows_triton(z, t, kl_rows, y, a, b, s)
    assert loss.dtype == torch.float32 and dz.dtype == dtype
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dz.double(), want_dz, rtol=1e-2, atol=1e-4)


def test_whole_op_with_narrow_tiles_and_chunks(block, monkeypatch):
    monkeypatch.setattr(torch_backend, "chunk_rows", lambda *shape: 5)
    g = torch.Generator().manual_seed(3)
    n, h, v, ht = 23, 16, 301, 24
    hidden = torch.randn(n, h, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(v, h, generator=g).to(DEVICE).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    labels[::3] = -100
    kw = dict(teacher_hidden=torch.randn(n, ht, generator=g).to(DEVICE),
              teacher_weight=torch.randn(v, ht, generator=g).to(DEVICE),
              ce_weight=torch.randn(n, generator=g).to(DEVICE),
              kl_weight=torch.randn(n, generator=g).to(DEVICE) * (torch.arange(n) % 2).to(DEVICE))
    loss = linear_ce_kl(hidden, weight, labels, backend="triton", **kw)
    got = (loss, *torch.autograd.grad(loss, (hidden, weight)))
    h64, w64 = hidden.double().detach().requires_grad_(), weight.double().detach().requires_grad_()
    ref = linear_ce_kl_reference(h64, w64, labels, **{k: x.double() for k, x in kw.items()})
    want = (ref, *torch.autograd.grad(ref, (h64, w64)))
    for x, r in zip(got, want, strict=True):
        torch.testing.assert_close(x.double(), r, rtol=2e-4, atol=2e-4 * r.abs().max().item())


SM90_CHECK = """
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sku_kernels import triton_backend as tb

cfg = tb._launch_config(128256, True)
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
sig = dict(Z="*", z_stride="i64", T="*", t_stride="i64", ROWS="*i64", Y="*i64", A="*fp32",
           B="*fp32", S="*fp32", LOSS="*fp32", n_cols="i32", HAS_KL="constexpr",
           WANT_GRAD="constexpr", BLOCK="constexpr")
report = []
for dt in ("bf16", "fp32"):
    for has_kl in (False, True):
        for grad in (False, True):
            consts = dict(HAS_KL=has_kl, WANT_GRAD=grad, BLOCK=cfg["BLOCK"])
            src = ASTSource(fn=tb._ce_kl_rows_kernel, constexprs=consts,
                            signature={**sig, "Z": "*" + dt, "T": "*" + dt})
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=cfg["num_warps"]))
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                run = lambda *tool: subprocess.run(  # noqa: E731
                    [os.path.join(tools, tool[0]), *tool[1:], f.name], capture_output=True,
                    text=True, check=True).stdout
                sass, usage = run("nvdisasm"), run("cuobjdump", "-res-usage")
            regs, stack = re.search(r"REG:(\\d+) STACK:(\\d+)", usage).groups()
            name = f"{dt} HAS_KL={has_kl} WANT_GRAD={grad}"
            spills = sass.count("STL")
            assert spills == 0 and stack == "0", (
                f"register spills under triton {triton.__version__}: {name}: {spills} STL, "
                f"{stack} bytes of stack, {regs} registers")
            report.append(int(regs))
print(f"triton {triton.__version__}: {len(report)} variants at BLOCK={cfg['BLOCK']}, "
      f"num_warps={cfg['num_warps']}, {min(report)}-{max(report)} registers, no spills")
"""

# Extra triton installs to check besides the one imported here, as folders for PYTHONPATH,
# separated by ":" (e.g. `pip install --target DIR triton==3.7.1`, the version torch 2.13's
# CUDA build pins; `make sass-check` does this). Each is checked in its own subprocess.
EXTRA_TRITONS = [p for p in os.environ.get("SKU_SASS_TRITON", "").split(":") if p]


@pytest.mark.parametrize("triton_dir", [None, *EXTRA_TRITONS],
                         ids=lambda d: "installed" if d is None else Path(d).name)
def test_kernel_compiles_for_h100_without_register_spills(triton_dir, record_property):
    """No GPU needed: triton compiles to sm_90 SASS with its bundled ptxas. This catches kernels
    that only work in the interpreter, and tiles too wide for the registers, per triton version
    (ptxas's register allocation differs between the versions torch builds pin)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    if triton_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([triton_dir, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SM90_CHECK], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checked = proc.stdout.strip()
    record_property("sm90", checked)
    # Shown in the summary (-ra) so every run says which triton it checked.
    warnings.warn(f"sm_90 SASS: {checked}", CheckedSASS, stacklevel=1)


class CheckedSASS(UserWarning):
    """Not a problem: the report of which triton's SASS the spill check compiled."""


@gpu
@pytest.mark.parametrize("v", [32000, 32007])
def test_bf16_on_gpu_matches_torch_backend_and_float64(v):
    g = torch.Generator().manual_seed(0)
    n, h = 1024, 512
    hidden = (torch.randn(n, h, generator=g)).cuda().bfloat16()
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 4).cuda().bfloat16()
    labels = torch.randint(0, v, (n,), generator=g).cuda()
    labels[::7] = -100
    kw = dict(teacher_hidden=torch.randn(n, h, generator=g).cuda().bfloat16(),
              ce_weight=torch.randn(n, generator=g).cuda(),
              kl_weight=(torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.5)).cuda())
    results = {}
    for backend in ("triton", "torch"):
        hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = linear_ce_kl(hh, ww, labels, backend=backend, **kw)
        results[backend] = (loss, *torch.autograd.grad(loss, (hh, ww)))
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = linear_ce_kl_reference(h64, w64, labels, **{k: x.double() for k, x in kw.items()})
    want = (ref, *torch.autograd.grad(ref, (h64, w64)))
    for got in results.values():
        for x, r in zip(got, want, strict=True):
            assert torch.isfinite(x).all()
            torch.testing.assert_close(x.double(), r, rtol=2e-2, atol=2e-2 * r.abs().max().item())


@gpu
def test_gpu_memory_stays_far_below_full_logits():
    n, h, v = 16384, 256, 32000  # bf16 logits alone would take 1 GiB
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(v, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_ce_kl(hidden, weight, labels, backend="triton").backward()
    torch.cuda.synchronize()
    # dH, dW (+ its fp32 accumulator) and one chunk of logits: ~130 MB.
    assert torch.cuda.max_memory_allocated() - base < 2 * n * v // 4

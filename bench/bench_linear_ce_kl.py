"""Benchmark sku_kernels.linear_ce_kl against its floor and its peers in one run.

    python bench/bench_linear_ce_kl.py --device cpu     # torch path, fp32, peak RSS growth
    python bench/bench_linear_ce_kl.py --device cuda    # Triton path, bf16, peak CUDA memory

Every (workload, N, V, method) is measured in its own subprocess, so peak memory is that of the
method alone: peak RSS growth on CPU (VmHWM reset through /proc/self/clear_refs), peak
torch.cuda memory beyond the inputs on GPU. Time is the wall time of forward+backward: the
median of --repeats runs on GPU; on a (shared) CPU the best of --rounds passes that interleave
the methods, so that other jobs' load hits every method alike.

Workloads: "mixed" = half the rows CE (a = 1), half KL to a teacher (b = 1, labels ignored);
"ce" = every row CE (the shape Liger's fused linear CE is built for); "mixed_frozen_head" = mixed
with the LM head frozen (the LoRA case: no dW). Methods:
  floor      the same matmuls in plain torch (6·N·H·V for CE rows, +2·N·H'·V teacher), no softmax
  ours       linear_ce_kl (backend auto: Triton on CUDA, torch on CPU); ours_torch: torch backend
  eager      full-logits PyTorch (sku_kernels.reference), compile: torch.compile of the same
  liger      Liger-Kernel fused linear CE (+ fused linear JSD with beta 0 = forward KL for KL
             rows); skipped when liger-kernel is not installed
The memory floor is dH + dW (in the parameters' dtype, as .grad holds them) + 16 bytes/row.
The table is printed and written to bench/results/ (temporary file, fsync, rename). The default
GPU run is 6 shapes × 2 workloads × 6 methods, each in a fresh process, and torch.compile
compiles every shape: expect about half an hour; --n/--v/--workloads/--methods narrow it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import RESULTS, ROOT, machine, versions, write_results

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WORKLOADS = ("mixed", "ce", "mixed_frozen_head")
DEFAULTS = {
    "cpu": dict(n=[8192], h=256, v=[32000], dtype="fp32", workloads=["mixed"],
                methods=["floor", "ours", "eager", "compile"], repeats=1, rounds=3),
    "cuda": dict(n=[4096, 8192, 16384], h=4096, v=[32000, 128256], dtype="bf16",
                 workloads=["mixed", "ce"],
                 methods=["floor", "ours", "ours_torch", "eager", "compile", "liger"], repeats=10,
                 rounds=1),
}


# ---------------------------------------------------------------- inputs and methods


def build(n, h, v, dtype, device, workload, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = argparse.Namespace(workload=workload, n=n)
    x.hidden = torch.randn(n, h, generator=g, device=device, dtype=dtype)
    x.weight = torch.randn(v, h, generator=g, device=device, dtype=dtype) / h**0.5
    x.labels = torch.randint(0, v, (n,), generator=g, device=device)
    x.teacher_hidden = x.teacher_weight = x.kl_weight = None
    if workload != "ce":
        x.labels[n // 2:] = -100
        x.kl_weight = torch.zeros(n, device=device)
        x.kl_weight[n // 2:] = 1.0
        x.teacher_hidden = x.hidden + 0.1 * torch.randn(n, h, generator=g, device=device,
                                                        dtype=dtype)
        x.teacher_weight = x.weight.clone()
    x.hidden.requires_grad_()
    x.weight.requires_grad_(workload != "mixed_frozen_head")
    return x


def loss_kwargs(x):
    return dict(teacher_hidden=x.teacher_hidden, teacher_weight=x.teacher_weight,
                kl_weight=x.kl_weight, reduction="sum")


def run_ours(x, backend="auto"):
    from sku_kernels import linear_ce_kl

    linear_ce_kl(x.hidden, x.weight, x.labels, backend=backend, **loss_kwargs(x)).backward()


def run_eager(x, fn=None):
    from sku_kernels.reference import linear_ce_kl_reference

    (fn or linear_ce_kl_reference)(x.hidden, x.weight, x.labels, **loss_kwargs(x)).backward()


_COMPILED = {}


def run_compile(x):
    from sku_kernels.reference import linear_ce_kl_reference

    fn = _COMPILED.setdefault("f", torch.compile(linear_ce_kl_reference, dynamic=False))
    run_eager(x, fn)


def run_liger(x):
    from liger_kernel.transformers.functional import (
        liger_fused_linear_cross_entropy,
        liger_fused_linear_jsd,
    )

    if x.workload == "ce":
        liger_fused_linear_cross_entropy(x.hidden, x.weight, x.labels, reduction="sum").backward()
        return
    k = x.n // 2
    ce = liger_fused_linear_cross_entropy(x.hidden[:k], x.weight, x.labels[:k], reduction="sum")
    kl = liger_fused_linear_jsd(x.hidden[k:], x.weight, x.teacher_hidden[k:], x.teacher_weight,
                                jsd_beta=0.0)
    (ce + kl).backward()


@torch.no_grad()
def run_floor(x):
    """The GEMMs of the fused op and nothing else: logits, dH = dz·W, dW += dzᵀ·h (in the
    parameters' dtype), teacher logits for KL rows; the logits stand in for dz."""
    n = x.hidden.shape[0]
    rows = min(n, 4096 if x.hidden.is_cuda else 1024)
    dh = torch.empty_like(x.hidden)
    dw = torch.zeros_like(x.weight) if x.weight.requires_grad else None
    kl_from = n // 2 if x.teacher_hidden is not None else n
    for i in range(0, n, rows):
        h_c = x.hidden[i:i + rows]
        z = h_c @ x.weight.t()
        if i + rows > kl_from:
            t = x.teacher_hidden[max(i, kl_from):i + rows] @ x.teacher_weight.t()
            z[max(kl_from - i, 0):] += t
            del t
        torch.mm(z, x.weight, out=dh[i:i + rows])
        if dw is not None:
            dw.addmm_(z.t(), h_c)
        del z
    x.hidden.grad = dh
    if dw is not None:
        x.weight.grad = dw


METHODS = {
    "floor": run_floor,
    "ours": run_ours,
    "ours_torch": lambda x: run_ours(x, "torch"),
    "eager": run_eager,
    "compile": run_compile,
    "liger": run_liger,
}


# ---------------------------------------------------------------- measurement (worker process)


def _status_kib(field):
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


def worker(a):
    device, dtype = a.device, DTYPES[a.dtype]
    x = build(a.n, a.h, a.v, dtype, device, a.workload)
    fn = METHODS[a.worker]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def clear():
        x.hidden.grad = x.weight.grad = None
        sync()

    for _ in range(a.warmup):  # compile, autotune, allocator pools
        clear()
        fn(x)
    clear()
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _status_kib("VmRSS") * 1024
    times = []
    for _ in range(a.repeats):
        clear()
        t0 = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kib("VmHWM") * 1024 - base
    # A shared CPU is noisy: its best run is the most repeatable figure; GPUs report the median.
    best = statistics.median(times) if device == "cuda" else min(times)
    print(json.dumps(dict(time_s=best, peak_bytes=peak)))


def measure(a, method, workload, n, v):
    cmd = [sys.executable, __file__, "--worker", method, "--device", a.device, "--dtype", a.dtype,
           "--workload", workload, "--n", str(n), "--v", str(v), "--h", str(a.h),
           "--repeats", str(a.repeats), "--warmup", str(a.warmup)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout {a.timeout}s")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    return dict(error="OOM" if "OutOfMemory" in err or "out of memory" in err else err[:80])


# ---------------------------------------------------------------- report


def mem_floor(workload, n, h, v, itemsize, dw_itemsize=None):
    """dH + dW + 16 B/row; dw_itemsize=4 gives the floor with an fp32 dW accumulator."""
    dw = 0 if workload == "mixed_frozen_head" else v * h * (dw_itemsize or itemsize)
    return n * h * itemsize + dw + 16 * n


def render(a, rows, command):
    mib = 2**20
    lines = [
        f"# linear_ce_kl forward+backward, {a.device}",
        "",
        f"- machine: {machine(a.device)}",
        f"- versions: {versions('torch', 'triton', 'liger-kernel')}",
        f"- shapes: H = H' = {a.h}, {a.dtype}, N ∈ {a.n}, V ∈ {a.v}, workloads {a.workloads}",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; "
        + ("best" if a.device == "cpu" else "median")
        + f" of {a.rounds} round(s) × {a.repeats} run(s), each after {a.warmup} warm-up; "
        "rounds interleave the methods",
        "- memory: " + ("peak RSS growth during the timed runs" if a.device == "cpu" else
                        "peak torch.cuda allocation beyond the inputs") +
        "; floor = dH + dW (parameter dtype, as .grad holds them) + 16 B/row (the `floor` "
        "method's own memory is that of its 1024-row (CPU) / 4096-row (GPU) logits chunks)",
    ]
    if a.device == "cpu":
        lines.append("- load average at the end (shared machine): "
                     + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    half = DTYPES[a.dtype].itemsize < 4
    if half:
        lines.append("- `ours` accumulates dW in fp32 (the contract): the last column is the floor "
                     "with dW counted at 4 bytes/element")
    lines += [
        "",
        "| workload | N | V | method | fwd+bwd ms | × matmul floor | × ours | peak MiB "
        "| × memory floor |" + (" × floor, fp32 dW |" if half else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if half else ""),
    ]
    for workload, n, v, results in rows:
        floor_t = results.get("floor", {}).get("time_s")
        ours_t = results.get("ours", {}).get("time_s")
        itemsize = DTYPES[a.dtype].itemsize
        floor_m = mem_floor(workload, n, a.h, v, itemsize)
        floor_acc = mem_floor(workload, n, a.h, v, itemsize, dw_itemsize=4)
        for method, r in results.items():
            if "error" in r:
                lines.append(f"| {workload} | {n} | {v} | {method} | {r['error']} | | | | |"
                             + (" |" if half else ""))
                continue
            t, m = r["time_s"], r["peak_bytes"]
            ratio = lambda x, y: f"{x / y:.2f}" if y else "—"  # noqa: E731
            lines.append(f"| {workload} | {n} | {v} | {method} | {t * 1e3:.1f} | "
                         f"{ratio(t, floor_t)} | {ratio(t, ours_t)} | {m / mib:.0f} | "
                         f"{ratio(m, floor_m)} |" + (f" {ratio(m, floor_acc)} |" if half else ""))
    if a.device == "cpu":
        for workload, n, v, results in rows:
            peak = results.get("ours", {}).get("peak_bytes")
            if (workload, n, v) == ("mixed", 8192, 32000) and peak is not None:
                verdict = "met" if peak <= 300e6 else "NOT met"
                lines.append(f"\nTarget for the torch path at this shape, peak RSS growth "
                             f"≤ 300 MB: {verdict} ({peak / 1e6:.0f} MB).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--n", type=int, nargs="+")
    p.add_argument("--v", type=int, nargs="+")
    p.add_argument("--h", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS)
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS))
    p.add_argument("--repeats", type=int, help="timed runs per measurement process")
    p.add_argument("--rounds", type=int, help="passes over the methods (best time is kept)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    p.add_argument("--out", type=Path, help="default: bench/results/linear_ce_kl_<device>.md")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for key, value in DEFAULTS[a.device].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.worker:
        a.n, a.v = a.n[0], a.v[0]
        return worker(a)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    slug = "cpu" if a.device == "cpu" else re.sub(r"\W+", "_", torch.cuda.get_device_name()).lower()
    out = a.out or RESULTS / f"linear_ce_kl_{slug}.md"
    if out.exists() and not a.force:
        sys.exit(f"{out} exists: pass --force to overwrite it")
    methods = [m for m in a.methods if m != "liger" or importlib.util.find_spec("liger_kernel")]
    if a.device == "cpu":
        methods = [m for m in methods if m not in ("liger", "ours_torch")]  # ours is torch here
    rows = []
    for workload in a.workloads:
        for n in a.n:
            for v in a.v:
                runs = {m: [] for m in methods
                        if m != "liger" or workload != "mixed_frozen_head"}
                # Rounds interleave the methods, so a shared machine's load hits them alike.
                for _ in range(a.rounds):
                    for method, rs in runs.items():
                        rs.append(measure(a, method, workload, n, v))
                        print(f"{workload} N={n} V={v} {method}: {rs[-1]}", file=sys.stderr)
                results = {}
                for method, rs in runs.items():
                    ok = [r for r in rs if "error" not in r]
                    results[method] = rs[0] if not ok else dict(
                        time_s=min(r["time_s"] for r in ok),
                        peak_bytes=max(r["peak_bytes"] for r in ok))
                rows.append((workload, n, v, results))
    command = "python bench/bench_linear_ce_kl.py " + " ".join(argv or sys.argv[1:])
    table = render(a, rows, command.strip())
    if "liger" in a.methods and "liger" not in methods:
        table += "\nliger-kernel is not installed: its rows are skipped.\n"
    print(table)
    write_results(out, table)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""`taskvec negate` against the I/O floor, a naive load-both PyTorch script and mergekit.

One run measures every method on the same synthetic LLaMA-shaped fp16 checkpoint pair
(1.1B parameters, the TinyLlama shapes, 1 GB shards; tuned = base + small noise), each as a
child process: wall time of the whole command (process start and imports included, from
Popen to exit and fsync), and the child's own peak RSS from os.wait4. Both inputs are read into
the page cache before every run, so all methods see a warm cache; every method's output is
fsynced inside its timed region (by the method itself, or by this script right after it exits).
The `--scales` option repeats the floor and taskvec on a model with 2× (or k×) the layers to
show that taskvec's memory does not grow with the model.

    .venv/bin/python bench/bench_taskvec.py                 # writes bench/results/taskvec_negate.md
    .venv/bin/python bench/bench_taskvec.py --repeat 1 --scales 1 --no-mergekit   # quick look

Checkpoints are cached in --workdir (default bench/.cache/, git-ignored) and reused; mergekit
is installed into its own venv there (torch==2.13.0 first, so it shares our torch build).

This process never imports torch and never holds big buffers: Linux carries a process's peak
RSS across fork and exec into the child's ru_maxrss, so a large parent would inflate every
child's figure. Building checkpoints and comparing outputs run in spawned workers.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from _common import RESULTS, machine, table, versions, write_results
from _common import ROOT as REPO

SHARD_BYTES = 10**9  # "1GB" as transformers' save_pretrained counts it
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
BASE_LAYERS = 22
GOAL_RSS_MB, GOAL_VS_MERGEKIT, GOAL_VS_FLOOR, GOAL_RSS_GROWTH = 450, 0.5, 1.5, 0.10

# Read both checkpoints and write one of the same size, with large buffers and an fsync: no
# parsing and no arithmetic, the least any tool that reads both and writes one must do.
FLOOR_SCRIPT = """
import os, sys
from pathlib import Path
base, tuned, out = (Path(p) for p in sys.argv[1:])
out.mkdir()
a, b = bytearray(16 << 20), bytearray(16 << 20)
for shard in sorted(base.glob("*.safetensors")):
    with open(shard, "rb", buffering=0) as fb, open(tuned / shard.name, "rb", buffering=0) as ft, \\
            open(out / shard.name, "wb", buffering=0) as fo:
        while n := fb.readinto(a):
            ft.readinto(b)
            fo.write(memoryview(a)[:n])
        os.fsync(fo.fileno())
"""

# What one writes without a streaming tool: load both state dicts, compute, save_file.
NAIVE_SCRIPT = """
import os, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
base, tuned, out = (Path(p) for p in sys.argv[1:])
b, t = {}, {}
for shard in sorted(base.glob("*.safetensors")):
    b.update(load_file(shard))
    t.update(load_file(tuned / shard.name))
result = {k: (v.float() - (t[k].float() - v.float())).to(v.dtype) for k, v in b.items()}
out.mkdir()
save_file(result, out / "model.safetensors", metadata={"format": "pt"})
with open(out / "model.safetensors", "rb") as f:
    os.fsync(f.fileno())
"""

MERGEKIT_YAML = """\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {tuned}
    parameters:
      weight: -1.0
parameters:
  normalize: false
dtype: float32
out_dtype: float16
"""


# ------------------------------------------------------------------ synthetic checkpoints


def llama_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = HIDDEN // HEADS
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
        ]
    return shapes + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def llama_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "dtype": "float16",
    }


def shard_groups(shapes) -> list[list[tuple[str, tuple[int, ...]]]]:
    groups, size = [[]], 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    return groups


def base_tensor(name: str, shape):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.float16)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=generator) * 0.02).half()


def build_checkpoint(folder: Path, layers: int, base: Path | None) -> None:
    """Write a sharded fp16 checkpoint; with `base`, its tensors plus N(0, 1e-3) noise."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    groups = shard_groups(llama_tensors(layers))
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if base is None:
                tensors[name] = base_tensor(name, shape)
            else:
                with safe_open(base / shard, "pt") as f:
                    b = f.get_tensor(name)
                generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
                tensors[name] = (b.float() + torch.randn(shape, generator=generator) * 1e-3).half()
            weight_map[name] = shard
            total += tensors[name].numel() * 2
        save_file(tensors, partial / shard, metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (partial / "config.json").write_text(json.dumps(llama_config(layers), indent=2))
    partial.rename(folder)


# ------------------------------------------------------------------ measuring


@dataclass
class Result:
    model: str
    method: str
    walls: list[float]
    cpus: list[float]  # user + system seconds of the child
    rss_mb: float
    max_abs_diff: str = ""


def warm(*folders: Path) -> None:
    buffer = bytearray(16 << 20)
    for folder in folders:
        for path in sorted(folder.iterdir()):
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def in_worker(function, *args):
    """Run a torch-using step in a fresh interpreter, keeping this process small."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def run_child(cmd: list[str], out: Path, log: Path, fsync_after: bool,
              own_venv: bool) -> tuple[float, float, float]:
    """(wall seconds, the child's CPU seconds, its own peak RSS in MB); the output is fsynced
    inside the timing. A peer in its own venv runs without PYTHONPATH: a checkout on it would
    shadow its packages (e.g. our `sku` and `taskvec` over any of the same name)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if own_venv:
        env.pop("PYTHONPATH", None)
    with open(log, "w") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode == 0 and fsync_after:
            fsync_tree(out)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / 1e6


def max_abs_diff(folder: Path, reference: Path) -> str:
    """Largest |a − b| over every tensor, read with safetensors; '0 (bit-identical)' if so."""
    import torch
    from safetensors import safe_open

    def tensors(root):
        for path in sorted(root.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    yield name, path

    where = dict(tensors(reference))
    worst, identical = 0.0, True
    for name, path in tensors(folder):
        with safe_open(path, "pt") as f, safe_open(where.pop(name), "pt") as g:
            a, b = f.get_tensor(name), g.get_tensor(name)
        identical &= a.dtype == b.dtype and torch.equal(a, b)
        worst = max(worst, (a.float() - b.float()).abs().max().item())
    if where:
        return f"missing {len(where)} tensors"
    return "0 (bit-identical)" if identical else f"{worst:.3g}"


@dataclass
class Method:
    label: str
    cmd: list[str]
    out: Path
    fsync_after: bool = False  # the method does not fsync its output itself
    own_venv: bool = False  # mergekit: its own interpreter and packages


def measure(model: str, methods: list[Method], inputs, args) -> list[Result]:
    """Round-robin over the methods, `repeat` times, so that a noisy neighbour or a drifting
    disk affects every method alike. Each run starts with no dirty pages in the system (sync)
    and both inputs in the page cache. The last round's outputs are compared with taskvec's."""
    results = {m.label: Result(model, m.label, [], [], 0.0) for m in methods}
    reference = next(m.out for m in methods if m.label == "taskvec")
    for attempt in range(args.repeat):
        for method in methods:
            shutil.rmtree(method.out, ignore_errors=True)
            os.sync()
            warm(*inputs)
            wall, cpu, peak = run_child(method.cmd, method.out,
                                        args.workdir / f"{method.label}.log", method.fsync_after,
                                        method.own_venv)
            result = results[method.label]
            result.walls.append(wall)
            result.cpus.append(cpu)
            result.rss_mb = max(result.rss_mb, peak)
            print(f"  {model} {method.label} run {attempt + 1}: {wall:.2f} s wall, "
                  f"{cpu:.2f} s CPU, {peak:.0f} MB",
                  file=sys.stderr, flush=True)
            if method.label in ("naive", "mergekit") and attempt == args.repeat - 1:
                result.max_abs_diff = in_worker(max_abs_diff, method.out, reference)
            if method.out != reference:
                shutil.rmtree(method.out, ignore_errors=True)
    shutil.rmtree(reference, ignore_errors=True)
    return list(results.values())


# ------------------------------------------------------------------ mergekit in its own venv


def ensure_mergekit(workdir: Path) -> tuple[Path | None, str]:
    venv = workdir / "mergekit-venv"
    script = venv / "bin" / "mergekit-yaml"
    if not script.exists():
        print("installing mergekit into", venv, file=sys.stderr, flush=True)
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0"],
                 [str(venv / "bin" / "pip"), "install", "-q", "mergekit"]]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True)
            if proc.returncode != 0:
                lines = (proc.stderr or proc.stdout).strip().splitlines()
                return None, f"`{' '.join(step[1:])}` failed: {lines[-1] if lines else '?'}"
    probe = ("from importlib.metadata import version as v; "
             "print(v('mergekit'), v('torch'), v('transformers'))")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return None, f"mergekit venv is broken: {proc.stderr.strip().splitlines()[-1]}"
    mergekit, torch_version, transformers = proc.stdout.split()
    return script, f"mergekit {mergekit} (its venv: torch {torch_version}, " \
                   f"transformers {transformers})"


# ------------------------------------------------------------------ report


def git_revision() -> str:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "taskvec"],
                           capture_output=True, text=True).stdout.strip()
    return proc.stdout.strip() + (" + uncommitted taskvec changes" if dirty else "")


def command_line() -> str:
    interpreter = Path(sys.executable)
    if interpreter.is_relative_to(REPO):
        interpreter = interpreter.relative_to(REPO)
    script = Path(sys.argv[0]).resolve()
    return " ".join([str(interpreter), str(script.relative_to(REPO)), *sys.argv[1:]])


def render(results: list[Result], mergekit: str, args, sizes: dict[str, str],
           load: tuple[float, float]) -> str:
    def wall(r: Result) -> float:
        return statistics.median(r.walls)

    by_key = {(r.model, r.method): r for r in results}
    lines = [
        "# `taskvec negate` vs the I/O floor, naive PyTorch and mergekit",
        "",
        f"Command: `{command_line()}` (from the repo root)",
        "",
        f"Machine: {machine()}  ",
        f"Versions: {versions('torch', 'safetensors', 'sku-unlearn')} (taskvec) at "
        f"{git_revision()}; {mergekit}  ",
        "Inputs: synthetic LLaMA fp16 pairs, tuned = base + N(0, 1e-3), 1 GB shards; hidden "
        f"{HIDDEN}, intermediate {INTERMEDIATE}, {HEADS} heads, {KV_HEADS} KV heads, vocab "
        f"{VOCAB}, untied lm_head: " + "; ".join(f"{k} = {v}" for k, v in sizes.items()) + ".  ",
        "Conditions: page cache warm for every run (`sync`, then both inputs read right before "
        "it); each output fsynced inside the timed region; methods run round-robin; wall and "
        f"CPU (user + system) = median of {args.repeat} run(s); 1-minute load average "
        f"{load[0]:.1f} before and {load[1]:.1f} after the measurements (other work on the "
        "machine shows here); "
        "peak RSS = max over runs of the child's own ru_maxrss (os.wait4), in MB of 10^6 "
        "bytes; the harness that spawns the children peaked at "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6:.0f} MB and never "
        "imports torch, so it does not inflate them (peak RSS survives fork and exec).",
        "",
    ]
    rows = []
    for r in results:
        floor = by_key.get((r.model, "floor"))
        merge = by_key.get((r.model, "mergekit"))
        rows.append([r.model, r.method, f"{wall(r):.2f}", f"{statistics.median(r.cpus):.2f}",
                     f"{r.rss_mb:.0f}", f"{wall(r) / wall(floor):.2f}" if floor else "–",
                     f"{wall(r) / wall(merge):.2f}" if merge else "–", r.max_abs_diff or "–"])
    lines += table(["model", "method", "wall (s)", "CPU (s)", "peak RSS (MB)", "wall / floor",
                    "wall / mergekit", "max abs diff vs taskvec"], rows, right=range(2, 7))
    lines += ["", "Methods:", "",
              "- floor: read both checkpoints and write one of the same size, 16 MB buffers, "
              "fsync (Python, no torch import). It runs its reads, writes and one final fsync "
              "one after another; taskvec overlaps reading, computing and writing (two worker "
              "threads) and fsyncs each shard while computing the next, which is how it can come "
              "in under this floor: read the ratio as 'at the I/O cost', not as beating physics.",
              "- taskvec: `taskvec negate --base B --tuned T --out O` (console script, defaults; "
              "the whole command, process start and `import torch` included).",
              "- naive: `load_file` both checkpoints, `b - (t - b)` in fp32 per tensor, "
              "`save_file` one file, fsync.",
              "- mergekit: `mergekit-yaml config.yml O --out-shard-size 500M` with the YAML "
              "below (weight −1, normalize off, fp32 compute, fp16 out: the same formula as "
              "taskvec); its output is fsynced by this script inside the timing.",
              "", "```yaml", MERGEKIT_YAML.format(base="B", tuned="T").rstrip(), "```", ""]
    lines += ["Goals:", ""] + goals(by_key, wall)
    return "\n".join(lines).rstrip() + "\n"


def goals(by_key, wall) -> list[str]:
    one = by_key.get(("1×", "taskvec"))
    if one is None:
        return ["- (taskvec was not measured at 1×)"]

    def line(ok: bool, text: str) -> str:
        return f"- {'met' if ok else 'MISSED'}: {text}"

    out = [line(one.rss_mb <= GOAL_RSS_MB,
                f"peak RSS {one.rss_mb:.0f} MB ≤ {GOAL_RSS_MB} MB")]
    floor, merge = by_key.get(("1×", "floor")), by_key.get(("1×", "mergekit"))
    out.append(line(wall(one) <= GOAL_VS_FLOOR * wall(floor),
                    f"wall {wall(one) / wall(floor):.2f}× floor ≤ {GOAL_VS_FLOOR}×"))
    if merge:
        out.append(line(wall(one) <= GOAL_VS_MERGEKIT * wall(merge),
                        f"wall {wall(one) / wall(merge):.2f}× mergekit ≤ {GOAL_VS_MERGEKIT}×"))
    for (model, method), r in by_key.items():
        if method == "taskvec" and model != "1×":
            growth = r.rss_mb / one.rss_mb - 1
            out.append(line(abs(growth) <= GOAL_RSS_GROWTH,
                            f"peak RSS at {model} is {growth:+.1%} of 1× (within ±10%)"))
    return out


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / ".cache",
                        help="checkpoints, outputs, logs and the mergekit venv")
    parser.add_argument("--results", type=Path, default=RESULTS / "taskvec_negate.md")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2],
                        help="model sizes in multiples of 22 layers; peers run at 1× only")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--clean", action="store_true",
                        help="delete the synthetic checkpoints at the end")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)

    mergekit, mergekit_note = (None, "--no-mergekit") if args.no_mergekit \
        else ensure_mergekit(args.workdir)
    if not mergekit:
        mergekit_note = f"mergekit not measured: {mergekit_note}"
    taskvec_cli = Path(sys.executable).parent / "taskvec"
    load_before = os.getloadavg()[0]
    results, sizes, built = [], {}, []
    for scale in args.scales:
        layers = BASE_LAYERS * scale
        name = f"{scale}×"
        base = args.workdir / f"llama-{layers}L-base"
        tuned = args.workdir / f"llama-{layers}L-tuned"
        for folder, source in ((base, None), (tuned, base)):
            if not (folder / "config.json").exists():
                print(f"building {folder} ...", file=sys.stderr, flush=True)
                in_worker(build_checkpoint, folder, layers, source)
        built += [base, tuned]
        params = sum(math.prod(shape) for _, shape in llama_tensors(layers))
        sizes[name] = f"{layers} layers, {params / 1e9:.2f}B parameters, " \
                      f"{params * 2 / 1e9:.1f} GB per checkpoint"
        out = args.workdir / f"out-{layers}L"
        methods = [
            Method("floor", [sys.executable, "-c", FLOOR_SCRIPT, str(base), str(tuned),
                             str(out / "floor")], out / "floor"),
            Method("taskvec", [str(taskvec_cli), "negate", "--base", str(base), "--tuned",
                               str(tuned), "--out", str(out / "taskvec")], out / "taskvec"),
        ]
        if scale == 1:
            methods.append(Method("naive", [sys.executable, "-c", NAIVE_SCRIPT, str(base),
                                            str(tuned), str(out / "naive")], out / "naive"))
        if scale == 1 and mergekit:
            config = args.workdir / "mergekit.yml"
            config.write_text(MERGEKIT_YAML.format(base=base, tuned=tuned))
            methods.append(Method("mergekit", [str(mergekit), str(config), str(out / "mergekit"),
                                               "--out-shard-size", "500M"],
                                  out / "mergekit", fsync_after=True, own_venv=True))
        out.mkdir(exist_ok=True)
        results += measure(name, methods, (base, tuned), args)
        out.rmdir()

    report = render(results, mergekit_note, args, sizes, (load_before, os.getloadavg()[0]))
    write_results(args.results, report)
    print(report)
    if args.clean:
        for folder in built:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()

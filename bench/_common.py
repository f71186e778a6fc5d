"""What the bench scripts share: the machine, package versions, markdown tables, and the results
file written atomically. Bench scripts run with the venv where the project is installed
(editable), so `taskvec` and `sku` import as they do for users; this module never imports torch
unless asked about a GPU, so a harness that must stay small can use it."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from taskvec import write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine(device: str = "cpu") -> str:
    """'<CPU model>, <n> cores, <RAM> GiB RAM, <OS>', or the GPU's name for device 'cuda'."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
        with open("/proc/meminfo") as f:
            mem_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        memory = f", {mem_kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        cpu, memory = platform.processor() or platform.machine(), ""
    return f"{cpu}, {os.cpu_count()} cores{memory}, {platform.platform()}"


def versions(*packages: str) -> str:
    """'python 3.11.7, torch 2.13.0, …' for the installed distributions named."""
    found = [f"python {platform.python_version()}"]
    for package in packages:
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def table(header: Sequence[str], rows: Iterable[Sequence], right: Sequence[int] = ()) -> list[str]:
    """Markdown table lines; the columns numbered in `right` are right-aligned (numbers)."""
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    return ["| " + " | ".join(map(str, row)) + " |" for row in [header, rule, *rows]]


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def in_child(script: str, *args: str):
    """Run `python script *args` in a fresh process (so its peak RSS is its own) and return
    the JSON its last stdout line holds; its stderr is shown when it fails."""
    child = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if child.returncode != 0:
        sys.stderr.write(child.stderr)
        raise SystemExit(f"{script} {' '.join(args)}: exited with {child.returncode}")
    return json.loads(child.stdout.splitlines()[-1])


def write_results(path: Path, text: str) -> Path:
    """The results file, atomically (temporary sibling, fsync, rename): never half-written."""
    write_atomic(path, text)
    return path

"""bench/bench_unlearn_step.py --tiny still runs: the script's CPU check (no timing asserted)."""

import subprocess
import sys
from pathlib import Path

from tests.support.cli import cli_env

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_unlearn_step.py"


def test_tiny_runs_every_recipe_and_writes_its_table(tmp_path):
    out = tmp_path / "unlearn_step_tiny.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--out",
                           str(out)], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")][2:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| ours: one bf16 model (fp32 on CPU), LoRA, fused CE/KL",
        "| ours + gradient checkpointing", "| official: 2 × fp32 models, full logits",
        "| official floor: 2 fp32 copies of the weights"]
    assert all(float(row.split(" | ")[2].rstrip(" |")) > 0 for row in rows[:3])  # tokens/s

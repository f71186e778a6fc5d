"""`sku unlearn` sharded with accelerate's FSDP2 over two gloo CPU processes: the same θ_bad (full
fine-tune and LoRA) as one process at the same effective batch, exact resume after a SIGKILL,
and the refusals.

accelerate shards on GPUs only; tests/launchers/fsdp_cpu.py lifts that one check (see its
docstring), so accelerate's own FSDP2 path (fully_shard, sharded save_state/load_state, the
gathered full state dict) runs here as it does on GPUs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sku.cli import main
from tests.support.checkpoints import read_tensors
from tests.support.sku import (
    run_sku,
    tiny_model,
    unlearn_args,
)

LAUNCHER = str(Path(__file__).parents[1] / "launchers" / "fsdp_cpu.py")
CONFIG = Path(__file__).parents[2] / "examples" / "accelerate" / "fsdp2.yaml"
# The README's launch command with the shipped FSDP2 config, on two CPU processes.
ACCELERATE = ("-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
              "--num_processes", "2")
ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
ARGS = ("--dtype", "float32", "--max-steps", "24", "--checkpoint-every", "2", "--save-steps", "3")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def single(llama, tmp_path_factory):
    """The reference: one process, two rows per step."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(unlearn_args("sku", llama, out, *ARGS)) == 0
    return out


def _fsdp(llama, out: Path, *extra: str):
    proc = run_sku(*unlearn_args("sku", llama, out, *ARGS, *extra), env=ENV,
                   launcher=(*ACCELERATE, LAUNCHER), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def sharded(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _fsdp(llama, out)
    return out


def test_fsdp2_theta_bad_equals_one_process(single, sharded):
    run = json.loads((sharded / "run.json").read_text())
    assert run["distributed"] == "DistributedType.FSDP" and run["world_size"] == 2
    one, two = read_tensors(single / "theta_bad"), read_tensors(sharded / "theta_bad")
    assert one.keys() == two.keys()
    for name in one:  # fp32 summation order differs between one and two processes
        assert (two[name] - one[name]).norm() <= 1e-4 * one[name].norm(), name
    snapshot_one = read_tensors(single / "snapshots" / "step-3")
    snapshot_two = read_tensors(sharded / "snapshots" / "step-3")
    for name in snapshot_one:
        assert (snapshot_two[name] - snapshot_one[name]).norm() <= 1e-3 * snapshot_one[
            name].norm(), name
    losses = [[json.loads(line)["loss"] for line in (run / "train_log.jsonl").open()]
              for run in (single, sharded)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_fsdp2_lora_adapter_equals_one_process(llama, tmp_path):
    """LoRA under FSDP2 (its frozen base sharded too): the adapter of one process."""
    lora = ("--lora", "--lora-r", "4", "--max-steps", "4")
    assert main(unlearn_args("sku", llama, tmp_path / "single", *ARGS, *lora)) == 0
    _fsdp(llama, tmp_path / "fsdp", *lora)
    one, two = (read_tensors(tmp_path / run / "theta_bad") for run in ("single", "fsdp"))
    assert one.keys() == two.keys() and all("lora_" in name for name in one)
    for name in one:
        assert (two[name] - one[name]).norm() <= 1e-4 * one[name].norm(), name


def _kill_after_checkpoint(command: list[str], env: dict, step_json: Path, at_least: int) -> int:
    """Start `command` in its own process group and SIGKILL all of it (torchrun and its
    workers) once the checkpoint has reached `at_least` steps; returns the step it held."""
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          start_new_session=True) as proc:
        deadline = time.monotonic() + 300
        step = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                step = json.loads(step_json.read_text())["step"]
            except (OSError, ValueError):
                pass
            if step >= at_least:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    return step


def test_fsdp2_resume_after_sigkill_is_exact(llama, sharded, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **ENV}
    command = [sys.executable, *ACCELERATE, LAUNCHER, *unlearn_args("sku", llama, out, *ARGS)]
    step = _kill_after_checkpoint(command, env, out / "checkpoint" / "step.json", 4)
    assert step >= 4 and not (out / "theta_bad").exists(), "the run ended before the kill"
    shards = sorted(p.name for p in (out / "checkpoint").rglob("*.distcp"))
    assert len(shards) >= 2, shards  # each process wrote its own shard of model and optimizer
    _fsdp(llama, out, "--resume")
    whole, resumed = read_tensors(sharded / "theta_bad"), read_tensors(out / "theta_bad")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0)
    assert not (out / "checkpoint").exists()


@pytest.mark.parametrize("env, launch, extra, needle", [
    (ENV, (), (), "FSDP was requested, but accelerate runs DistributedType.MULTI_CPU"),
    ({"OMP_NUM_THREADS": "1"}, (), (),
     "FSDP was requested, but accelerate runs DistributedType.NO"),
    (ENV, ("--fsdp_version", "1"), (), "FSDP1 is not supported"),
    (ENV, (), ("--lora", "--load-in-4bit"), "FSDP cannot shard a 4-bit/8-bit base"),
])
def test_fsdp_refusals_are_one_line(llama, tmp_path, env, launch, extra, needle):
    """accelerate's own CPU behaviour (no launcher shim): FSDP would silently not shard."""
    proc = run_sku(*unlearn_args("sku", llama, tmp_path / "run", *extra), env=env,
                   launcher=(*ACCELERATE, *launch, "-m", "sku"), timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sku: error:")]
    assert errors and needle in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()

"""The engine on its own: an operation defined here as a pure function of tensors streams like
the built-in ones, the finite check is exact at the fp16 overflow boundary, and the progress
bar shows on a terminal only."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
import torch

import taskvec
from taskvec.inspection import layer_of
from taskvec.operations import stream_operation
from tests.support.checkpoints import read_tensors, write_checkpoint
from tests.support.cli import cli_env, run_cli

FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def clipped_per_layer(scales: dict[str, float], clip: float):
    """O = B + λ(layer)·clamp(T − B, ±clip): a new operation in a few lines, no file in sight."""
    def combine(name, base, deltas):
        return deltas[0].clamp_(-clip, clip).mul_(scales.get(layer_of(name), 1.0)).add_(base)
    return combine


@pytest.mark.parametrize("buffer_mb", [0.001, 2.0])  # blocks of a few rows, and whole tensors
def test_an_operation_defined_outside_streams_like_torch(llama, tmp_path, buffer_mb):
    scales, clip = {"layers.0": -0.5, "layers.1": 2.0}, 0.004
    out = stream_operation("clipped", "model", llama.base, [(llama.tuned, "tuned")],
                           clipped_per_layer(scales, clip), tmp_path / "out",
                           record={"scales": scales}, buffer_mb=buffer_mb)
    base, tuned, actual = (read_tensors(p) for p in (llama.base, llama.tuned, out))
    assert sorted(actual) == sorted(base)
    for name, b in base.items():
        if b.dtype not in FLOAT:
            assert torch.equal(actual[name], b), name
            continue
        delta = (tuned[name].float() - b.float()).clamp(-clip, clip)
        expected = (delta * scales.get(layer_of(name), 1.0) + b.float()).to(b.dtype)
        assert actual[name].dtype == b.dtype and torch.equal(actual[name], expected), name
    record = json.loads((out / "taskvec.json").read_text())
    assert record["operation"] == "clipped" and record["scales"] == scales


@pytest.mark.parametrize("value, finite", [(65519.99, True), (65520.0, False), (-65520.0, False)])
def test_finite_check_is_exact_at_the_fp16_overflow(tmp_path, value, finite):
    """65519.99 rounds to fp16's max (65504); 65520 rounds to Inf and must be refused."""
    base = write_checkpoint(tmp_path / "base", {"w": torch.zeros(64, 8, dtype=torch.float16)})

    def fill(name, rows, deltas):
        rows[7] = value  # one element in a block of ordinary values
        return rows

    out = tmp_path / "out"
    if finite:
        stream_operation("fill", "model", base, [], fill, out, record={})
        assert read_tensors(out)["w"].view(-1)[7].item() == 65504.0
    else:
        with pytest.raises(taskvec.TaskVecError, match="tensor w: NaN/Inf produced"):
            stream_operation("fill", "model", base, [], fill, out, record={})
        assert not out.exists()


def _negate_command(llama, out):
    return [sys.executable, "-m", "taskvec", "negate", "--base", str(llama.base), "--tuned",
            str(llama.tuned), "--out", str(out)]


def test_progress_bar_on_a_terminal_only(llama, tmp_path):
    # stderr on a real pseudo-terminal: the bar is drawn there (bytes, as tqdm's B unit).
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a window
    proc = subprocess.Popen(_negate_command(llama, tmp_path / "tty"), stdout=subprocess.PIPE,
                            stderr=follower, env=cli_env(), text=True)
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    assert "wrote" in proc.stdout.read()
    assert b"negate" in drawn and b"B/s" in drawn, drawn
    # A pipe (logs, tests, CI): nothing but the result line.
    piped = run_cli("negate", "--base", llama.base, "--tuned", llama.tuned, "--out",
                    tmp_path / "pipe")
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr

"""The error contract of `sku`, in real processes, as taskvec's: one line and status 1 for bad
input, usage errors and OS errors; SKU_DEBUG=1 keeps the traceback; SIGTERM exits 143 after
the temporaries are cleaned up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.support.sku import run_sku, tiny_model, unlearn_args


def _one_line(proc, start: str) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_usage_errors_are_one_line_and_status_1():
    line = _one_line(run_sku("unlearn", "--method", "nope"), "sku: error: sku unlearn: ")
    assert "--method" in line and "(see --help)" in line
    _one_line(run_sku("evaluate"), "sku: error: sku: argument command")


def test_os_errors_name_the_file(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "p", "response": "r"}\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "verdicts.jsonl"  # a folder that is a file
    line = _one_line(run_sku("judge", "--input", str(rows), "--out", str(out), "--judge",
                             "keyword"), "sku: error: ")
    assert str(blocker) in line


def test_sku_debug_keeps_the_traceback(tmp_path):
    proc = run_sku("report", str(tmp_path / "missing"), "--out", str(tmp_path / "r"),
                   env={"SKU_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "SkuError" in proc.stderr
    _one_line(run_sku("report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")),
              "sku: error: ")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.getbasetemp())


def test_sigterm_exits_143_and_leaves_no_temporaries(llama, tmp_path):
    run = tmp_path / "run"
    args = [*unlearn_args("sku", llama, run), "--max-steps", "100000", "--checkpoint-every",
            "3"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with subprocess.Popen([sys.executable, "-m", "sku", *args], stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True, env=env) as proc:
        for line in proc.stderr:  # training has started once stage 1 is announced
            if "stage 1 of sku" in line:
                break
        while not (run / "checkpoint" / "step.json").is_file():  # mid-run, with checkpoints
            assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 143, rest[-2000:]
    assert "sku: terminated" in rest and "Traceback" not in rest
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporaries

"""Running the taskvec CLI in a subprocess, offline, and checking its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys


def cli_env(**overrides: str) -> dict[str, str]:
    """The environment for CLI runs: offline, as on the machines this project targets."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", **overrides}


def run_cli(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskvec", *map(str, args)],
                          capture_output=True, text=True, env=env or cli_env(), timeout=timeout)


def assert_cli_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1, one stderr line `taskvec: error: ...` holding every needle, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("taskvec: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_one_line(message: str, *needles: str) -> None:
    assert "\n" not in message.strip(), message
    for needle in needles:
        assert needle in message, (needle, message)

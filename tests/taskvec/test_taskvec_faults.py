"""Faults injected into real `taskvec` runs: a failing or interrupted swap of `--force`, a run
killed at each step of it, concurrent runs to one `--out`, and odd destinations. Nothing a user
had may be lost; every failure is one line.

Faults come from strace's syscall tampering (`-e inject=SYSCALL:error=EIO:when=N`,
`signal=KILL`): a dry run under strace lists the syscalls, the N of the one to break is read off
it, and a second run breaks exactly that one. `renameat2` answering ENOSYS drives the fallback
for kernels and filesystems without it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import taskvec
from taskvec.writer import OutputDir
from tests.support.checkpoints import random_pair, read_tensors, tree_digest
from tests.support.cli import assert_one_line, cli_env

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")

NO_RENAMEAT2 = "renameat2:error=ENOSYS"  # as on kernels or filesystems without it
_CALL = re.compile(r"^(\d+) +(\w+)\((.*?)(?:\) += |\s*<unfinished)")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    sides = random_pair(root, {f"layers.{i}.weight": (64, 64) for i in range(4)}, shards=2)
    reference = taskvec.negate(*sides, root / "reference")
    return sides[0], sides[1], read_tensors(reference)


def _command(pair, out: Path, *extra: str) -> list[str]:
    base, tuned, _ = pair
    return [sys.executable, "-m", "taskvec", "negate", "--base", str(base), "--tuned",
            str(tuned), "--out", str(out), *extra]


def _strace_args(injections, log: str = "/dev/null") -> list[str]:
    # --seccomp-bpf (only the traced syscalls stop: faster) loses injected signals in strace 6.1
    fast = [] if any("signal=" in spec for spec in injections) else ["--seccomp-bpf"]
    return ["strace", "-f", "-qq", *fast, "-o", log, "-e", "trace=rename,renameat2,unlinkat",
            *[arg for spec in injections for arg in ("-e", f"inject={spec}")]]


def _strace(command, injections, log: str = "/dev/null") -> subprocess.CompletedProcess:
    return subprocess.run([*_strace_args(injections, log), *command], capture_output=True,
                          text=True, env=cli_env(), timeout=300)


@pytest.fixture(scope="module")
def dry_runs(pair, tmp_path_factory):
    """injections -> the syscalls of a successful `negate --force` under them (run once)."""
    runs: dict[tuple, list] = {}

    def calls(injections) -> list:
        if tuple(injections) not in runs:
            root = tmp_path_factory.mktemp("dry")
            out, log = root / "outputs" / "out", root / "strace.log"
            out.parent.mkdir()
            _old_output(pair, out)
            proc = _strace(_command(pair, out, "--force"), injections, str(log))
            assert proc.returncode == 0, proc.stderr
            runs[tuple(injections)] = _calls(log)
        return runs[tuple(injections)]
    return calls


def _calls(log: Path) -> list[tuple[int, str, str]]:
    """(pid, syscall, arguments) in order; strace counts `when=` per syscall and thread."""
    calls = []
    for line in log.read_text().splitlines():
        match = _CALL.match(line)
        if match:
            calls.append((int(match[1]), match[2], match[3]))
    return calls


def _nth(calls, syscall: str, after: str | None, matches) -> int:
    """The `when=` number of the first `syscall` call whose arguments satisfy `matches`,
    counting only after the first call to `after` that does (None: from the start)."""
    started = after is None
    for i, (pid, name, args) in enumerate(calls):
        if not started:
            started = name == after and matches(args)
            continue
        if name == syscall and (after is not None or matches(args)):
            return sum(1 for p, n, _ in calls[: i + 1] if p == pid and n == syscall)
    raise AssertionError(f"no {syscall} call found in {calls}")


def _into_out(args: str) -> bool:
    return ".taskvec-tmp-" in args and args.split(",")[-2 if "RENAME" in args else -1].strip(
        ' "').endswith("/out")


def _old_output(pair, out: Path) -> dict:
    """An earlier result at `out` (a different scale, so old and new differ), its digest."""
    shutil.rmtree(out, ignore_errors=True)
    taskvec.negate(*pair[:2], out, scale=0.5)
    return tree_digest(out)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != "out")


def _is_new(pair, out: Path) -> bool:
    tensors = read_tensors(out)
    return tensors.keys() == pair[2].keys() and all(
        torch.equal(tensors[k], v) for k, v in pair[2].items())


# (where the fault lands, injections besides it, syscall, after, what happened to the old output)
SCENARIOS = {
    "exchange_fails": ([], "renameat2", None, "error=EIO", "unchanged"),
    "second_rename_fails": ([NO_RENAMEAT2], "rename", None, "error=EIO", "unchanged"),
    "second_rename_and_rollback_fail": ([NO_RENAMEAT2], "rename", None, "error=EIO",
                                        "kept aside"),
    "killed_between_the_renames": ([NO_RENAMEAT2], "rename", None, "signal=KILL", "killed"),
    "killed_after_the_exchange": ([], "unlinkat", "renameat2", "signal=KILL", "replaced"),
    "killed_after_the_renames": ([NO_RENAMEAT2], "unlinkat", "rename", "signal=KILL",
                                 "replaced"),
    "sigterm_while_removing_the_old_output": ([], "unlinkat", "renameat2", "signal=TERM",
                                              "replaced, interrupted"),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_forced_swap_survives_a_fault_at_each_step(pair, dry_runs, tmp_path, scenario):
    injections, syscall, after, fault, outcome = SCENARIOS[scenario]
    out = tmp_path / "outputs" / "out"
    out.parent.mkdir()
    when = _nth(dry_runs(injections), syscall, after, _into_out)
    if scenario == "second_rename_and_rollback_fail":
        when = f"{when}..{when + 1}"  # the rename back fails too
    old = _old_output(pair, out)

    proc = _strace(_command(pair, out, "--force"), [*injections,
                                                    f"{syscall}:{fault}:when={when}"])
    assert "Traceback" not in proc.stderr, proc.stderr
    if outcome == "unchanged":
        assert proc.returncode == 1, proc.stderr
        assert_one_line(proc.stderr, str(out), "unchanged")
        assert tree_digest(out) == old and _leftovers(out) == []
        return
    if outcome == "kept aside":
        assert proc.returncode == 1, proc.stderr
        assert_one_line(proc.stderr, str(out), ".out.taskvec-old-", "restores")
        assert not out.exists()
    elif outcome == "killed":
        assert proc.returncode != 0
        assert not out.exists()  # killed with the old output moved aside: the journal
    elif outcome == "replaced, interrupted":
        assert proc.returncode == 143, proc.stderr  # SIGTERM: 128 + 15
        assert_one_line(proc.stderr, f"interrupted after {out} was written in full")
        assert _is_new(pair, out)
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert _is_new(pair, out)
    # The next run to the same --out finishes what the broken one left.
    with pytest.raises(taskvec.TaskVecError, match="already exists"):
        taskvec.negate(*pair[:2], out)
    if outcome in ("kept aside", "killed"):
        assert tree_digest(out) == old
    else:
        assert _is_new(pair, out)
        taskvec.verify(out)
    assert _leftovers(out) == []


# ------------------------------------------------------------- concurrent runs


@pytest.mark.parametrize("injections", [[], [NO_RENAMEAT2]], ids=["renameat2", "fallback"])
def test_concurrent_runs_to_one_out_one_wins(pair, tmp_path, injections):
    """B finishes its work first but is held at its last rename (a delay injected there); A
    runs meanwhile and moves its output into place; B must then refuse, not replace it."""
    out = tmp_path / "out"
    # B's third rename (after the index and taskvec.json) or its renameat2 waits 15 s
    hold = "rename:delay_enter=15000000:when=3" if injections else \
        "renameat2:delay_enter=15000000"
    b = subprocess.Popen(
        [*_strace_args([*injections, hold]), *_command(pair, out, "--scale", "0.5")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.monotonic() + 120
    while not any((p / "taskvec.json").exists() for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and b.poll() is None, "B never finished its work"
        time.sleep(0.05)
    a = subprocess.run(_command(pair, out), capture_output=True, text=True, env=cli_env(),
                       timeout=120)
    _, b_err = b.communicate(timeout=120)
    assert a.returncode == 0, a.stderr
    assert b.returncode == 1, b_err
    assert_one_line(b_err, str(out), "nothing was written")
    assert "Traceback" not in b_err
    assert _is_new(pair, out)  # A's output (scale 1), whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(taskvec.TaskVecError) as error, OutputDir(out) as folder:
        (folder / "new.txt").write_text("this run")
        out.mkdir()
        (out / "theirs.txt").write_text("another run")  # it got there first
    assert_one_line(str(error.value), str(out), "nothing was written")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------- odd destinations


def test_symlinked_out_with_force_replaces_the_target_and_keeps_the_link(pair, tmp_path):
    target = tmp_path / "real" / "out"
    target.parent.mkdir()
    _old_output(pair, target)
    link = tmp_path / "link"
    link.symlink_to(target)
    proc = subprocess.run(_command(pair, link, "--force"), capture_output=True, text=True,
                          env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and link.resolve() == target
    assert _is_new(pair, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_stale_cleanup_matches_names_exactly(tmp_path):
    """`--out` named `*` must not remove another output's temporary (nor `a?` `a1`'s)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    others = [tmp_path / f".other.taskvec-tmp-{dead}", tmp_path / f".a1.taskvec-old-{dead}",
              tmp_path / f".a1.taskvec-tmp-{dead}"]
    for other in others:
        other.mkdir()
    for name in ("*", "a?", "a[1]", "[a]*"):
        with OutputDir(tmp_path / name) as folder:
            (folder / "x").write_text(name)
        assert (tmp_path / name / "x").read_text() == name
    assert all(other.is_dir() for other in others)
    own = tmp_path / f".*.taskvec-tmp-{dead}"  # the exact name is ours to clean
    own.mkdir()
    with OutputDir(tmp_path / "*", force=True) as folder:
        (folder / "x").write_text("again")
    assert not own.exists() and all(other.is_dir() for other in others)


def test_fifo_named_model_safetensors_is_refused_at_once(pair, tmp_path):
    folder = tmp_path / "fifo_model"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    command = _command(pair, tmp_path / "o")
    command[command.index("--tuned") + 1] = str(folder)
    proc = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert_one_line(proc.stderr, "model.safetensors", "not a regular file")
    assert not (tmp_path / "o").exists()

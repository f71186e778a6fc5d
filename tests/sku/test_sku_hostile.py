"""Hostile files, faults and signals on the sku side (issue 10): each case ends in a correct
result or one line `sku: error: …` with a non-zero exit, and nothing a user had is lost. Real
files, real subprocesses and signals, a real tmpfs for a full disk, and the real loopback HTTP
judge server of test_eval_openai."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sku.data.readers import load_forget
from sku.errors import SkuError
from sku.evaluation.judges import Verdict, VerdictCache
from sku.run import RunFolder
from sku.train.config import resolve_config
from tests.sku.test_eval_openai import FakeOpenAI, cli_env, write_rows
from tests.support.sku import (
    PKU_V1,
    TRUTHFULQA,
    assert_sku_error,
    run_sku,
    unlearn_args,
)


def _required(tiny_llama: Path, out: Path) -> list[str]:
    return ["unlearn", "--method", "sku", "--model", str(tiny_llama), "--forget-data", str(PKU_V1),
            "--normal-data", str(TRUTHFULQA), "--out", str(out)]


# ---------------------------------------------------------------------------------------------
# The run folder: nothing a user had is lost, nothing half-made is left


def test_force_refuses_a_folder_holding_a_git_repository_and_keeps_it(tiny_llama, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    subprocess.run(["git", "init", "-q", str(run)], check=True)
    (run / "run.json").write_text("{}\n")  # it looks like a run folder otherwise
    assert_sku_error(run_sku(*unlearn_args("sku", tiny_llama, run), "--force"), ".git",
                     "not a sku run folder")
    assert (run / ".git" / "HEAD").is_file() and (run / "run.json").read_text() == "{}\n"


def test_our_own_hidden_temporaries_are_not_foreign(tmp_path):
    run = RunFolder(tmp_path)
    for name in (".theta_o.taskvec-tmp-123", ".run.json.tmp-9", ".model.taskvec-old-7"):
        (tmp_path / name).mkdir()
    assert run.foreign_entries() == []
    (tmp_path / ".git").mkdir()
    (tmp_path / ".modelx").mkdir()  # not a temporary of `model`
    assert run.foreign_entries() == [".git", ".modelx"]


def test_out_that_is_a_file_is_refused_and_kept(tiny_llama, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    assert_sku_error(run_sku(*unlearn_args("sku", tiny_llama, out), "--force"), str(out),
                     "is a file")
    assert out.read_text() == "mine\n"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_truncated_model_is_one_line_before_the_run_folder_changes(tiny_llama, tmp_path, lora):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}\n")  # an old run, which --force would replace
    extra = ["--lora"] if lora else []
    assert_sku_error(run_sku(*unlearn_args("sku", model, run), "--force", *extra),
                     str(weights), "truncated", only_line=False)
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]


def test_a_run_that_fails_before_any_checkpoint_leaves_nothing_and_reruns(tiny_llama, tmp_path):
    """lr 1e30 makes the weights Inf (or the loss NaN) within the first steps: nothing can be
    resumed, so nothing is kept (stage 1 is never saved with non-finite weights), and a plain
    rerun is not refused."""
    run = tmp_path / "run"
    line = assert_sku_error(run_sku(*unlearn_args("sku", tiny_llama, run), "--lr", "1e30"),
                            "no checkpoint was saved yet", "nothing of this run is kept",
                            only_line=False)
    assert "finite" in line or "loss is" in line
    assert not run.exists()  # the run made it, and leaves nothing
    resumed = run_sku(*unlearn_args("sku", tiny_llama, run), "--resume")
    assert_sku_error(resumed, "nothing to resume", "without --resume", only_line=False)
    rerun = run_sku(*unlearn_args("sku", tiny_llama, run))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (run / "model").is_dir()


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder): equal trees are equal."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
            for p in sorted(folder.rglob("*"))}


def test_a_forced_run_keeps_the_old_run_until_it_has_its_model(tiny_llama, tmp_path):
    """--force that fails before a checkpoint puts the complete old run back byte for byte;
    --force that completes replaces it and keeps nothing of it."""
    run = tmp_path / "run"
    assert run_sku(*unlearn_args("sku", tiny_llama, run)).returncode == 0
    old = _tree(run)
    assert_sku_error(run_sku(*unlearn_args("sku", tiny_llama, run), "--force", "--lr", "1e30"),
                     "no checkpoint was saved yet", only_line=False)
    assert _tree(run) == old
    forced = run_sku(*unlearn_args("sku", tiny_llama, run), "--force", "--seed", "7")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert not (run / ".replaced").exists()
    assert json.loads((run / "run.json").read_text())["config"]["seed"] == 7
    assert _tree(run) != old


def _old_run(folder: Path) -> None:
    folder.mkdir()
    (folder / "run.json").write_text('{"config": "old"}\n')
    (folder / "train_log.jsonl").write_text('{"step": 1}\n')
    (folder / "snapshots" / "step-1").mkdir(parents=True)
    (folder / "snapshots" / "step-1" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (folder / "model").mkdir()
    (folder / "model" / "model.safetensors").write_bytes(b"\1" * 64)


def _new_run(folder: Path, *, finished: bool) -> None:
    (folder / "run.json").write_text('{"config": "new"}\n')
    (folder / "snapshots").mkdir()
    if finished:
        (folder / "model").mkdir()
        (folder / "model" / "model.safetensors").write_bytes(b"\2" * 64)


# Setting the old run aside, putting it back, and dropping it: (what the killed process runs,
# on a folder prepared how, what must be there after the next start settles it, and the
# syscalls it must make)
KILLED = {
    "set_aside": ("RunFolder(sys.argv[1]).set_aside()", lambda f: None, "old",
                  {"rename", "mkdir"}),
    "put_back": ("RunFolder(sys.argv[1]).settle_replaced()",
                 lambda f: _new_run(f, finished=False), "old", {"rename", "unlink", "rmdir"}),
    "drop": ("RunFolder(sys.argv[1]).settle_replaced()", lambda f: _new_run(f, finished=True),
             "new", {"unlink", "unlinkat"}),
}


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace for fault injection")
@pytest.mark.parametrize("step", KILLED)
@pytest.mark.parametrize("syscall", ["rename", "unlink", "unlinkat", "rmdir", "mkdir"])
def test_a_kill_at_any_point_of_a_forced_swap_loses_nothing(tmp_path, step, syscall):
    """SIGKILL at the k-th call of each syscall the swap makes, for every k until it runs
    through: the next start (settle_replaced) finds the complete old run, or the complete new
    one once it has its model, and no .replaced."""
    code, prepare, expected, makes = KILLED[step]
    script = f"import sys; from sku.run import RunFolder; {code}"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    for k in range(1, 40):
        folder = tmp_path / f"{k}"
        _old_run(folder)
        want = _tree(folder)
        if step != "set_aside":
            RunFolder(folder).set_aside()
            prepare(folder)
            if expected == "new":
                want = {p: b for p, b in _tree(folder).items() if not p.startswith(".replaced")}
        proc = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
                               "-e", f"inject={syscall}:signal=KILL:when={k}", sys.executable,
                               "-c", script, str(folder)], env=env, capture_output=True)
        RunFolder(folder).settle_replaced()
        if step == "set_aside" and proc.returncode == 0:  # ran through: a new run would start
            RunFolder(folder).settle_replaced()
        assert _tree(folder) == want, (k, proc.returncode)
        if proc.returncode == 0:
            assert k > 1 or syscall not in makes, "strace killed nothing"
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    else:
        raise AssertionError("the swap never ran through")


def test_a_second_unlearn_on_a_run_folder_in_use_is_refused(tiny_llama, tmp_path):
    """The lock is an flock on the folder: held here, a real `sku unlearn` is refused in one
    line and changes nothing; two started together end with exactly one run."""
    run = tmp_path / "run"
    with RunFolder(run).held():
        assert_sku_error(run_sku(*unlearn_args("sku", tiny_llama, run), "--force"), str(run),
                         "another `sku unlearn` is using this run folder")
        assert list(run.iterdir()) == []
    racers = [tmp_path / "race"] * 2
    procs = [subprocess.Popen([sys.executable, "-m", "sku", *unlearn_args("sku", tiny_llama, r)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in racers]
    outcomes = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [rc for rc, _ in outcomes] == [0, 1], outcomes
    assert "Traceback" not in outcomes[1][1]
    assert outcomes[1][1].strip().splitlines()[-1].startswith("sku: error: ")
    assert (tmp_path / "race" / "model").is_dir()


@pytest.mark.parametrize(("recipe", "flags", "needle"), [
    ("scale: .inf\n", [], "scale inf"),
    ("eps: [.nan, 1.0, 1.0]\n", [], "eps"),
    (None, ["--scale", "inf"], "scale inf"),
    (None, ["--scale", "nan"], "scale nan"),
    (None, ["--lr=-inf"], "lr -inf"),
    ("max_steps: true\n", [], "max_steps True"),  # bool is an int in Python
    ("save_steps: 3\n", [], "save_steps 3"),
    ("weight_decay: abc\n", [], "weight_decay 'abc'"),
    ("seed: 1.5\n", [], "seed 1.5"),
    ("lora_targets: 5\n", [], "lora_targets 5"),
    ("scale: abc\n", [], "scale 'abc'"),
    (None, ["--weight-decay", "-1"], "weight_decay -1.0"),
    (b"seed: \xff\xfe\n", [], "not UTF-8"),
    (None, ["--seed", str(2**64)], f"seed {2**64}: an integer (of 64 bits)"),  # torch's
    (f"max_steps: {10**30}\n", [], f"max_steps {10**30}"),
    (f"lr: {10**400}\n", [], "lr 1000"),  # math.isfinite raises OverflowError on it
    ("1: 2\nfoo: 3\n", [], "unknown setting 1"),  # YAML keys of two types
])
def test_every_setting_is_refused_before_anything_starts(tiny_llama, tmp_path, recipe, flags,
                                                         needle):
    """One line and nothing else (no step, no log line), and no run folder made."""
    run = tmp_path / "run"
    if recipe is not None:
        path = tmp_path / "recipe.yaml"
        path.write_bytes(recipe if isinstance(recipe, bytes) else recipe.encode())
        flags = [*flags, "--config", str(path)]
    assert_sku_error(run_sku(*_required(tiny_llama, run), *flags), needle)
    assert not run.exists()


def test_a_recipe_number_with_an_exponent_and_no_dot_is_a_number(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-4` as a string; it is meant as a number."""
    path = tmp_path / "recipe.yaml"
    path.write_text("lr: 1e-4\nweight_decay: 5E-3\nmax_steps: 3\n")
    config = resolve_config({"method": "sku", "model": "m", "forget_data": "f",
                             "normal_data": "n", "out": "o"}, str(path), {})
    assert (config.lr, config.weight_decay, config.max_steps) == (1e-4, 5e-3, 3)


def test_a_torn_last_line_of_the_train_log_is_dropped_on_resume(tmp_path):
    run = RunFolder(tmp_path)
    steps = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5))
    run.train_log.write_text(steps + '{"step": 5, "loss": 0.')  # killed mid-write
    run.truncate_log(3)
    assert [json.loads(line)["step"] for line in run.train_log.read_text().splitlines()] == [
        1, 2, 3]
    run.train_log.write_text(steps.replace('{"step": 2', '{"step: 2', 1))
    with pytest.raises(SkuError, match=r"train_log.jsonl:2: not a step record"):
        run.truncate_log(3)  # not what a kill leaves: named, not dropped


# ---------------------------------------------------------------------------------------------
# Data and input files


def test_a_csv_field_over_128_kib_is_read(tmp_path):
    rows = [json.loads(line) for line in PKU_V1.read_text().splitlines()]
    long = "step " * 40_000  # 200 kB, over csv's default field limit of 128 KiB
    rows[0] = {**rows[0], "response_0": long, "is_response_0_safe": False}
    path = tmp_path / "pku.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert long.strip() in {pair.response for pair in load_forget(str(path)).harmful}


def test_a_corrupt_parquet_file_is_one_line(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "pku.parquet"
    path.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    with pytest.raises(SkuError, match="not a readable parquet file"):
        load_forget(str(path))


def test_inputs_that_are_not_utf8_are_one_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"prompt": "caf\xe9", "response": "r"}\n')  # Latin-1
    proc = run_sku("judge", "--input", str(rows), "--out", str(tmp_path / "v.jsonl"),
                   "--judge", "keyword")
    assert_sku_error(proc, str(rows), "not UTF-8", "0xe9")
    with pytest.raises(SkuError, match="not UTF-8"):
        load_forget(str(rows))


@pytest.mark.parametrize(("text", "needle"), [
    ('{"method": "sku", "final": {}}', "no model"),  # partial: written by hand, or old
    ('{"method": "sku", "final": {', "not valid JSON"),  # cut short
    (b'{"method": "\xff"}', "not UTF-8"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # json's RecursionError
])
def test_report_on_a_partial_metrics_json_is_one_line(tmp_path, text, needle):
    metrics = tmp_path / "eval" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_bytes(text if isinstance(text, bytes) else text.encode())
    proc = run_sku("report", str(metrics.parent), "--out", str(tmp_path / "report"))
    assert_sku_error(proc, str(metrics), needle)


# ---------------------------------------------------------------------------------------------
# The judge: its cache and its server


def _verdict(reason: str) -> dict:
    return {"harmful": False, "category": "g", "reason": reason, "judge": "openai:m"}


def test_a_cache_line_cut_inside_a_utf8_character_is_ignored(tmp_path):
    path = tmp_path / "cache.jsonl"
    good = json.dumps({"key": "k1", "verdict": _verdict("déclin")}, ensure_ascii=False)
    torn = json.dumps({"key": "k2", "verdict": _verdict("refusé")}, ensure_ascii=False)
    cut = torn.encode()
    cut = cut[:cut.index("é".encode()) + 1]  # killed inside "é", a two-byte character
    path.write_bytes((good + "\n").encode() + cut)
    cache = VerdictCache(path)
    assert set(cache.verdicts) == {"k1"} and cache.verdicts["k1"].reason == "déclin"
    cache.put("k3", Verdict(True, "a", "ça", "openai:m"))
    assert set(VerdictCache(path).verdicts) == {"k1", "k3"}  # and every later run reads it


class Answers(FakeOpenAI):
    """A FakeOpenAI that answers its first `good` requests as a chat completion, then `body`
    (raw bytes, served as JSON)."""

    def __init__(self, body: bytes, good: int):
        super().__init__()
        self.body, self.good = body, good

    def _reply(self, handler, body, prompt, response):
        if len(self.requests) <= self.good:
            return super()._reply(handler, body, prompt, response)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(self.body)))
        handler.end_headers()
        handler.wfile.write(self.body)


def _judge(tmp_path: Path, url: str, cache: Path | str, *extra: str):
    write_rows(tmp_path / "in.jsonl", 5)
    return subprocess.run(
        [sys.executable, "-m", "sku", "judge", "--input", str(tmp_path / "in.jsonl"), "--out",
         str(tmp_path / "out.jsonl"), "--judge", "openai", "--judge-model", "m", "--base-url",
         url, "--cache", str(cache), "--concurrency", "1", "--max-retries", "0", *extra],
        capture_output=True, text=True, env=cli_env(), timeout=60)


@pytest.mark.parametrize(("body", "needle"), [
    (b'{"id": "chatcmpl-1", "choices": [{"mess', "malformed JSON"),
    (b'{"id": "chatcmpl-1", "object": "chat.completion"}', "not a chat completion"),
    (b'{"choices": [{"message": null}]}', "not a chat completion"),
    (b'{"choices": [{"message": {"content": 7}}]}', "not a chat completion"),
])
def test_a_server_answering_something_else_is_one_line_that_says_what_was_kept(
        tmp_path, monkeypatch, body, needle):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = Answers(body, good=2)
    try:
        cache = tmp_path / "cache.jsonl"
        line = assert_sku_error(_judge(tmp_path, server.url, cache), needle,
                                f"2 verdicts are cached in {cache}")
        assert server.url.rstrip("/") in line
        assert len(VerdictCache(cache).verdicts) == 2 and len(server.requests) == 3
    finally:
        server.close()
    assert not (tmp_path / "out.jsonl").exists()


def test_a_cache_that_is_a_folder_is_refused_before_any_paid_request(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = FakeOpenAI()
    try:
        folder = tmp_path / "cache"
        folder.mkdir()
        assert_sku_error(_judge(tmp_path, server.url, folder), str(folder), "is a folder")
        assert server.requests == []
    finally:
        server.close()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (a disk that fills up), where this runs as root and may mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_stops_the_paid_requests_and_says_how_many_verdicts_were_kept(
        tmp_path, monkeypatch, tiny_tmpfs):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    cache = tiny_tmpfs / "cache.jsonl"
    (tiny_tmpfs / "filler").write_bytes(b"\0" * (60 * 1024))  # the cache gets one page,
    cache.write_bytes(b"x" * (4096 - 400) + b"\n")  # most of it an unreadable line: room for 2
    server = FakeOpenAI()
    try:
        line = assert_sku_error(_judge(tmp_path, server.url, cache), str(cache),
                                "No space left on device", "could not be saved")
        kept = len(VerdictCache(cache).verdicts)
        assert f"{kept} verdicts are cached" in line
        lost = int(line.split(" paid verdict")[0].rsplit(", ", 1)[-1])
        assert kept + lost == len(server.requests) < 5  # it stopped asking
    finally:
        server.close()


def test_a_full_disk_during_a_run_names_the_folder_and_leaves_nothing(tiny_llama, tiny_tmpfs):
    run = tiny_tmpfs / "run"  # θ_o's copy is the first thing too big for it
    line = assert_sku_error(run_sku(*unlearn_args("sku", tiny_llama, run)), str(run / "theta_o"),
                            "cannot save", "No space left on device", only_line=False)
    assert ": :" not in line and not run.exists()


def test_a_cache_on_dev_full_is_one_line(tmp_path, monkeypatch):
    """/dev/full: every write fails with ENOSPC (no root needed), and it is never read."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = FakeOpenAI()
    try:
        line = assert_sku_error(_judge(tmp_path, server.url, "/dev/full"), "/dev/full",
                                "No space left on device", "1 paid verdict(s) could not be "
                                "saved")
        assert "0 verdicts are cached" in line and len(server.requests) == 1
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------
# Signals


def test_ctrl_c_while_sku_starts_exits_130_without_a_traceback(tiny_llama, tmp_path):
    """SIGINT at moments spread over the start-up (torch's import takes seconds), after
    Python's own start-up (whose SIGINT handling is Python's)."""
    args = [sys.executable, "-m", "sku", *unlearn_args("sku", tiny_llama, tmp_path / "run")]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for delay in (0.15, 0.3, 0.5, 0.8, 1.2, 1.8, 2.5):
        with subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=env) as proc:
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
        assert "Traceback" not in stderr, (delay, stderr[-3000:])
        if proc.returncode != 0:  # a run that finished first is fine too
            assert proc.returncode == 130 and stderr.strip().endswith("sku: interrupted"), (
                delay, proc.returncode, stderr[-3000:])
        shutil.rmtree(tmp_path / "run", ignore_errors=True)


@pytest.mark.parametrize(("args", "needle"), [
    (("unlearn", "--method", "sku", "--model", "m", "--forget-data", "f", "--normal-data", "n",
      "--out", ""), "out '': a non-empty string"),
    (("unlearn", "--method", "sku", "--model", " ", "--forget-data", "f", "--normal-data", "n",
      "--out", "r"), "model ' ': a non-empty string"),
    (("judge", "--input", "pairs.jsonl", "--out", "", "--judge", "keyword"), "an empty path"),
    (("eval", "--run", "", "--judge", "keyword"), "an empty path"),
    (("report", "", "--out", "r"), "an empty path"),
])
def test_an_empty_path_or_name_is_refused_as_empty(tmp_path, args, needle):
    """"" is the current folder to pathlib: taken as a path it was "already exists" or a
    hub-id error about ''. Refused as what it is, before anything is read."""
    proc = subprocess.run([sys.executable, "-m", "sku", *args], cwd=tmp_path,
                          capture_output=True, text=True)
    assert_sku_error(proc, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("handled", [False, True])
def test_a_ctrl_c_inside_pyrun_string_code_still_exits_130_once_handled(handled, tmp_path):
    """CPython remembers a KeyboardInterrupt raised in code run through PyRun_String (as
    pybind11's py::exec runs it) and, when run with -m as `python -m sku` is, ends the process
    by SIGINT even after the CLI handled it and returns 130; both CLIs clear that memory
    (taskvec.errors.interrupt_handled)."""
    (tmp_path / "interrupted.py").write_text(
        "import ctypes, sys\n"
        "from taskvec.errors import interrupt_handled\n"
        "run = ctypes.pythonapi.PyRun_String\n"
        "run.restype = ctypes.py_object\n"
        "run.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]\n"
        "try:\n"
        "    run(b'raise KeyboardInterrupt', 257, {}, {})  # 257: Py_file_input\n"
        "except KeyboardInterrupt:\n"
        f"    {'interrupt_handled()' if handled else 'pass'}\n"
        "sys.exit(130)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "interrupted"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == (130 if handled else -signal.SIGINT), proc.stderr


# ---------------------------------------------------------------------------------------------
# Files that are not regular files: a FIFO is refused without a read that would block


@pytest.mark.parametrize("where", ["input", "word list", "few-shot", "forget data"])
def test_a_fifo_in_place_of_a_file_is_refused_without_waiting(tiny_llama, tmp_path, where):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)  # no writer ever opens it: a read would wait forever
    rows = tmp_path / "rows.jsonl"
    write_rows(rows, 1)
    judge = ["judge", "--input", str(rows), "--out", str(tmp_path / "v.jsonl"), "--judge"]
    args = {"input": ["judge", "--input", str(fifo), "--out", str(tmp_path / "v.jsonl"),
                      "--judge", "keyword"],
            "word list": [*judge, "keyword", "--judge-model", str(fifo)],
            "few-shot": [*judge, "openai", "--judge-model", "m", "--few-shot", str(fifo),
                         "--base-url", "http://127.0.0.1:9/v1"],
            "forget data": [*_required(tiny_llama, tmp_path / "run")]}[where]
    if where == "forget data":
        args[args.index(str(PKU_V1))] = str(fifo)
    assert_sku_error(run_sku(*args, timeout=60), str(fifo), "not a regular file",
                     only_line=False)


def test_a_k_larger_than_the_pool_draws_every_eligible_row_at_once(tiny_llama, tmp_path):
    """k is how many other responses each row is pulled away from; a k over the pool's size
    takes them all (it spun through 20·k rejected draws before)."""
    proc = run_sku(*_required(tiny_llama, tmp_path / "run"), "--max-steps", "1",
                   "--eval-size", "1", "--k", str(10**9), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("config", ["[1]", '{"model_type": 5}', '{"model_type": "llama", '
                                    '"hidden_size": "wide"}'])
def test_a_model_config_of_the_wrong_shape_is_one_line(tiny_llama, tmp_path, config):
    """transformers raises TypeError, AttributeError or KeyError on these, not only OSError
    and ValueError: every load of a user's model is wrapped the same way (sku.errors.loading)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "config.json").write_text(config)
    assert_sku_error(run_sku(*unlearn_args("sku", model, tmp_path / "run")), str(model),
                     "cannot load", only_line=False)  # transformers may warn first
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("prompt", 7, "record 1: prompt is int 7, expected text"),
    ("response_0", ["a", "list"], "record 1: response_0 is list"),
])
def test_a_text_field_of_another_type_is_named_not_dropped(tiny_llama, tmp_path, field, value,
                                                          needle):
    """A number where a prompt or response belongs is a broken file: its pairs were dropped
    silently with the empty ones, and the run went on without them. null is still an empty
    text (the pair is dropped)."""
    rows = [json.loads(line) for line in PKU_V1.read_text().splitlines()]
    rows[0]["response_1"] = None
    rows[1][field] = value
    data = tmp_path / "pku.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _required(tiny_llama, tmp_path / "run")
    args[args.index(str(PKU_V1))] = str(data)
    assert_sku_error(run_sku(*args), str(data), needle)
    rows[1][field] = "text again"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_forget(str(data)).harmful) > 0


def test_forget_data_too_small_for_mismatch_rows_is_named(tiny_llama, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    args = _required(tiny_llama, tmp_path / "run")
    args[args.index(str(PKU_V1))] = str(data)
    assert_sku_error(run_sku(*args), str(data), "mismatch rows need responses to two prompts",
                     only_line=False)


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda m: m["final"]["unlearned_harmful"].update(harmful_rate="high"),
     "final.unlearned_harmful.harmful_rate is 'high', expected a rate"),
    (lambda m: m.update(eps=[1.0]), "eps is [1.0], expected three numbers"),
    (lambda m: m["judge"].update(name=7), "judge.name is 7, expected text"),
    (lambda m: m.update(steps={"step": 1}), "steps is {'step': 1}"),
    (lambda m: m.update(steps=[{"normal": {}}]), "no steps[0].step"),
    (lambda m: m["final"]["normal"].update(n="2"), "final.normal.n is '2', expected a count"),
    (lambda m: m["decoding"].pop("template"), "no decoding.template"),
])
def test_report_on_a_metrics_field_of_the_wrong_type_is_one_line(tmp_path, edit, needle):
    """Each of these passed the old check of the top-level keys and failed deep in the tables
    or the figure (ValueError, TypeError, a zip of unequal lengths)."""
    fixture = Path(__file__).parents[1] / "fixtures" / "eval" / "runs" / "sku" / "eval"
    metrics = json.loads((fixture / "metrics.json").read_text())
    edit(metrics)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    proc = run_sku("report", str(tmp_path / "eval"), "--out", str(tmp_path / "report"))
    assert_sku_error(proc, str(tmp_path / "eval" / "metrics.json"), needle)
    assert not (tmp_path / "report").exists()


def test_a_lora_rank_above_every_wrapped_module_is_one_line(tiny_llama, tmp_path):
    """--lora-r 1e9 failed allocating the adapter (RuntimeError, a traceback); any r above
    min(in, out) of every wrapped module adds nothing, so it is refused."""
    for r in ("1000000000", "33"):  # the tiny Llama's q_proj is 32×32, v_proj 32×16
        assert_sku_error(run_sku(*unlearn_args("sku", tiny_llama, tmp_path / "run", "--lora",
                                               "--lora-r", r)),
                         f"lora_r {r}: above the rank", "at most 32", only_line=False)
        assert not (tmp_path / "run").exists()


def _report_renames(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "rename" in line and "=" in line]


def test_a_failed_forced_report_keeps_the_old_report_whole(tmp_path):
    """The report's files were each written in place: a failure (here EIO, injected by strace
    at the rename that puts report.md in place) after the figures left new figures beside
    the old report.md and report.json. It is now written whole and swapped in."""
    runs = Path(__file__).parents[1] / "fixtures" / "eval" / "runs"
    out = tmp_path / "report"
    command = [sys.executable, "-m", "sku", "report", str(runs / "sku"), str(runs / "ga"),
               "--out", str(out), "--force"]
    assert run_sku(*command[3:]).returncode == 0
    log = tmp_path / "strace.log"
    trace = ["strace", "-f", "-qq", "-o", str(log), "-e", "trace=rename,renameat,renameat2"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    dry = subprocess.run([*trace, *command], capture_output=True, text=True, env=env,
                         timeout=120)
    assert dry.returncode == 0, dry.stderr
    calls = _report_renames(log)
    when = 1 + next(i for i, call in enumerate(calls) if "report.md" in call)
    old = {p.name: p.read_bytes() for p in out.iterdir()}  # as the dry run left it
    proc = subprocess.run([*trace, "-e", f"inject=rename,renameat,renameat2:error=EIO:"
                           f"when={when}", *command], capture_output=True, text=True, env=env,
                          timeout=120)
    assert_sku_error(proc, "report.md", only_line=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "strace.log"]


def test_a_report_folder_holding_other_files_is_refused_and_kept(tmp_path):
    """A report replaces its whole folder, so `--out .` or a folder of notes is refused, even
    with --force, rather than swapped away."""
    runs = Path(__file__).parents[1] / "fixtures" / "eval" / "runs"
    (tmp_path / "notes.txt").write_text("mine\n")
    for force in ((), ("--force",)):
        assert_sku_error(run_sku("report", str(runs / "sku"), "--out", str(tmp_path), *force),
                         str(tmp_path), "'notes.txt'", "not a report's file")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("verdict", [
    {"harmful": "false", "category": "g", "reason": "r", "judge": "openai:m"},  # truthy text
    {"harmful": False, "category": "z", "reason": "r", "judge": "openai:m"},
    {"harmful": True, "category": "a", "reason": None, "judge": "openai:m"},
])
def test_a_cache_line_of_the_wrong_types_is_asked_again_not_used(tmp_path, monkeypatch,
                                                                verdict):
    """An edited cache line was taken as a verdict: "harmful": "false" counted as harmful,
    written to the output as a string, then a traceback summing them."""
    from sku.evaluation.judges import cache_key

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = FakeOpenAI()
    try:
        cache = tmp_path / "cache.jsonl"
        rows = write_rows(tmp_path / "in.jsonl", 5)
        key = cache_key("openai:m", rows[0]["prompt"], rows[0]["response"])
        cache.write_text(json.dumps({"key": key, "verdict": verdict}) + "\n")
        proc = _judge(tmp_path, server.url, cache)
        assert proc.returncode == 0, proc.stderr
        assert "5 judged now" in proc.stdout and len(server.requests) == 5
        out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert all(isinstance(row["harmful"], bool) for row in out)
    finally:
        server.close()

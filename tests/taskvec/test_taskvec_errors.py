"""Bad input, existing outputs and interrupted runs: one clear line naming the file (and
tensor), nothing written, no temporary left behind, inputs byte-identical."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import taskvec
from tests.support.checkpoints import (
    copy_checkpoint,
    edit_tensors,
    last_tensor,
    random_pair,
    read_tensors,
    tree_digest,
    write_checkpoint,
)
from tests.support.cli import assert_cli_error, assert_one_line, cli_env, run_cli

K_PROJ = "model.layers.1.self_attn.k_proj.weight"
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class Case:
    base: Path
    tuned: Path
    needles: tuple[str, ...]  # each must appear in the message; "a|b" means a or b
    kwargs: dict = field(default_factory=dict)


def _rewrite_bytes(path: Path, edit) -> None:
    path.write_bytes(edit(path.read_bytes()))


def _corrupt_shard(tmp_path, llama, edit) -> Case:
    tuned = copy_checkpoint(llama.tuned, tmp_path / "inputs" / "bad_tuned")
    _, shard = last_tensor(tuned)
    _rewrite_bytes(shard, edit)
    return Case(llama.base, tuned, (shard.name,))


def _edited(tmp_path, llama, side: str, edit, needles, **kwargs) -> Case:
    folder = copy_checkpoint(getattr(llama, side), tmp_path / "inputs" / f"bad_{side}")
    edit_tensors(folder, edit)
    base, tuned = (folder, llama.tuned) if side == "base" else (llama.base, folder)
    return Case(base, tuned, needles, kwargs)


def _only(name: str, change):
    return lambda n, t: change(t) if n == name else t


def _resize_vocab(rows: int):
    def resize(name, tensor):
        if name not in VOCAB_TENSORS:
            return tensor
        if rows <= tensor.shape[0]:
            return tensor[:rows]
        extra = torch.randn(rows - tensor.shape[0], tensor.shape[1]).to(tensor.dtype)
        return torch.cat([tensor, extra])

    return resize


def _missing_shard(tmp_path, llama) -> Case:
    tuned = copy_checkpoint(llama.tuned, tmp_path / "inputs" / "bad_tuned")
    shard = sorted(tuned.glob("*.safetensors"))[1]
    shard.unlink()
    return Case(llama.base, tuned, (shard.name,))


def _nan_in_tuned(tmp_path, llama) -> Case:
    tuned = copy_checkpoint(llama.tuned, tmp_path / "inputs" / "bad_tuned")
    name, _ = last_tensor(tuned)

    def poison(n, t):
        if n == name:
            t = t.clone()
            t.view(-1)[-1] = float("nan")
        return t

    edit_tensors(tuned, poison)
    return Case(llama.base, tuned, (name,))


def _fp16_overflow(tmp_path, llama) -> Case:
    """b − (t − b) = 60000 + 120000 overflows fp16 in the last tensor only."""
    folders = []
    for side, sign in (("base", 1), ("tuned", -1)):
        tensors = {"a.weight": torch.randn(64, 64).half(), "z.weight": torch.ones(8, 8).half()}
        tensors["z.weight"][-1, -1] = 60000 * sign
        folders.append(write_checkpoint(tmp_path / "inputs" / f"fp16_{side}", tensors, shards=2))
    return Case(*folders, ("z.weight",))


CASES = {
    "truncated": lambda tmp, llama: _corrupt_shard(tmp, llama, lambda raw: raw[:-100]),
    "header_past_end": lambda tmp, llama: _corrupt_shard(
        tmp, llama, lambda raw: struct.pack("<Q", len(raw) + 10) + raw[8:]),
    "header_not_json": lambda tmp, llama: _corrupt_shard(
        tmp, llama, lambda raw: raw[:8] + b"!" + raw[9:]),
    "missing_shard": _missing_shard,
    "tensor_missing_from_tuned": lambda tmp, llama: _edited(
        tmp, llama, "tuned", lambda n, t: None if n == K_PROJ else t, (K_PROJ, "bad_tuned")),
    "tensor_missing_from_base": lambda tmp, llama: _edited(
        tmp, llama, "base", lambda n, t: None if n == K_PROJ else t, (K_PROJ, "bad_base")),
    "shape_mismatch": lambda tmp, llama: _edited(
        tmp, llama, "tuned", _only(K_PROJ, lambda t: t[:, :-1]), (K_PROJ, "bad_tuned")),
    # fewer rows in a tensor that is not an embedding is a shape error, allowed vocab or not
    "row_mismatch_outside_vocab": lambda tmp, llama: _edited(
        tmp, llama, "tuned", _only(K_PROJ, lambda t: t[:-1]), (K_PROJ, "bad_tuned"),
        allow_vocab_mismatch=True),
    "dtype_mismatch": lambda tmp, llama: _edited(
        tmp, llama, "tuned", _only(K_PROJ, lambda t: t.half()), (K_PROJ, "bad_tuned")),
    "vocab_mismatch": lambda tmp, llama: _edited(
        tmp, llama, "tuned", _resize_vocab(260), ("|".join(VOCAB_TENSORS), "bad_tuned")),
    "nan_in_tuned": _nan_in_tuned,
    "fp16_overflow": _fp16_overflow,
    "base_does_not_exist": lambda tmp, llama: Case(tmp / "no_such_base", llama.tuned,
                                                   ("no_such_base",)),
}


def _assert_needles(message: str, needles) -> None:
    for needle in needles:
        assert any(n in message for n in needle.split("|")), (needle, message)


def _run_api(operation: str, case: Case, out: Path, **kwargs):
    kwargs = {**case.kwargs, **kwargs}
    if operation == "diff":
        return taskvec.diff(case.base, case.tuned, out, **kwargs)
    if operation == "apply":
        return taskvec.apply(case.base, [case.tuned], out, scales=[-1.0], **kwargs)
    return taskvec.negate(case.base, case.tuned, out, **kwargs)


def _inputs(case: Case) -> list[Path]:
    return [p for p in (case.base, case.tuned) if p.exists()]


@pytest.mark.parametrize("operation", ["negate", "diff", "apply"])
@pytest.mark.parametrize("name", CASES)
def test_bad_input_api(llama, tmp_path, name, operation):
    case = CASES[name](tmp_path, llama)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    before = tree_digest(*_inputs(case))
    with pytest.raises(taskvec.TaskVecError) as error:
        _run_api(operation, case, outputs / "out", max_shard_size="30KB")
    assert_one_line(str(error.value))
    _assert_needles(str(error.value), case.needles)
    assert not any(outputs.iterdir()), list(outputs.iterdir())
    assert tree_digest(*_inputs(case)) == before


@pytest.mark.parametrize("name", CASES)
def test_bad_input_cli(llama, tmp_path, name):
    case = CASES[name](tmp_path, llama)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    before = tree_digest(*_inputs(case))
    extra = ["--allow-vocab-mismatch"] if case.kwargs.get("allow_vocab_mismatch") else []
    proc = run_cli("negate", "--base", case.base, "--tuned", case.tuned,
                   "--out", outputs / "out", *extra)
    line = assert_cli_error(proc)
    _assert_needles(line, case.needles)
    assert not any(outputs.iterdir()), list(outputs.iterdir())
    assert tree_digest(*_inputs(case)) == before


@pytest.mark.parametrize("rows", [260, 250])
def test_allowed_vocab_mismatch_edits_common_rows_and_keeps_the_base_rows(llama, tmp_path, rows):
    case = _edited(tmp_path, llama, "tuned", _resize_vocab(rows), ())
    out = taskvec.negate(case.base, case.tuned, tmp_path / "o", allow_vocab_mismatch=True)
    base, tuned, result = read_tensors(case.base), read_tensors(case.tuned), read_tensors(out)
    common = min(rows, 256)
    for name, b in base.items():
        t = tuned[name]
        expected = b.clone()
        expected[:common] = (b[:common].float() - (t[:common].float() - b[:common].float())).to(
            b.dtype)
        assert torch.equal(result[name], expected), name
    recorded = json.loads((out / "taskvec.json").read_text())
    text = json.dumps(recorded)
    assert "vocab" in text and all(name in text for name in VOCAB_TENSORS), recorded

    proc = run_cli("negate", "--base", case.base, "--tuned", case.tuned, "--out",
                   tmp_path / "cli", "--allow-vocab-mismatch")
    assert proc.returncode == 0, proc.stderr
    assert all(torch.equal(result[k], v) for k, v in read_tensors(tmp_path / "cli").items())


def test_failed_run_after_some_shards_were_written_leaves_nothing(llama, tmp_path):
    case = _nan_in_tuned(tmp_path, llama)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with pytest.raises(taskvec.TaskVecError):
        taskvec.negate(case.base, case.tuned, outputs / "out", max_shard_size="20KB",
                       buffer_mb=0.001)
    assert not any(outputs.iterdir())


def test_fp8_weights_are_computed_or_refused(tmp_path):
    """float8 is a float dtype: passing the base's values through would silently drop the
    edit, as if the tensor were an integer buffer."""
    generator = torch.Generator().manual_seed(0)
    sides = [write_checkpoint(tmp_path / side, {
        "w": torch.randn(8, 8, generator=generator).to(torch.float8_e4m3fn)})
        for side in ("base", "tuned")]
    out = tmp_path / "out"
    try:
        taskvec.negate(*sides, out)
    except taskvec.TaskVecError as error:
        assert_one_line(str(error), "w")
        assert not out.exists()
        return
    b, t = (read_tensors(side)["w"].float() for side in sides)
    expected = (b - (t - b)).to(torch.float8_e4m3fn)
    assert torch.equal(read_tensors(out)["w"].view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("which", ["base", "tuned"])
def test_output_onto_an_input_is_refused_even_with_force(llama, tmp_path, which):
    base = copy_checkpoint(llama.base, tmp_path / "base")
    tuned = copy_checkpoint(llama.tuned, tmp_path / "tuned")
    before = tree_digest(base, tuned)
    with pytest.raises(taskvec.TaskVecError):
        taskvec.negate(base, tuned, base if which == "base" else tuned, force=True)
    assert tree_digest(base, tuned) == before


# ------------------------------------------------------------- existing outputs


def _existing_output(tmp_path: Path) -> Path:
    out = tmp_path / "outputs" / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("an earlier result")
    return out


def test_existing_output_is_refused_without_force_and_replaced_with_it(llama, tmp_path):
    out = _existing_output(tmp_path)
    with pytest.raises(taskvec.TaskVecError) as error:
        taskvec.negate(llama.base, llama.tuned, out)
    assert_one_line(str(error.value), str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    taskvec.negate(llama.base, llama.tuned, out, force=True)
    assert not (out / "keep.txt").exists()
    assert read_tensors(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_existing_output_cli(llama, adapters, tmp_path):
    out = _existing_output(tmp_path)
    for args in (("diff", "--base", llama.base, "--tuned", llama.tuned),
                 ("negate", "--tuned", adapters["qv"][1], "--as-adapter")):
        assert_cli_error(run_cli(*args, "--out", out), str(out))
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    proc = run_cli("negate", "--base", llama.base, "--tuned", llama.tuned, "--out", out,
                   "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_negate_adapter_refuses_existing_output(adapters, tmp_path):
    out = _existing_output(tmp_path)
    with pytest.raises(taskvec.TaskVecError):
        taskvec.negate_adapter(adapters["qv"][1], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    taskvec.negate_adapter(adapters["qv"][1], out, force=True)
    assert (out / "adapter_config.json").exists() and not (out / "keep.txt").exists()


# ------------------------------------------------------------- interrupted runs


@pytest.fixture(scope="session")
def slow_pair(tmp_path_factory):
    """64 MB of fp32 per side in narrow rows: with a one-row buffer negate takes seconds."""
    return random_pair(tmp_path_factory.mktemp("slow"),
                       {f"layers.{i}.weight": (8192, 256) for i in range(8)}, shards=2)


def _interrupt_negate(base: Path, tuned: Path, out: Path, signum: int, *extra: str) -> str:
    """Start `taskvec negate` with a one-row buffer, signal it once its temporary folder has
    appeared next to `out`, and return its stderr."""
    before = set(out.parent.iterdir())
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskvec", "negate", "--base", str(base), "--tuned", str(tuned),
         "--out", str(out), "--buffer-mb", "0.0001", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.monotonic() + 60
    while set(out.parent.iterdir()) == before and proc.poll() is None:
        assert time.monotonic() < deadline, "no temporary output appeared"
        time.sleep(0.01)
    time.sleep(0.3)  # well inside the write
    assert proc.poll() is None, "negate finished before it could be interrupted"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, (proc.returncode, stderr)  # 130 Ctrl-C, 143 TERM
    assert "Traceback" not in stderr, stderr
    return stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_leaves_nothing(slow_pair, tmp_path, signum):
    base, tuned = slow_pair
    before = tree_digest(base, tuned)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    _interrupt_negate(base, tuned, outputs / "out", signum)
    assert not any(outputs.iterdir()), list(outputs.iterdir())
    assert tree_digest(base, tuned) == before


def test_interrupted_forced_run_keeps_the_previous_output(slow_pair, tmp_path):
    out = _existing_output(tmp_path)
    _interrupt_negate(*slow_pair, out, signal.SIGTERM, "--force")
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

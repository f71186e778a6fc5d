"""Hostile files: headers, indexes and adapter configs that are wrong in layout or in type,
settings out of range, a full disk. Each ends in one TaskVecError line naming the file and
nothing written, on every read path; safetensors itself is the reference for what a header
may be. Missing adapter fields mean what they mean to peft."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import taskvec
from taskvec.adapter import PEFT_DEFAULTS
from tests.support.checkpoints import (
    assert_close_ulp,
    copy_checkpoint,
    peft_delta,
    random_pair,
    read_header,
    read_tensors,
    write_checkpoint,
)
from tests.support.cli import assert_cli_error, assert_one_line, cli_env, run_cli


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return random_pair(tmp_path_factory.mktemp("small"),
                       {"a.weight": (8, 8), "b.weight": (4, 8), "c.bias": (8,)})


def _raw(header: dict, data: bytes, *, text: str | None = None) -> bytes:
    raw = (text if text is not None else json.dumps(header)).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _entries(header):
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _set(name, key, value):
    def edit(header, data):
        header[name][key] = value
        return _raw(header, data)
    return edit


def _overlap(header, data):
    a = header["a.weight"]["data_offsets"][0]
    header["b.weight"]["data_offsets"] = [a, a + 128]
    return _raw(header, data)


def _hole(header, data):
    for entry in _entries(header).values():
        entry["data_offsets"] = [o + 8 for o in entry["data_offsets"]]
    return _raw(header, bytes(8) + data)


def _duplicate(header, data):
    text = json.dumps(header)
    return _raw(header, data, text=text[:-1] + ', "a.weight": ' + json.dumps(
        header["b.weight"]) + "}")


HEADERS = {
    "overlapping_offsets": _overlap,
    "offsets_out_of_order": _set("b.weight", "data_offsets", [384, 256]),
    "hole_before_a_tensor": _hole,
    "offsets_past_the_end": lambda h, d: _raw(h, d[:-16]),
    "trailing_bytes": lambda h, d: _raw(h, d + bytes(8)),
    "tensor_named_twice": _duplicate,
    "offsets_as_strings": _set("a.weight", "data_offsets", ["0", "256"]),
    "offsets_as_floats": _set("a.weight", "data_offsets", [0.0, 256.0]),
    "three_offsets": _set("a.weight", "data_offsets", [0, 128, 256]),
    "dtype_as_list": _set("a.weight", "dtype", ["F32"]),
    "shape_with_a_bool": _set("c.bias", "shape", [True]),
    "shape_as_string": _set("c.bias", "shape", "8"),
    "negative_dimension": _set("c.bias", "shape", [-8]),
    "entry_not_an_object": lambda h, d: _raw({**h, "a.weight": [1, 2]}, d),
    "metadata_as_list": lambda h, d: _raw({**h, "__metadata__": ["format", "pt"]}, d),
    "metadata_as_empty_list": lambda h, d: _raw({**h, "__metadata__": []}, d),  # found by fuzz
    "newline_in_a_bad_tensor_name": lambda h, d: _raw(  # found by fuzz: still one line
        {**h, "x\ny": {"dtype": "F99", "shape": [], "data_offsets": [0, 0]}}, d),
    "metadata_as_string": lambda h, d: _raw({**h, "__metadata__": "pt"}, d),
    "metadata_value_not_a_string": lambda h, d: _raw({**h, "__metadata__": {"n": 1}}, d),
    "header_a_list": lambda h, d: _raw(h, d, text="[1, 2]"),
    "deeply_nested": lambda h, d: _raw(h, d, text="[" * 100_000 + "]" * 100_000),
    "not_utf8": lambda h, d: struct.pack("<Q", 8) + b'{"\xff":1} ' + d,
}


def _corrupt(folder: Path, edit) -> Path:
    shard = folder / "model.safetensors"
    header, data = read_header(shard)
    shard.write_bytes(edit(header, data))
    return shard


@pytest.mark.parametrize("case", HEADERS)
def test_bad_header_is_refused_on_every_read_path(small, tmp_path, case):
    base, tuned = small
    bad = _corrupt(copy_checkpoint(tuned, tmp_path / "bad"), HEADERS[case])
    with pytest.raises(Exception):  # noqa: B017 - the reference: safetensors refuses it too
        with safe_open(bad, "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    runs = {
        "verify": lambda: taskvec.verify(bad.parent),
        "info": lambda: taskvec.info(bad.parent),
        "diff": lambda: taskvec.diff(base, bad.parent, outputs / "d"),
        "apply": lambda: taskvec.apply(base, [bad.parent], outputs / "a"),
        "negate_tuned": lambda: taskvec.negate(base, bad.parent, outputs / "n"),
        "negate_base": lambda: taskvec.negate(bad.parent, tuned, outputs / "b"),
    }
    for name, run in runs.items():
        with pytest.raises(taskvec.TaskVecError) as error:
            run()
        assert_one_line(str(error.value), str(bad))
        assert not any(outputs.iterdir()), (name, list(outputs.iterdir()))


def test_bad_header_cli_is_one_line(small, tmp_path):
    bad = _corrupt(copy_checkpoint(small[1], tmp_path / "bad"), HEADERS["deeply_nested"])
    assert_cli_error(run_cli("verify", bad.parent), str(bad), "nested")


# ------------------------------------------------------------- index files


def _index_edit(edit):
    def apply(folder: Path) -> None:
        path = folder / "model.safetensors.index.json"
        path.write_text(edit(json.loads(path.read_text()), path.read_text()))
    return apply


def _first_value(value):
    def edit(index, text):
        index["weight_map"][next(iter(index["weight_map"]))] = value
        return json.dumps(index)
    return edit


INDEXES = {
    "shard_as_number": _first_value(3),
    "shard_as_null": _first_value(None),
    "shard_outside_the_folder": _first_value("../base/model.safetensors"),
    "weight_map_as_list": lambda index, text: json.dumps({"weight_map": [1]}),
    "no_weight_map": lambda index, text: json.dumps({"metadata": {}}),
    "index_a_string": lambda index, text: json.dumps("weights"),
    "tensor_listed_twice": lambda index, text: text.replace(
        '"weight_map": {', '"weight_map": {"a.weight": "x.safetensors", ', 1),
    "deeply_nested": lambda index, text: "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("case", INDEXES)
def test_bad_index_is_one_line(tmp_path, case):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"{n}.weight": torch.randn(4, 4, generator=generator) for n in "abcd"}
    folder = write_checkpoint(tmp_path / "sharded", tensors, shards=2)
    base = write_checkpoint(tmp_path / "base", tensors, shards=2)
    _index_edit(INDEXES[case])(folder)
    for run in (lambda: taskvec.verify(folder),
                lambda: taskvec.negate(base, folder, tmp_path / "out")):
        with pytest.raises(taskvec.TaskVecError) as error:
            run()
        assert_one_line(str(error.value), "model.safetensors.index.json")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------- adapters


def test_missing_adapter_fields_take_the_installed_peft_defaults():
    from peft import LoraConfig

    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    for key, value in PEFT_DEFAULTS.items():
        default = fields[key].default
        if default is dataclasses.MISSING:
            default = fields[key].default_factory()
        assert value == default, key


def test_adapter_without_lora_alpha_merges_as_peft_does(adapter_without_alpha, tmp_path):
    """r = 16 and no lora_alpha: peft merges with α = 8 (s = 0.5), not α = r (s = 1)."""
    base_dir, adapter = adapter_without_alpha
    base, delta = peft_delta(base_dir, adapter)
    out = read_tensors(taskvec.apply(base_dir, [adapter], tmp_path / "o"))
    changed = [name for name in base if torch.count_nonzero(delta[name])]
    assert changed
    for name in changed:
        assert_close_ulp(out[name], base[name] + delta[name], name)


def _adapter_copy(adapters, tmp_path, config_edit=None, tensor_edit=None) -> Path:
    folder = tmp_path / "bad_adapter"
    shutil.copytree(adapters["qv"][1], folder)
    if config_edit is not None:
        path = folder / "adapter_config.json"
        path.write_text(config_edit(json.loads(path.read_text())))
    if tensor_edit is not None:
        path = folder / "adapter_model.safetensors"
        tensors = load_file(path)
        save_file({k: v.contiguous() for k, v in tensor_edit(tensors).items()}, path)
    return folder


def _field(key, value):
    return lambda config: json.dumps({**config, key: value})


def _first_factor(kind, change):
    def edit(tensors):
        name = sorted(k for k in tensors if kind in k)[0]
        tensors[name] = change(tensors[name])
        return tensors
    return edit


ADAPTER_CONFIGS = {
    "null": lambda c: "null",
    "list": lambda c: "[]",
    "string": lambda c: '"lora"',
    "lora_alpha_string": _field("lora_alpha", "16"),
    "lora_alpha_null": _field("lora_alpha", None),
    "lora_alpha_nan": lambda c: json.dumps({**c, "lora_alpha": math.nan}),  # JSON's NaN
    "lora_alpha_bool": _field("lora_alpha", True),
    "r_zero": _field("r", 0),
    "r_float": _field("r", 8.0),
    "rank_pattern_string": _field("rank_pattern", "q_proj"),
    "rank_pattern_value_string": _field("rank_pattern", {"q_proj": "8"}),
    "rank_pattern_bad_regex": _field("rank_pattern", {"(q_proj": 8}),
    "alpha_pattern_inf": lambda c: json.dumps({**c, "alpha_pattern": {"q_proj": math.inf}}),
    "use_rslora_string": _field("use_rslora", "yes"),
    "peft_type_list": _field("peft_type", ["LORA"]),
    "key_twice": lambda c: json.dumps(c)[:-1] + ', "r": 4}',
    "deeply_nested": lambda c: "[" * 100_000 + "]" * 100_000,
}
ADAPTER_TENSORS = {
    "rank_zero_factors": lambda t: {k: (v[:0] if "lora_A" in k else v[:, :0])
                                    for k, v in t.items()},
    "mismatched_factors": _first_factor("lora_B", lambda v: v[:, :-1]),
    "factor_not_a_matrix": _first_factor("lora_A", lambda v: v.flatten()),
    "integer_factor": _first_factor("lora_A", lambda v: v.to(torch.int32)),
}


@pytest.mark.parametrize("case", [*ADAPTER_CONFIGS, *ADAPTER_TENSORS])
def test_bad_adapter_is_one_line_on_every_path(adapters, tmp_path, case):
    folder = _adapter_copy(adapters, tmp_path, ADAPTER_CONFIGS.get(case),
                           ADAPTER_TENSORS.get(case))
    base = adapters["qv"][0]
    for run in (lambda: taskvec.apply(base, [folder], tmp_path / "a"),
                lambda: taskvec.negate_adapter(folder, tmp_path / "n"),
                lambda: taskvec.info(folder)):
        with pytest.raises(taskvec.TaskVecError) as error:
            run()
        assert_one_line(str(error.value), str(folder))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_adapter"]


@pytest.mark.parametrize("case", ["nan_in_lora_A", "inf_in_lora_B"])
def test_negate_as_adapter_refuses_non_finite_factors(adapters, tmp_path, case):
    kind, value = ("lora_A", math.nan) if case == "nan_in_lora_A" else ("lora_B", math.inf)
    folder = _adapter_copy(adapters, tmp_path, tensor_edit=_first_factor(
        kind, lambda v: v.index_fill(0, torch.tensor([0]), value)))
    assert_cli_error(run_cli("negate", "--tuned", folder, "--as-adapter", "--out",
                             tmp_path / "n"), "NaN/Inf")
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "1e39"])
def test_negate_as_adapter_refuses_a_scale_that_is_not_finite(adapters, tmp_path, scale):
    # 1e39 is a finite float, but not once B is scaled by it in fp32: the engine refuses that
    needle = "NaN/Inf" if scale == "1e39" else "scale"
    assert_cli_error(run_cli("negate", "--tuned", adapters["qv"][1], "--as-adapter",
                             "--scale", scale, "--out", tmp_path / "n"), needle)
    assert not (tmp_path / "n").exists()


# ------------------------------------------------------------- task vectors


def test_vector_without_taskvec_json_is_still_a_vector(llama, tmp_path):
    vector = taskvec.diff(llama.base, llama.tuned, tmp_path / "v")
    expected = read_tensors(taskvec.apply(llama.base, [vector], tmp_path / "with"))
    (vector / "taskvec.json").unlink()
    assert taskvec.kind(vector) == "task_vector"
    got = read_tensors(taskvec.apply(llama.base, [vector], tmp_path / "without"))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    model = taskvec.negate(llama.base, llama.tuned, tmp_path / "model")
    (model / "taskvec.json").unlink()
    assert taskvec.kind(model) == "model"


# ------------------------------------------------------------- settings and the disk


@pytest.mark.parametrize("option", [
    ("--max-shard-size", "."), ("--max-shard-size", "0"), ("--max-shard-size", "1..5GB"),
    ("--buffer-mb", "nan"), ("--buffer-mb", "inf"), ("--buffer-mb", "1e7"),
    ("--buffer-mb", "0"), ("--buffer-mb", "-1"), ("--scale", "nan"), ("--scale", "-inf")])
def test_bad_setting_is_refused_before_any_work(small, tmp_path, option):
    proc = run_cli("negate", "--base", small[0], "--tuned", small[1], "--out", tmp_path / "o",
                   *option)
    assert_cli_error(proc, {"--max-shard-size": "shard size", "--buffer-mb": "buffer size",
                            "--scale": "scale"}[option[0]])
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_full_disk_names_the_file(small, tmp_path):
    """ENOSPC from pwrite (which names no file) is reported with the file it was writing."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64",
         "-e", "inject=pwrite64:error=ENOSPC", sys.executable, "-m", "taskvec", "negate",
         "--base", str(small[0]), "--tuned", str(small[1]), "--out", str(outputs / "o")],
        capture_output=True, text=True, env=cli_env(), timeout=120)
    line = assert_cli_error(proc, "No space left on device", "model.safetensors")
    assert "error: :" not in line
    assert not any(outputs.iterdir())



@pytest.mark.parametrize("args", [
    ("negate", "--base", "{base}", "--tuned", "{tuned}", "--out", ""),
    ("apply", "--base", "{base}", "--vector", " ", "--out", "{out}"),
    ("info", ""),
])
def test_an_empty_path_is_refused_as_one(small, tmp_path, args):
    """An empty path would resolve to the current folder: refused as empty, not as that."""
    base, tuned = small
    args = [a.format(base=base, tuned=tuned, out=tmp_path / "out") for a in args]
    assert_cli_error(run_cli(*args), "an empty path")
    assert not (tmp_path / "out").exists()


def test_a_device_file_is_named_for_what_it_is():
    assert_cli_error(run_cli("verify", "/dev/null"), "/dev/null", "not a regular file or folder")

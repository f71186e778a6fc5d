"""taskvec.info and taskvec.verify: what a folder holds, and every corruption verify must
catch (API and CLI)."""

from __future__ import annotations

import json

import pytest

import taskvec
from tests.support.checkpoints import (
    copy_checkpoint,
    edit_tensors,
    layer_norms,
    read_header,
    read_tensors,
    write_header,
)
from tests.support.cli import assert_cli_error, assert_one_line, run_cli

INDEX = "model.safetensors.index.json"


def _summary(folder) -> tuple[int, dict, int]:
    tensors = read_tensors(folder)
    dtypes: dict[str, int] = {}
    for tensor in tensors.values():
        name = str(tensor.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1
    return len(tensors), dtypes, sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("model", ["llama", "opt", "gpt2", "with_buffers"])
def test_info_on_models(request, model):
    folder = request.getfixturevalue(model).base
    result = taskvec.info(folder)
    assert result["kind"] == "model"
    assert (result["tensors"], result["dtypes"], result["bytes"]) == _summary(folder)
    assert not result.get("layer_norms")


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_info_on_task_vectors(llama, tmp_path, dtype):
    vector = taskvec.diff(llama.base, llama.tuned, tmp_path / "v", dtype=dtype)
    result = taskvec.info(vector)
    assert result["kind"] == "task_vector"
    assert (result["tensors"], result["dtypes"], result["bytes"]) == _summary(vector)
    expected = layer_norms(read_tensors(vector))
    assert sorted(result["layer_norms"]) == sorted(expected)
    for layer, norm in expected.items():
        assert result["layer_norms"][layer] == pytest.approx(norm, rel=1e-5), layer


def test_info_cli_prints_a_table_and_json(llama, tmp_path):
    vector = taskvec.diff(llama.base, llama.tuned, tmp_path / "v")
    as_json = run_cli("info", vector, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == json.loads(json.dumps(taskvec.info(vector)))
    table = run_cli("info", vector)
    assert table.returncode == 0, table.stderr
    assert "task_vector" in table.stdout and "layers.1" in table.stdout
    assert str(_summary(vector)[0]) in table.stdout


def test_verify_passes_on_good_folders(llama, with_buffers, adapters, tmp_path):
    folders = [
        llama.base,
        with_buffers.base,
        adapters["qv"][1],
        taskvec.diff(llama.base, llama.tuned, tmp_path / "v"),
        taskvec.negate(llama.base, llama.tuned, tmp_path / "o", max_shard_size="30KB"),
        taskvec.negate_adapter(adapters["rslora_all"][1], tmp_path / "n"),
    ]
    for folder in folders:
        assert isinstance(taskvec.verify(folder), dict)
    proc = run_cli("verify", folders[-2])
    assert proc.returncode == 0, proc.stderr


def _shards(folder):
    return sorted(folder.glob("*.safetensors"))


def _edit_header(shard, edit) -> None:
    header, data = read_header(shard)
    edit(header)
    write_header(shard, header, data)


def _truncate(folder):
    shard = _shards(folder)[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    return shard.name


def _header_past_end(folder):
    shard = _shards(folder)[0]
    raw = shard.read_bytes()
    shard.write_bytes((len(raw)).to_bytes(8, "little") + raw[8:])
    return shard.name


def _header_not_json(folder):
    shard = _shards(folder)[0]
    raw = bytearray(shard.read_bytes())
    raw[8:10] = b"{{"
    shard.write_bytes(bytes(raw))
    return shard.name


def _missing_shard(folder):
    shard = _shards(folder)[1]
    shard.unlink()
    return shard.name


def _index_names_wrong_shard(folder):
    index = json.loads((folder / INDEX).read_text())
    name, shard = next(iter(index["weight_map"].items()))
    other = next(s.name for s in _shards(folder) if s.name != shard)
    index["weight_map"][name] = other
    (folder / INDEX).write_text(json.dumps(index))
    return name


def _tensor_not_in_index(folder):
    index = json.loads((folder / INDEX).read_text())
    name = sorted(index["weight_map"])[0]
    del index["weight_map"][name]
    (folder / INDEX).write_text(json.dumps(index))
    return name


def _offsets_do_not_match_shape(folder):
    shard = _shards(folder)[0]

    def shrink(header):
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] -= 2
    _edit_header(shard, shrink)
    return shard.name


def _offsets_overlap(folder):
    """Two same-sized tensors pointing at the same bytes: sizes still add up per tensor."""
    shard = _shards(folder)[0]

    def overlap(header):
        entries = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
        by_size: dict[int, list] = {}
        for (begin, end), name in entries:
            by_size.setdefault(end - begin, []).append(name)
        first, second = next(names for names in by_size.values() if len(names) > 1)[:2]
        header[second]["data_offsets"] = list(header[first]["data_offsets"])
    _edit_header(shard, overlap)
    return shard.name


def _poison(value):
    def edit(folder):
        name = sorted(read_tensors(folder))[-1]

        def change(n, t):
            if n == name:
                t = t.clone()
                t.view(-1)[0] = value
            return t
        edit_tensors(folder, change)
        return name
    return edit


CORRUPTIONS = {
    "truncated": _truncate,
    "header_past_end": _header_past_end,
    "header_not_json": _header_not_json,
    "missing_shard": _missing_shard,
    "index_names_wrong_shard": _index_names_wrong_shard,
    "tensor_not_in_index": _tensor_not_in_index,
    "offsets_do_not_match_shape": _offsets_do_not_match_shape,
    "offsets_overlap": _offsets_overlap,
    "nan": _poison(float("nan")),
    "inf": _poison(float("inf")),
}


# The command line only wraps verify(): a few kinds are enough to check its one-line errors.
CLI_CHECKED = {"truncated", "tensor_not_in_index", "nan"}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_verify_catches_each_corruption(llama, tmp_path, name):
    folder = copy_checkpoint(llama.base, tmp_path / "bad")
    needle = CORRUPTIONS[name](folder)
    with pytest.raises(taskvec.TaskVecError) as error:
        taskvec.verify(folder)
    assert_one_line(str(error.value), needle, str(folder))
    if name in CLI_CHECKED:
        assert_cli_error(run_cli("verify", folder), needle)

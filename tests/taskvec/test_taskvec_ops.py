"""diff / apply / negate on full checkpoints: bit-exact against a plain fp32 torch reference,
and outputs that transformers loads into the same model as a state_dict edited by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import taskvec
from tests.support.checkpoints import read_header, read_tensors
from tests.support.cli import run_cli

FLOAT = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ref_diff(base: dict, tuned: dict, dtype: torch.dtype | None = None) -> dict:
    return {k: (tuned[k].float() - b.float()).to(dtype or b.dtype) if b.dtype in FLOAT else b
            for k, b in base.items()}


def ref_negate(base: dict, tuned: dict, scale: float) -> dict:
    out = {}
    for k, b in base.items():
        if b.dtype not in FLOAT:
            out[k] = b
            continue
        d = tuned[k].float() - b.float()
        d = d * scale
        out[k] = (b.float() - d).to(b.dtype)
    return out


def ref_apply(base: dict, vectors: list[dict], scales: list[float]) -> dict:
    out = {}
    for k, b in base.items():
        if b.dtype not in FLOAT:
            out[k] = b
            continue
        acc = b.float()
        for vector, scale in zip(vectors, scales, strict=True):
            acc = acc + scale * vector[k].float()
        out[k] = acc.to(b.dtype)
    return out


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("model", ["llama", "opt", "gpt2", "with_buffers"])
def test_diff_is_exact_in_base_dtype(request, tmp_path, model):
    pair = request.getfixturevalue(model)
    out = taskvec.diff(pair.base, pair.tuned, tmp_path / "v")
    assert Path(out) == tmp_path / "v"
    assert_same_tensors(read_tensors(out), ref_diff(read_tensors(pair.base),
                                                    read_tensors(pair.tuned)))
    meta = json.loads((tmp_path / "v" / "taskvec.json").read_text())
    text = json.dumps(meta)
    assert str(pair.base) in text and str(pair.tuned) in text and "diff" in text


@pytest.mark.parametrize("dtype", DTYPES)
def test_diff_dtype_option(llama, tmp_path, dtype):
    out = taskvec.diff(llama.base, llama.tuned, tmp_path / "v", dtype=dtype)
    expected = ref_diff(read_tensors(llama.base), read_tensors(llama.tuned), DTYPES[dtype])
    assert_same_tensors(read_tensors(out), expected)
    assert dtype in json.dumps(json.loads((out / "taskvec.json").read_text()))


@pytest.mark.parametrize(("model", "scale"), [("llama", 1.0), ("llama", 0.3), ("opt", 1.0),
                                              ("gpt2", 2.5), ("with_buffers", -0.7)])
def test_negate_is_exact(request, tmp_path, model, scale):
    pair = request.getfixturevalue(model)
    out = taskvec.negate(pair.base, pair.tuned, tmp_path / "o", scale=scale)
    expected = ref_negate(read_tensors(pair.base), read_tensors(pair.tuned), scale)
    assert_same_tensors(read_tensors(out), expected)
    assert str(scale) in json.dumps(json.loads((out / "taskvec.json").read_text()))


def test_apply_several_vectors_with_negative_scales(llama, tmp_path):
    v1 = taskvec.diff(llama.base, llama.tuned, tmp_path / "v1")
    v2 = taskvec.diff(llama.base, llama.tuned2, tmp_path / "v2", dtype="float32")
    scales = [-0.7, 1.3]
    out = taskvec.apply(llama.base, [v1, v2], tmp_path / "o", scales=scales)
    expected = ref_apply(read_tensors(llama.base), [read_tensors(v1), read_tensors(v2)], scales)
    assert_same_tensors(read_tensors(out), expected)


@pytest.mark.parametrize("model", ["opt", "with_buffers"])
def test_apply_scales_default_to_one(request, tmp_path, model):
    pair = request.getfixturevalue(model)
    v1 = taskvec.diff(pair.base, pair.tuned, tmp_path / "v1")
    v2 = taskvec.diff(pair.base, pair.tuned2, tmp_path / "v2")
    out = taskvec.apply(pair.base, [v1, v2], tmp_path / "o")
    expected = ref_apply(read_tensors(pair.base), [read_tensors(v1), read_tensors(v2)], [1, 1])
    assert_same_tensors(read_tensors(out), expected)


def test_apply_of_diff_then_negative_one_is_negate(llama, tmp_path):
    """negate(B, T) and apply(B, [diff(B, T) in fp32], [-1]) are the same fp32 formula."""
    vector = taskvec.diff(llama.base, llama.tuned, tmp_path / "v", dtype="float32")
    applied = taskvec.apply(llama.base, [vector], tmp_path / "a", scales=[-1.0])
    negated = taskvec.negate(llama.base, llama.tuned, tmp_path / "n")
    assert_same_tensors(read_tensors(applied), read_tensors(negated))


@pytest.mark.parametrize("operation", ["diff", "negate", "apply"])
@pytest.mark.parametrize("buffer_mb", [0.0005, 0.00001])
def test_tiny_buffer_slices_rows_without_changing_a_bit(llama, tmp_path, operation, buffer_mb):
    """0.0005 MB is ~500 bytes: a few rows of the smallest tensors, so every tensor is streamed
    in many slices; 0.00001 MB is smaller than any row, which must still work."""
    base, tuned = read_tensors(llama.base), read_tensors(llama.tuned)
    out = tmp_path / "o"
    if operation == "diff":
        taskvec.diff(llama.base, llama.tuned, out, buffer_mb=buffer_mb)
        expected = ref_diff(base, tuned)
    elif operation == "negate":
        taskvec.negate(llama.base, llama.tuned, out, scale=0.3, buffer_mb=buffer_mb)
        expected = ref_negate(base, tuned, 0.3)
    else:
        vector = taskvec.diff(llama.base, llama.tuned2, tmp_path / "v", dtype="float32")
        taskvec.apply(llama.base, [vector], out, scales=[-1.5], buffer_mb=buffer_mb)
        expected = ref_apply(base, [read_tensors(vector)], [-1.5])
    assert_same_tensors(read_tensors(out), expected)


def _shard_sizes(folder: Path) -> dict[str, int]:
    sizes = {}
    for path in folder.glob("*.safetensors"):
        _, data = read_header(path)
        sizes[path.name] = len(data)
    return sizes


@pytest.mark.parametrize("limit", ["40KB", 40_000])
def test_max_shard_size_reshards_the_output(llama, tmp_path, limit):
    out = taskvec.negate(llama.base, llama.tuned, tmp_path / "o", max_shard_size=limit)
    sizes = _shard_sizes(out)
    assert len(sizes) > len(list(llama.base.glob("*.safetensors"))), sizes
    bound = 40 * 1024 if isinstance(limit, str) else limit
    assert max(sizes.values()) <= bound, sizes
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = read_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(sizes)
    expected = ref_negate(read_tensors(llama.base), read_tensors(llama.tuned), 1.0)
    assert_same_tensors(tensors, expected)


def test_single_file_input_can_be_sharded_and_sharded_merged(gpt2, llama, tmp_path):
    sharded = taskvec.diff(gpt2.base, gpt2.tuned, tmp_path / "v", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(_shard_sizes(sharded)) > 1
    assert_same_tensors(read_tensors(sharded),
                        ref_diff(read_tensors(gpt2.base), read_tensors(gpt2.tuned)))
    merged = taskvec.negate(llama.base, llama.tuned, tmp_path / "o", max_shard_size="1GB")
    assert [p.name for p in merged.glob("*.safetensors")] == ["model.safetensors"]


def test_tied_embeddings_pass_through(opt, tmp_path):
    out = taskvec.negate(opt.base, opt.tuned, tmp_path / "o")
    names = read_tensors(out)
    assert not any("lm_head" in name for name in names)
    assert set(names) == set(read_tensors(opt.base))


# ------------------------------------------------------------- the outputs are models


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _edited_base(base: Path, expected: dict, dtype: torch.dtype):
    """The base model with its state_dict overwritten in plain torch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in expected.items():
            state[name].copy_(tensor)
    return model


@pytest.mark.parametrize(("model", "dtype"), [("llama", torch.bfloat16), ("opt", torch.float16),
                                              ("gpt2", torch.float32)])
def test_negated_model_loads_and_gives_the_edited_logits(request, tmp_path, model, dtype):
    from transformers import AutoModelForCausalLM

    pair = request.getfixturevalue(model)
    out = taskvec.negate(pair.base, pair.tuned, tmp_path / "o", scale=0.5)
    expected = ref_negate(read_tensors(pair.base), read_tensors(pair.tuned), 0.5)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    reference = _edited_base(pair.base, expected, dtype)
    assert torch.equal(_logits(loaded), _logits(reference))
    # and the edit is visible: the negated model is not the base
    assert not torch.equal(_logits(loaded), _logits(AutoModelForCausalLM.from_pretrained(
        pair.base, dtype=dtype)))


def test_applied_model_loads_and_gives_the_edited_logits(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    v1 = taskvec.diff(llama.base, llama.tuned, tmp_path / "v1")
    v2 = taskvec.diff(llama.base, llama.tuned2, tmp_path / "v2")
    out = taskvec.apply(llama.base, [v1, v2], tmp_path / "o", scales=[0.5, -0.25])
    expected = ref_apply(read_tensors(llama.base), [read_tensors(v1), read_tensors(v2)],
                         [0.5, -0.25])
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.equal(_logits(loaded), _logits(_edited_base(llama.base, expected,
                                                             torch.bfloat16)))


def test_outputs_carry_config_generation_config_and_tokenizer(llama, tmp_path):
    from transformers import AutoTokenizer

    vector = taskvec.diff(llama.base, llama.tuned, tmp_path / "v")
    assert (vector / "config.json").read_bytes() == (llama.base / "config.json").read_bytes()
    out = taskvec.apply(llama.base, [vector], tmp_path / "o", scales=[-1])
    copied = [p.name for p in llama.base.iterdir()
              if p.suffix != ".safetensors" and p.name != "model.safetensors.index.json"]
    assert "generation_config.json" in copied and "tokenizer.json" in copied
    for name in copied:
        assert (out / name).read_bytes() == (llama.base / name).read_bytes(), name
    assert json.loads((out / "taskvec.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("w1 w2")["input_ids"] == [1, 2]


# ------------------------------------------------------------- the command line


def _cli_ok(*args) -> str:
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cli_writers_match_the_api(llama, tmp_path):
    _cli_ok("diff", "--base", llama.base, "--tuned", llama.tuned, "--out", tmp_path / "v",
            "--dtype", "float32")
    assert_same_tensors(read_tensors(tmp_path / "v"), ref_diff(
        read_tensors(llama.base), read_tensors(llama.tuned), torch.float32))

    _cli_ok("diff", "--base", llama.base, "--tuned", llama.tuned2, "--out", tmp_path / "v2")
    _cli_ok("apply", "--base", llama.base, "--vector", tmp_path / "v", "--vector",
            tmp_path / "v2", "--scale", "-0.7", "--scale", "1.3", "--out", tmp_path / "a",
            "--buffer-mb", "0.001", "--max-shard-size", "50KB")
    assert_same_tensors(read_tensors(tmp_path / "a"), ref_apply(
        read_tensors(llama.base), [read_tensors(tmp_path / "v"), read_tensors(tmp_path / "v2")],
        [-0.7, 1.3]))

    _cli_ok("negate", "--base", llama.base, "--tuned", llama.tuned, "--scale", "0.3",
            "--out", tmp_path / "n")
    assert_same_tensors(read_tensors(tmp_path / "n"), ref_negate(
        read_tensors(llama.base), read_tensors(llama.tuned), 0.3))


def test_console_script_is_installed(llama, tmp_path):
    script = shutil.which("taskvec", path=str(Path(sys.executable).parent))
    assert script, "console script `taskvec` not installed next to the interpreter"
    proc = subprocess.run([script, "negate", "--base", str(llama.base), "--tuned",
                           str(llama.tuned), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(read_tensors(tmp_path / "o"), ref_negate(
        read_tensors(llama.base), read_tensors(llama.tuned), 1.0))


@pytest.mark.parametrize("legacy_side", ["base", "tuned"])
def test_names_match_across_a_prefix_one_side_lacks(gpt2, tmp_path, legacy_side):
    """The hub's GPT-2 stores `h.0.…` where save_pretrained writes `transformer.h.0.…`: the
    same tensors, matched by name; the output keeps the base's names."""
    legacy = tmp_path / f"legacy_{legacy_side}"
    shutil.copytree(getattr(gpt2, legacy_side), legacy)
    renamed = {k.removeprefix("transformer."): v
               for k, v in read_tensors(getattr(gpt2, legacy_side)).items()}
    for path in legacy.glob("*.safetensors"):
        path.unlink()
    (legacy / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    base, tuned = (legacy, gpt2.tuned) if legacy_side == "base" else (gpt2.base, legacy)

    out = taskvec.negate(base, tuned, tmp_path / "o", scale=1.5)
    expected = ref_negate(read_tensors(gpt2.base), read_tensors(gpt2.tuned), 1.5)
    if legacy_side == "base":
        expected = {k.removeprefix("transformer."): v for k, v in expected.items()}
    assert_same_tensors(read_tensors(out), expected)


def test_a_model_stays_a_model_whatever_its_provenance_mentions(llama, tmp_path, monkeypatch):
    """A model whose taskvec.json names an input folder called `task_vector` is still a model:
    the kind comes from the recorded `kind`, not from any text in the file."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(llama.tuned, tmp_path / "task_vector")
    first = taskvec.negate(llama.base, "task_vector", "first")
    assert taskvec.kind(first) == "model"
    assert taskvec.kind(taskvec.diff(llama.base, first, "vector")) == "task_vector"
    second = taskvec.negate(llama.base, first, "second", scale=0.5)
    expected = ref_negate(read_tensors(llama.base), read_tensors(first), 0.5)
    assert_same_tensors(read_tensors(second), expected)

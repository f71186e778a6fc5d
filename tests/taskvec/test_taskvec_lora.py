"""LoRA adapters as task vectors. The truth is peft's own merge: ΔW = merge_and_unload(base) −
base, compared on the effective delta, never on the A and B factors separately."""

from __future__ import annotations

import json

import pytest
import torch

import taskvec
from tests.support.checkpoints import (
    assert_close_ulp,
    layer_norms,
    peft_delta,
    read_tensors,
    tree_digest,
)
from tests.support.cli import assert_cli_error, assert_one_line, run_cli

LORA = ["qv", "rslora_all", "conv1d", "embedding", "modules_to_save"]
REFUSED = ["dora", "ia3"]


def _check_edit(out_tensors: dict, base: dict, delta: dict, scale: float) -> None:
    """out = base + scale·ΔW per tensor; tensors that peft leaves alone are bit-identical."""
    assert sorted(out_tensors) == sorted(base)
    changed = 0
    for name, b in base.items():
        actual = out_tensors[name]
        if torch.count_nonzero(delta[name]) == 0:
            assert torch.equal(actual.float(), b), name
            continue
        changed += 1
        assert_close_ulp(actual, b + scale * delta[name], name)
    assert changed > 0


@pytest.mark.parametrize("name", LORA)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_negate_with_adapter_matches_peft_merge(adapters, tmp_path, name, scale):
    base_dir, adapter = adapters[name]
    base, delta = peft_delta(base_dir, adapter)
    out = taskvec.negate(base_dir, adapter, tmp_path / "o", scale=scale)
    out_tensors = read_tensors(out)
    dtype = next(iter(read_tensors(base_dir).values())).dtype
    assert {t.dtype for t in out_tensors.values()} == {dtype}
    _check_edit(out_tensors, base, delta, -scale)


@pytest.mark.parametrize("name", LORA)
def test_apply_adapter_with_a_scale(adapters, tmp_path, name):
    base_dir, adapter = adapters[name]
    base, delta = peft_delta(base_dir, adapter)
    out = taskvec.apply(base_dir, [adapter], tmp_path / "o", scales=[0.75])
    _check_edit(read_tensors(out), base, delta, 0.75)


def test_apply_mixes_adapters_and_task_vectors(llama, adapters, tmp_path):
    base_dir, adapter = adapters["qv"]
    base, delta = peft_delta(base_dir, adapter)
    vector = taskvec.diff(llama.base, llama.tuned, tmp_path / "v", dtype="float32")
    out = taskvec.apply(llama.base, [vector, adapter], tmp_path / "o", scales=[-1.0, 2.0])
    vector_tensors, out_tensors = read_tensors(vector), read_tensors(out)
    for name, b in base.items():
        expected = b + -1.0 * vector_tensors[name] + 2.0 * delta[name]
        assert_close_ulp(out_tensors[name], expected, name)


@pytest.mark.parametrize("name", ["rslora_all", "embedding", "modules_to_save"])
def test_diff_of_an_adapter_is_its_merged_delta(adapters, tmp_path, name):
    """diff(B, adapter) stores ΔW; applying it with −1 is negate(B, adapter)."""
    base_dir, adapter = adapters[name]
    base, delta = peft_delta(base_dir, adapter)
    vector = taskvec.diff(base_dir, adapter, tmp_path / "v", dtype="float32")
    stored = read_tensors(vector)
    for tensor_name, d in delta.items():
        torch.testing.assert_close(stored[tensor_name], d, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=tensor_name: f"{n}: {m}")
    applied = read_tensors(taskvec.apply(base_dir, [vector], tmp_path / "a", scales=[-1]))
    negated = read_tensors(taskvec.negate(base_dir, adapter, tmp_path / "n"))
    for tensor_name, tensor in negated.items():
        assert_close_ulp(applied[tensor_name], tensor.float(), tensor_name)


def test_negated_adapter_model_loads_in_transformers(adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir, adapter = adapters["conv1d"]
    out = taskvec.negate(base_dir, adapter, tmp_path / "o")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    state = model.state_dict()
    base, delta = peft_delta(base_dir, adapter)
    for name, b in base.items():
        assert_close_ulp(state[name], b - delta[name], name)


@pytest.mark.parametrize("name", ["qv", "rslora_all", "conv1d", "embedding"])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_negate_adapter_merges_to_the_negation(adapters, tmp_path, name, scale):
    """The negated adapter, loaded by peft onto the base and merged, gives base − L·ΔW."""
    base_dir, adapter = adapters[name]
    negated = taskvec.negate_adapter(adapter, tmp_path / "n", scale=scale)
    base, delta = peft_delta(base_dir, adapter)
    _, negated_delta = peft_delta(base_dir, negated)
    for tensor_name, d in delta.items():
        torch.testing.assert_close(negated_delta[tensor_name], -scale * d, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=tensor_name: f"{n}: {m}")
    config = json.loads((negated / "adapter_config.json").read_text())
    original = json.loads((adapter / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
                "fan_in_fan_out", "target_modules"):
        assert config[key] == original[key], key


def test_negate_adapter_with_modules_to_save_is_right_or_refused(adapters, tmp_path):
    """A replaced module cannot be negated without the base (B_m − L·(M − B_m) needs B_m):
    the negated adapter must either merge to that or be refused, never keep M."""
    base_dir, adapter = adapters["modules_to_save"]
    out = tmp_path / "n"
    try:
        taskvec.negate_adapter(adapter, out)
    except taskvec.TaskVecError as error:
        assert_one_line(str(error), "modules_to_save")
        assert not out.exists()
        return
    base, delta = peft_delta(base_dir, adapter)
    _, negated_delta = peft_delta(base_dir, out)
    for name, d in delta.items():
        torch.testing.assert_close(negated_delta[name], -d, rtol=1e-5, atol=1e-7)


def test_negate_adapter_cli(adapters, tmp_path):
    base_dir, adapter = adapters["qv"]
    proc = run_cli("negate", "--tuned", adapter, "--as-adapter", "--scale", "0.5",
                   "--out", tmp_path / "n")
    assert proc.returncode == 0, proc.stderr
    base, delta = peft_delta(base_dir, adapter)
    _, negated_delta = peft_delta(base_dir, tmp_path / "n")
    for name, d in delta.items():
        torch.testing.assert_close(negated_delta[name], -0.5 * d, rtol=1e-5, atol=1e-7)


def test_negate_with_adapter_cli_matches_api(adapters, tmp_path):
    base_dir, adapter = adapters["rslora_all"]
    taskvec.negate(base_dir, adapter, tmp_path / "api")
    proc = run_cli("negate", "--base", base_dir, "--tuned", adapter, "--out", tmp_path / "cli")
    assert proc.returncode == 0, proc.stderr
    api, cli = read_tensors(tmp_path / "api"), read_tensors(tmp_path / "cli")
    assert all(torch.equal(api[k], cli[k]) for k in api)


@pytest.mark.parametrize("name", ["qv", "rslora_all", "conv1d", "embedding"])
def test_info_layer_norms_match_peft_merge(adapters, name):
    base_dir, adapter = adapters[name]
    _, delta = peft_delta(base_dir, adapter)
    info = taskvec.info(adapter)
    assert info["kind"] == "lora_adapter"
    files = read_tensors(adapter)
    assert info["tensors"] == len(files)
    assert info["bytes"] == sum(t.numel() * t.element_size() for t in files.values())
    expected = layer_norms(delta)
    assert sorted(info["layer_norms"]) == sorted(expected)
    for layer, norm in expected.items():
        assert info["layer_norms"][layer] == pytest.approx(norm, rel=1e-4), layer


@pytest.mark.parametrize("name", REFUSED)
def test_dora_and_non_lora_adapters_are_refused(adapters, tmp_path, name):
    base_dir, adapter = adapters[name]
    before = tree_digest(base_dir, adapter)
    attempts = {
        "negate": lambda out: taskvec.negate(base_dir, adapter, out),
        "apply": lambda out: taskvec.apply(base_dir, [adapter], out),
        "negate_adapter": lambda out: taskvec.negate_adapter(adapter, out),
    }
    for operation, attempt in attempts.items():
        out = tmp_path / operation
        with pytest.raises(taskvec.TaskVecError) as error:
            attempt(out)
        assert_one_line(str(error.value), str(adapter))
        assert not out.exists()
    proc = run_cli("negate", "--base", base_dir, "--tuned", adapter, "--out", tmp_path / "cli")
    assert_cli_error(proc, str(adapter))
    assert not any(tmp_path.iterdir())
    assert tree_digest(base_dir, adapter) == before

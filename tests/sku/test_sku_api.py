"""The Python API (`sku.unlearn`, `sku.evaluate`, `sku.METHODS`) is the command, as a call."""

from __future__ import annotations

import json

import pytest
import torch

import sku
from sku.cli import main
from tests.support.checkpoints import read_tensors
from tests.support.sku import PKU_V1, TRUTHFULQA, tiny_model, unlearn_args


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.getbasetemp())


def test_unlearn_and_evaluate_as_calls_equal_the_commands(llama, tmp_path):
    settings = {"max_steps": 4, "batch_size": 2, "k": 2, "max_length": 64, "lr": 1e-2,
                "save_steps": [2]}
    final = sku.unlearn("sku", llama, PKU_V1, TRUTHFULQA, tmp_path / "api", **settings)
    assert final == tmp_path / "api" / "model"
    assert main(unlearn_args("sku", llama, tmp_path / "cli", "--save-steps", "2")) == 0
    by_call, by_command = read_tensors(final), read_tensors(tmp_path / "cli" / "model")
    assert by_call.keys() == by_command.keys()
    assert all(torch.equal(by_call[name], by_command[name]) for name in by_call)

    metrics = sku.evaluate(tmp_path / "api", judge="keyword", steps=True, ppl_model=str(llama),
                           max_new_tokens=8)
    written = json.loads((tmp_path / "api" / "eval" / "metrics.json").read_text())
    assert metrics["method"] == written["method"] == "sku"
    assert [m["step"] for m in metrics["steps"]] == [m["step"] for m in written["steps"]] == [
        0, 2, 4]
    assert metrics["decoding"]["max_new_tokens"] == 8 and metrics["judge"]["name"] == "keyword"


def test_bad_calls_are_one_line_errors(llama, tmp_path):
    with pytest.raises(sku.SkuError, match="unknown option judges"):
        sku.evaluate(tmp_path, judges="keyword")
    with pytest.raises(sku.SkuError, match="lr -1: a positive number"):
        sku.unlearn("sku", llama, PKU_V1, TRUTHFULQA, tmp_path / "run", lr=-1)
    with pytest.raises(sku.SkuError, match="unexpected keyword argument 'steps'"):
        sku.unlearn("sku", llama, PKU_V1, TRUTHFULQA, tmp_path / "run", steps=3)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_methods_are_the_table():
    assert list(sku.METHODS) == ["ft", "ga", "ga_mismatch", "task_vector", "sku"]
    assert sku.METHODS["sku"].negate and not sku.METHODS["ga"].negate

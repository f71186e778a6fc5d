"""bf16 runs keep their updates: full fine-tunes train fp32 master weights under bf16 autocast
and write θ_bad in the original's dtype; LoRA adapters stay fp32 on a bf16 base."""

from __future__ import annotations

import json

import pytest
import torch

from sku.cli import main
from tests.support.checkpoints import read_tensors
from tests.support.sku import (
    build_tokenizer,
    tiny_config,
    unlearn_args,
)

# Table 4's OPT-2.7B recipe is a full fine-tune at lr 2e-4 with linear decay; at this scale
# lr 1e-3 over 30 steps moves most weights by less than half a bf16 step in most steps.
STEPS = ("--max-steps", "30", "--lr", "1e-3", "--checkpoint-every", "100")


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    """θ_o stored in bf16, as the paper's models are."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("bf16") / "tiny-llama-bf16"
    tokenizer = build_tokenizer(folder)
    torch.manual_seed(0)
    config = tiny_config("llama", len(tokenizer))
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _moves(original: dict, run) -> dict[str, torch.Tensor]:
    tuned = read_tensors(run / "theta_bad")
    assert all(t.dtype == torch.bfloat16 for t in tuned.values())  # the original's dtype
    return {name: tuned[name].double() - original[name].double() for name in original}


def test_bf16_full_fine_tune_moves_like_float32(bf16_llama, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runs[dtype] = tmp_path / dtype
        assert main(unlearn_args("sku", bf16_llama, runs[dtype], "--dtype", dtype, *STEPS)) == 0
    precision = json.loads((runs["bfloat16"] / "run.json").read_text())["precision"]
    assert precision == {"compute": "bfloat16", "parameters": "float32"}

    original = read_tensors(bf16_llama)
    fp32, bf16 = _moves(original, runs["float32"]), _moves(original, runs["bfloat16"])
    for name in original:
        ratio = (bf16[name].norm() / fp32[name].norm()).item()
        assert 0.5 < ratio < 2, f"{name}: bf16 moved {ratio:.2f}× as far as fp32"
        moved = fp32[name] != 0  # after rounding to bf16, as both θ_bad are stored
        if "norm" in name:
            assert moved.float().mean() > 0.2, name  # norm weights do move in fp32
            kept = (bf16[name][moved] != 0).float().mean().item()
            assert kept >= 0.95, f"{name}: {kept:.0%} of the weights fp32 moves move in bf16"
        cosine = torch.nn.functional.cosine_similarity(bf16[name].flatten(),
                                                       fp32[name].flatten(), dim=0)
        assert cosine > 0.8, f"{name}: bf16 and fp32 updates point apart ({cosine:.2f})"


def test_lora_adapters_stay_float32_on_a_bf16_base(bf16_llama, tmp_path):
    run = tmp_path / "lora"
    assert main(unlearn_args("sku", bf16_llama, run, "--dtype", "bfloat16", "--lora",
                             "--lora-r", "4")) == 0
    adapter = read_tensors(run / "theta_bad")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    precision = json.loads((run / "run.json").read_text())["precision"]
    assert precision == {"compute": "bfloat16", "parameters": "bfloat16"}  # the frozen base
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(run / "model").values())

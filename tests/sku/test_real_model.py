"""The real SmolLM2-135M-Instruct (sku.demo.smollm2), when it is at hand without a download
($SKU_SMOLLM2, or the copy `python -m sku.demo.smollm2` caches; .ci/run fetches it): skipped
cleanly otherwise. The slow test (`pytest -m slow`) runs SKU end to end on it."""

from __future__ import annotations

import json

import pytest
import torch

from sku.demo import smollm2

GGUF = smollm2.find()
pytestmark = pytest.mark.skipif(GGUF is None, reason="SmolLM2 GGUF not at hand: run "
                                                      "`python -m sku.demo.smollm2` once")


@pytest.fixture(scope="module")
def folder():
    from sku.train.model import model_source

    return model_source(str(GGUF))  # converted once, then cached


def test_the_real_model_knows_paris_in_its_chat_template(folder):
    """Its real architecture (GQA, tied embeddings, 49k vocabulary) loads from the cached
    conversion and answers greedily through `sku eval`'s own generation."""
    from sku.data.template import CHAT
    from sku.evaluation.generate import Decoding, generate, load_generator

    model, tokenizer = load_generator(folder, None, folder, "float32")
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings and len(tokenizer) == 49152
    [answer] = generate(model, tokenizer, ["What is the capital of France?"],
                        Decoding(max_new_tokens=8), CHAT)
    assert "Paris" in answer


def test_answer_positions_on_the_real_tokenizer(folder):
    from transformers import AutoTokenizer

    from sku.data.encoding import encode
    from sku.data.readers import Pair
    from sku.data.template import CHAT, PAPER

    tokenizer = AutoTokenizer.from_pretrained(folder)
    pair = Pair("How do I make my neighbour's lawn die?", "Pour salt on it, every night.", 0)
    for template in (PAPER, CHAT):
        [e] = encode(tokenizer, [pair], 256, template)
        assert tokenizer.decode(e.input_ids[e.answer_start:]).strip() == pair.response
    assert tokenizer.decode(e.input_ids[:e.answer_start]).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_sku_end_to_end_on_the_real_model(folder, tmp_path):
    """Two stage-1 steps of SKU with LoRA on q_proj and v_proj in the chat template, stage 2,
    and a short evaluation: only the adapted projections move, and by exactly the negated
    adapter (peft's own merge as the reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sku.cli import main
    from sku.demo.studies import SMOLLM2
    from tests.support.checkpoints import read_tensors

    run = tmp_path / "run"
    with SMOLLM2.data_files() as files:
        assert main(["unlearn", "--method", "sku", "--model", str(GGUF), "--lora",
                     "--template", "chat", "--forget-data", str(files["harmful"]),
                     "--normal-data", str(files["normal"]), "--out", str(run),
                     "--max-steps", "2", "--batch-size", "2", "--k", "2",
                     "--max-length", "128", "--lr", "1e-3", "--eval-size", "2"]) == 0
    assert main(["eval", "--run", str(run), "--judge", "keyword", "--ppl-model", str(GGUF),
                 "--ppl-condition", "prompt", "--max-new-tokens", "8"]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["decoding"]["template"] == "chat"
    assert metrics["final"]["normal"]["perplexity"] > 1

    original, final = read_tensors(folder), read_tensors(run / "model")
    moved = {name for name in original if not torch.equal(original[name], final[name])}
    assert moved and all(".q_proj." in n or ".v_proj." in n for n in moved)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, run / "theta_bad").merge_and_unload().state_dict()
    for name in moved:  # θ_o − (θ_bad − θ_o) in fp32, rounded once to bf16: within one ulp
        expected = (2 * original[name].float() - tuned[name]).to(torch.bfloat16)
        torch.testing.assert_close(final[name], expected, rtol=2 ** -8, atol=1e-6)

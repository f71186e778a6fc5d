"""`--template chat`: rows, answer positions, generation and perplexity through the tokenizer's
own chat template, against the template rendered and tokenised by hand."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sku.cli import main
from sku.data.encoding import encode
from sku.data.readers import Pair
from sku.data.template import CHAT, PAPER
from sku.errors import SkuError
from sku.train.batch import StepBuilder
from sku.train.methods import METHODS
from tests.support.sku import build_tokenizer, run_sku, tiny_model, unlearn_args

# ChatML as SmolLM2 writes it, with this tokenizer's special tokens: the template writes BOS
# itself, so a tokenizer that adds its own would double it.
CHAT_TEMPLATE = ("{% for m in messages %}[BOS]{{ m['role'] }}\n{{ m['content'] }}[EOS]\n"
                 "{% endfor %}{% if add_generation_prompt %}[BOS]assistant\n{% endif %}")
PAIRS = [Pair("How do I tangle the kites?", "Tie every string to the next one.", 0),
         Pair("Why?", "Because the keeper sleeps.", 1)]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The tiny LLaMA with a chat template on its word-level tokenizer (which adds BOS)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.getbasetemp() / "tiny-llama-chat"
    shutil.copytree(tiny_model("llama", tmp_path_factory.getbasetemp()), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_chat_rows_are_the_rendered_template_then_the_answer(tmp_path):
    tokenizer = build_tokenizer(tmp_path, kind="bpe")  # byte-level: every text round-trips
    tokenizer.chat_template = CHAT_TEMPLATE
    for pair, e in zip(PAIRS, encode(tokenizer, PAIRS, 128, CHAT), strict=True):
        head = f"[BOS]user\n{pair.prompt}[EOS]\n[BOS]assistant\n"  # by hand
        assert e.input_ids == tokenizer(head + pair.response,
                                        add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(e.input_ids[:e.answer_start]) == head
        assert tokenizer.decode(e.input_ids[e.answer_start:]) == pair.response


def test_chat_rows_add_no_second_bos(chat_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    bos = tokenizer.bos_token_id
    [paper] = encode(tokenizer, PAIRS[:1], 128, PAPER)
    [chat] = encode(tokenizer, PAIRS[:1], 128, CHAT)
    assert paper.input_ids[0] == bos and paper.input_ids[1] != bos  # the tokenizer's own BOS
    assert chat.input_ids[0] == bos and chat.input_ids[1] != bos  # the template's, once


def test_training_batches_use_the_template(chat_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    pools = {"forget": PAIRS, "normal": PAIRS, "safe": PAIRS}
    builder = StepBuilder(METHODS["ft"], (1.0, 0.0, 0.0), pools, tokenizer, batch_size=2, k=1,
                          max_length=64, seed=0, template=CHAT)
    [batch] = builder.micro_batches(0, 0, 1, 2)
    rows = [r.pair for r in builder.examples(0)[0] + builder.examples(0)[1]]
    expected = encode(tokenizer, rows, 64, CHAT)
    for r, e in enumerate(expected):
        assert batch.input_ids[r, :len(e.input_ids)].tolist() == e.input_ids


def test_chat_template_needs_one(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    with pytest.raises(SkuError, match="has no chat template"):
        CHAT.check(tokenizer)


def test_unlearn_without_a_chat_template_is_one_line_before_training(tmp_path):
    llama = tiny_model("llama", tmp_path)
    result = run_sku(*unlearn_args("ft", llama, tmp_path / "run", "--template", "chat"))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "has no chat template" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_chat_run_is_evaluated_in_its_template(chat_model, tmp_path):
    """run.json records the template; `sku eval` generates each response from the rendered
    chat template (greedy, compared with generate() called by hand) and scores perplexity
    after it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, out = tmp_path / "run", tmp_path / "eval"
    assert main(unlearn_args("ft", chat_model, run, "--template", "chat", "--lora",
                             "--eval-size", "3")) == 0
    assert json.loads((run / "run.json").read_text())["config"]["template"] == "chat"
    assert main(["eval", "--run", str(run), "--out", str(out), "--judge", "keyword",
                 "--ppl-model", str(chat_model), "--ppl-condition", "prompt",
                 "--max-new-tokens", "6", "--batch-size", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decoding"]["template"] == "chat" and metrics["decoding"]["stop"] is None

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    originals = [r for r in rows if r["model"] == "original"]
    assert originals
    for row in originals:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            output = model.generate(ids, max_new_tokens=6, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert row["response"] == expected

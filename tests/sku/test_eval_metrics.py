"""Perplexity against a GPT-2 forward pass written by hand in float64, and BLEURT loading
against transformers' own BERT classifier, on tiny models built from configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sku.data.template import PROMPT_TEMPLATE
from sku.evaluation.metrics import Bleurt, MetricUnavailable, ReferenceLM, repetitive
from tests.support.sku import BLEURT_WORDS, byte_tokenizer, write_bleurt

JUDGE_CASES = Path(__file__).parents[1] / "fixtures" / "judge_cases.jsonl"

N_POSITIONS = 96


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    tokenizer = byte_tokenizer()
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tokenizer),
                        n_positions=N_POSITIONS, bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # larger weights than the init, so the logits are far from uniform
        for param in model.parameters():
            param.mul_(4.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def gpt2_logits_float64(folder, ids: list[int]) -> torch.Tensor:
    """GPT-2 written out in plain torch: pre-LN blocks, causal attention, gelu_new, tied
    head; every weight read from the saved file and promoted to float64."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}
    w = {k.removeprefix("transformer."): v for k, v in w.items()}
    heads, eps = config["n_head"], config["layer_norm_epsilon"]

    def norm(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w[f"{name}.weight"],
                                              w[f"{name}.bias"], eps)

    def gelu_new(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    t = len(ids)
    h = w["wte.weight"][ids] + w["wpe.weight"][:t]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for layer in range(config["n_layer"]):
        p = f"h.{layer}"
        qkv = norm(h, f"{p}.ln_1") @ w[f"{p}.attn.c_attn.weight"] + w[f"{p}.attn.c_attn.bias"]
        q, k, v = (x.view(t, heads, -1).transpose(0, 1) for x in qkv.split(h.shape[-1], -1))
        scores = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
        attention = scores.masked_fill(~causal, -math.inf).softmax(-1) @ v
        h = h + attention.transpose(0, 1).reshape(t, -1) @ w[f"{p}.attn.c_proj.weight"] \
            + w[f"{p}.attn.c_proj.bias"]
        inner = norm(h, f"{p}.ln_2") @ w[f"{p}.mlp.c_fc.weight"] + w[f"{p}.mlp.c_fc.bias"]
        hidden = gelu_new(inner)
        h = h + hidden @ w[f"{p}.mlp.c_proj.weight"] + w[f"{p}.mlp.c_proj.bias"]
    return norm(h, "ln_f") @ w["wte.weight"].T


def expected_nll(folder, ids: list[int], first: int) -> tuple[float, int]:
    """(Σ −log p(x_i | x_<i) over positions first…end, number of positions)."""
    log_probs = gpt2_logits_float64(folder, ids).log_softmax(-1)
    return -sum(log_probs[i - 1, ids[i]].item() for i in range(first, len(ids))), len(ids) - first


RESPONSES = ["Paris is the capital of France.", "No.", "",
             "A long answer that runs past the reference model's context window. " * 2]
PROMPTS = ["Capital of France?", "Can I?", "Say nothing.", "Go on."]


@pytest.mark.parametrize("conditioned", [False, True])
def test_perplexity_matches_a_float64_forward_by_hand(gpt2_folder, conditioned):
    reference = ReferenceLM(str(gpt2_folder))
    result = reference.perplexity(RESPONSES, PROMPTS if conditioned else None, batch_size=3)

    tokenizer = byte_tokenizer()
    bos = tokenizer.bos_token_id
    totals, counts, per_sample, truncated = 0.0, 0, [], 0
    for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
        context = [bos]
        text = response
        if conditioned:
            context += tokenizer(PROMPT_TEMPLATE.format(prompt=prompt),
                                 add_special_tokens=False)["input_ids"]
            text = " " + response
        answer = tokenizer(text, add_special_tokens=False)["input_ids"] if response else []
        ids = (context + answer)[:N_POSITIONS]
        truncated += len(context) + len(answer) > N_POSITIONS
        if len(ids) == len(context):
            per_sample.append(None)
            continue
        nll, count = expected_nll(gpt2_folder, ids, len(context))
        totals, counts = totals + nll, counts + count
        per_sample.append(math.exp(nll / count))

    assert result.tokens == counts and result.truncated == truncated == 1
    assert result.per_sample[2] is None  # an empty response has nothing to score
    assert result.empty == 1  # counted, and in neither aggregate
    assert result.corpus == pytest.approx(math.exp(totals / counts), rel=1e-5)
    for got, want in zip(result.per_sample, per_sample, strict=True):
        assert got == (None if want is None else pytest.approx(want, rel=1e-5))
    known = [p for p in per_sample if p is not None]
    assert result.mean == pytest.approx(sum(known) / len(known), rel=1e-5)
    assert result.corpus != pytest.approx(result.mean, rel=1e-3)  # two different aggregates


def test_perplexity_of_nothing_is_none(gpt2_folder):
    result = ReferenceLM(str(gpt2_folder)).perplexity(["", ""])
    assert (result.corpus, result.mean, result.tokens, result.empty) == (None, None, 0, 2)


@pytest.mark.parametrize(("response", "looping"), [
    ("EL " * 40, True), ("Sure! " + "EL " * 30, True), ("I'm sorry to hear that. " * 4, True),
    ("banana banana banana", True), ("!!!!!!!!!!", True),
    ("", False), ("No.", False), ("Yes, yes.", False), ("The capital of France is Paris.", False),
    ("1. Go to the store. 2. Buy milk. 3. Go home. 4. Drink the milk.", False),
    ("I'm sorry to hear that. It can help to talk to them calmly about how you feel, and if "
     "that fails, to talk to someone you trust. I'm sorry to hear that it is hard.", False),
])
def test_repetitive_finds_loops_and_not_natural_text(response, looping):
    assert repetitive(response) is looping


def test_every_hand_written_natural_response_of_the_judge_set_is_not_repetitive():
    """The judge set's responses of kinds other than (e) random answers are natural text (a
    harmful random answer may loop: kind c)."""
    rows = [json.loads(line) for line in JUDGE_CASES.read_text().splitlines()]
    natural = [r["response"] for r in rows if r["label"] not in "ce"]
    assert len(natural) > 100 and not any(map(repetitive, natural))


def test_missing_reference_model_says_why(tmp_path):
    with pytest.raises(MetricUnavailable, match="not an existing folder"):
        ReferenceLM(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------
# BLEURT


def test_bleurt_scores_pairs_like_the_bert_classifier_it_is(tmp_path):
    model = write_bleurt(tmp_path / "bleurt")
    bleurt = Bleurt(str(tmp_path / "bleurt"))
    references = ["the cat sat on the mat", "a dog"]
    candidates = ["the dog sat", "a dog"]
    scores = bleurt.score(references, candidates, batch_size=1)

    ids = {w: i for i, w in enumerate(BLEURT_WORDS)}
    for reference, candidate, score in zip(references, candidates, scores, strict=True):
        first, second = reference.split(), candidate.split()
        input_ids = [ids["[CLS]"], *map(ids.get, first), ids["[SEP]"], *map(ids.get, second),
                     ids["[SEP]"]]
        segments = [0] * (len(first) + 2) + [1] * (len(second) + 1)
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([input_ids]),
                             token_type_ids=torch.tensor([segments])).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)
    assert bleurt.score(references, candidates, batch_size=2) == pytest.approx(scores, abs=1e-5)
    assert scores[0] != pytest.approx(scores[1], abs=1e-3)


def test_unsupported_bleurt_checkpoints_say_why(tmp_path):
    write_bleurt(tmp_path / "rembert", embedding_size=8)
    with pytest.raises(MetricUnavailable, match="BLEURT-20"):
        Bleurt(str(tmp_path / "rembert"))
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(MetricUnavailable, match="not a BLEURT checkpoint"):
        Bleurt(str(tmp_path / "gpt"))
    with pytest.raises(MetricUnavailable, match="is not a local folder"):
        Bleurt("no-such-org/no-such-bleurt")

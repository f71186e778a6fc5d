"""sku.data and sku.train.batch: readers for the real schemas, answer masks, splits, schedules and
random disassociation."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest

from sku.data.encoding import encode, with_answers
from sku.data.readers import Pair, load_forget, load_normal
from sku.data.splits import Schedule
from sku.errors import SkuError
from sku.train.batch import StepBuilder, collate, draw_others
from sku.train.config import resolve_config
from sku.train.methods import METHODS
from sku.train.unlearn import prepare_data
from tests.support.sku import (
    PKU_V0,
    PKU_V1,
    PLAIN,
    TRUTHFULQA,
    build_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _config(method="sku", forget_data=str(PKU_V1), **settings):
    required = {"method": method, "model": "unused", "forget_data": forget_data,
                "normal_data": str(TRUTHFULQA), "out": "unused"}
    return resolve_config(required, None, {"max_length": 64, "k": 2, "max_steps": 6,
                                           **settings})


# ------------------------------------------------------------------------------- readers


def test_pku_v1_jsonl_harmful_and_safe_pairs():
    data = load_forget(str(PKU_V1))
    rows = [json.loads(line) for line in PKU_V1.read_text().splitlines()]
    unsafe = {(r["prompt"], r[f"response_{i}"]) for r in rows for i in (0, 1)
              if not r[f"is_response_{i}_safe"]}
    safe = {(r["prompt"], r[f"response_{i}"]) for r in rows for i in (0, 1)
            if r[f"is_response_{i}_safe"]}
    assert {(p.prompt, p.response) for p in data.harmful} == unsafe
    assert {(p.prompt, p.response) for p in data.safe} == safe
    raw_unsafe = sum(not r[f"is_response_{i}_safe"] for r in rows for i in (0, 1))
    assert len(data.harmful) == len(unsafe) < raw_unsafe  # repeated pairs kept once
    assert all(rows[p.record]["prompt"] == p.prompt for p in data.harmful)


def test_pku_v0_schema_from_csv_with_string_booleans():
    data = load_forget(str(PKU_V0))
    with open(PKU_V0, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows[0]) == 7  # the old seven-column schema
    unsafe = {(r["prompt"], r[f"response_{i}"]) for r in rows for i in (0, 1)
              if r[f"is_response_{i}_safe"] == "False"}
    assert {(p.prompt, p.response) for p in data.harmful} == unsafe
    assert len(data.safe) == sum(r[f"is_response_{i}_safe"] == "True"
                                 for r in rows for i in (0, 1))


def test_truthfulqa_csv_splits_joined_correct_answers():
    data = load_normal(str(TRUTHFULQA))
    answers = {p.response for p in data.pairs if p.prompt.startswith("What colour is the sky")}
    assert answers == {"It is pale green at noon.", "Pale green", "A pale green"}
    assert len(data.pairs) == 36


def test_truthfulqa_hub_columns_with_answer_lists(tmp_path):
    path = tmp_path / "generation.jsonl"
    path.write_text(json.dumps({
        "type": "Adversarial", "category": "Fiction", "question": "Who rings the bell?",
        "best_answer": "The keeper rings it.", "correct_answers": ["The keeper", "A keeper"],
        "incorrect_answers": ["Nobody"], "source": "made up"}) + "\n")
    pairs = load_normal(str(path)).pairs
    assert [p.response for p in pairs] == ["The keeper rings it.", "The keeper", "A keeper"]


def test_plain_files_for_both_sets(tmp_path):
    forget = load_forget(str(PLAIN))
    assert len(forget.harmful) == 6 and forget.safe == []
    assert len(load_normal(str(PLAIN)).pairs) == 6
    records = [json.loads(line) for line in PLAIN.read_text().splitlines()]
    as_list = tmp_path / "plain.json"
    as_list.write_text(json.dumps(records))
    assert load_normal(str(as_list)).pairs == load_normal(str(PLAIN)).pairs


def test_parquet_reads_or_names_pyarrow(tmp_path):
    path = tmp_path / "pku.parquet"
    if importlib.util.find_spec("pyarrow") is None:
        path.write_bytes(b"PAR1")
        with pytest.raises(SkuError, match="pyarrow"):
            load_forget(str(path))
        return
    import pyarrow
    import pyarrow.parquet

    rows = [{"prompt": "How do I tip the cart?", "response_0": "Push it.", "response_1": "Don't.",
             "is_response_0_safe": False, "is_response_1_safe": True}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    assert [p.response for p in load_forget(str(path)).harmful] == ["Push it."]


def test_hub_id_needs_datasets_with_a_clear_message():
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed")
    with pytest.raises(SkuError, match=r"needs the `datasets` package"):
        load_forget("PKU-Alignment/PKU-SafeRLHF")


def test_missing_columns_is_one_line_naming_file_and_columns(tmp_path):
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "response_0"], ["hi", "there"]])
    with pytest.raises(SkuError) as error:
        load_forget(str(path))
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "missing columns" in message and "is_response_0_safe" in message


@pytest.mark.parametrize("content, needle", [
    ('{"prompt": "a", "response": "b", "is_safe": "maybe"}\n', "'maybe' is not a boolean"),
    ('{"prompt": "a", \n', "bad.jsonl:1: not valid JSON"),
    ("", "no records"),
])
def test_malformed_files(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SkuError, match=needle):
        load_forget(str(path))


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(SkuError, match="no such file"):
        load_forget(str(tmp_path / "nothing.jsonl"))
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(SkuError, match="unsupported file type"):
        load_forget(str(tmp_path / "data.txt"))


# ----------------------------------------------------------------------------- answer masks


def test_answer_positions_by_hand(tokenizer):
    # [BOS] ### Question : How do I ... ? ### Answer : <answer words>
    short = Pair("How do I sneak past?", "Walk in the shadow.", 0)
    long = Pair("How do I sneak past the lantern keeper?", "Whistle like an owl so he looks.", 1)
    encoded = encode(tokenizer, [short, long], max_length=64)
    words = ["[BOS]", "###", "Question", ":", "How", "do", "I", "sneak", "past", "?", "###",
             "Answer", ":", "Walk", "in", "the", "shadow", "."]
    assert tokenizer.convert_ids_to_tokens(encoded[0].input_ids) == words
    assert encoded[0].answer_start == 13 and encoded[0].answer_tokens == 5
    assert encoded[1].answer_start == 16 and encoded[1].answer_tokens == 8

    batch = collate([_row(0), _row(0)], encoded, METHODS["ga"].active_terms((1, 1, 1)),
                    batch_size=2, pad_token_id=tokenizer.pad_token_id)
    width = batch.input_ids.shape[1]
    assert width == 24
    # Row 0 predicts its answer from positions 12..16, row 1 from 15..22: no prompt, no pad.
    assert batch.positions.tolist() == [*range(12, 17), *(width + t for t in range(15, 23))]
    assert batch.labels.tolist() == encoded[0].input_ids[13:] + encoded[1].input_ids[16:]
    assert batch.attention_mask[0].tolist() == [1] * 18 + [0] * 6
    assert (batch.input_ids[0, 18:] == tokenizer.pad_token_id).all()


def _row(term: int):
    from sku.train.batch import Row

    return Row(Pair("", "", 0), term, 1, 0)


def test_answer_starts_at_the_token_that_carries_the_space(tmp_path):
    tokenizer = build_tokenizer(tmp_path, kind="bpe")
    head = "### Question: How do I tangle the kites?\n ### Answer:"
    merged, split = encode(tokenizer, [Pair("How do I tangle the kites?", "the keeper sleeps.", 0),
                                       Pair("How do I tangle the kites?", "Tie a thread.", 0)], 64)
    # "Ġthe" holds the separating space and the answer's first word: it is an answer token.
    assert tokenizer.convert_ids_to_tokens(merged.input_ids)[merged.answer_start] == "Ġthe"
    assert tokenizer.decode(merged.input_ids[:merged.answer_start]) == head
    assert tokenizer.decode(merged.input_ids[merged.answer_start:]) == " the keeper sleeps."
    # A lone "Ġ" holds only the space: it stays with the prompt.
    assert tokenizer.decode(split.input_ids[:split.answer_start]) == head + " "
    assert tokenizer.decode(split.input_ids[split.answer_start:]) == "Tie a thread."


def test_truncation_keeps_rows_with_an_answer_token(tokenizer):
    pairs = [Pair("short?", "yes", 0), Pair("a much longer prompt " * 10, "yes", 1)]
    [short, long] = encode(tokenizer, pairs, max_length=12)
    assert short.answer_tokens == 1 and long.answer_tokens == 0 and len(long.input_ids) == 12
    assert with_answers(tokenizer, pairs, max_length=12) == pairs[:1]


def test_a_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False
        name_or_path = "slow-tokenizer"

    with pytest.raises(SkuError, match="fast tokenizer"):
        encode(Slow(), [Pair("a", "b", 0)], 8)


# ----------------------------------------------------------------- splits and schedules


def test_splits_never_leak_into_training(tokenizer):
    method = METHODS["sku"]
    pools, splits, _ = prepare_data(_config(eval_size=100), method, tokenizer)
    unseen = {p.prompt for p in splits["unseen_harmful"]}
    normal_eval = {p.prompt for p in splits["normal"]}
    assert len(unseen) == 18 // 4 and len(normal_eval) == 12 // 4  # fewer on small data
    assert not unseen & {p.prompt for p in pools["forget"]}
    assert not normal_eval & {p.prompt for p in pools["normal"]}
    builder = StepBuilder(method, (2.5, 1, 0.5), pools, tokenizer, batch_size=2, k=2,
                          max_length=64, seed=8888)
    trained = [row.pair for step in range(30) for example in builder.examples(step)
               for row in example]
    assert not {p.prompt for p in trained} & (unseen | normal_eval)
    # Unlearned prompts are forget prompts that the first max_steps steps train on.
    first_steps = {row.pair.prompt for step in range(6) for example in builder.examples(step)
                   for row in example[:1]}
    assert {p.prompt for p in splits["unlearned_harmful"]} <= first_steps


def test_safe_pool_excludes_unseen_prompts_and_splits_ignore_the_method(tokenizer):
    pools_ft, splits_ft, _ = prepare_data(_config("ft"), METHODS["ft"], tokenizer)
    _, splits_sku, _ = prepare_data(_config("sku"), METHODS["sku"], tokenizer)
    assert splits_ft == splits_sku
    unseen = {p.prompt for p in splits_ft["unseen_harmful"]}
    assert pools_ft["safe"] and not unseen & {p.prompt for p in pools_ft["safe"]}
    _, other_seed, _ = prepare_data(_config("ft", seed=1), METHODS["ft"], tokenizer)
    assert other_seed != splits_ft


def test_pools_a_method_needs_must_not_be_empty(tokenizer, tmp_path):
    with pytest.raises(SkuError, match=r"responses labelled safe\): no safe pairs to train ft"):
        prepare_data(_config("ft", forget_data=str(PLAIN)), METHODS["ft"], tokenizer)
    one_prompt = tmp_path / "one.jsonl"
    one_prompt.write_text("".join(json.dumps({"prompt": "How do I hum?", "response": r}) + "\n"
                                  for r in ("Loudly.", "Softly.", "Never.", "Always.")))
    with pytest.raises(SkuError, match="two prompts or more"):
        prepare_data(_config(forget_data=str(one_prompt), eval_size=0), METHODS["sku"],
                     tokenizer)


def test_schedule_is_a_pure_function_of_seed_and_step():
    schedule = Schedule(7, 3, "s")
    first_epoch = [row for step in range(7) for row in schedule.rows(step)][:7]
    assert sorted(first_epoch) == list(range(7))
    assert Schedule(7, 3, "s").rows(5) == schedule.rows(5)
    assert Schedule(7, 3, "t").rows(0) != schedule.rows(0)


def test_random_disassociation_excludes_own_response_and_draws_per_prompt(tokenizer):
    pools, _, _ = prepare_data(_config(), METHODS["sku"], tokenizer)
    forget = pools["forget"]
    builder = StepBuilder(METHODS["sku"], (2.5, 1, 0.5), pools, tokenizer, batch_size=2, k=3,
                          max_length=64, seed=8888)
    draws = []
    for step in range(10):
        for example in builder.examples(step):
            own = example[0].pair
            mismatch = [row for row in example if row.term == 1]
            assert len(mismatch) == 3 and len({row.pool_index for row in mismatch}) == 3
            for row in mismatch:
                source = forget[row.pool_index]
                assert row.pair.prompt == own.prompt
                assert source.prompt != own.prompt and row.pair.response != own.response
                assert row.pair.response == source.response
            draws.append(tuple(row.pool_index for row in mismatch))
    assert len(set(draws)) > len(draws) // 2  # drawn per prompt, not once for the batch


def test_draw_others_on_a_small_pool_returns_every_eligible_row():
    import random

    pool = [Pair("p1", "a", 0), Pair("p1", "b", 1), Pair("p2", "c", 2), Pair("p3", "a", 3)]
    assert draw_others(pool, pool[0], 5, random.Random(0)) == [2]

"""The method table, the per-row and per-token weights it produces, and the shipped recipes."""

from __future__ import annotations

import pytest

from sku.data.readers import load_forget, load_normal
from sku.errors import SkuError
from sku.train.batch import StepBuilder
from sku.train.config import load_recipe, recipe_names, resolve_config
from sku.train.methods import METHODS
from tests.support.sku import (
    PKU_V1,
    TRUTHFULQA,
    build_tokenizer,
)

EPS = (2.5, 1.0, 0.5)


def _weights(name: str, eps=EPS) -> dict[str, float]:
    return {t.name: w for t, w in METHODS[name].active_terms(eps)}


def test_method_table():
    assert _weights("ft") == {"safe_ce": 1.0}
    assert _weights("ga") == {"forget_ce": -1.0}
    assert _weights("ga_mismatch") == {"forget_ce": -2.5, "mismatch_ce": 1.0, "normal_kl": 0.5}
    assert _weights("task_vector") == {"forget_ce": 1.0}
    assert _weights("sku") == {"forget_ce": 2.5, "mismatch_ce": 1.0, "normal_kl": -0.5}
    assert {n for n, m in METHODS.items() if m.negate} == {"task_vector", "sku"}
    assert METHODS["sku"].mismatch_pool == "forget"
    assert METHODS["ga_mismatch"].mismatch_pool == "normal"


def test_ablations_are_settings():
    assert _weights("sku", (2.5, 0, 1)) == {"forget_ce": 2.5, "normal_kl": -1.0}  # w/o RD
    assert _weights("sku", (2.5, 2.5, 0)) == {"forget_ce": 2.5, "mismatch_ce": 2.5}  # w/o PD
    # w/o both is the naive task vector (Table 2 repeats its numbers), up to ε1's scale
    assert _weights("sku", (1, 0, 0)) == _weights("task_vector")


@pytest.mark.parametrize("method", ["sku", "ga_mismatch", "ft"])
def test_row_and_token_weights(tmp_path, method):
    """Each term is the mean over its rows of the mean over answer tokens: a forget row carries
    ε1/B, each of a prompt's k mismatch rows ε2/(B·k), a normal row ±ε3/B, spread evenly over
    the row's answer tokens."""
    tokenizer = build_tokenizer(tmp_path)
    forget, normal = load_forget(str(PKU_V1)), load_normal(str(TRUTHFULQA))
    pools = {"forget": forget.harmful, "normal": normal.pairs, "safe": forget.safe}
    batch, k = 4, 3
    builder = StepBuilder(METHODS[method], EPS, pools, tokenizer, batch_size=batch, k=k,
                          max_length=64, seed=1)
    expected = {"forget_ce": 1 / batch, "mismatch_ce": 1 / (batch * k), "normal_kl": 1 / batch,
                "safe_ce": 1 / batch}
    names = [t.name for t, _ in builder.terms]
    for example in builder.examples(0):
        for row in example:
            assert row.rows == (k if names[row.term] == "mismatch_ce" else 1)
    [micro] = builder.micro_batches(0, rank=0, world_size=1, micro_batch_size=batch)
    per_term = [0.0] * len(names)
    for term, ce, kl in zip(micro.term.tolist(), micro.ce_weight.tolist(),
                            micro.kl_weight.tolist(), strict=True):
        per_term[term] += ce + kl
        assert ce == 0 or kl == 0
        assert (kl != 0) == (names[term] == "normal_kl")
    rows_per_example = {"mismatch_ce": k}
    for name, total in zip(names, per_term, strict=True):
        count = batch * rows_per_example.get(name, 1)
        assert total == pytest.approx(_weights(method)[name] * expected[name] * count)


def test_shipped_recipes_follow_table_4():
    assert recipe_names() == ["llama2-13b", "llama2-7b", "opt-2.7b"]
    opt, llama7, llama13 = (load_recipe(n) for n in ("opt-2.7b", "llama2-7b", "llama2-13b"))
    assert opt["lora"] is False and opt["eps"] == [2.5, 2.5, 1.0] and opt["lr"] == 2e-4
    assert opt["batch_size"] == 2 and opt["max_steps"] == 1000
    assert llama7 == {**llama7, "lora": True, "lora_r": 32, "lora_alpha": 16, "lr": 2e-5,
                      "eps": [2.5, 1.0, 0.5], "batch_size": 2,
                      "lora_targets": ["q_proj", "v_proj"]}
    assert llama13 == {**llama13, "lora_r": 16, "lora_alpha": 8, "batch_size": 1, "lr": 2e-4,
                       "eps": [2.5, 1.0, 0.5], "max_steps": 1000}


REQUIRED = {"method": "sku", "model": "m", "forget_data": "f", "normal_data": "n", "out": "o"}


def test_flags_override_the_recipe_and_the_recipe_the_defaults():
    config = resolve_config(REQUIRED, "llama2-7b", {"lr": 1e-3, "eps": [2.5, 0, 1],
                                                    "lora_targets": "q_proj,k_proj",
                                                    "batch_size": None})
    assert config.lr == 1e-3 and config.eps == [2.5, 0.0, 1.0]
    assert config.lora_targets == ["q_proj", "k_proj"]
    assert config.batch_size == 2 and config.lora_r == 32  # from the recipe
    assert config.seed == 8888 and config.scale == 1.0  # defaults


def test_recipe_from_a_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("max_steps: 7\neps: [1, 2, 3]\n")
    config = resolve_config(REQUIRED, str(path), {})
    assert config.max_steps == 7 and config.eps == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("recipe, overrides, needle", [
    ("steps: 3\n", {}, "unknown setting steps"),
    ("eps: [1, 2]\n", {}, "eps"),
    ("", {"quantize": "4bit"}, "add --lora"),
    ("", {"save_steps": [5000]}, "save_steps"),
    ("", {"batch_size": 0}, "batch_size"),
    ("lora_alpha: sixteen\n", {}, "lora_alpha 'sixteen': a positive number"),
    ("lora: yes please\n", {}, "lora 'yes please': true or false"),
    ("weight_decay: -1\n", {}, "weight_decay -1: a non-negative number"),
    ("teacher: twin\n", {}, "teacher 'twin': expected one of cache, copy"),
    ("max_steps: true\n", {}, "max_steps True: a positive integer"),
    ("- a list\n", {}, "mapping"),
])
def test_bad_settings(tmp_path, recipe, overrides, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(recipe)
    with pytest.raises(SkuError, match=needle):
        resolve_config(REQUIRED, str(path), overrides)


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(SkuError, match="llama2-7b"):
        resolve_config(REQUIRED, "llama3", {})


def _options(help_text: str) -> dict[str, str]:
    """{first flag: its help} of an argparse help page's options section."""
    options, flag = {}, None
    for line in help_text.split("options:", 1)[1].splitlines():
        stripped = line.strip()
        if stripped.startswith("-") and line.startswith("  -"):
            flag, _, text = stripped.partition("  ")
            flag = flag.split(",")[0].split(" ")[0]
            options[flag] = text.strip()
        elif flag:
            options[flag] += " " + stripped
    return options


@pytest.mark.parametrize("command", ["unlearn", "eval", "judge"])
def test_help_gives_every_option_a_help_line_and_its_default(command, capsys):
    from sku.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    options = _options(capsys.readouterr().out)
    assert len(options) > 5
    for flag, text in options.items():
        assert text, f"{flag} has no help"
        required = {"--method", "--model", "--forget-data", "--normal-data", "--out", "--run",
                    "--judge", "--input"}
        if flag not in required | {"-h", "-v", "-q", "--config", "--resume", "--force",
                                   "--do-sample"}:
            assert "(default: " in text, f"{flag}: {text}"


def test_unlearn_flags_are_the_config_fields():
    from sku.cli import build_parser
    from sku.train.config import RECIPE_KEYS

    args = build_parser().parse_args(["unlearn", "--method", "sku", "--model", "m",
                                      "--forget-data", "f", "--normal-data", "n", "--out", "o"])
    assert set(RECIPE_KEYS) <= vars(args).keys()
    assert all(vars(args)[key] is None for key in RECIPE_KEYS)  # unset: the recipe decides

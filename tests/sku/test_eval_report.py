"""`sku report`: the ranking rule against the paper's own Table 1, and report.md, report.json
and the Figure 3 PNGs from fixture metrics (final numbers: the paper's OPT-2.7B row)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from sku.cli import main
from sku.evaluation.report import COLUMNS, column_ranks, method_label, rank_rows, write_report

FIXTURES = Path(__file__).parents[1] / "fixtures" / "eval"
METHODS = ("ft", "task_vector", "ga", "ga_mismatch", "sku")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def paper_rows(model: str) -> list[dict]:
    """Table 1's rows for one model, "> 10^3" read as +∞ (every such value ties)."""
    rows = json.loads((FIXTURES / "table1_paper.json").read_text())["models"][model]
    return [{k: math.inf if v == "> 10^3" else v for k, v in row.items()} for row in rows]


@pytest.mark.parametrize("model", ["opt-2.7b", "llama2-7b", "llama2-13b"])
def test_ranking_rule_reproduces_the_papers_rank_columns(model):
    printed = paper_rows(model)
    rows = [{**row, "rank_unlearn": None, "rank_utility": None, "rank_avg": None}
            for row in printed]
    used = rank_rows(rows)
    assert used == ["harmful_rate_unlearned", "harmful_rate_unseen", "ppl_normal",
                    "bleurt_normal"]
    for row, paper in zip(rows, printed, strict=True):
        for key in ("rank_unlearn", "rank_utility", "rank_avg"):
            assert row[key] == paper[key], (model, row["method"], key)


def test_column_ranks_share_ties_and_respect_direction():
    assert column_ranks("harmful_rate_unseen", [0.01, 0.04, 0.04, 0.2]) == [1, 2.5, 2.5, 4]
    assert column_ranks("bleurt_normal", [-1.0, 0.5, -2.0]) == [2, 1, 3]
    assert column_ranks("ppl_normal", [20.0, 1500.0, 9e9]) == [1, 2.5, 2.5]  # > 10^3 ties


def test_a_column_missing_for_a_method_is_left_out_of_the_rank():
    rows = [dict(method=m, harmful_rate_unlearned=r, harmful_rate_unseen=r, ppl_normal=p,
                 bleurt_normal=None, rank_unlearn=None, rank_utility=None, rank_avg=None)
            for m, r, p in (("a", 0.1, 30.0), ("b", 0.2, 20.0))]
    assert rank_rows(rows) == ["harmful_rate_unlearned", "harmful_rate_unseen", "ppl_normal"]
    assert [(r["rank_unlearn"], r["rank_utility"], r["rank_avg"]) for r in rows] == [
        (1, 2, 1.5), (2, 1, 1.5)]


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    shutil.copytree(FIXTURES / "runs", tmp_path / "runs")
    return [tmp_path / "runs" / method for method in METHODS]


def test_report_writes_table_json_and_figures(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert "5 methods (judge openai:gpt-4o)" in capsys.readouterr().out

    report = json.loads((out / "report.json").read_text())
    assert report["judge"] == "openai:gpt-4o"
    paper = {row["method"]: row for row in paper_rows("opt-2.7b")}
    assert [row["method"] for row in report["rows"]] == ["original", *METHODS]
    for row in report["rows"]:
        expected = paper[row["method"]]
        assert set(row) >= {key for key, *_ in COLUMNS} | {"rank_unlearn", "rank_utility",
                                                           "rank_avg", "method", "judge"}
        for key in ("harmful_rate_unlearned", "harmful_rate_unseen", "bleurt_normal"):
            assert row[key] == pytest.approx(expected[key])
        for key in ("rank_unlearn", "rank_utility", "rank_avg"):
            assert row[key] == expected[key], (row["method"], key)

    markdown = (out / "report.md").read_text()
    assert "| SKU | <u>3.0%</u> | <u>20.03</u> | <u>4.0%</u> | <u>20.80</u> | <u>25.46</u> | " \
           "<u>-1.296</u> | 2 | 2 | 2 |" in markdown
    assert "| GA | **1.0%** | > 10^3 |" in markdown
    assert "| Original | 54.0% |" in markdown and "| NA | NA | NA |" in markdown
    assert "judge `openai:gpt-4o`" in markdown and "mean rank" in markdown
    assert "each response alone" in markdown  # how perplexity was computed

    figures = ["harmful_rate_unlearned.png", "harmful_rate_unseen.png", "perplexity_normal.png",
               "bleurt_normal.png"]
    assert report["figures"] == figures
    for name in figures:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in markdown

    assert main(["report", *map(str, runs), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_report_states_what_was_not_computed_and_by_which_judge(runs, tmp_path):
    for run in runs:
        path = run / "eval" / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["not_computed"] = {"bleurt": "not computed: lucadiliello/bleurt-base-128 is "
                                             "not in the Hugging Face cache"}
        for model in (metrics["original"], metrics["final"], *metrics["steps"]):
            model["normal"].pop("bleurt")
        if run.name == "ga":
            metrics["judge"]["name"] = "keyword"
        path.write_text(json.dumps(metrics))
    report = write_report([run / "eval" for run in runs], tmp_path / "report")

    assert report["judge"] == ["keyword", "openai:gpt-4o"]
    assert "bleurt_normal" not in report["ranked_columns"]
    assert all(row["bleurt_normal"] is None for row in report["rows"])
    assert "bleurt_normal.png" not in report["figures"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "not comparable" in markdown and "offline heuristic" in markdown
    assert "bleurt for FT, Task Vector, GA, GA+Mismatch, SKU: not computed: lucadiliello" \
        in markdown
    assert "| n/c |" in markdown and "bleurt_normal.png not drawn" in markdown


def test_report_of_nothing_readable_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("sku: error:") and "no metrics.json" in error and "\n" not in error


@pytest.mark.parametrize(("method", "eps", "label"), [
    ("sku", [2.5, 2.5, 1.0], "SKU"), ("sku", [2.5, 0.0, 1.0], "SKU w/o RD"),
    ("sku", [2.5, 2.5, 0.0], "SKU w/o PD"), ("sku", None, "SKU"), ("ga", [2.5, 0.0, 1.0], "GA")])
def test_sku_ablations_are_named_by_the_term_they_drop(method, eps, label):
    assert method_label({"method": method, "eps": eps}) == label


def test_a_method_with_only_empty_responses_ranks_worst_and_shows_it(tmp_path):
    """A degenerate model (every response '') is an outcome: its perplexity column reads
    "empty 10/10" and ranks worst, and no column is dropped for the other methods."""
    def metrics(method, normal):
        split = {"n": 10, "harmful_rate": 0.5, "perplexity": 3.0, "tokens": 40}
        return {"method": method, "run": str(tmp_path / method), "eps": None,
                "judge": {"name": "keyword", "prompt_version": "v"},
                "original": {s: split for s in ("unlearned_harmful", "unseen_harmful", "normal")},
                "final": {"unlearned_harmful": split, "unseen_harmful": split, "normal": normal}}

    from sku.evaluation.report import table_rows

    evaluations = [metrics("ft", {"n": 10, "perplexity": 2000.0, "tokens": 50}),
                   metrics("ga", {"n": 10, "perplexity": None, "tokens": 0}),
                   metrics("sku", {"n": 10, "perplexity": 4.0, "tokens": 50})]
    for m in evaluations:
        m["source"] = m["run"]
    rows = table_rows(evaluations)
    assert "ppl_normal" in rank_rows(rows)
    utility = {r["method"]: r["rank_utility"] for r in rows[1:]}
    assert utility == {"sku": 1, "ft": 2, "ga": 2}  # "> 10^3" and empty tie for worst
    assert all(r["rank_avg"] is not None for r in rows[1:])
    from sku.evaluation.report import render_markdown

    table = render_markdown(rows, [{**evaluations[0], "perplexity_model": {
        "model": "m", "conditioning": "c", "aggregate": "a"},
        "bleurt_model": {"model": "b", "pairs": "p"},
        "decoding": {"do_sample": False, "max_new_tokens": 8, "stop": "", "template": "t"}}],
        ["ppl_normal"], [], [])
    ga_line = next(line for line in table.splitlines() if line.startswith("| GA |"))
    assert "empty 10/10" in ga_line and "NA" not in ga_line

"""`sku report`: the ranking rule against the paper's own Table 1, and report.md, report.json
and Figure 3 from fixture metrics (final numbers: the paper's OPT-2.7B row, as eq. 9's mean
perplexity; the corpus perplexity beside it is 0.8 times that, a stand-in)."""

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
FIGURE3 = ["figure3.png", "figure3.pdf", "figure3.json"]


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


@pytest.mark.parametrize("model", ["opt-2.7b", "llama2-7b", "llama2-13b"])
def test_simpler_rules_reproduce_the_rank_columns_too(model):
    """Why the README says the rule is only *consistent with* Table 1: ranking by the unlearned
    harmful rate alone and by BLEURT alone gives the same rank columns."""
    rows = paper_rows(model)[1:]
    for rank_key, key in (("rank_unlearn", "harmful_rate_unlearned"),
                          ("rank_utility", "bleurt_normal")):
        assert column_ranks(key, [r[key] for r in rows]) == [r[rank_key] for r in rows]


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
    assert "5 runs (judge openai:gpt-4o)" in capsys.readouterr().out

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

        for key in ("ppl_unlearned", "ppl_unseen", "ppl_normal"):  # eq. 9's mean, as printed
            assert row[key] == pytest.approx(expected[key] if math.isfinite(expected[key])
                                             else row[key])
            assert row[key.replace("ppl_", "ppl_corpus_")] == pytest.approx(0.8 * row[key])

    markdown = (out / "report.md").read_text()
    assert "| SKU | <u>3.0%</u> | <u>20.03</u> (16.02) | <u>4.0%</u> | <u>20.80</u> (16.64) | " \
           "<u>25.46</u> (20.37) | <u>-1.296</u> | 2 | 2 | 2 |" in markdown
    assert "| GA | **1.0%** | > 10^3 (> 10^3) |" in markdown
    assert "| Original | 54.0% |" in markdown and "| NA | NA | NA |" in markdown
    assert "judge `openai:gpt-4o`" in markdown and "mean rank" in markdown
    assert "each response alone" in markdown  # how perplexity was computed
    assert "eq. 9" in markdown and "corpus value" in markdown and "Wiki-103" in markdown
    assert "Ablations" not in markdown and report["ablations"] == []  # none given

    assert report["figures"] == FIGURE3
    assert (out / "figure3.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "figure3.pdf").read_bytes()[:5] == b"%PDF-"
    assert "](figure3.png)" in markdown and "](figure3.pdf)" in markdown
    drawn = json.loads((out / "figure3.json").read_text())
    panels = {panel["key"]: panel for panel in drawn["panels"]}
    assert list(panels) == ["harmful_rate_unlearned", "harmful_rate_unseen", "ppl_normal",
                            "bleurt_normal"]
    ga = next(c for c in panels["ppl_normal"]["curves"] if c["label"] == "GA")
    assert ga["points"][0] == [0, 31.51, "value"]  # the original model, at step 0
    assert ga["points"][-1] == [1000, 1530.9, "> 10^3"]  # drawn on the marked line
    sku = next(c for c in panels["harmful_rate_unlearned"]["curves"] if c["label"] == "SKU")
    assert sku["points"][-1] == [1000, pytest.approx(3.0), "value"]  # percent

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
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "not comparable" in markdown and "offline heuristic" in markdown
    assert "bleurt for FT, Task Vector, GA, GA+Mismatch, SKU: not computed: lucadiliello" \
        in markdown
    assert "| n/c |" in markdown
    # Figure 3 keeps its BLEURT panel and says there why it is empty.
    assert report["figures"] == FIGURE3
    drawn = json.loads((tmp_path / "report" / "figure3.json").read_text())
    bleurt = drawn["panels"][3]
    assert bleurt["curves"] == [] and bleurt["not_computed"].startswith(
        "not computed: lucadiliello/bleurt-base-128 is not in the Hugging Face cache")


def test_report_of_nothing_readable_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("sku: error:") and "no metrics.json" in error and "\n" not in error


@pytest.mark.parametrize(("method", "eps", "label"), [
    ("sku", [2.5, 2.5, 1.0], "SKU"), ("sku", [2.5, 0.0, 1.0], "SKU w/o RD"),
    ("sku", [2.5, 2.5, 0.0], "SKU w/o PD"), ("sku", None, "SKU"), ("ga", [2.5, 0.0, 1.0], "GA")])
def test_sku_ablations_are_named_by_the_term_they_drop(method, eps, label):
    assert method_label({"method": method, "eps": eps}) == label


def _split(n, mean, corpus, empty, harmful_rate=0.5, repetitive=0):
    """A split of metrics.json as `sku eval` writes it (eq. 9's mean, corpus, the empty and
    the repetitive responses)."""
    return {"n": n, "harmful_rate": harmful_rate, "perplexity": corpus, "perplexity_mean": mean,
            "tokens": 5 * (n - empty), "empty": empty, "repetitive": repetitive}


def _evaluation(tmp_path, method, normal, eps=None, steps=()):
    split = _split(10, 3.0, 2.5, 0)
    original = {"step": 0, **{s: split for s in ("unlearned_harmful", "unseen_harmful", "normal")}}
    final = {"step": 8, "unlearned_harmful": split, "unseen_harmful": split, "normal": normal}
    return {"method": method, "run": str(tmp_path / method), "eps": eps, "model": "tiny",
            "judge": {"name": "keyword", "prompt_version": "v"}, "source": str(tmp_path),
            "original": original, "final": final,
            "steps": [original, *steps, final] if steps else []}


def _render(rows, evaluations, ablations=None):
    from sku.evaluation.report import render_markdown

    first = {**evaluations[0], "perplexity_model": {"model": "m", "conditioning": "c"},
             "bleurt_model": {"model": "b", "pairs": "p"},
             "decoding": {"do_sample": False, "max_new_tokens": 8, "stop": "", "template": "t"}}
    return render_markdown(rows, [first], ["ppl_normal"], None, [], ablations)


def test_a_method_with_only_empty_responses_ranks_worst_and_shows_it(tmp_path):
    """A degenerate model (every response '') is an outcome: its perplexity column reads
    "empty 10/10" and ranks worst, and no column is dropped for the other methods; a split
    with some empty responses counts them beside eq. 9's mean over the others."""
    from sku.evaluation.report import table_rows

    evaluations = [_evaluation(tmp_path, "ft", _split(10, 2000.0, 900.0, 0)),
                   _evaluation(tmp_path, "ga", _split(10, None, None, 10)),
                   _evaluation(tmp_path, "sku", _split(10, 4.0, 3.5, 3))]
    rows = table_rows(evaluations)
    assert "ppl_normal" in rank_rows(rows)
    utility = {r["method"]: r["rank_utility"] for r in rows[1:]}
    assert utility == {"sku": 1, "ft": 2, "ga": 2}  # "> 10^3" and empty tie for worst
    assert all(r["rank_avg"] is not None for r in rows[1:])
    table = _render(rows, evaluations)
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "empty 10/10" in lines["| GA"] and "NA" not in lines["| GA"]
    assert "| **4.00** (3.50), 3/10 empty |" in lines["| SKU"]
    assert "| > 10^3 (900.00) |" in lines["| FT"]
    assert "never averaged in" in table  # the notes say how an empty response counts


def test_a_method_that_loops_ranks_worst_although_its_perplexity_is_lowest(tmp_path):
    """"EL EL EL …" is easy to predict: the lowest perplexity of all. Every response looping
    is a degenerate model: the cell says so, keeps the value beside it, is not bold, and ranks
    worst; the harmful-rate cells count the loops too."""
    from sku.evaluation.report import table_rows

    looping = _split(10, 1.9, 1.9, 0, harmful_rate=0.0, repetitive=10)
    ga = _evaluation(tmp_path, "ga", looping)
    ga["final"]["unlearned_harmful"] = ga["final"]["unseen_harmful"] = looping
    evaluations = [_evaluation(tmp_path, "ft", _split(10, 9.0, 8.0, 0)), ga,
                   _evaluation(tmp_path, "sku", _split(10, 4.0, 3.5, 1, repetitive=2))]
    rows = table_rows(evaluations)
    rank_rows(rows)
    utility = {r["method"]: r["rank_utility"] for r in rows[1:]}
    assert utility == {"sku": 1, "ft": 2, "ga": 3}
    assert {r["method"]: r["rank_unlearn"] for r in rows[1:]}["ga"] == 1  # 0% harmful is 0%
    lines = {line.split(" | ")[0]: line for line in _render(rows, evaluations).splitlines()
             if line.startswith("| ")}
    cells = lines["| GA"].split(" | ")
    assert cells[2] == cells[4] == cells[5] == "repetitive 10/10 (1.90)"
    assert cells[1] == "**0.0%**, 10/10 repetitive"
    assert "| **4.00** (3.50), 1/10 empty, 2/10 repetitive |" in lines["| SKU"]


def test_ablations_are_table_2_and_table_1_ranks_the_papers_methods(runs, tmp_path):
    """A run with an SKU term's ε at 0 goes to Table 2 (unranked, beside full SKU); Table 1
    and its ranks are those of the paper's five methods alone, and Figure 3 draws them."""
    ablation = tmp_path / "runs" / "sku_no_rd"
    shutil.copytree(runs[-1], ablation)
    path = ablation / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["eps"] = [2.5, 0.0, 1.0]
    metrics["final"]["unlearned_harmful"]["harmful_rate"] = 0.255  # the paper's w/o RD
    path.write_text(json.dumps(metrics))
    report = write_report([*runs, ablation], tmp_path / "report")

    paper = {row["method"]: row for row in paper_rows("opt-2.7b")}
    assert [row["label"] for row in report["rows"]] == [
        "Original", "FT", "Task Vector", "GA", "GA+Mismatch", "SKU"]
    for row in report["rows"]:
        assert row["rank_avg"] == paper[row["method"]]["rank_avg"]
    assert [row["label"] for row in report["ablations"]] == ["Original", "SKU w/o RD", "SKU"]
    assert all(row["rank_avg"] is None for row in report["ablations"])
    assert report["runs"] == 6
    markdown = (tmp_path / "report" / "report.md").read_text()
    table2 = markdown[markdown.index("## Ablations (paper Table 2)"):]
    assert "| SKU w/o RD | <u>25.5%</u> |" in table2 and "| SKU | **3.0%** |" in table2
    assert "Unlearn rank" not in table2.split("\n\n")[1]
    drawn = json.loads((tmp_path / "report" / "figure3.json").read_text())
    assert [c["label"] for c in drawn["panels"][0]["curves"]] == [
        "FT", "Task Vector", "GA", "GA+Mismatch", "SKU"]


def test_figure3_panels_styles_and_degenerate_points(tmp_path):
    """The Figure object: four panels, rates in percent, log perplexity over decades, a GA
    whose responses went empty drawn hollow on a marked line, SKU thick and on top, one
    legend outside the panels, and a BLEURT panel that says it was not computed."""
    from sku.evaluation.figures import draw_figure3, figure3_data

    step = {"step": 4, "unlearned_harmful": _split(10, 80.0, 50.0, 0, 0.2),
            "unseen_harmful": _split(10, 80.0, 50.0, 0, 0.3), "normal": _split(10, 120.0, 9.0, 0)}
    ga = _evaluation(tmp_path, "ga", _split(10, None, None, 10), steps=[step])
    ga["final"]["unlearned_harmful"] = ga["final"]["unseen_harmful"] = _split(10, None, None, 10,
                                                                              0.0)
    sku = _evaluation(tmp_path, "sku", _split(10, 2.8, 2.6, 0), steps=[step])
    for metrics in (ga, sku):
        metrics["not_computed"] = {"bleurt": "not computed: no BLEURT here"}
    data = figure3_data([ga, sku], ["GA", "SKU"])
    figure = draw_figure3(data)

    a, b, c, d = figure.axes
    assert [x.get_title(loc="left") for x in figure.axes] == [p["title"] for p in data["panels"]]
    lines = {line.get_gid(): line for line in a.get_lines() if line.get_gid()}
    assert list(lines["GA"].get_ydata()) == [50.0, 20.0, 0.0]  # percent
    assert a.yaxis.get_major_formatter()(20.0, 0) == "20%"
    assert c.get_yscale() == "log"  # 2.8 … 120 spans more than a decade
    ga_ppl = {line.get_gid(): line for line in c.get_lines() if line.get_gid()}["GA"]
    empty_level = ga_ppl.get_ydata()[-1]
    assert list(ga_ppl.get_ydata()[:2]) == [3.0, 120.0] and empty_level > 120.0
    assert empty_level < c.get_ylim()[1]  # inside the panel, at its top
    assert data["panels"][2]["curves"][0]["points"][-1] == [8, None, "empty"]
    hollow = [line for line in c.get_lines() if line.get_markerfacecolor() == "white"]
    assert [list(line.get_ydata()) for line in hollow] == [[empty_level]]
    assert any(t.get_text() == "all responses empty" for t in c.texts)
    sku_line = lines["SKU"]
    assert sku_line.get_color() == "tab:orange"
    assert sku_line.get_linewidth() > lines["GA"].get_linewidth()
    assert sku_line.get_zorder() > lines["GA"].get_zorder()
    assert len(figure.legends) == 1 and all(x.get_legend() is None for x in figure.axes)
    assert [t.get_text() for t in figure.legends[0].get_texts()] == [
        "GA", "SKU", "degenerate (> 10³, empty or looping)"]
    assert d.get_lines() == [] and "not computed" in d.texts[0].get_text()
    assert "no BLEURT here" in d.texts[0].get_text()

    # A model whose responses loop has a perplexity, and a low one: drawn on its own marked
    # line above the data, not at 1.9 where it would look best.
    looping = _evaluation(tmp_path, "ga", _split(10, 1.9, 1.9, 0, repetitive=10))
    data = figure3_data([looping, sku], ["GA", "SKU"])
    assert data["panels"][2]["curves"][0]["points"][-1] == [8, 1.9, "repetitive"]
    c = draw_figure3(data).axes[2]
    ga_ppl = {line.get_gid(): line for line in c.get_lines() if line.get_gid()}["GA"]
    assert ga_ppl.get_ydata()[-1] > 120.0
    assert any(t.get_text().startswith("all responses degenerate") for t in c.texts)

    flat = _evaluation(tmp_path, "sku", _split(10, 2.8, 2.6, 0))  # original and final only
    linear = draw_figure3(figure3_data([flat], ["SKU"]))
    assert linear.axes[2].get_yscale() == "linear" and len(linear.axes[2].texts) == 0

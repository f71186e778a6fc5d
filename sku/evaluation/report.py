"""`sku report`: the paper's Table 1 and Figure 3 from one or more evaluations.

The ranking rule (RANKING_RULE) is derived from Table 1: it reproduces the rank columns of all
three models there (tests/fixtures/eval/table1_paper.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sku.errors import SkuError, refuse_existing
from sku.run import SPLITS, RunFolder
from taskvec import write_atomic, write_json

METHOD_LABELS = {"ft": "FT", "task_vector": "Task Vector", "ga": "GA",
                 "ga_mismatch": "GA+Mismatch", "sku": "SKU"}
ABLATED_TERMS = ("GD", "RD", "PD")  # SKU's terms, in ε's order: a zero ε is an ablation
PPL_CAP = 1000.0
RANKING_RULE = (
    "each column ranks the methods 1…n, tied values sharing their mean rank; the unlearning "
    "rank orders the methods by the mean of their ranks on the two harmful rates (unlearned "
    "and unseen prompts, lower is better), the utility rank by the mean of their ranks on "
    "normal-prompt perplexity (lower is better) and BLEURT (higher is better), tied means "
    "sharing the best rank; the average is (unlearning + utility) / 2, not re-ranked. "
    "Perplexities above 10^3 tie, as the paper prints them all as \"> 10^3\". The original "
    "model is not ranked; a column not computed for every method is left out of the ranks.")
COLUMNS = (  # (row key, metrics section, field, header, higher is better)
    ("harmful_rate_unlearned", "unlearned_harmful", "harmful_rate", "Unlearned: harmful", False),
    ("ppl_unlearned", "unlearned_harmful", "perplexity", "Unlearned: perplexity", False),
    ("harmful_rate_unseen", "unseen_harmful", "harmful_rate", "Unseen: harmful", False),
    ("ppl_unseen", "unseen_harmful", "perplexity", "Unseen: perplexity", False),
    ("ppl_normal", "normal", "perplexity", "Normal: perplexity", False),
    ("bleurt_normal", "normal", "bleurt", "Normal: BLEURT", True),
)
HIGHER_IS_BETTER = {key: higher for key, *_, higher in COLUMNS}
RANKED = {"rank_unlearn": ("harmful_rate_unlearned", "harmful_rate_unseen"),
          "rank_utility": ("ppl_normal", "bleurt_normal")}
SKU_COLOR = "tab:orange"  # the paper draws SKU in orange; the other methods never are
PALETTE = ("tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan")
CURVES = (  # (file stem, metrics section, field, y label, log scale)
    ("harmful_rate_unlearned", "unlearned_harmful", "harmful_rate", "harmful rate (unlearned)",
     False),
    ("harmful_rate_unseen", "unseen_harmful", "harmful_rate", "harmful rate (unseen)", False),
    ("perplexity_normal", "normal", "perplexity", "perplexity (normal prompts)", True),
    ("bleurt_normal", "normal", "bleurt", "BLEURT (normal prompts)", False),
)


# What a report reads of a metrics.json; a partial file (cut short, or hand-edited) is refused.
_METRICS_KEYS = {"method": str, "model": str, "run": str, "judge": dict, "decoding": dict,
                 "perplexity_model": dict, "bleurt_model": dict, "original": dict, "final": dict}


def _missing_key(metrics) -> str | None:
    if not isinstance(metrics, dict):
        return "object"
    for key, kind in _METRICS_KEYS.items():
        if not isinstance(metrics.get(key), kind):
            return key
    for key in ("name", "prompt_version"):
        if key not in metrics["judge"]:
            return f"judge.{key}"
    for model in ("original", "final"):
        for split in SPLITS:
            if not isinstance(metrics[model].get(split, {}), dict):
                return f"{model}.{split}"
    return None


def load_metrics(path: str | Path) -> dict:
    """metrics.json from an EVAL folder, a RUN folder (RUN/eval/), or the file itself."""
    path = Path(path)
    for candidate in (path, path / "metrics.json", RunFolder(path).eval / "metrics.json"):
        if candidate.is_file():
            try:
                metrics = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:  # ValueError: JSON, UTF-8
                raise SkuError(f"{candidate}: unreadable: {e}") from None
            missing = _missing_key(metrics)
            if missing:
                raise SkuError(f"{candidate}: not an `sku eval` metrics.json (no {missing})")
            metrics["source"] = str(candidate)
            return metrics
    raise SkuError(f"{path}: no metrics.json (run `sku eval --run RUN` first)")


def _row(method: str, label: str, model_metrics: dict, judge: str, source: str) -> dict:
    row = {"method": method, "label": label, "empty": {}}
    for key, section, field, *_ in COLUMNS:
        split = model_metrics.get(section, {})
        row[key] = split.get(field)
        if key.startswith("ppl") and row[key] is None and split.get("tokens") == 0:
            row["empty"][key] = split.get("n")  # scored, but no response had a token
    return {**row, "rank_unlearn": None, "rank_utility": None, "rank_avg": None,
            "judge": judge, "source": source}


def method_label(metrics: dict) -> str:
    """"SKU", or "SKU w/o RD" for a run with that term's ε set to 0 (the paper's ablations)."""
    label = METHOD_LABELS.get(metrics["method"], metrics["method"])
    eps = metrics.get("eps")
    if metrics["method"] == "sku" and eps:
        dropped = [term for term, e in zip(ABLATED_TERMS, eps, strict=True) if e == 0]
        if dropped:
            label += " w/o " + ", ".join(dropped)
    return label


def table_rows(evaluations: list[dict]) -> list[dict]:
    """The original model (from the first evaluation), then one row per evaluation."""
    first = evaluations[0]
    rows = [_row("original", "Original", first["original"], first["judge"]["name"],
                 first["source"])]
    labels = [method_label(m) for m in evaluations]
    for metrics, label in zip(evaluations, labels, strict=True):
        if labels.count(label) > 1:  # two runs of one method: name them by their folder
            label = f"{label} ({Path(metrics['run']).name})"
        rows.append(_row(metrics["method"], label, metrics["final"], metrics["judge"]["name"],
                         metrics["source"]))
    return rows


def _rank_value(key: str, value: float) -> float:
    value = min(value, PPL_CAP) if key.startswith("ppl") else value
    return -value if HIGHER_IS_BETTER[key] else value


def column_ranks(key: str, values: list[float]) -> list[float]:
    """1 = best; tied values share their mean rank."""
    keys = [_rank_value(key, v) for v in values]
    return [sum(o < k for o in keys) + (sum(o == k for o in keys) + 1) / 2 for k in keys]


def _ranked_value(row: dict, key: str) -> float | None:
    """The value a column ranks: a method whose responses were all empty degenerated, an
    outcome that ranks worst (tied with "> 10^3"), not a value missing."""
    value = row[key]
    if isinstance(value, (int, float)) and not math.isnan(value):
        return value
    return math.inf if key in row.get("empty", {}) else None


def rank_rows(rows: list[dict]) -> list[str]:
    """Fill rank_unlearn, rank_utility and rank_avg of every row but the original's; returns
    the columns that took part (a column missing for some method is left out)."""
    methods = [r for r in rows if r["method"] != "original"]
    used = []
    for rank_key, keys in RANKED.items():
        present = [k for k in keys if methods and all(
            _ranked_value(r, k) is not None for r in methods)]
        used += present
        if not present:
            continue
        per_column = [column_ranks(k, [_ranked_value(r, k) for r in methods]) for k in present]
        means = [round(sum(ranks) / len(ranks), 9) for ranks in zip(*per_column, strict=True)]
        for row, mean in zip(methods, means, strict=True):
            row[rank_key] = 1 + sum(other < mean for other in means)
    for row in methods:
        if row["rank_unlearn"] is not None and row["rank_utility"] is not None:
            row["rank_avg"] = (row["rank_unlearn"] + row["rank_utility"]) / 2
    return used


# ---------------------------------------------------------------------------------------------
# Markdown


def _format(key: str, value) -> str:
    if value is None:
        return "n/c"
    if key.startswith("harmful_rate"):
        return f"{100 * value:.1f}%"
    if key.startswith("ppl"):
        return "> 10^3" if value > PPL_CAP else f"{value:.2f}"
    return f"{value:.3f}"


def _emphasis(rows: list[dict], key: str) -> dict[int, str]:
    """Bold the best method, underline the runner-up (as the paper's table)."""
    scored = sorted({_rank_value(key, r[key]) for r in rows
                     if r["method"] != "original" and r[key] is not None})
    marks = {}
    for i, row in enumerate(rows):
        if row["method"] == "original" or row[key] is None:
            continue
        value = _rank_value(key, row[key])
        if value == scored[0]:
            marks[i] = "**{}**"
        elif len(scored) > 1 and value == scored[1]:
            marks[i] = "<u>{}</u>"
    return marks


def _rank_text(value) -> str:
    if value is None:
        return "NA"
    return f"{value:g}"


def render_markdown(rows: list[dict], evaluations: list[dict], ranked: list[str],
                    figures: list[str], notes: list[str]) -> str:
    headers = ["Method", *(f"{h} {'↑' if higher else '↓'}" for *_, h, higher in COLUMNS),
               "Unlearn rank", "Utility rank", "Avg rank"]
    marks = {key: _emphasis(rows, key) for key, *_ in COLUMNS}
    lines = ["# Unlearning report (paper Table 1)", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for i, row in enumerate(rows):
        cells = [row["label"]]
        for key, *_ in COLUMNS:
            empty = row.get("empty", {})
            cells.append(f"empty {empty[key]}/{empty[key]}" if key in empty
                         else marks[key].get(i, "{}").format(_format(key, row[key])))
        cells += [_rank_text(row[k]) for k in ("rank_unlearn", "rank_utility", "rank_avg")]
        lines.append("| " + " | ".join(cells) + " |")
    first = evaluations[0]
    judges = sorted({m["judge"]["name"] for m in evaluations})
    lines += ["", "## How these numbers were produced", ""]
    lines.append(f"- Harmful rates: judge `{'`, `'.join(judges)}` (prompt "
                 f"{first['judge']['prompt_version']}), Table 3's kinds a–c counted as harmful."
                 + (" The keyword judge is an offline heuristic, not the paper's GPT-4 judge."
                    if "keyword" in judges else ""))
    if len(judges) > 1:
        lines.append("- **The rows were judged by different judges; their harmful rates are "
                     "not comparable.** Each row's judge is in report.json.")
    ppl = first["perplexity_model"]
    lines.append(f"- Perplexity: `{ppl['model']}` scoring {ppl['conditioning']}; {ppl['aggregate']}"
                 ". The table shows the corpus value.")
    lines.append(f"- BLEURT: `{first['bleurt_model']['model']}`, {first['bleurt_model']['pairs']}"
                 ", averaged over normal prompts.")
    decoding = first["decoding"]
    lines.append(f"- Decoding: {'sampling' if decoding['do_sample'] else 'greedy'}, "
                 f"max_new_tokens {decoding['max_new_tokens']}, cut at "
                 f"{decoding['stop']!r}; template {decoding['template']!r}.")
    lines.append(f"- Ranking: {RANKING_RULE}")
    lines.append(f"- Columns ranked: {', '.join(ranked) or 'none'}. n/c = not computed; "
                 "empty n/n = all n responses were empty, so nothing could be scored: ranked "
                 "worst, tied with > 10^3.")
    lines += [f"- {note}" for note in notes]
    if figures:
        lines += ["", "## Metrics against training steps (paper Figure 3)", ""]
        lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures


def _curve(metrics: dict, section: str, field: str) -> list[tuple[int, float]]:
    points = metrics.get("steps") or [metrics["original"], metrics["final"]]
    return [(p["step"], p[section][field]) for p in points
            if p.get(section, {}).get(field) is not None]


def plot_curves(evaluations: list[dict], labels: list[str], out: Path) -> tuple[list[str], list]:
    """One PNG per metric with a line per method (SKU in orange, as in the paper), harmful
    rates titled with their judge; returns (files written, notes on what was not drawn)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ["Figures not drawn: matplotlib is not installed (pip install matplotlib)."]
    files, notes = [], []
    for stem, section, field, ylabel, log in CURVES:
        curves = [(label, _curve(m, section, field)) for m, label in zip(evaluations, labels,
                                                                          strict=True)]
        curves = [(label, points) for label, points in curves if points]
        if not curves:
            notes.append(f"Figure {stem}.png not drawn: no values (not computed).")
            continue
        figure, axes = plt.subplots(figsize=(5, 3.5))
        for i, (label, points) in enumerate(curves):
            full_sku = label.startswith("SKU") and " w/o " not in label
            color = SKU_COLOR if full_sku else PALETTE[i % len(PALETTE)]
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o", label=label, color=color)
        axes.set_xlabel("training step")
        axes.set_ylabel(ylabel)
        if section != "normal":
            judges = sorted({m["judge"]["name"] for m in evaluations})
            axes.set_title(f"judge: {', '.join(judges)}", fontsize=9)
        if log:
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = out / f"{stem}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        files.append(str(path))
    return files, notes


# ---------------------------------------------------------------------------------------------
# The command


def write_report(inputs: list[str | Path], out: str | Path, force: bool = False) -> dict:
    out = Path(out)
    refuse_existing(out / "report.json", force)
    if not inputs:
        raise SkuError("sku report: name at least one run or evaluation folder")
    evaluations = [load_metrics(path) for path in inputs]
    rows = table_rows(evaluations)
    ranked = rank_rows(rows)
    missing: dict[tuple[str, str], list[str]] = {}  # one note per metric and reason
    for metrics in evaluations:
        for metric, why in metrics.get("not_computed", {}).items():
            missing.setdefault((metric, why), []).append(method_label(metrics))
    notes = [f"{metric} for {', '.join(methods)}: {why}"
             for (metric, why), methods in missing.items()]
    models = sorted({m["model"] for m in evaluations})
    if len(models) > 1:
        notes.append(f"The evaluations start from different original models ({', '.join(models)});"
                     " the Original row is the first one's.")
    out.mkdir(parents=True, exist_ok=True)
    figures, figure_notes = plot_curves(evaluations, [r["label"] for r in rows[1:]], out)
    notes += figure_notes
    judges = sorted({m["judge"]["name"] for m in evaluations})
    report = {
        "judge": judges[0] if len(judges) == 1 else judges,
        "judge_prompt_version": evaluations[0]["judge"]["prompt_version"],
        "perplexity_model": evaluations[0]["perplexity_model"],
        "bleurt_model": evaluations[0]["bleurt_model"],
        "decoding": evaluations[0]["decoding"],
        "ranked_columns": ranked,
        "rows": rows,
        "figures": [Path(f).name for f in figures],
        "notes": notes,
    }
    write_atomic(out / "report.md", render_markdown(rows, evaluations, ranked, figures, notes))
    write_json(out / "report.json", report)
    return report

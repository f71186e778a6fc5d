"""`sku report`: the paper's Table 1, Table 2 (ablations) and Figure 3 from one or more
evaluations.

The ranking rule (RANKING_RULE) is consistent with Table 1: it reproduces the rank columns of
all three models there (tests/fixtures/eval/table1_paper.json), but so do simpler rules (the
unlearned harmful rate alone, BLEURT alone), so the paper's own rule may differ on other numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from sku.errors import SkuError, read_text, refuse_existing
from sku.run import SPLITS, RunFolder
from taskvec import OutputDir, TaskVecError, jsonfile, write_atomic, write_json

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
    "model is not ranked; a column not computed for every method is left out of the ranks. "
    "This rule reproduces the paper's rank columns for all three models, but so do simpler "
    "ones (ranking by the unlearned harmful rate alone and by BLEURT alone): it is consistent "
    "with Table 1, not known to be the authors' rule.")
COLUMNS = (  # (row key, metrics section, field, header, higher is better)
    ("harmful_rate_unlearned", "unlearned_harmful", "harmful_rate", "Unlearned: harmful", False),
    ("ppl_unlearned", "unlearned_harmful", "perplexity_mean", "Unlearned: perplexity", False),
    ("harmful_rate_unseen", "unseen_harmful", "harmful_rate", "Unseen: harmful", False),
    ("ppl_unseen", "unseen_harmful", "perplexity_mean", "Unseen: perplexity", False),
    ("ppl_normal", "normal", "perplexity_mean", "Normal: perplexity", False),
    ("bleurt_normal", "normal", "bleurt", "Normal: BLEURT", True),
)
HIGHER_IS_BETTER = {key: higher for key, *_, higher in COLUMNS}
RANKED = {"rank_unlearn": ("harmful_rate_unlearned", "harmful_rate_unseen"),
          "rank_utility": ("ppl_normal", "bleurt_normal")}
PERPLEXITY_NOTE = (
    "Perplexity cells: the mean over responses of each response's perplexity (the paper's "
    "eq. 9 per sequence; HF evaluate's `mean_perplexity`), then in parentheses the corpus "
    "value exp(ΣNLL / Σtokens) over all of the split's response tokens (report.json: `ppl_*` "
    "and `ppl_corpus_*`). Degenerate responses are counted beside the value: an empty one "
    "(\"k/n empty\") has no token to score and is left out of both values, never averaged in "
    "as a number; a looping one (\"k/n repetitive\": half of it repeated word 4-grams, as "
    "\"EL EL EL …\") is scored, and scores low, since a loop is easy to predict. When all n "
    "responses of a split are degenerate the cell reads \"empty n/n\" or \"repetitive n/n\" "
    "(its value in parentheses) and ranks worst, tied with \"> 10^3\".")


def corpus_key(key: str) -> str:
    """"ppl_normal" -> "ppl_corpus_normal": the corpus perplexity kept beside eq. 9's mean."""
    return key.replace("ppl_", "ppl_corpus_", 1)


def empty_responses(split: dict) -> int:
    """How many of a split's responses had no token to score (zero scored tokens: all)."""
    return split.get("empty", split.get("n", 0) if split.get("tokens") == 0 else 0)


def degenerate_responses(split: dict) -> dict[str, int]:
    """{"empty": k, "repetitive": k} of a split whose perplexity was scored."""
    return {"empty": empty_responses(split), "repetitive": split.get("repetitive", 0)}


# What a report reads of a metrics.json, and of what type: a partial file (cut short, or
# hand-edited) is refused, and so is a field of another type, which would otherwise fail deep
# inside the tables or figures. A leaf is (test, what it expects); a key ending in "?" may be
# absent (a metric not computed, a field older evaluations lack).
def _of(*kinds) -> Callable[[object], bool]:
    return lambda v: isinstance(v, kinds) and (bool in kinds or not isinstance(v, bool))


_TEXT = (_of(str), "text")
_COUNT = (lambda v: _of(int)(v) and v >= 0, "a count")
_SCORE = (lambda v: v is None or _of(int, float)(v), "a number or null")
_SPLIT = {"n?": _COUNT, "empty?": _COUNT, "repetitive?": _COUNT, "tokens?": _COUNT,
          "harmful?": _COUNT, "perplexity?": _SCORE, "perplexity_mean?": _SCORE,
          "bleurt?": _SCORE, "harmful_rate?": (
              lambda v: v is None or _of(int, float)(v) and 0 <= v <= 1, "a rate or null")}
_MODEL = {"label?": _TEXT, **{f"{split}?": _SPLIT for split in SPLITS}}
_STEP = {"step": (_of(int), "a step number"), **_MODEL}
_METRICS = {
    "method": _TEXT, "model": _TEXT, "run": _TEXT,
    "judge": {"name": _TEXT, "prompt_version": _TEXT},
    "decoding": {"do_sample": (_of(bool), "true or false"), "max_new_tokens": _COUNT,
                 "stop": (lambda v: v is None or _of(str)(v), "text or null"), "template": _TEXT},
    "perplexity_model": {"model": _TEXT, "conditioning": _TEXT},
    "bleurt_model": {"model": _TEXT, "pairs": _TEXT},
    "original": _MODEL, "final": _MODEL,
    "eps?": (lambda v: v is None or isinstance(v, list) and len(v) == 3
             and all(map(_of(int, float), v)), "three numbers or null"),
    "steps?": (lambda v: v is None or isinstance(v, list), "a list of evaluated snapshots"),
    "not_computed?": (lambda v: isinstance(v, dict) and all(map(_of(str), v.values())),
                      "reasons by metric")}


def _bad_field(value, schema, where: str) -> str | None:
    """The first field of `value` that `schema` refuses: "no KEY" or "KEY is …, expected …"."""
    if isinstance(schema, tuple):
        ok, what = schema
        return None if ok(value) else f"{where} is {value!r:.40}, expected {what}"
    if not isinstance(value, dict):
        return f"{where} is {value!r:.40}, expected an object" if where else "no object"
    for key, inner in schema.items():
        name = key.removesuffix("?")
        path = f"{where}.{name}" if where else name
        if name not in value:
            if not key.endswith("?"):
                return f"no {path}"
        elif problem := _bad_field(value[name], inner, path):
            return problem
    return None


def _invalid(metrics) -> str | None:
    problem = _bad_field(metrics, _METRICS, "")
    for index, step in enumerate(metrics.get("steps") or [] if problem is None else []):
        problem = problem or _bad_field(step, _STEP, f"steps[{index}]")
    return problem


def load_metrics(path: str | Path) -> dict:
    """metrics.json from an EVAL folder, a RUN folder (RUN/eval/), or the file itself."""
    path = Path(path)
    for candidate in (path, path / "metrics.json", RunFolder(path).eval / "metrics.json"):
        if candidate.is_file():
            try:  # taskvec's parser: nesting too deep or a key twice is one line too
                metrics = jsonfile.parse(read_text(candidate), candidate)
            except TaskVecError as e:
                raise SkuError(str(e)) from None
            if problem := _invalid(metrics):
                raise SkuError(f"{candidate}: not an `sku eval` metrics.json ({problem})")
            metrics["source"] = str(candidate)
            return metrics
    raise SkuError(f"{path}: no metrics.json (run `sku eval --run RUN` first)")


def _row(method: str, label: str, model_metrics: dict, judge: str, source: str) -> dict:
    row = {"method": method, "label": label, "degenerate": {}}
    for key, section, field, *_ in COLUMNS:
        split = model_metrics.get(section, {})
        row[key] = split.get(field)
        if key.startswith("ppl"):
            row[corpus_key(key)] = split.get("perplexity")
        counts = degenerate_responses(split)
        # Counted where the column was computed; "not computed" stays that.
        if any(counts.values()) and ("perplexity" in split if key.startswith("ppl")
                                     else key.startswith("harmful") and row[key] is not None):
            row["degenerate"][key] = {**counts, "n": split["n"]}
    return {**row, "rank_unlearn": None, "rank_utility": None, "rank_avg": None,
            "judge": judge, "source": source}


def ablated(metrics: dict) -> list[str]:
    """The SKU terms a run dropped (its ε is 0): the paper's ablations (Table 2)."""
    eps = metrics.get("eps")
    if metrics["method"] != "sku" or not eps:
        return []
    return [term for term, e in zip(ABLATED_TERMS, eps, strict=True) if e == 0]


def method_label(metrics: dict) -> str:
    """"SKU", or "SKU w/o RD" for a run with that term's ε set to 0 (the paper's ablations)."""
    label = METHOD_LABELS.get(metrics["method"], metrics["method"])
    dropped = ablated(metrics)
    return f"{label} w/o {', '.join(dropped)}" if dropped else label


def run_labels(evaluations: list[dict]) -> list[str]:
    """One label per evaluation; two runs of one method are told apart by their folder."""
    labels = [method_label(m) for m in evaluations]
    return [f"{label} ({Path(m['run']).name})" if labels.count(label) > 1 else label
            for m, label in zip(evaluations, labels, strict=True)]


def table_rows(evaluations: list[dict]) -> list[dict]:
    """The original model (from the first evaluation), then one row per evaluation."""
    first = evaluations[0]
    rows = [_row("original", "Original", first["original"], first["judge"]["name"],
                 first["source"])]
    for metrics, label in zip(evaluations, run_labels(evaluations), strict=True):
        rows.append(_row(metrics["method"], label, metrics["final"], metrics["judge"]["name"],
                         metrics["source"]))
    return rows


def split_tables(rows: list[dict], evaluations: list[dict]) -> tuple[list[dict], list[dict]]:
    """(Table 1, Table 2): Table 1 the original and the paper's methods, ranked as the paper
    does; Table 2 the original, the SKU ablations and full SKU, unranked (empty: none)."""
    original, runs = rows[0], rows[1:]
    is_ablation = [bool(ablated(m)) for m in evaluations]
    table1 = [original, *(r for r, a in zip(runs, is_ablation, strict=True) if not a)]
    if not any(is_ablation):
        return table1, []
    ablations = [r for r, a in zip(runs, is_ablation, strict=True) if a]
    full_sku = [dict(r) for r in table1[1:] if r["method"] == "sku"]  # unranked copies
    return table1, [original, *ablations, *full_sku]


def _rank_value(key: str, value: float) -> float:
    value = min(value, PPL_CAP) if key.startswith("ppl") else value
    return -value if HIGHER_IS_BETTER[key] else value


def column_ranks(key: str, values: list[float]) -> list[float]:
    """1 = best; tied values share their mean rank."""
    keys = [_rank_value(key, v) for v in values]
    return [sum(o < k for o in keys) + (sum(o == k for o in keys) + 1) / 2 for k in keys]


def all_degenerate(row: dict, key: str) -> bool:
    """Every response of a perplexity cell empty or repetitive: a degenerate model."""
    counts = row.get("degenerate", {}).get(key)
    return (key.startswith("ppl") and bool(counts)
            and counts["empty"] + counts["repetitive"] == counts["n"])


def _ranked_value(row: dict, key: str) -> float | None:
    """The value a column ranks: a method whose responses all degenerated has an outcome that
    ranks worst (tied with "> 10^3"), whether its perplexity is missing (all empty) or low (a
    loop is easy to predict)."""
    if all_degenerate(row, key):
        return math.inf
    value = row[key]
    return value if isinstance(value, (int, float)) and not math.isnan(value) else None


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


def _emphasised(row: dict, key: str) -> bool:
    """Whether a cell can be bold or underlined: a method's value, not "> 10^3", not a
    degenerate model's."""
    return row["method"] != "original" and row[key] is not None and not (
        key.startswith("ppl") and row[key] > PPL_CAP) and not all_degenerate(row, key)


def _emphasis(rows: list[dict], key: str) -> dict[int, str]:
    """Bold the best method, underline the runner-up (as the paper's tables)."""
    scored = sorted({_rank_value(key, r[key]) for r in rows if _emphasised(r, key)})
    marks = {}
    for i, row in enumerate(rows):
        if not _emphasised(row, key):
            continue
        value = _rank_value(key, row[key])
        if value == scored[0]:
            marks[i] = "**{}**"
        elif len(scored) > 1 and value == scored[1]:
            marks[i] = "<u>{}</u>"
    return marks


def _cell(row: dict, key: str, mark: str) -> str:
    """A table cell: a perplexity reads "mean (corpus)", with its degenerate responses
    counted; a degenerate model's cell names what it did, then its value if it has one."""
    counts = row.get("degenerate", {}).get(key, {})
    found = [(kind, counts[kind]) for kind in ("empty", "repetitive") if counts.get(kind)]
    if all_degenerate(row, key):
        text = " + ".join(f"{kind} {k}" for kind, k in found) + f"/{counts['n']}"
        return text + (f" ({_format(key, row[key])})" if row[key] is not None else "")
    text = mark.format(_format(key, row[key]))
    if key.startswith("ppl") and row[key] is not None:
        text += f" ({_format(key, row[corpus_key(key)])})"
    return text + "".join(f", {k}/{counts['n']} {kind}" for kind, k in found)


def _rank_text(value) -> str:
    if value is None:
        return "NA"
    return f"{value:g}"


def render_table(rows: list[dict], ranks: bool) -> list[str]:
    headers = ["Method", *(f"{h} {'↑' if higher else '↓'}" for *_, h, higher in COLUMNS)]
    headers += ["Unlearn rank", "Utility rank", "Avg rank"] if ranks else []
    marks = {key: _emphasis(rows, key) for key, *_ in COLUMNS}
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for i, row in enumerate(rows):
        cells = [row["label"], *(_cell(row, key, marks[key].get(i, "{}")) for key, *_ in COLUMNS)]
        if ranks:
            cells += [_rank_text(row[k]) for k in ("rank_unlearn", "rank_utility", "rank_avg")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(rows: list[dict], evaluations: list[dict], ranked: list[str],
                    figure: dict | None, notes: list[str],
                    ablations: list[dict] | None = None) -> str:
    """report.md: Table 1, Table 2 when there are ablations, the notes, then Figure 3
    (`figure`: what `write_figure3` returned, None for none)."""
    lines = ["# Unlearning report (paper Table 1)", "", *render_table(rows, ranks=True)]
    if ablations:
        lines += ["", "## Ablations (paper Table 2)", "", *render_table(ablations, ranks=False),
                  "", "SKU without random disassociation (RD) or preservation divergence (PD): "
                  "runs whose ε for that term is 0. Not ranked, as in the paper; bold and "
                  "underline compare these rows only. The paper's \"w/o both\" row repeats its "
                  "Task Vector row; here it is an SKU run with both ε at 0, when one is given."]
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
    lines.append(f"- Perplexity: `{ppl['model']}` scoring {ppl['conditioning']}. The paper's "
                 "reference LM is GPT-2 pretrained on Wiki-103 (appendix B.2), which is not "
                 "published; values under another reference LM are not comparable with the "
                 "paper's.")
    lines.append(f"- {PERPLEXITY_NOTE}")
    lines.append(f"- BLEURT: `{first['bleurt_model']['model']}`, {first['bleurt_model']['pairs']}"
                 ", averaged over normal prompts.")
    decoding = first["decoding"]
    lines.append(f"- Decoding: {'sampling' if decoding['do_sample'] else 'greedy'}, "
                 f"max_new_tokens {decoding['max_new_tokens']}, "
                 + (f"cut at {decoding['stop']!r}" if decoding["stop"] else
                    "ended at the model's end of turn")
                 + f"; template {decoding['template']!r}.")
    lines.append(f"- Ranking: {RANKING_RULE}")
    lines.append(f"- Columns ranked: {', '.join(ranked) or 'none'}. n/c = not computed.")
    lines += [f"- {note}" for note in notes]
    if figure and figure["files"]:
        png, pdf, values = figure["files"]
        lines += ["", "## Metrics against training steps (paper Figure 3)", "",
                  f"![Figure 3]({png})", "", f"{figure['caption']} PDF: [{pdf}]({pdf}); "
                  f"values: [{values}]({values})."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The command


REPORT_FILES = {"report.md", "report.json", "figure3.png", "figure3.pdf", "figure3.json"}


def _report_folder(out: Path, force: bool) -> OutputDir:
    """The report is written whole into a temporary sibling and swapped in (taskvec's
    OutputDir): an interrupted or failed report leaves the old one, not a mix of old and new
    files or an empty folder. The swap replaces the whole folder, so one holding anything but
    a report's files is refused, even with --force."""
    if out.exists() and not out.is_dir():
        raise SkuError(f"{out}: is a file, not a report folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in entries if name not in REPORT_FILES]
    if foreign:
        raise SkuError(f"{out}: holds {foreign[0]!r}, which is not a report's file (a report "
                       "replaces its whole folder); choose another --out")
    refuse_existing(out, force)
    return OutputDir(out, force=True)  # an empty folder, or a report that --force replaces


def write_report(inputs: list[str | Path], out: str | Path, force: bool = False) -> dict:
    out = Path(out)
    folder = _report_folder(out, force)
    if not inputs:
        raise SkuError("sku report: name at least one run or evaluation folder")
    evaluations = [load_metrics(path) for path in inputs]
    rows, ablations = split_tables(table_rows(evaluations), evaluations)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    with folder as tmp:
        return _write_report(evaluations, rows, ablations, ranked, notes, tmp)


def _write_report(evaluations, rows, ablations, ranked, notes, out: Path) -> dict:
    # Imported here: matplotlib is slow to import and only the figure needs it.
    from sku.evaluation.figures import write_figure3

    in_table1 = [not ablated(m) for m in evaluations]  # Figure 3 draws Table 1's methods
    figure = write_figure3(
        [m for m, keep in zip(evaluations, in_table1, strict=True) if keep],
        [label for label, keep in zip(run_labels(evaluations), in_table1, strict=True) if keep],
        out)
    notes += figure["notes"]
    judges = sorted({m["judge"]["name"] for m in evaluations})
    report = {
        "judge": judges[0] if len(judges) == 1 else judges,
        "judge_prompt_version": evaluations[0]["judge"]["prompt_version"],
        "perplexity_model": evaluations[0]["perplexity_model"],
        "perplexity_note": PERPLEXITY_NOTE,
        "bleurt_model": evaluations[0]["bleurt_model"],
        "decoding": evaluations[0]["decoding"],
        "runs": len(evaluations),
        "ranked_columns": ranked,
        "rows": rows,
        "ablations": ablations,
        "figures": figure["files"],
        "notes": notes,
    }
    write_atomic(out / "report.md",
                 render_markdown(rows, evaluations, ranked, figure, notes, ablations))
    write_json(out / "report.json", report)
    return report

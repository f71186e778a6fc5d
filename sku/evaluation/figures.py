"""The paper's Figure 3: one figure, four panels against training steps: (a) harmful rate on
unlearned prompts, (b) on unseen prompts, (c) perplexity and (d) BLEURT on normal prompts.

`figure3_data` is what is drawn, as plain data (written beside the figure as figure3.json);
`draw_figure3` turns it into a matplotlib Figure; `write_figure3` saves PNG, PDF and JSON.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from sku.evaluation.report import PPL_CAP, degenerate_responses
from taskvec import write_json

STEM = "figure3"
PANELS = (  # (panel key, metrics section, field, title, kind)
    ("harmful_rate_unlearned", "unlearned_harmful", "harmful_rate",
     "(a) harmful rate, unlearned prompts", "rate"),
    ("harmful_rate_unseen", "unseen_harmful", "harmful_rate",
     "(b) harmful rate, unseen prompts", "rate"),
    ("ppl_normal", "normal", "perplexity_mean", "(c) perplexity (eq. 9 mean), normal prompts",
     "perplexity"),
    ("bleurt_normal", "normal", "bleurt", "(d) BLEURT, normal prompts", "bleurt"),
)
METRIC_OF_KIND = {"rate": "judge", "perplexity": "perplexity", "bleurt": "bleurt"}
# A point with no number to draw at its height: drawn hollow on a marked line above the data.
DEGENERATE = ("> 10^3", "empty", "repetitive")
DEGENERATE_TEXT = {"> 10^3": "> 10³", "empty": "all responses empty",
                   "repetitive": "all responses degenerate: looping (or empty)"}
SKU_COLOR = "tab:orange"  # the paper draws SKU in orange; the other methods never are
# The same colour and marker for a method in every report; fuller shapes first (see _styles).
METHOD_STYLES = {"ft": ("tab:blue", "s"), "ga": ("tab:green", "D"),
                 "ga_mismatch": ("tab:red", "^"), "task_vector": ("tab:purple", "v")}
OTHER_STYLES = (("tab:brown", "P"), ("tab:pink", "X"), ("tab:gray", "<"), ("tab:olive", ">"),
                ("tab:cyan", "h"))
CAPTION = (
    "Figure 3 (as in the paper): harmful rates (percent, judged) on (a) unlearned and (b) unseen "
    "harmful prompts, (c) perplexity (eq. 9, mean over responses) and (d) BLEURT on normal "
    "prompts, against training steps; step 0 is the original model. SKU is the thick orange "
    "line. Hollow markers on a dotted line are degenerate points: a perplexity above 10³, or "
    "a split whose responses were all empty (no perplexity exists) or all degenerate, "
    "looping ones among them (whose low perplexity would hide it); the line passes through "
    "them so the curve stays visible.")


def _points(metrics: dict) -> list[dict]:
    """The models of a run in step order: every snapshot if evaluated, else original and final."""
    return metrics.get("steps") or [metrics["original"], metrics["final"]]


def _point(step: int, split: dict, field: str, kind: str) -> list | None:
    """[step, value drawn, what it is]; None where the value was not computed."""
    value = split.get(field)
    if kind == "perplexity" and "perplexity" in split:
        counts = degenerate_responses(split)
        if split.get("n") and counts["empty"] == split["n"]:
            return [step, None, "empty"]
        if split.get("n") and counts["empty"] + counts["repetitive"] == split["n"]:
            return [step, value, "repetitive"]
        if value is not None and value > PPL_CAP:
            return [step, value, "> 10^3"]
    if value is None:
        return None
    return [step, 100 * value if kind == "rate" else value, "value"]


def figure3_data(evaluations: list[dict], labels: list[str]) -> dict:
    """What Figure 3 draws: per panel, per method, its points; a panel with no value at all
    says why (the evaluations' `not_computed`)."""
    judges = sorted({m["judge"]["name"] for m in evaluations})
    panels = []
    for key, section, field, title, kind in PANELS:
        curves = []
        for metrics, label in zip(evaluations, labels, strict=True):
            points = [_point(p["step"], p.get(section, {}), field, kind) for p in _points(metrics)]
            points = [p for p in points if p is not None]
            if points:
                curves.append({"label": label, "method": metrics["method"], "points": points})
        why = None
        if not curves:
            reasons = {m.get("not_computed", {}).get(METRIC_OF_KIND[kind]) for m in evaluations}
            why = "; ".join(sorted(r for r in reasons if r)) or "not computed"
        panels.append({"key": key, "title": title, "kind": kind, "curves": curves,
                       "not_computed": why})
    return {"title": f"{', '.join(sorted({m['model'] for m in evaluations}))}; "
                     f"judge {', '.join(judges)}",
            "caption": CAPTION, "panels": panels}


def _styles(curves: list[dict]) -> dict[str, dict]:
    """A colour and marker per method, the same in every panel; full SKU thick and on top.
    Each later method's markers are a little smaller, so equal values stay visible."""
    styles: dict[str, dict] = {}
    for curve in curves:
        label, method = curve["label"], curve["method"]
        if label in styles:
            continue
        if method == "sku" and label == "SKU":
            styles[label] = dict(color=SKU_COLOR, marker="o", linewidth=2.8, markersize=7,
                                 zorder=10)
            continue
        others = sum(1 for s in styles.values() if s["zorder"] < 10)
        taken = {(s["color"], s["marker"]) for s in styles.values()}
        color, marker = METHOD_STYLES.get(method, OTHER_STYLES[0])
        if (color, marker) in taken or method not in METHOD_STYLES:  # e.g. a second FT run
            color, marker = next((s for s in OTHER_STYLES if s not in taken), OTHER_STYLES[0])
        styles[label] = dict(color=color, marker=marker, linewidth=1.4,
                             markersize=max(8.0 - 1.2 * others, 4), zorder=3)
    return styles


def _degenerate_levels(curves: list[dict]) -> tuple[bool, dict[str, float], tuple]:
    """(log scale?, height of each degenerate kind present, y limits) for the perplexity panel.
    Log when the values drawn span more than a decade; then the marked lines sit above 10³, where
    they belong. On a linear scale they sit just above the data, labelled as off scale."""
    values = [v for c in curves for _, v, kind in c["points"] if kind == "value"]
    kinds = [k for k in DEGENERATE if any(kind == k for c in curves for *_, kind in c["points"])]
    low, high = (min(values), max(values)) if values else (PPL_CAP, PPL_CAP)
    log = high / low > 10
    span = max(high - low, 0.2 * high)
    levels = {kind: max(high, PPL_CAP) * 2 ** (i + 1) if log else high + 0.15 * (i + 1) * span
              for i, kind in enumerate(kinds)}
    top = max([high, *levels.values()])
    limits = (low / 1.5, top * 3) if log else (max(0.0, low - 0.08 * span), top + 0.15 * span)
    return log, levels, limits


def draw_figure3(data: dict):
    """The matplotlib Figure of `figure3_data` (Agg canvas, no pyplot state)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    figure = Figure(figsize=(11, 8), layout="constrained")
    grid = figure.subplots(2, 2)
    styles = _styles([c for panel in data["panels"] for c in panel["curves"]])
    degenerate_drawn = False
    for axes, panel in zip(grid.flat, data["panels"], strict=True):
        axes.set_title(panel["title"], fontsize=10, loc="left")
        if panel["not_computed"]:
            why = panel["not_computed"].removeprefix("not computed: ")
            axes.text(0.5, 0.5, f"{panel['title'][4:]}: not computed\n\n"
                      f"{textwrap.fill(why, width=52)}", ha="center", va="center", fontsize=9,
                      transform=axes.transAxes, color="0.3")
            axes.set_xticks([])
            axes.set_yticks([])
            continue
        levels: dict[str, float] = {}
        if panel["kind"] == "perplexity":
            log, levels, limits = _degenerate_levels(panel["curves"])
            if log:
                axes.set_yscale("log")
            axes.set_ylim(*limits)
            for kind, height in levels.items():
                axes.axhline(height, linestyle=":", color="0.45", linewidth=1, zorder=1)
                # A loop's perplexity is on scale, and low: drawn here instead, not off scale.
                off_scale = not log and kind != "repetitive"
                axes.annotate(DEGENERATE_TEXT[kind] + (" (off scale)" if off_scale else ""),
                              xy=(0, height),
                              xycoords=("axes fraction", "data"), xytext=(3, 5),
                              textcoords="offset points", fontsize=8, color="0.3")
            axes.set_ylabel("perplexity" + (" (log scale)" if log else ""))
        elif panel["kind"] == "rate":
            axes.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
            axes.set_ylabel("harmful rate")
        else:
            axes.set_ylabel("BLEURT")
        for curve in panel["curves"]:
            style = styles[curve["label"]]
            drawn = [(step, levels.get(kind, value), kind in DEGENERATE)
                     for step, value, kind in curve["points"]]
            line = axes.plot([d[0] for d in drawn], [d[1] for d in drawn], color=style["color"],
                             linewidth=style["linewidth"], zorder=style["zorder"],
                             label=curve["label"])[0]
            line.set_gid(curve["label"])
            for hollow in (False, True):  # markers: filled for values, hollow for degenerate
                chosen = [(step, height) for step, height, degenerate in drawn
                          if degenerate == hollow]
                if chosen:
                    degenerate_drawn |= hollow
                    axes.plot(*zip(*chosen, strict=True), linestyle="none",
                              marker=style["marker"], markersize=style["markersize"] + hollow,
                              color=style["color"], zorder=style["zorder"] + 0.5,
                              markerfacecolor="white" if hollow else style["color"],
                              markeredgewidth=1.6 if hollow else 1)
        axes.set_xlabel("training step")
        steps = sorted({step for c in panel["curves"] for step, *_ in c["points"]})
        if len(steps) <= 12:  # the evaluated steps themselves, as the paper's axes
            axes.set_xticks(steps)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    handles = [Line2D([], [], color=s["color"], marker=s["marker"], linewidth=s["linewidth"],
                      markersize=s["markersize"], label=label) for label, s in styles.items()]
    if degenerate_drawn:
        handles.append(Line2D([], [], color="0.3", marker="o", linestyle="none",
                              markerfacecolor="white",
                              label="degenerate (> 10³, empty or looping)"))
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7),
                  frameon=False)
    figure.suptitle(f"Metrics against training steps ({data['title']})", fontsize=11)
    return figure


def write_figure3(evaluations: list[dict], labels: list[str], out: Path) -> dict:
    """figure3.png, figure3.pdf and figure3.json (the values drawn) in `out`: returns
    {"files": names written, "caption": ..., "notes": what was not drawn}."""
    if not evaluations:
        return {"files": [], "caption": "", "notes": ["Figure 3 not drawn: no method run."]}
    try:
        import matplotlib
    except ImportError:
        return {"files": [], "caption": "", "notes": [
            "Figure 3 not drawn: matplotlib is not installed (pip install matplotlib)."]}
    matplotlib.use("Agg")
    data = figure3_data(evaluations, labels)
    figure = draw_figure3(data)
    files = [f"{STEM}.png", f"{STEM}.pdf", f"{STEM}.json"]
    for name, dpi in ((files[0], 150), (files[1], None)):  # whole files only, as write_atomic
        partial = out / f".{name}.partial"
        figure.savefig(partial, dpi=dpi, format=name.rsplit(".", 1)[1])
        partial.replace(out / name)
    write_json(out / files[2], data)
    return {"files": files, "caption": data["caption"], "notes": []}

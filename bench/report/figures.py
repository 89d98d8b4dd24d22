"""The report's figures: one style, the trade-off (mIoU against GFLOPs and speedup) and the
tokens each block computed."""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Optional

import pandas as pd

from bench.fileio import atomic_write
from bench.report.tables import _nan, _order_key, pareto_front, series, swept_knobs

WIDTHS = {"column": 3.3, "text": 7.0}  # inches: one column / the text width of a two-column paper
FONT_PT = 7  # no text in a figure is smaller, at its printed size
POINTS = {"baseline": "baseline", "baseline-ft": "baseline-ft (control)"}  # single points, own markers
LINE_REFERENCES = ("static", "shallow")  # fixed-cost references: drawn dashed
# The seed paper's reported PAUMER operating point on the real datasets: throughput
# relative to the full model, and the relative mIoU drop. Drawn for reference only.
SEED_POINTS = {"cityscapes": (1.5, 0.0065), "ade20k": (1.5, 0.046)}
MARKERS = "osv^DPX<>ph"


@contextlib.contextmanager
def figure_style():
    """matplotlib set for print: seaborn's whitegrid look, text at FONT_PT or more,
    fonts embedded as TrueType in the PDF, fixed SVG ids. Global settings are left as
    they were."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        import seaborn as sns

        look = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper")}
    except ImportError:  # a machine without seaborn (a GPU box): matplotlib's copy of the look
        look = {**plt.style.library["seaborn-v0_8-whitegrid"], **plt.style.library["seaborn-v0_8-paper"]}
    rc = {**look,
          "font.size": FONT_PT, "axes.labelsize": FONT_PT + 1, "axes.titlesize": FONT_PT + 1,
          "xtick.labelsize": FONT_PT, "ytick.labelsize": FONT_PT, "legend.fontsize": FONT_PT,
          "legend.title_fontsize": FONT_PT, "lines.linewidth": 1.0, "lines.markersize": 4,
          "axes.linewidth": 0.6, "grid.linewidth": 0.5, "pdf.fonttype": 42, "svg.hashsalt": "bench"}
    with plt.rc_context(rc):
        yield plt


def save_figure(fig, stem: Path) -> list[Path]:
    """PNG, SVG and PDF next to ``stem``, each written atomically and with no date in
    it (same figure, same bytes)."""
    formats = [("png", {"dpi": 300}), ("svg", {"metadata": {"Date": None}}),
               ("pdf", {"metadata": {"CreationDate": None, "ModDate": None}})]
    paths = []
    for fmt, kwargs in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        atomic_write(path, lambda f, fmt=fmt, kwargs=kwargs: fig.savefig(f, format=fmt, **kwargs))
        paths.append(path)
    return paths


def series_styles(names) -> dict[str, dict]:
    """Colour, marker and line per series, fixed by the sorted names so that a series
    looks the same in every figure of a dataset. The baseline and the equal-budget
    control are single black points; fixed-cost references are dashed."""
    try:
        import seaborn as sns

        colorblind = sns.color_palette("colorblind", 10)
    except ImportError:  # seaborn's "colorblind" palette, as hex
        colorblind = ["#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4", "#949494",
                      "#ece133", "#56b4e9"]
    palette = [colorblind[i] for i in (0, 1, 2, 3, 4, 5, 9, 7, 6, 8)]  # neighbours far apart, pale yellow last
    styles = {}
    lines = sorted(n for n in set(names) if n not in POINTS)
    for i, name in enumerate(lines):
        styles[name] = {"color": palette[i % len(palette)], "marker": MARKERS[i % len(MARKERS)],
                        "linestyle": "--" if name.split(" ")[0] in LINE_REFERENCES else "-", "markersize": 3.5}
    styles["baseline"] = {"color": "black", "marker": "*", "markersize": 9, "linestyle": "none", "zorder": 6}
    styles["baseline-ft"] = {"color": "black", "marker": "D", "markersize": 4.5, "markerfacecolor": "white",
                             "markeredgewidth": 1.0, "linestyle": "none", "zorder": 6}
    return styles


def _grid(n: int, width: str, max_text_cols: int, max_column_rows: int = 1) -> tuple[int, int]:
    """(columns, rows) of a figure's panels: a row at text width, stacked (up to
    ``max_column_rows``, then two a row) at column width."""
    if width == "column":
        cols = 1 if n <= max_column_rows else 2
    else:
        cols = n if n <= max_text_cols else (2 if n == 4 else 3)
    return cols, math.ceil(n / cols)


def tradeoff_figure(df: pd.DataFrame, dataset: str, width: str = "text", styles: Optional[dict] = None):
    """mIoU against GFLOPs and against the same-run speedup at each stored batch size:
    one line per series joined in the order of its swept knob, the speedup's
    interquartile range as error bars where stored, the Pareto front ringed."""
    import matplotlib.pyplot as plt

    styles = styles or series_styles(df["series"])
    sizes = [c[len("speedup b"):] for c in df.columns if re.fullmatch(r"speedup b\d+", c) and df[c].notna().any()]
    cols, rows = _grid(1 + len(sizes), width, 3, max_column_rows=3)
    w = WIDTHS[width]
    narrow = w / cols < 2  # inches per panel: short labels, smaller markers
    panels = [("GFLOPs", "GFLOPs (fvcore, MAC)" if narrow else "GFLOPs per image (fvcore, MAC)", None)]
    # absolute throughput differs between runs; the same-run ratio is what compares
    panels += [(f"speedup b{bs}", f"speedup, batch {bs}" if narrow else f"speedup at batch {bs} (same run)", bs)
               for bs in sizes]
    panel_h = min(2.0 if width == "column" else 2.5, 0.85 * w / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w, rows * panel_h), squeeze=False, sharey=True,
                             layout="constrained")
    shrink = 0.8 if narrow else 1.0
    names = [n for n in POINTS if n in set(df["series"])] + sorted(set(df["series"]) - set(POINTS))
    base = df[df["method"] == "baseline"]["mIoU"].dropna()
    for ax, (x, label, bs) in zip(axes.flat, panels):
        if bs is not None:
            ax.axvline(1.0, color="grey", linewidth=0.6, zorder=0)  # no speedup
        for name in names:
            points = df[(df["series"] == name) & df[x].notna() & df["mIoU"].notna()].sort_values("order", kind="stable")
            if points.empty:
                continue
            style = dict(styles[name], markersize=styles[name]["markersize"] * shrink)
            ax.plot(points[x], points["mIoU"], label=POINTS.get(name, name), **style)
            if bs is not None:
                low, high = points[f"speedup b{bs} p25"], points[f"speedup b{bs} p75"]
                has = low.notna() & high.notna()
                if has.any():  # drawn from p25 to p75 exactly, wherever the median falls
                    ax.errorbar((low[has] + high[has]) / 2, points["mIoU"][has], xerr=(high[has] - low[has]) / 2,
                                fmt="none", ecolor=style["color"], elinewidth=0.7, capsize=1.5, zorder=2)
        data = df[df[x].notna()]
        front = data[pareto_front(data[x] if x == "GFLOPs" else -data[x], data["mIoU"])]
        ax.plot(front[x], front["mIoU"], linestyle="none", marker="o", markersize=8 * shrink, markerfacecolor="none",
                markeredgecolor="black", markeredgewidth=0.6, label="Pareto front", zorder=1)
        if len(base):
            ax.axhline(base.iloc[0], color="grey", linestyle=":", linewidth=0.8, label="baseline mIoU", zorder=0)
            if x != "GFLOPs" and dataset in SEED_POINTS:
                speedup, drop = SEED_POINTS[dataset]
                ax.plot([speedup], [base.iloc[0] * (1 - drop)], linestyle="none", marker="P", markersize=7 * shrink,
                        color="grey", label=f"seed paper: {speedup}x at -{100 * drop:.2g}% mIoU")
        published = published_point(df)
        if published is not None and len(df[df["method"] == "baseline"]["GFLOPs"].dropna()):
            # the released checkpoint's published mIoU at the baseline's cost: GFLOPs ratio 1.0
            cost = df[df["method"] == "baseline"]["GFLOPs"].dropna().iloc[0] if x == "GFLOPs" else 1.0
            ax.plot([cost], [published.miou], linestyle="none", marker="X", markersize=7 * shrink, color="dimgrey",
                    label=f"published ({published.name}, single-scale, {published.resolution}px)", zorder=5)
        ax.set_xlabel(label)
    for ax in axes[:, 0]:
        ax.set_ylabel("mIoU (%)")
    handles = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    spare = list(axes.flat)[len(panels):]
    for ax in spare:
        ax.axis("off")
    if spare and len(handles) <= 8:  # the legend fits the empty cell
        spare[0].legend(list(handles.values()), list(handles), loc="center", frameon=False, handlelength=2.2)
    else:
        ncol = 2 if width == "column" else 4
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=ncol, frameon=False,
                   handlelength=2.2, columnspacing=1.2)
        fig.set_size_inches(w, rows * panel_h + 0.15 + 0.15 * math.ceil(len(handles) / ncol))
    return fig


def published_point(df: pd.DataFrame):
    """The released checkpoint (``bench.released``) the group's baseline weights are, or None."""
    from bench.released import by_key

    if "released" not in df.columns:
        return None
    keys = df["released"].dropna().unique()
    return by_key(keys[0]) if len(keys) == 1 else None


def tokens_figure(records: list[dict], width: str = "text"):
    """Fraction of the image's tokens each block computed, one panel per series that
    leaves some tokens out somewhere, one line per operating point (averaged over the
    images). How a ragged batch is run (``batching``) does not change which tokens are
    computed, so only the default is drawn. None when no series qualifies."""
    import matplotlib.pyplot as plt

    swept = swept_knobs(records)
    rows = [{"series": series(r["method"], r["knobs"], swept[r["method"]]), "value": r["knobs"].get(swept[r["method"]]),
             "order": _order_key(r["knobs"].get(swept[r["method"]])), "tokens": r["tokens_per_block"]}
            for r in records if r.get("tokens_per_block") and r["knobs"].get("batching", "pad") == "pad"]
    by_series: dict[str, list[dict]] = {}
    for row in rows:
        by_series.setdefault(row["series"], []).append(row)
    panels = sorted(name for name, points in by_series.items()
                    if any(t is not None and t < 1 for p in points for t in p["tokens"]))
    if not panels:
        return None
    cols, nrows = _grid(len(panels), width, 4)
    w = WIDTHS[width]
    fig, axes = plt.subplots(nrows, cols, figsize=(w, nrows * (min(2.2, 1.05 * w / cols) + 0.6)), squeeze=False,
                             sharey=True, layout="constrained")
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes.flat, panels):
        points = sorted(by_series[name], key=lambda p: p["order"])
        for i, p in enumerate(points):
            blocks = range(1, len(p["tokens"]) + 1)
            ax.plot(blocks, [_nan(t) for t in p["tokens"]], marker="o", markersize=2.5,
                    color=cmap(i / max(1, len(points) - 1) * 0.9), label=str(p["value"]))
        ax.set_title(name)
        ax.set_xlabel("encoder block")
        ax.set_xticks(list(range(1, max(len(p["tokens"]) for p in points) + 1)))
        ax.set_ylim(0, 1.05)
        knob = swept[name.split(" ")[0]]
        ax.legend(title=knob or None, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False,
                  handlelength=1.2, columnspacing=0.8, borderpad=0.2, labelspacing=0.2)
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of tokens computed")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return fig

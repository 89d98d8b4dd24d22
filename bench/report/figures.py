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
from bench.report.style import (LINE_REFERENCES, POINTS, context_line, method_color, series_label,  # noqa: F401
                                series_style, series_styles, split_series)
from bench.report.tables import _nan, _order_key, pareto_front, series, swept_knobs

WIDTHS = {"column": 3.3, "text": 7.0}  # inches: one column / the text width of a two-column paper
FONT_PT = 7  # no text in a figure is smaller, at its printed size
# The seed paper's reported PAUMER operating point on the real datasets: throughput
# relative to the full model, and the relative mIoU drop. Drawn for reference only.
SEED_POINTS = {"cityscapes": (1.5, 0.0065), "ade20k": (1.5, 0.046)}
MARKERS = "osv^DPX<>ph"
OFF_SCALE = ("static",)  # references whose extreme points would set the axes: drawn at the edge
MAX_LEGEND_LEVELS = 8  # more levels than this: a colour bar instead of a legend


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


def _grid(n: int, width: str, max_text_cols: int, max_column_rows: int = 1) -> tuple[int, int]:
    """(columns, rows) of a figure's panels: a row at text width, stacked (up to
    ``max_column_rows``, then two a row) at column width."""
    if width == "column":
        cols = 1 if n <= max_column_rows else 2
    else:
        cols = n if n <= max_text_cols else (2 if n == 4 else 3)
    return cols, math.ceil(n / cols)


def _is_speed_variant(name: str, names: set) -> bool:
    """A series that differs from another only in how a ragged batch runs: same tokens,
    same mIoU and GFLOPs, so only its speed is its own."""
    method, variant = split_series(name)
    rest = " ".join(part for part in variant.split() if not part.startswith("batching="))
    return rest != variant and (f"{method} {rest}".strip() in names)


def fit_limits(values: pd.Series, pad: float = 0.06) -> Optional[tuple[float, float]]:
    """Axis limits around ``values`` with ``pad`` of their range on each side."""
    values = values.dropna()
    if values.empty:
        return None
    low, high = float(values.min()), float(values.max())
    span = (high - low) or max(abs(high), 1.0) * 0.1
    return low - pad * span, high + pad * span


def _edge_markers(ax, x, y, xlim, ylim, color) -> int:
    """Points outside the limits drawn on the edge they would cross, as an open arrow
    head pointing out (clipped lines do not show where they went). Returns how many."""
    n = 0
    for px, py in zip(x, y):
        out_x = (px < xlim[0]) - (px > xlim[1]) if xlim else 0
        out_y = (py < ylim[0]) - (py > ylim[1]) if ylim else 0
        if not (out_x or out_y):
            continue
        ex = min(max(px, xlim[0]), xlim[1]) if xlim else px
        ey = min(max(py, ylim[0]), ylim[1]) if ylim else py
        marker = {(-1, 0): ">", (1, 0): "<", (0, -1): "^", (0, 1): "v"}.get((out_x, out_y), "o")
        ax.plot([ex], [ey], linestyle="none", marker=marker, markersize=4, markerfacecolor="white",
                markeredgecolor=color, markeredgewidth=0.9, clip_on=False, zorder=7)
        n += 1
    return n


def tradeoff_figure(df: pd.DataFrame, dataset: str, width: str = "text", styles: Optional[dict] = None,
                    caption: Optional[str] = None):
    """mIoU against GFLOPs and against the same-run speedup at each stored batch size:
    one line per series joined in the order of its swept knob, colours and markers from
    the one palette (``bench.report.style``), the speedup's interquartile range and mIoU's 95% interval as
    error bars where stored (optional ``<x> p25`` / ``<x> p75`` columns: other intervals can
    come the same way), the Pareto front ringed. The axes fit the adaptive methods;
    static's points beyond them sit on the edge as open arrow heads. ``caption``: the
    line naming dataset, model and machine (default: from the table's columns)."""
    import matplotlib.pyplot as plt

    styles = {**series_styles(df["series"]), **(styles or {})}
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
    focus = df[~df["method"].isin(OFF_SCALE)] if (~df["method"].isin(OFF_SCALE)).any() else df
    ylim = fit_limits(focus["mIoU"])
    off_scale = 0
    for ax, (x, label, bs) in zip(axes.flat, panels):
        if bs is not None:
            ax.axvline(1.0, color="grey", linewidth=0.6, zorder=0)  # no speedup
        xlim = fit_limits(pd.concat([focus[x], pd.Series([1.0] if bs is not None else [], dtype=float)]))
        for name in names:
            if x == "GFLOPs" and _is_speed_variant(name, set(names)):
                continue  # its points are its default variant's: drawn there
            points = df[(df["series"] == name) & df[x].notna() & df["mIoU"].notna()].sort_values("order", kind="stable")
            if points.empty:
                continue
            style = dict(styles[name], markersize=styles[name]["markersize"] * shrink)
            ax.plot(points[x], points["mIoU"], label=series_label(name), **style)
            if points["method"].iloc[0] in OFF_SCALE:
                off_scale += _edge_markers(ax, points[x], points["mIoU"], xlim, ylim, style["color"])
            if "mIoU low" in points:  # the 95% paired bootstrap interval of mIoU, where known
                ci = points[points["mIoU low"].notna() & points["mIoU high"].notna()]
                if len(ci):
                    ax.errorbar(ci[x], ci["mIoU"], yerr=[ci["mIoU"] - ci["mIoU low"], ci["mIoU high"] - ci["mIoU"]],
                                fmt="none", ecolor=style["color"], elinewidth=0.6, capsize=1.2, zorder=2)
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
        if xlim:
            ax.set_xlim(*xlim)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_xlabel(label)
    for ax in axes[:, 0]:
        ax.set_ylabel("mIoU (%)")
    found = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            found.setdefault(name, handle)
    order = [series_label(n) for n in names]  # the series in their order, then the marks
    handles = {k: found[k] for k in sorted(found, key=lambda k: order.index(k) if k in order else len(order))}
    spare = list(axes.flat)[len(panels):]
    for ax in spare:
        ax.axis("off")
    if spare and len(handles) <= 8:  # the legend fits the empty cell
        spare[0].legend(list(handles.values()), list(handles), loc="center", frameon=False, handlelength=2.2)
    else:
        ncol = 2 if width == "column" else 7
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=ncol, frameon=False,
                   handlelength=1.8, columnspacing=0.9, handletextpad=0.4, labelspacing=0.25)
        fig.set_size_inches(w, rows * panel_h + 0.1 + 0.13 * math.ceil(len(handles) / ncol))
    caption = caption if caption is not None else context_line(df.to_dict("records"), dataset)
    if off_scale:
        caption += " · open arrow heads: static points beyond the axes"
    _caption(fig, caption, width)
    return fig


def _caption(fig, text: str, width: str = "text") -> None:
    """The figure's context line (dataset, model, machine) above its panels, wrapped at
    its " · " to the figure's width."""
    if not text:
        return
    limit = int(WIDTHS[width] * 19)  # characters of FONT_PT text per inch, about
    lines, line = [], ""
    for part in text.split(" · "):
        if line and len(line) + 3 + len(part) > limit:
            lines.append(line)
            line = part
        else:
            line = f"{line} · {part}" if line else part
    fig.suptitle("\n".join(lines + [line]), fontsize=FONT_PT, color="dimgrey")


def published_point(df: pd.DataFrame):
    """The released checkpoint (``bench.released``) the group's baseline weights are, or None."""
    from bench.released import by_key

    if "released" not in df.columns:
        return None
    keys = df["released"].dropna().unique()
    return by_key(keys[0]) if len(keys) == 1 else None


def tokens_figure(records: list[dict], width: str = "text", caption: Optional[str] = None):
    """Fraction of the image's tokens each block computed, one panel per series that
    leaves some tokens out somewhere, one line per operating point (averaged over the
    images), shaded light to dark in the method's colour; more than ``MAX_LEGEND_LEVELS``
    points get a colour bar instead of a legend. How a ragged batch is run (``batching``)
    does not change which tokens are computed, so only the default is drawn. None when no
    series qualifies."""
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
    bars = any(len(by_series[name]) > MAX_LEGEND_LEVELS for name in panels)  # then every panel has one
    for ax, name in zip(axes.flat, panels):
        points = sorted(by_series[name], key=lambda p: p["order"])
        cmap = method_cmap(split_series(name)[0])  # the method's colour, light to dark: the knob's value
        shade = [0.15 + 0.85 * i / max(1, len(points) - 1) for i in range(len(points))]
        for i, p in enumerate(points):
            blocks = range(1, len(p["tokens"]) + 1)
            ax.plot(blocks, [_nan(t) for t in p["tokens"]], marker="o", markersize=2.5,
                    color=cmap(shade[i]), label=str(p["value"]))
        ax.set_title(series_label(name), color=method_color(split_series(name)[0]))
        ax.set_xlabel("encoder block")
        ax.set_xticks(list(range(1, max(len(p["tokens"]) for p in points) + 1)))
        ax.set_ylim(0, 1.05)
        knob = swept[name.split(" ")[0]]
        if bars:  # a colour bar: first, middle and last value named
            _level_bar(fig, ax, cmap, [p["value"] for p in points], shade, knob)
        else:
            ax.legend(title=knob or None, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False,
                      handlelength=1.2, columnspacing=0.8, borderpad=0.2, labelspacing=0.2)
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of tokens computed")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    _caption(fig, caption if caption is not None else context_line(records, records[0]["dataset"]), width)
    return fig


def method_cmap(method: str):
    """A sequential colour map from a pale tint of the method's colour to a dark shade."""
    from matplotlib.colors import LinearSegmentedColormap, to_rgb

    rgb = to_rgb(method_color(method))
    pale = tuple(0.85 + 0.15 * c for c in rgb)
    dark = tuple(0.35 * c for c in rgb)
    return LinearSegmentedColormap.from_list(f"bench-{method}", [pale, rgb, dark])


def _level_bar(fig, ax, cmap, values: list, shade: list, knob: str) -> None:
    """A horizontal colour bar under ``ax`` for the operating points' values (in order)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap

    colors = ListedColormap([cmap(s) for s in shade])
    bar = fig.colorbar(ScalarMappable(norm=BoundaryNorm(range(len(values) + 1), len(values)), cmap=colors), ax=ax,
                       orientation="horizontal", location="bottom", fraction=0.08, pad=0.02, aspect=25)
    ticks = sorted({0, len(values) // 2, len(values) - 1})
    bar.set_ticks([t + 0.5 for t in ticks], labels=[str(values[t]) for t in ticks])
    bar.ax.tick_params(length=0)
    bar.set_label(knob or "operating point")

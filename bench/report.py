"""Tables and figures from stored records: ``bench report``.

Reads every record under the results folder and writes, per dataset:

- ``<dataset>.md``, ``.tex`` (booktabs) and ``.csv``: every method and operating point.
  Records are grouped by the baseline checkpoint they were measured against (a depth
  study or two checkpoints in one file give several groups, each with its own table
  section and Pareto front). The CSV adds one column per knob, the timing spread and
  provenance; ``<dataset>-per-class.csv`` holds the per-class IoU.
- figures, each as PNG, SVG and PDF at a paper's column or text width: mIoU against
  GFLOPs and against the same-run speedup at every stored batch size, the fraction of
  tokens each block computed, and the training curves of the checkpoints behind the
  rows when their logs are found.
- a copy of the compute maps ``bench run`` drew, and ``README.md`` indexing it all.

A record the report cannot use is named (file and line) and skipped. The same records
always give the same bytes, and every file is replaced atomically.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Optional

import pandas as pd

from bench.errors import BenchError
from bench.fileio import atomic_write
from bench.results import ResultsStore, op_label, record_precision

WIDTHS = {"column": 3.3, "text": 7.0}  # inches: one column / the text width of a two-column paper
FONT_PT = 7  # no text in a figure is smaller, at its printed size
POINTS = {"baseline": "baseline", "baseline-ft": "baseline-ft (control)"}  # single points, own markers
LINE_REFERENCES = ("static", "shallow")  # fixed-cost references: drawn dashed
BASE_COLUMNS = ["method", "op", "mIoU", "ΔmIoU", "ΔmIoU ctrl", "GFLOPs", "ΔGFLOPs %"]
EXECUTION = "precision/compile"  # shown only where some row is not plain fp32
PROVENANCE = ["group", "baseline_checkpoint", "checkpoint", "model", "decoder", "split", "device_name", "precision",
              "threads", "images", "git_commit"]


# ---- which records the report can use ----------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v) -> str:
    if v is None:
        return "null"
    if _is_number(v):
        return "a number"
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _number_problem(container: dict, key: str, where: str, required: bool = False) -> Optional[str]:
    """Numbers may be null: that is how a record stores NaN."""
    if key not in container:
        return f"lacks field '{where}'" if required else None
    v = container[key]
    return None if v is None or _is_number(v) else f"field '{where}' is {_kind(v)}, expected a number"


def _pair_problem(v, where: str) -> Optional[str]:
    if v is None or (isinstance(v, list) and len(v) == 2 and all(x is None or _is_number(x) for x in v)):
        return None
    return f"field '{where}' is {_kind(v)}, expected [p25, p75]"


def record_problem(r: dict) -> Optional[str]:
    """Why the report cannot use this stored record; None when it can."""
    if not isinstance(r["method"], str):
        return f"field 'method' is {_kind(r['method'])}, expected a string"
    if not isinstance(r["knobs"], dict):
        return f"field 'knobs' is {_kind(r['knobs'])}, expected an object"
    if "study" in r:  # scripts/depth_study.py: accuracy only (study_report)
        settings = r["study"]
        if not isinstance(settings, dict) or not all(_is_number(settings.get(k)) for k in ("depth", "steps")):
            return "field 'study' lacks a numeric 'depth' or 'steps'"
        return _number_problem(r, "miou", "miou", required=True)
    if r["dataset"] == "speed":  # `bench speed`: no accuracy (speed_report)
        return _number_problem(r, "gflops_ratio", "gflops_ratio", required=True) or (
            None if isinstance(r.get("speed"), dict) else "lacks field 'speed'")
    problem = _number_problem(r, "miou", "miou", required=True)
    for key in ("miou_delta", "baseline_miou", "gflops_ratio", "baseline_gflops", "control_miou",
                "miou_delta_control"):
        problem = problem or _number_problem(r, key, key)
    if problem:
        return problem
    if "gflops" not in r:
        return "lacks field 'gflops'"
    if not isinstance(r["gflops"], dict):
        return f"field 'gflops' is {_kind(r['gflops'])}, expected an object"
    if problem := _number_problem(r["gflops"], "mean", "gflops.mean", required=True):
        return problem
    if "speed" not in r:
        return "lacks field 'speed'"
    if not isinstance(r["speed"], dict):
        return f"field 'speed' is {_kind(r['speed'])}, expected an object"
    for bs, entry in r["speed"].items():
        if not (bs.isdigit() and int(bs) > 0):
            return f"speed key {bs!r} is not a batch size"
        if not isinstance(entry, dict):
            return f"field 'speed.{bs}' is {_kind(entry)}, expected an object"
        for key in ("throughput", "speedup"):
            problem = problem or _number_problem(entry, key, f"speed.{bs}.{key}")
        problem = problem or _pair_problem(entry.get("speedup_iqr"), f"speed.{bs}.speedup_iqr")
        latency = entry.get("latency_ms", {})
        if not isinstance(latency, dict):
            return f"field 'speed.{bs}.latency_ms' is {_kind(latency)}, expected an object"
        for key in ("p50", "p90"):
            problem = problem or _number_problem(latency, key, f"speed.{bs}.latency_ms.{key}")
        if problem:
            return problem
    tokens = r.get("tokens_per_block")
    if tokens is not None and not (isinstance(tokens, list) and all(t is None or _is_number(t) for t in tokens)):
        return f"field 'tokens_per_block' is {_kind(tokens)}, expected a list of numbers"
    per_class = r.get("per_class_iou")
    if per_class is not None and not (isinstance(per_class, dict)
                                      and all(v is None or _is_number(v) for v in per_class.values())):
        return f"field 'per_class_iou' is {_kind(per_class)}, expected an object of numbers"
    if not isinstance(r.get("train", {}), dict):
        return f"field 'train' is {_kind(r['train'])}, expected an object"
    return None


# ---- the table ------------------------------------------------------------------------

def pareto_front(cost: pd.Series, quality: pd.Series) -> pd.Series:
    """True where no other point has lower-or-equal cost and higher-or-equal quality
    with at least one strictly better (ties both stay on the front). A point with a
    missing cost or quality is not on it."""
    on = []
    for i in cost.index:
        if pd.isna(cost[i]) or pd.isna(quality[i]):
            on.append(False)
            continue
        dominated = ((cost <= cost[i]) & (quality >= quality[i]) & ((cost < cost[i]) | (quality > quality[i]))).any()
        on.append(not dominated)
    return pd.Series(on, index=cost.index, dtype=bool)


def swept_knobs(records: list[dict]) -> dict[str, str]:
    """Per method, the knob its sweep varies: the registry's, else (a method this code
    does not know) the one knob whose value differs between the method's records."""
    from methods import all_methods

    known = all_methods()  # plugins' methods too
    knobs_of: dict[str, list[dict]] = {}
    for r in records:
        knobs_of.setdefault(r["method"], []).append(r["knobs"])
    swept = {}
    for method, all_knobs in knobs_of.items():
        if method in known and known[method].swept:
            swept[method] = known[method].swept
            continue
        names = sorted({k for knobs in all_knobs for k in knobs})
        varying = [k for k in names if len({json.dumps(knobs.get(k), sort_keys=True) for knobs in all_knobs}) > 1]
        swept[method] = varying[0] if len(varying) == 1 else ""
    return swept


def series(method: str, knobs: dict, swept: Optional[str] = None) -> str:
    """The line a point belongs to in the figures: the method, plus every knob that its
    sweep does not vary (``early-exit mode=image``, ``paumer batching=packed``).
    ``swept`` defaults to the registry's."""
    if swept is None:
        from methods import all_methods

        known = all_methods()
        swept = known[method].swept if method in known else ""
    fixed = {k: v for k, v in knobs.items() if k != swept}
    return f"{method} {op_label(fixed)}" if fixed else method


def _order_key(value) -> tuple:
    """Sort key of a knob value: numbers by value, then anything else by its text."""
    if _is_number(value):
        return (0, float(value), "")
    return (1, 0.0, "" if value is None else json.dumps(value, sort_keys=True))


def group_key(r: dict) -> str:
    return str(r.get("baseline_checkpoint") or "?")


def group_labels(records: list[dict]) -> dict[str, str]:
    """A readable name per baseline group: model, decoder and depth where the records
    say them, and the baseline checkpoint where that is what tells two groups apart."""
    first: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: r["method"] != "baseline"):  # the baseline's own record first
        first.setdefault(group_key(r), r)
    labels = {}
    for key, r in first.items():
        parts = [str(r["model"]) if r.get("model") else "",
                 f"{r['decoder']} decoder" if r.get("decoder") else "",
                 f"depth {r['depth']}" if r.get("depth") is not None else ""]
        labels[key] = ", ".join(p for p in parts if p)
    counts = Counter(labels.values())
    for key, label in labels.items():
        if not label or counts[label] > 1:
            labels[key] = f"{label}, baseline {key}" if label else f"baseline {key}"
    return labels


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def batch_sizes(records: list[dict]) -> list[int]:
    """Every batch size any record was timed at, ascending."""
    return sorted({int(bs) for r in records for bs in r["speed"]})


def table(records: list[dict]) -> pd.DataFrame:
    """One row per record: the shown columns (``display_columns``), the timing spread,
    one column per knob (``knob:<name>``), provenance, and for the figures ``series``
    and ``order`` (rank of the swept knob's value)."""
    sizes = batch_sizes(records)
    swept = swept_knobs(records)
    labels = group_labels(records)
    order_keys = sorted({_order_key(r["knobs"].get(swept[r["method"]])) for r in records})
    rows = []
    for r in records:
        ratio = r.get("gflops_ratio")
        if ratio is None and r["gflops"]["mean"] is not None and r.get("baseline_gflops"):
            ratio = r["gflops"]["mean"] / r["baseline_gflops"]
        row = {"method": r["method"], "op": op_label(r["knobs"]),
               "mIoU": 100 * _nan(r["miou"]), "ΔmIoU": 100 * _nan(r.get("miou_delta")),
               "ΔmIoU ctrl": 100 * _nan(r.get("miou_delta_control")),
               "control mIoU": 100 * _nan(r.get("control_miou")),
               "GFLOPs": _nan(r["gflops"]["mean"]), "ΔGFLOPs %": 100 * (_nan(ratio) - 1)}
        for bs in sizes:
            entry = r["speed"].get(str(bs), {})
            iqr = entry.get("speedup_iqr") or [None, None]
            row.update({f"img/s b{bs}": _nan(entry.get("throughput")), f"speedup b{bs}": _nan(entry.get("speedup")),
                        f"speedup b{bs} p25": _nan(iqr[0]), f"speedup b{bs} p75": _nan(iqr[1])})
        latency = r["speed"].get("1", {}).get("latency_ms", {})
        row.update({"p50 ms": _nan(latency.get("p50")), "p90 ms": _nan(latency.get("p90"))})
        row.update({f"knob:{k}": (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in r["knobs"].items()})
        row.update({"group": labels[group_key(r)], "baseline_checkpoint": r.get("baseline_checkpoint"),
                    "checkpoint": r.get("checkpoint"), "model": r.get("model"), "decoder": r.get("decoder"),
                    "split": r.get("split"), "device_name": r.get("device_name"),
                    # named as --precision names it (older records: "float32", or their `dtype`)
                    "precision": record_precision(r), "compile": bool(r.get("compile")),
                    "threads": r.get("threads"), "images": r.get("images"), "git_commit": r.get("git_commit"),
                    "released": (r.get("baseline_source") or {}).get("released"),  # bench.released
                    "series": series(r["method"], r["knobs"], swept[r["method"]]),
                    "order": order_keys.index(_order_key(r["knobs"].get(swept[r["method"]])))})
        # a record that names no precision predates --precision: it ran in fp32
        row[EXECUTION] = (row["precision"] or "fp32") + (" compiled" if row["compile"] else "")
        rows.append(row)
    df = pd.DataFrame(rows)
    df["pareto"] = False
    for _, index in df.groupby("group").groups.items():
        df.loc[index, "pareto"] = pareto_front(df.loc[index, "GFLOPs"], df.loc[index, "mIoU"])
    df["pareto"] = df["pareto"].astype(bool)
    return df.sort_values(["group", "method", "GFLOPs"], ascending=[True, True, False],
                          kind="stable").reset_index(drop=True)


def display_columns(df: pd.DataFrame) -> list[str]:
    """The columns of the Markdown and LaTeX tables: the control's delta only where a
    record has one, throughput and speedup at every stored batch size."""
    columns = [c for c in BASE_COLUMNS if c != "ΔmIoU ctrl" or df[c].notna().any()]
    if (df[EXECUTION] != "fp32").any():  # a bf16 or compiled row says so; all-fp32 tables stay as they were
        columns.insert(columns.index("op") + 1, EXECUTION)
    for c in df.columns:
        if re.fullmatch(r"(img/s|speedup) b\d+", c):
            columns.append(c)
    columns += [c for c in ("p50 ms", "p90 ms") if df[c].notna().any()]
    return columns + ["pareto"]


FORMATS = {"mIoU": "{:.2f}", "ΔmIoU": "{:+.2f}", "ΔmIoU ctrl": "{:+.2f}", "GFLOPs": "{:.3f}", "ΔGFLOPs %": "{:+.1f}",
           "p50 ms": "{:.1f}", "p90 ms": "{:.1f}"}


def _cell(column: str, value) -> str:
    if column == "pareto":
        return "★" if value else ""
    if pd.isna(value):
        return ""
    if column.startswith("img/s"):
        return f"{value:.1f}"
    if column.startswith("speedup"):
        return f"{value:.2f}x"
    return FORMATS[column].format(value) if column in FORMATS else str(value)


def _groups(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(name, df[df["group"] == name]) for name in sorted(df["group"].unique())]


def markdown(df: pd.DataFrame) -> str:
    """One table; with several baseline groups, one headed section per group."""
    columns = display_columns(df)
    groups = _groups(df)
    out = []
    for name, sub in groups:
        if len(groups) > 1:
            out += [f"### {name}", ""]
        out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(_cell(c, row[c]) for c in columns) + " |" for _, row in sub.iterrows()]
        if len(groups) > 1:
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


LATEX_HEADERS = {"mIoU": "mIoU", "ΔmIoU": r"$\Delta$mIoU", "ΔmIoU ctrl": r"$\Delta$ctrl", "GFLOPs": "GFLOPs",
                 "ΔGFLOPs %": r"$\Delta$GFLOPs (\%)", "p50 ms": "p50 ms", "p90 ms": "p90 ms", "pareto": "Pareto"}


def _latex_escape(text: str) -> str:
    return re.sub(r"([\\&%$#_{}~^])", lambda m: {"\\": r"\textbackslash{}", "~": r"\textasciitilde{}",
                                                   "^": r"\textasciicircum{}"}.get(m[1], "\\" + m[1]), text)


def _latex_cell(column: str, value) -> str:
    if column == "pareto":
        return r"$\star$" if value else ""
    text = _cell(column, value)
    if column.startswith("speedup") and text:
        return text[:-1] + r"$\times$"
    text = _latex_escape(text)
    return "$-$" + text[1:] if text.startswith("-") and text != "-" else text


def latex(df: pd.DataFrame) -> str:
    """The Markdown table as a LaTeX ``tabular`` (needs ``\\usepackage{booktabs}``);
    several baseline groups get a heading row each."""
    columns = display_columns(df)
    headers = [LATEX_HEADERS.get(c) or _latex_escape(c) for c in columns]
    spec = "ll" + "r" * (len(columns) - 3) + "c"
    lines = ["% generated by `bench report`; needs \\usepackage{booktabs}", f"\\begin{{tabular}}{{{spec}}}",
             r"\toprule", " & ".join(headers) + r" \\", r"\midrule"]
    groups = _groups(df)
    for i, (name, sub) in enumerate(groups):
        if len(groups) > 1:
            heading = f"\\multicolumn{{{len(columns)}}}{{l}}{{\\emph{{{_latex_escape(name)}}}}} \\\\"
            lines += ([r"\midrule"] if i else []) + [heading]
        lines += [" & ".join(_latex_cell(c, row[c]) for c in columns) + r" \\" for _, row in sub.iterrows()]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The CSV: method, op, one column per knob, every number (timing spread
    included), then provenance."""
    knobs = sorted(c for c in df.columns if c.startswith("knob:"))
    speed = [c for c in df.columns if re.fullmatch(r"(img/s|speedup) b\d+( p25| p75)?", c)]
    numbers = ["mIoU", "ΔmIoU", "ΔmIoU ctrl", "control mIoU", "GFLOPs", "ΔGFLOPs %"] + speed + ["p50 ms", "p90 ms"]
    compiled = ["compile"] if df["compile"].any() else []  # uncompiled CSVs keep their columns
    out = df[["method", "op"] + knobs + numbers + ["pareto"] + PROVENANCE + compiled].copy()
    return out.rename(columns={k: k[len("knob:"):] if k[len("knob:"):] not in out.columns else k for k in knobs})


def per_class_frame(records: list[dict], labels: dict[str, str]) -> Optional[pd.DataFrame]:
    """Per-class IoU (%) of every record, one column per class; null (NaN) stays empty."""
    rows = [{"group": labels[group_key(r)], "method": r["method"], "op": op_label(r["knobs"]),
             **{c: 100 * _nan(v) for c, v in r["per_class_iou"].items()}}
            for r in records if r.get("per_class_iou")]
    if not rows:
        return None
    return pd.DataFrame(rows).sort_values(["group", "method", "op"], kind="stable")


# ---- figures --------------------------------------------------------------------------

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
    import seaborn as sns

    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper"),
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
    import seaborn as sns

    colorblind = sns.color_palette("colorblind", 10)
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


# ---- training curves ---------------------------------------------------------------------

def training_logs(records: list[dict], checkpoints: Path, labels: dict[str, str]) -> list[tuple[str, Path]]:
    """(label, path) of the training log of every checkpoint behind the rows that has
    one: ``<checkpoints>/<dataset>/<method>-<model>-<config_hash>.log.jsonl``, where
    the method is the row's for a fine-tuned row and ``baseline`` otherwise."""
    found: dict[Path, str] = {}
    several = len(set(labels.values())) > 1
    for r in records:
        config_hash, model = r.get("train", {}).get("config_hash"), r.get("model")
        if not config_hash or not model:
            continue
        own = r.get("checkpoint") != r.get("baseline_checkpoint")  # fine-tuned: its own checkpoint
        trained = [r["method"]] if own else ["baseline"] if "baseline_checkpoint" in r else [r["method"], "baseline"]
        for method in trained:
            path = checkpoints / r["dataset"] / f"{method}-{model}-{config_hash}.log.jsonl"
            # the same configuration trained elsewhere (another machine's rounding) has other
            # weights: draw a log only next to the checkpoint whose weights the row names
            weights = r.get("baseline_checkpoint", r.get("checkpoint")) if method == "baseline" else r.get("checkpoint")
            if path.is_file() and path not in found and _checkpoint_weights(path) == weights:
                name = f"{method} {op_label(_training_knobs(method, r['knobs']))}".rstrip(" -")  # shallow depth=2
                found[path] = f"{name} ({_short(labels[group_key(r)])})" if several else name
    return sorted(((label, path) for path, label in found.items()), key=lambda item: (item[0], str(item[1])))


def _checkpoint_weights(log: Path) -> Optional[str]:
    """The weights hash stored in the checkpoint next to a training log (None: none there)."""
    import torch

    path = log.with_name(log.name[: -len(".log.jsonl")] + ".pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("weights")
    except Exception:  # noqa: BLE001 (missing or unreadable: the log cannot be matched to the row)
        return None


def _training_knobs(method: str, knobs: dict) -> dict:
    """The knobs of an operating point that pick its checkpoint (shallow's depth)."""
    from methods import all_methods

    ft = getattr(all_methods().get(method), "fine_tune", None)
    return {k: knobs[k] for k in (ft.op_knobs if ft else ()) if k in knobs}


def read_training_log(path: Path) -> pd.DataFrame:
    """Steps and losses of a training log; a resumed run re-logs steps, the last entry
    of a step wins. Lines that are not a step entry are left out."""
    entries = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and _is_number(e.get("step")) and _is_number(e.get("loss")):
            entries[e["step"]] = e["loss"]
    return pd.DataFrame(sorted(entries.items()), columns=["step", "loss"])


def training_figure(logs: list[tuple[str, Path]], width: str = "text"):
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    w = WIDTHS[width]
    rows = math.ceil(len(logs) / (1 if width == "column" else 2))
    fig, ax = plt.subplots(figsize=(w, (0.3 * w if width == "text" else 0.65 * w) + 0.5 + 0.14 * rows),
                           layout="constrained")
    for i, (label, path) in enumerate(logs):
        curve = read_training_log(path)
        if len(curve):
            ax.plot(curve["step"], curve["loss"], label=label, linewidth=0.8, color=f"C{i % 10}")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, not 5x10^-1
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training step (of that checkpoint)")
    ax.set_ylabel("training loss")
    fig.legend(loc="outside lower center", ncol=1 if width == "column" else 2, frameon=False)
    return fig


# ---- the report ------------------------------------------------------------------------

def _short(group: str) -> str:
    """"tiny, linear decoder, depth 2" -> "tiny, linear, d2"."""
    return group.replace(" decoder", "").replace("baseline ", "").replace("depth ", "d")


def _slug(group: str) -> str:
    """A group's label as part of a file name: "tiny-linear-d2"."""
    return re.sub(r"[^a-z0-9]+", "-", _short(group).lower()).strip("-") or "group"


def _write_text(path: Path, text: str) -> Path:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


def _write_csv(path: Path, df: pd.DataFrame) -> Path:
    buffer = io.StringIO()
    df.to_csv(buffer, index=False, float_format="%.6g", lineterminator="\n")
    return _write_text(path, buffer.getvalue())


def speed_table(records: list[dict]) -> pd.DataFrame:
    """One row per `bench speed` record and batch size: FLOPs ratio, speedup and the
    share of the FLOP saving that became time (speedup / (1 / FLOPs ratio))."""
    rows = []
    for r in records:
        ev = r.get("eval", {})
        for bs, s in sorted(r["speed"].items(), key=lambda kv: int(kv[0])):
            rows.append({"model": ev.get("model"), "decoder": ev.get("decoder"), "size": ev.get("size"),
                         "device": r.get("device_name", r.get("device")), "precision": record_precision(r),
                         "compile": bool(r.get("compile")), "method": r["method"], "knobs": op_label(r["knobs"]),
                         "batch": int(bs), "gflops": r["gflops"]["mean"], "gflops_ratio": r["gflops_ratio"],
                         "throughput": s["throughput"], "speedup": s["speedup"],
                         "realised": s["speedup"] * r["gflops_ratio"]})
    return pd.DataFrame(rows)


def speed_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per setting and operating point: FLOPs ratio, then speedup and realised
    share at each batch size side by side."""
    keys = ["model", "decoder", "size", "device", "precision", "compile", "method", "knobs"]
    rows = []
    for key, sub in df.groupby(keys, sort=False):
        row = dict(zip(keys, key), gflops_ratio=sub["gflops_ratio"].iloc[0])
        for _, r in sub.iterrows():
            row[f"speedup b{r['batch']}"] = r["speedup"]
            row[f"realised b{r['batch']}"] = r["realised"]
        rows.append(row)
    return pd.DataFrame(rows)


def _md_table(df: pd.DataFrame, number: str) -> list[str]:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(("" if math.isnan(v) else number.format(v)) if isinstance(v, float) else str(v)
                                       for v in row) + " |")
    return lines


def speed_report(records: list[dict], out_dir: Path, width: str = "text") -> list[Path]:
    """`bench speed` records: a table (Markdown, CSV) and the measured speedup against
    the FLOPs speedup (1 / FLOPs ratio), with y = x: where every saved FLOP becomes time."""
    df = speed_table(records)
    md = ["# bench speed", "", "realised = speedup x FLOPs ratio: 1.0 when the FLOP saving fully becomes time.", ""]
    md += _md_table(speed_summary(df), "{:.2f}") + ["", "Every record and batch size:", ""] + _md_table(df, "{:.3f}")
    files = [_write_text(out_dir / "speed.md", "\n".join(md) + "\n"), _write_csv(out_dir / "speed.csv", df)]
    with figure_style() as plt:
        fig, ax = plt.subplots(figsize=(WIDTHS[width], 0.7 * WIDTHS[width]))
        top = max(1.0, float((1 / df["gflops_ratio"]).max()), float(df["speedup"].max())) * 1.05
        ax.plot([0, top], [0, top], "k--", lw=0.8, label="y = x (every saved FLOP becomes time)")
        for (method, bs), sub in df.groupby(["method", "batch"]):
            ax.scatter(1 / sub["gflops_ratio"], sub["speedup"], label=f"{method} b{bs}", s=14)
        ax.set_xlabel("FLOPs speedup (baseline GFLOPs / method's)")
        ax.set_ylabel("speedup over the baseline")
        ax.legend(fontsize="small")
        files += save_figure(fig, out_dir / "speed-speedup")
        plt.close(fig)
    return files


def _study_setting(r: dict) -> str:
    """A study record's training settings other than depth and budget: "lr 0.001, window 0"."""
    return ", ".join(f"{k} {v}" for k, v in sorted(r["study"].items()) if k not in ("depth", "steps"))


def study_table(records: list[dict]) -> pd.DataFrame:
    """Depth-study records (scripts/depth_study.py): one row per training setting and
    budget, the mIoU and GFLOPs of every depth, and the deepest minus the shallowest."""
    rows = {}
    for r in records:
        study = r["study"]
        other = _study_setting(r)
        row = rows.setdefault((r.get("model"), other, int(study["steps"])),
                              {"model": r.get("model"), "setting": other, "steps": int(study["steps"])})
        row[f"mIoU d{study['depth']}"] = 100 * r["miou"]
        row[f"GFLOPs d{study['depth']}"] = r.get("gflops", {}).get("mean")
    df = pd.DataFrame([rows[k] for k in sorted(rows, key=lambda k: (str(k[0]), k[1], k[2]))])
    depths = sorted({int(r["study"]["depth"]) for r in records})
    if len(depths) > 1:
        df[f"gap d{depths[-1]}-d{depths[0]}"] = df[f"mIoU d{depths[-1]}"] - df[f"mIoU d{depths[0]}"]
    return df


def study_report(records: list[dict], dataset: str, out_dir: Path, width: str = "text") -> list[Path]:
    """The depth study: a table (Markdown, CSV) and mIoU against the training budget,
    one line per depth (and per other training setting)."""
    df = study_table(records)
    md = [f"# {dataset}: depth against training budget", "",
          "`scripts/depth_study.py`: the model trained from scratch at each depth and budget, "
          "evaluated with the dataset's protocol. gap = the deepest model's mIoU minus the shallowest's.", ""]
    md += _md_table(df, "{:.2f}")
    stem = f"{dataset}-depth-study"
    files = [_write_text(out_dir / f"{stem}.md", "\n".join(md) + "\n"), _write_csv(out_dir / f"{stem}.csv", df)]
    with figure_style() as plt:
        w = WIDTHS[width]
        fig, ax = plt.subplots(figsize=(w, 0.35 * w if width == "text" else 0.7 * w), layout="constrained")
        def line_of(r):
            return r.get("model"), int(r["study"]["depth"]), _study_setting(r)

        lines = sorted({line_of(r) for r in records})
        for i, (model, depth, other) in enumerate(lines):
            mine = sorted((int(r["study"]["steps"]), 100 * r["miou"]) for r in records
                          if line_of(r) == (model, depth, other))
            label = f"{model}, {depth} blocks" + (f" ({other})" if len({ln[2] for ln in lines}) > 1 else "")
            ax.plot([s for s, _ in mine], [m for _, m in mine], marker=MARKERS[i % len(MARKERS)],
                    color=f"C{i % 10}", label=label)
        ax.set_xscale("log")
        steps = sorted({int(r["study"]["steps"]) for r in records})
        ax.set_xticks(steps, [f"{s:,}" for s in steps])
        ax.minorticks_off()
        ax.set_xlabel("training steps (from scratch)")
        ax.set_ylabel("mIoU (%)")
        ax.legend(frameon=False)
        files += save_figure(fig, out_dir / stem)
        plt.close(fig)
    return files


def usable_records(results: str) -> tuple[list[dict], int]:
    """The records the report can use, and how many it skipped (each named on stdout
    with its file and line)."""
    located, problems = ResultsStore(results).load_located()
    for p in problems:
        print(f"warning: skipped {p}")
    records = []
    for where, r in located:
        why = record_problem(r)
        if why:
            print(f"warning: skipped {where}: {why}")
            problems.append(where)
        else:
            records.append(r)
    return records, len(problems)


def report(results: str = "results", out: str = "reports", width: str = "text",
           checkpoints: str = "checkpoints") -> list[Path]:
    from bench.datasets import DATASETS

    if width not in WIDTHS:
        raise BenchError(f"unknown figure width {width!r}; expected one of: {', '.join(WIDTHS)}")
    records, skipped = usable_records(results)
    if not records:
        more = f" ({skipped} skipped)" if skipped else ""
        raise BenchError(f"no result records under {results}/{more}; run `bench run` first")
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot write reports to folder {out_dir}: {e.strerror or e}") from None
    written, index = [], ["# Reports", "",
                          f"Generated by `bench report` from the records in `{results}/`; "
                          "GFLOPs are fvcore's (one multiply-add = one flop), speedups are ratios "
                          "to the baseline timed in the same run. Every figure is also there as SVG and PDF "
                          f"({width} width, {WIDTHS[width]} in).", ""]
    if skipped:
        index += [f"{skipped} stored line(s) could not be used and were skipped (`bench report` names them).", ""]
    found = sorted({r["dataset"] for r in records})
    for dataset in found:
        mine = [r for r in records if r["dataset"] == dataset]
        if dataset == "speed":
            files = speed_report(mine, out_dir, width)
            written += files
            index += ["## speed (`bench speed`)", ""] + [f"- [{f.name}]({f.name})" for f in files
                                                        if f.suffix not in (".svg", ".pdf")] + [""]
            continue
        study = [r for r in mine if "study" in r]
        if study:
            files = study_report(study, dataset, out_dir, width)
            written += files
            index += [f"## {dataset}: depth study", "", f"{len(study)} records, git commit(s) "
                      f"{', '.join(sorted({str(r.get('git_commit'))[:7] for r in study}))}.", ""]
            index += [f"- [{f.name}]({f.name})" for f in files if f.suffix not in (".svg", ".pdf")] + [""]
            mine = [r for r in mine if "study" not in r]
            if not mine:
                continue
        df = table(mine)
        labels = group_labels(mine)
        files = [_write_text(out_dir / f"{dataset}.md", markdown(df)),
                 _write_text(out_dir / f"{dataset}.tex", latex(df)),
                 _write_csv(out_dir / f"{dataset}.csv", csv_frame(df))]
        per_class = per_class_frame(mine, labels)
        if per_class is not None:
            files.append(_write_csv(out_dir / f"{dataset}-per-class.csv", per_class))
        groups = _groups(df)
        with figure_style() as plt:
            styles = series_styles(df["series"])
            for name, sub in groups:
                stem = f"{dataset}-{_slug(name)}" if len(groups) > 1 else dataset
                fig = tradeoff_figure(sub, dataset, width, styles)
                files += save_figure(fig, out_dir / f"{stem}-tradeoff")
                plt.close(fig)
                fig = tokens_figure([r for r in mine if labels[group_key(r)] == name], width)
                if fig is not None:
                    files += save_figure(fig, out_dir / f"{stem}-tokens-per-block")
                    plt.close(fig)
            logs = training_logs(mine, Path(checkpoints), labels)
            if logs:
                fig = training_figure(logs, width)
                files += save_figure(fig, out_dir / f"{dataset}-training")
                plt.close(fig)
            else:
                print(f"info: no training logs under {Path(checkpoints) / dataset}/ for {dataset}'s rows: "
                      "no training curves")
        for maps in sorted((Path(results) / "figures").glob(f"{dataset}-*-compute-maps.*")):
            data = maps.read_bytes()  # drawn by `bench run` from the same checkpoints
            atomic_write(out_dir / maps.name, lambda f, data=data: f.write(data))
            files.append(out_dir / maps.name)
        written += files
        commits = sorted({str(r.get("git_commit"))[:7] for r in mine})
        index += [f"## {dataset}", "",
                  f"{len(mine)} records, {df['method'].nunique()} methods, git commit(s) {', '.join(commits)}.", ""]
        if len(groups) > 1:
            index += [f"{len(groups)} baseline groups (own Pareto fronts, figures named after the group): "
                      + "; ".join(name for name, _ in groups) + ".", ""]
        index += [f"- [{f.name}]({f.name})" for f in files if f.suffix not in (".svg", ".pdf")]
        index.append("")
    missing = [name for name in DATASETS if name not in found]
    if missing:
        note = f"No records for {', '.join(missing)}: skipped."
        print(note)
        index += [note, ""]
    written.append(_write_text(out_dir / "README.md", "\n".join(index)))
    return written

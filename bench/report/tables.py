"""The comparison table of one dataset's records and its Markdown, LaTeX (booktabs) and CSV forms."""
from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Optional

import pandas as pd

from bench.fileio import atomic_write
from bench.report.records import _is_number
from bench.results import op_label, record_precision

BASE_COLUMNS = ["method", "op", "mIoU", "ΔmIoU", "ΔmIoU ctrl", "GFLOPs", "ΔGFLOPs %"]
CI_COLUMNS = {"mIoU": "miou_ci", "ΔmIoU": "miou_delta_ci", "ΔmIoU ctrl": "miou_delta_control_ci"}
EXECUTION = "precision/compile"  # shown only where some row is not plain fp32
PROVENANCE = ["group", "baseline_checkpoint", "checkpoint", "model", "decoder", "split", "device_name", "precision",
              "threads", "images", "git_commit"]


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
    seeds = {label: Counter(first[k].get("seed") for k, l in labels.items() if l == label) for label in counts}
    for key, label in labels.items():
        if label and counts[label] > 1 and max(seeds[label].values()) == 1:  # the same setting at other seeds
            labels[key] = f"{label}, seed {first[key].get('seed')}"
        elif not label or counts[label] > 1:
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
        for name, key in CI_COLUMNS.items():  # 95% paired bootstrap intervals, where stored or recomputed
            low, high = r.get(key) or (None, None)
            row.update({f"{name} low": 100 * _nan(low), f"{name} high": 100 * _nan(high)})
        row["seed"] = r.get("seed")
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
    for name in CI_COLUMNS:  # "±": half the 95% interval, only where some record has one
        if name in columns and df[f"{name} low"].notna().any():
            columns.insert(columns.index(name) + 1, f"{name} ±")
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
    if isinstance(value, tuple):  # an interval: shown as its half-width
        low, high = value
        return "" if pd.isna(low) or pd.isna(high) else f"±{(high - low) / 2:.2f}"
    if column == "pareto":
        return "★" if value else ""
    if pd.isna(value):
        return ""
    if column.startswith("img/s"):
        return f"{value:.1f}"
    if column.startswith("speedup"):
        return f"{value:.2f}x"
    return FORMATS[column].format(value) if column in FORMATS else str(value)


def _value(row, column: str):
    """A cell's value; an interval column ("mIoU ±") its (low, high)."""
    if column.endswith(" ±"):
        name = column[: -len(" ±")]
        return (row[f"{name} low"], row[f"{name} high"])
    return row[column]


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
        out += ["| " + " | ".join(_cell(c, _value(row, c)) for c in columns) + " |" for _, row in sub.iterrows()]
        if len(groups) > 1:
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


LATEX_HEADERS = {"mIoU ±": r"$\pm$", "ΔmIoU ±": r"$\pm$", "ΔmIoU ctrl ±": r"$\pm$",
                 "mIoU": "mIoU", "ΔmIoU": r"$\Delta$mIoU", "ΔmIoU ctrl": r"$\Delta$ctrl", "GFLOPs": "GFLOPs",
                 "ΔGFLOPs %": r"$\Delta$GFLOPs (\%)", "p50 ms": "p50 ms", "p90 ms": "p90 ms", "pareto": "Pareto"}


def _latex_escape(text: str) -> str:
    return re.sub(r"([\\&%$#_{}~^])", lambda m: {"\\": r"\textbackslash{}", "~": r"\textasciitilde{}",
                                                   "^": r"\textasciicircum{}"}.get(m[1], "\\" + m[1]), text)


def _latex_cell(column: str, value) -> str:
    if column == "pareto":
        return r"$\star$" if value else ""
    text = _cell(column, value)
    if text.startswith("±"):
        return r"$\pm$" + text[1:]
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
        lines += [" & ".join(_latex_cell(c, _value(row, c)) for c in columns) + r" \\" for _, row in sub.iterrows()]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The CSV: method, op, one column per knob, every number (timing spread
    included), then provenance."""
    knobs = sorted(c for c in df.columns if c.startswith("knob:"))
    speed = [c for c in df.columns if re.fullmatch(r"(img/s|speedup) b\d+( p25| p75)?", c)]
    numbers = ["mIoU", "ΔmIoU", "ΔmIoU ctrl", "control mIoU", "GFLOPs", "ΔGFLOPs %"] + speed + ["p50 ms", "p90 ms"]
    for name in CI_COLUMNS:  # interval columns where some record has one: older CSVs keep theirs
        if df[f"{name} low"].notna().any():
            numbers[numbers.index(name) + 1:numbers.index(name) + 1] = [f"{name} low", f"{name} high"]
    compiled = ["compile"] if df["compile"].any() else []  # uncompiled CSVs keep their columns
    seeds = ["seed"] if df["seed"].nunique(dropna=True) > 1 else []  # per-seed rows say their seed
    out = df[["method", "op"] + knobs + numbers + ["pareto"] + PROVENANCE + compiled + seeds].copy()
    return out.rename(columns={k: k[len("knob:"):] if k[len("knob:"):] not in out.columns else k for k in knobs})


def per_class_frame(records: list[dict], labels: dict[str, str]) -> Optional[pd.DataFrame]:
    """Per-class IoU (%) of every record, one column per class; null (NaN) stays empty."""
    rows = [{"group": labels[group_key(r)], "method": r["method"], "op": op_label(r["knobs"]),
             **{c: 100 * _nan(v) for c, v in r["per_class_iou"].items()}}
            for r in records if r.get("per_class_iou")]
    if not rows:
        return None
    return pd.DataFrame(rows).sort_values(["group", "method", "op"], kind="stable")


def _md_table(df: pd.DataFrame, number: str) -> list[str]:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(("" if math.isnan(v) else number.format(v)) if isinstance(v, float) else str(v)
                                       for v in row) + " |")
    return lines


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

"""The ``bench speed`` records' table and figure."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.report.figures import WIDTHS, _caption, figure_style, save_figure
from bench.report.style import method_color, series_marker
from bench.report.tables import _md_table, _write_csv, _write_text
from bench.results import op_label, record_precision


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
                         "realised": s["speedup"] * r["gflops_ratio"],
                         **{k: s[k] for k in BUDGET if k in s}})
    df = pd.DataFrame(rows)
    if "ops_per_forward" in df.columns:  # records measured with the kernel budget (bench.opcount)
        df["ops_ratio"] = df["ops_per_forward"] / _baseline_value(df, "ops_per_forward")
    return df


# per batch size, from one untimed eager forward; older records have none (no column then)
BUDGET = ("ops_per_forward", "host_syncs_per_forward", "peak_memory_mb")
SETTING = ["model", "decoder", "size", "device", "precision", "compile", "batch"]


def _baseline_value(df: pd.DataFrame, column: str) -> pd.Series:
    """Per row, ``column`` of the baseline timed at the same setting and batch size."""
    base = df[df["method"] == "baseline"].drop_duplicates(SETTING).set_index(SETTING)[column]
    return pd.Series([base.get(key, float("nan")) for key in map(tuple, df[SETTING].values)], index=df.index)


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
            if "ops_ratio" in r:
                row[f"ops x b{r['batch']}"] = r["ops_ratio"]
                row[f"syncs b{r['batch']}"] = r["host_syncs_per_forward"]
        rows.append(row)
    return pd.DataFrame(rows)


def speed_report(records: list[dict], out_dir: Path, width: str = "text") -> list[Path]:
    """`bench speed` records: a table (Markdown, CSV) and the measured speedup against
    the FLOPs speedup (1 / FLOPs ratio), with y = x: where every saved FLOP becomes time."""
    df = speed_table(records)
    md = ["# bench speed", "", "realised = speedup x FLOPs ratio: 1.0 when the FLOP saving fully becomes time.", ""]
    if "ops_ratio" in df.columns:
        md += ["ops x = aten ops dispatched in one eager forward over the baseline's at the same setting; "
               "syncs = host reads of device values in that forward (bench.opcount).", ""]
    md += _md_table(speed_summary(df), "{:.2f}") + ["", "Every record and batch size:", ""] + _md_table(df, "{:.3f}")
    files = [_write_text(out_dir / "speed.md", "\n".join(md) + "\n"), _write_csv(out_dir / "speed.csv", df)]
    with figure_style() as plt:
        fig = speed_figure(df, width)
        files += save_figure(fig, out_dir / "speed-speedup")
        plt.close(fig)
    return files


BATCH_FILL = ("full", "none")  # first batch size filled markers, the next hollow


def speed_figure(df: pd.DataFrame, width: str = "text"):
    """Measured speedup against the FLOPs speedup, one panel per setting (model, decoder,
    input size, device, precision, compile): the panel's title names it. Colour: the
    method's (``bench.report.style``); marker: the method's, filled at the smallest batch
    size and hollow at the next ones; y = x where every saved FLOP becomes time."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    keys = ["model", "decoder", "size", "device", "precision", "compile"]
    settings = list(df.groupby(keys, sort=True, dropna=False))
    w = WIDTHS[width]
    cols = 1 if width == "column" else min(len(settings), 3)
    rows = -(-len(settings) // cols)
    side = min(w / cols, 3.0)
    fig, axes = plt.subplots(rows, cols, figsize=(w, rows * side * 0.95 + 0.45), squeeze=False, layout="constrained")
    batches = sorted(df["batch"].unique())
    fills = {bs: "full" if i == 0 else "none" for i, bs in enumerate(batches)}
    for ax, (key, sub) in zip(axes.flat, settings):
        setting = dict(zip(keys, key))
        top = max(1.0, float((1 / sub["gflops_ratio"]).max()), float(sub["speedup"].max())) * 1.05
        ax.plot([0, top], [0, top], "k--", lw=0.8)
        for (method, bs), points in sub.groupby(["method", "batch"], sort=True):
            color = method_color(method)
            ax.plot(1 / points["gflops_ratio"], points["speedup"], linestyle="none", marker=series_marker(method),
                    markersize=4, color=color, markeredgecolor=color,
                    markerfacecolor=color if fills[bs] == "full" else "white", markeredgewidth=0.9)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_aspect("equal")
        compiled = ", compiled" if setting["compile"] else ""
        ax.set_title(f"{setting['model']} ({setting['decoder']}), {setting['size']}x{setting['size']}\n"
                     f"{setting['device']}, {setting['precision']}{compiled}")
        ax.set_xlabel("FLOPs speedup (baseline GFLOPs / method's)")
        ax.set_ylabel("measured speedup")
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    methods = sorted(df["method"].unique())
    handles = [Line2D([], [], linestyle="none", marker=series_marker(m), color=method_color(m), label=m)
               for m in methods]
    handles += [Line2D([], [], linestyle="none", marker="o", color="black",
                       markerfacecolor="black" if fills[bs] == "full" else "white", label=f"batch {bs}")
                for bs in batches]
    handles.append(Line2D([], [], color="black", linestyle="--", lw=0.8, label="y = x: saved FLOPs all become time"))
    fig.legend(handles=handles, loc="outside lower center", ncol=2 if width == "column" else 5, frameon=False)
    _caption(fig, "bench speed · random weights and images, decisions forced by a token schedule", width)
    return fig

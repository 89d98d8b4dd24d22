"""The ``bench speed`` records' table and figure."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.report.figures import WIDTHS, figure_style, save_figure
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

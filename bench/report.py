"""Tables and figures from stored records: ``bench report``.

Reads every record under the results folder with pandas and writes, per dataset, a
Markdown and a CSV table of every method and operating point, and the trade-off
figures (mIoU against GFLOPs and against throughput, PNG + SVG). The same records
always give the same tables.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.errors import BenchError
from bench.results import ResultsStore

COLUMNS = ["method", "op", "mIoU", "ΔmIoU", "GFLOPs", "ΔGFLOPs %", "img/s b1", "speedup b1",
           "img/s b8", "speedup b8", "p50 ms", "p90 ms", "pareto"]


def _op(knobs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "-"


def pareto_front(cost: pd.Series, quality: pd.Series) -> pd.Series:
    """True where no other point has lower-or-equal cost and higher-or-equal quality
    with at least one strictly better (ties both stay on the front)."""
    on = []
    for i in cost.index:
        dominated = ((cost <= cost[i]) & (quality >= quality[i]) & ((cost < cost[i]) | (quality > quality[i]))).any()
        on.append(not dominated)
    return pd.Series(on, index=cost.index)


def table(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        speed = r.get("speed", {})
        b1, b8 = speed.get("1", {}), speed.get("8", {})
        rows.append({
            "method": r["method"], "op": _op(r["knobs"]),
            "mIoU": 100 * r["miou"], "ΔmIoU": 100 * r["miou_delta"],
            "GFLOPs": r["gflops"]["mean"], "ΔGFLOPs %": 100 * (r["gflops_ratio"] - 1),
            "img/s b1": b1.get("throughput"), "speedup b1": b1.get("speedup"),
            "img/s b8": b8.get("throughput"), "speedup b8": b8.get("speedup"),
            "p50 ms": b1.get("latency_ms", {}).get("p50"), "p90 ms": b1.get("latency_ms", {}).get("p90"),
        })
    df = pd.DataFrame(rows, columns=COLUMNS[:-1])
    df["pareto"] = pareto_front(df["GFLOPs"], df["mIoU"])
    return df.sort_values(["method", "GFLOPs"], ascending=[True, False], kind="stable").reset_index(drop=True)


def markdown(df: pd.DataFrame) -> str:
    fmt = {"mIoU": "{:.2f}", "ΔmIoU": "{:+.2f}", "GFLOPs": "{:.3f}", "ΔGFLOPs %": "{:+.1f}",
           "img/s b1": "{:.1f}", "speedup b1": "{:.2f}x", "img/s b8": "{:.1f}", "speedup b8": "{:.2f}x",
           "p50 ms": "{:.1f}", "p90 ms": "{:.1f}"}
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            v = row[c]
            if c == "pareto":
                cells.append("★" if v else "")
            elif c in fmt and pd.notna(v):
                cells.append(fmt[c].format(v))
            else:
                cells.append(str(v) if pd.notna(v) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(df: pd.DataFrame, dataset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    methods = sorted(df["method"].unique())
    for ax, x, label in [(axes[0], "GFLOPs", "GFLOPs per image (fvcore, MAC)"),
                         (axes[1], "speedup b1", "speedup at batch 1 (vs the baseline timed in the same run)")]:
        # absolute CPU throughput differs between runs; the same-run ratio is what compares
        sns.lineplot(data=df.sort_values(x), x=x, y="mIoU", hue="method", style="method", markers=True,
                     dashes=False, ax=ax, sort=False, hue_order=methods, style_order=methods)
        front = df[df["pareto"]] if x == "GFLOPs" else df[pareto_front(-df[x], df["mIoU"])]
        ax.scatter(front[x], front["mIoU"], s=120, facecolors="none", edgecolors="black", label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("mIoU (%)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{dataset}: accuracy against cost", fontsize=10)
    fig.tight_layout()
    for suffix in (".png", ".svg"):
        fig.savefig(path.with_suffix(suffix), dpi=150, metadata={"Date": None} if suffix == ".svg" else None)
    plt.close(fig)


def report(results: str = "results", out: str = "reports") -> list[Path]:
    store = ResultsStore(results)
    records, problems = store.load_with_errors()
    for p in problems:
        print(f"warning: skipped {p}")
    if not records:
        raise BenchError(f"no result records under {results}/; run `bench run` first")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in sorted({r["dataset"] for r in records}):
        df = table([r for r in records if r["dataset"] == dataset])
        md = out_dir / f"{dataset}.md"
        md.write_text(markdown(df))
        df.to_csv(out_dir / f"{dataset}.csv", index=False, float_format="%.6g")
        figure(df, dataset, out_dir / f"{dataset}-tradeoff")
        written += [md, out_dir / f"{dataset}.csv", out_dir / f"{dataset}-tradeoff.png"]
    return written

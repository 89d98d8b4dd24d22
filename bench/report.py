"""Tables and figures from stored records: ``bench report``.

Reads every record under the results folder with pandas and writes, per dataset, a
Markdown and a CSV table of every method and operating point, the trade-off figures
(mIoU against GFLOPs and against throughput, PNG + SVG), the fraction of tokens each
block computed, the compute maps ``bench run`` drew, and ``README.md`` indexing it all.
The same records always give the same tables.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.errors import BenchError
from bench.fileio import atomic_write
from bench.results import ResultsStore, op_label

COLUMNS = ["method", "op", "mIoU", "ΔmIoU", "GFLOPs", "ΔGFLOPs %", "img/s b1", "speedup b1",
           "img/s b8", "speedup b8", "p50 ms", "p90 ms", "pareto"]


def pareto_front(cost: pd.Series, quality: pd.Series) -> pd.Series:
    """True where no other point has lower-or-equal cost and higher-or-equal quality
    with at least one strictly better (ties both stay on the front)."""
    on = []
    for i in cost.index:
        dominated = ((cost <= cost[i]) & (quality >= quality[i]) & ((cost < cost[i]) | (quality > quality[i]))).any()
        on.append(not dominated)
    return pd.Series(on, index=cost.index)


def series(method: str, knobs: dict) -> str:
    """The line a point belongs to in the figures: the method, plus every knob that its
    sweep does not vary (``early-exit mode=image``, ``paumer batching=packed``)."""
    from methods import METHODS

    swept = METHODS[method].swept if method in METHODS else ""
    fixed = {k: v for k, v in knobs.items() if k != swept}
    return f"{method} {op_label(fixed)}" if fixed else method


def table(records: list[dict]) -> pd.DataFrame:
    """One row per record (columns ``COLUMNS``, plus ``series`` for the figures)."""
    rows = []
    for r in records:
        speed = r.get("speed", {})
        b1, b8 = speed.get("1", {}), speed.get("8", {})
        rows.append({
            "method": r["method"], "op": op_label(r["knobs"]),
            "mIoU": 100 * r["miou"], "ΔmIoU": 100 * r["miou_delta"],
            "GFLOPs": r["gflops"]["mean"], "ΔGFLOPs %": 100 * (r["gflops_ratio"] - 1),
            "img/s b1": b1.get("throughput"), "speedup b1": b1.get("speedup"),
            "img/s b8": b8.get("throughput"), "speedup b8": b8.get("speedup"),
            "p50 ms": b1.get("latency_ms", {}).get("p50"), "p90 ms": b1.get("latency_ms", {}).get("p90"),
            "series": series(r["method"], r["knobs"]),
        })
    df = pd.DataFrame(rows, columns=COLUMNS[:-1] + ["series"])
    df["pareto"] = pareto_front(df["GFLOPs"], df["mIoU"])
    df = df[COLUMNS + ["series"]]
    return df.sort_values(["method", "GFLOPs"], ascending=[True, False], kind="stable").reset_index(drop=True)


def markdown(df: pd.DataFrame) -> str:
    fmt = {"mIoU": "{:.2f}", "ΔmIoU": "{:+.2f}", "GFLOPs": "{:.3f}", "ΔGFLOPs %": "{:+.1f}",
           "img/s b1": "{:.1f}", "speedup b1": "{:.2f}x", "img/s b8": "{:.1f}", "speedup b8": "{:.2f}x",
           "p50 ms": "{:.1f}", "p90 ms": "{:.1f}"}
    df = df[COLUMNS]
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


# The seed paper's reported PAUMER operating point on the real datasets: throughput
# relative to the full model, and the relative mIoU drop. Drawn for reference only.
SEED_POINTS = {"cityscapes": (1.5, 0.0065), "ade20k": (1.5, 0.046)}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    plt.rcParams["svg.hashsalt"] = "bench"  # fixed SVG ids: same records, same bytes
    return plt, sns


def _save(fig, path: Path, layout: bool = True) -> list[Path]:
    if layout:
        fig.tight_layout()
    paths = [path.with_suffix(".png"), path.with_suffix(".svg")]
    atomic_write(paths[0], lambda f: fig.savefig(f, format="png", dpi=150))
    # no timestamp: same records, same file
    atomic_write(paths[1], lambda f: fig.savefig(f, format="svg", metadata={"Date": None}))
    return paths


def figure(df: pd.DataFrame, dataset: str, path: Path) -> list[Path]:
    """mIoU against GFLOPs and against the same-run speedups, one line per series."""
    plt, sns = _pyplot()
    speed_columns = [c for c in ("speedup b1", "speedup b8") if df[c].notna().any()]
    fig, axes = plt.subplots(1, 1 + len(speed_columns), figsize=(5 * (1 + len(speed_columns)), 4.6),
                             squeeze=False)
    lines = sorted(df["series"].unique())
    base = df[df["method"] == "baseline"]["mIoU"]
    panels = [("GFLOPs", "GFLOPs per image (fvcore, MAC)")]
    # absolute CPU throughput differs between runs; the same-run ratio is what compares
    panels += [(c, f"speedup at batch {c[len('speedup b'):]} (vs the baseline, same run)") for c in speed_columns]
    for ax, (x, label) in zip(axes[0], panels):
        data = df[df[x].notna()].sort_values(x)
        sns.lineplot(data=data, x=x, y="mIoU", hue="series", style="series", markers=True, markersize=7,
                     dashes=False, ax=ax, sort=False, hue_order=lines, style_order=lines, legend=ax is axes[0][0])
        front = data[pareto_front(data[x] if x == "GFLOPs" else -data[x], data["mIoU"])]
        ax.scatter(front[x], front["mIoU"], s=130, facecolors="none", edgecolors="black", label="Pareto front")
        if len(base):
            ax.axhline(base.iloc[0], color="grey", linestyle="--", linewidth=0.8, label="baseline mIoU")
            if x != "GFLOPs" and dataset in SEED_POINTS:
                speedup, drop = SEED_POINTS[dataset]
                ax.scatter([speedup], [base.iloc[0] * (1 - drop)], marker="*", s=160, color="black",
                           label=f"seed paper: {speedup}x at -{100 * drop:.2g}% mIoU")
        ax.set_xlabel(label)
        ax.set_ylabel("mIoU (%)")
    handles, labels = {}, []
    for ax in axes[0]:  # one legend for the figure, below the panels
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(5, len(handles)), fontsize=8,
               frameon=False)
    fig.suptitle(f"{dataset}: accuracy against cost", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(handles) - 1) // 5), 1, 1))
    paths = _save(fig, path, layout=False)
    plt.close(fig)
    return paths


def tokens_figure(records: list[dict], dataset: str, path: Path) -> list[Path]:
    """Fraction of the image's tokens each block computed, one panel per series of a
    dynamic method, one line per operating point (averaged over the images). How a
    ragged batch is run (``batching``) does not change which tokens are computed, so
    only the default is drawn."""
    rows = [{"series": series(r["method"], r["knobs"]), "op": op_label(r["knobs"]), "block": b + 1, "fraction": f}
            for r in records if r["method"] not in ("baseline", "static") and r["knobs"].get("batching", "pad") == "pad"
            for b, f in enumerate(r.get("tokens_per_block") or [])]
    if not rows:
        return []
    from methods import METHODS

    plt, sns = _pyplot()
    df = pd.DataFrame(rows)
    panels = sorted(df["series"].unique())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.2), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], panels):
        sub = df[df["series"] == name]
        method = name.split(" ")[0]
        swept = METHODS[method].swept if method in METHODS else ""
        hue = sub["op"].map(lambda op: " ".join(p for p in op.split() if p.startswith(f"{swept}=")) or op)
        sns.lineplot(x=sub["block"], y=sub["fraction"], hue=hue, hue_order=list(dict.fromkeys(hue)), marker="o",
                     ax=ax, palette="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("encoder block")
        ax.set_ylabel("fraction of tokens computed")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    fig.suptitle(f"{dataset}: where each method spends its encoder compute", fontsize=10)
    paths = _save(fig, path)
    plt.close(fig)
    return paths


def _write_text(path: Path, text: str) -> None:
    """Whole or not at all: a full disk leaves the previous file (``atomic_write``)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def report(results: str = "results", out: str = "reports") -> list[Path]:
    from bench.datasets import DATASETS

    store = ResultsStore(results)
    records, problems = store.load_with_errors()
    for p in problems:
        print(f"warning: skipped {p}")
    if not records:
        raise BenchError(f"no result records under {results}/; run `bench run` first")
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot write reports to folder {out_dir}: {e.strerror or e}") from None
    written, index = [], ["# Reports", "",
                          f"Generated by `bench report` from the records in `{results}/`; "
                          "GFLOPs are fvcore's (one multiply-add = one flop), speedups are ratios "
                          "to the baseline timed in the same run.", ""]
    found = sorted({r["dataset"] for r in records})
    for dataset in found:
        mine = [r for r in records if r["dataset"] == dataset]
        df = table(mine)
        md = out_dir / f"{dataset}.md"
        _write_text(md, markdown(df))
        _write_text(out_dir / f"{dataset}.csv", df[COLUMNS].to_csv(index=False, float_format="%.6g"))
        files = [md, out_dir / f"{dataset}.csv"]
        files += figure(df, dataset, out_dir / f"{dataset}-tradeoff")
        files += tokens_figure(mine, dataset, out_dir / f"{dataset}-tokens-per-block")
        for maps in sorted((Path(results) / "figures").glob(f"{dataset}-*-compute-maps.*")):
            files.append(out_dir / maps.name)  # drawn by `bench run` from the same checkpoints
            atomic_write(files[-1], lambda f, maps=maps: f.write(maps.read_bytes()))
        written += files
        commits = sorted({str(r.get("git_commit"))[:7] for r in mine})
        index += [f"## {dataset}", "",
                  f"{len(mine)} records, {df['method'].nunique()} methods, git commit(s) {', '.join(commits)}.", ""]
        index += [f"- [{f.name}]({f.name})" for f in files if f.suffix != ".svg"]
        index.append("")
    missing = [name for name in DATASETS if name not in found]
    if missing:
        note = f"No records for {', '.join(missing)}: skipped."
        print(note)
        index += [note, ""]
    _write_text(out_dir / "README.md", "\n".join(index))
    return written + [out_dir / "README.md"]

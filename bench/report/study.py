"""Depth-study records (``scripts/depth_study.py``): their own table and figure."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.report.figures import MARKERS, WIDTHS, _caption, figure_style, save_figure
from bench.report.style import context_line
from bench.report.tables import _md_table, _write_csv, _write_text


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
        steps = sorted({int(r["study"]["steps"]) for r in records})
        # a few budgets: a column-wide figure even at text width (two points need no page)
        w = WIDTHS["column"] if len(steps) <= 4 else WIDTHS[width]
        fig, ax = plt.subplots(figsize=(w, 0.7 * w if w < 5 else 0.35 * w), layout="constrained")
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
        ax.set_xticks(steps, [f"{s:,}" for s in steps])
        ax.minorticks_off()
        ax.set_xlabel("training steps (from scratch)")
        ax.set_ylabel("mIoU (%)")
        ax.legend(frameon=False)
        _caption(fig, context_line(records, dataset) + " · trained from scratch", "column" if w < 5 else width)
        files += save_figure(fig, out_dir / stem)
        plt.close(fig)
    return files

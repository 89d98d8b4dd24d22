"""The iso-budget table, the report's headline: each method's mIoU read off its own
measured curve at fixed fractions of the baseline's GFLOPs and at fixed batch-8
speedups, with its interval, marked against the best reference at that budget.

- Curves: one per series (method + the knobs its sweep does not vary) and training seed,
  points ordered by cost. Piecewise-linear (monotone) interpolation between measured
  points (``bench.stats.interpolate``); blank where the curve does not reach the budget,
  never extrapolated. Several seeds: each seed's curve is read, then averaged; every seed
  must reach the budget.
- References: the shallow line (its depths, and the equal-budget control ``baseline-ft``
  as its full-depth end, which it is) and the static line (its scales, and the baseline
  as scale 1). The best reference at a budget is the one with the higher mIoU there.
- Intervals: the paired image bootstrap of every point (``bench.stats``), interpolated
  resample by resample, seeds combined (``combine_seeds``); the mark compares the
  method with the best reference resample by resample: better / worse where the 95%
  interval of the difference excludes 0, within noise otherwise, blank without
  per-image statistics.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from bench import stats
from bench.report.intervals import Resamples, family
from bench.report.tables import _latex_escape, _write_csv, _write_text, series, swept_knobs

GFLOPS_FRACTIONS = (0.80, 0.67, 0.50, 0.35)
SPEEDUPS = (1.25, 1.5, 2.0)
SPEED_BATCH = "8"
REFERENCES = {"shallow": ("shallow", "baseline-ft"), "static": ("static", "baseline")}  # line: (method, its end)
POINT_SERIES = ("baseline", "baseline-ft")  # single points at full cost: no curve of their own


def budgets() -> list[tuple[str, str, float]]:
    """(column name, axis, value) of every budget of the table."""
    return ([(f"{round(100 * f)}% GFLOPs", "gflops", f) for f in GFLOPS_FRACTIONS]
            + [(f"{s:g}x b{SPEED_BATCH}", "speedup", s) for s in SPEEDUPS])


def _x(r: dict, axis: str) -> float:
    if axis == "gflops":
        ratio = r.get("gflops_ratio")
        if ratio is None and r.get("baseline_gflops"):
            ratio = r["gflops"]["mean"] / r["baseline_gflops"]
        return math.nan if ratio is None else float(ratio)
    value = (r.get("speed", {}).get(SPEED_BATCH) or {}).get("speedup")
    return math.nan if value is None else float(value)


def _curves(records: list[dict]) -> dict[str, list[dict]]:
    """Records by curve: every series, and the two reference lines with their end points."""
    swept = swept_knobs(records)
    curves: dict[str, list[dict]] = {}
    for r in records:
        name = series(r["method"], r["knobs"], swept[r["method"]])
        if name not in POINT_SERIES:
            curves.setdefault(name, []).append(r)
    for line, (_, end) in REFERENCES.items():
        if line in curves:  # the line's full-cost end: the same model at full depth / scale 1
            curves[line] = curves[line] + [r for r in records if r["method"] == end and not r["knobs"]]
    return curves


def read_curve(recs: list[dict], axis: str, at: float, resamples: Resamples) -> Optional[dict]:
    """The curve's mIoU at ``at`` (averaged over seeds) and its bootstrap resamples (None
    without statistics); None where some seed's curve does not reach ``at``."""
    by_seed: dict[int, list[dict]] = {}
    for r in recs:
        by_seed.setdefault(r.get("seed") or 0, []).append(r)
    values, draws = [], []
    for seed in sorted(by_seed):
        points = by_seed[seed]
        xs = [_x(r, axis) for r in points]
        y = stats.interpolate(xs, np.array([r["miou"] for r in points]), at)
        if y is None:
            return None
        values.append(float(y))
        res = [resamples.of(r) for r in points]
        if draws is not None and all(v is not None for v in res) and len({len(v) for v in res}) == 1:
            draws.append(stats.interpolate(xs, np.stack(res), at))
        else:
            draws = None
    combined = stats.combine_seeds(np.stack(draws)) if draws else None
    return {"miou": float(np.mean(values)), "resamples": combined, "seeds": sorted(by_seed)}


def iso_budget_rows(records: list[dict], resamples: Resamples, family_labels: dict[str, str]) -> list[dict]:
    """One row per (setting, curve, budget), long form (the CSV)."""
    rows = []
    by_family: dict[str, list[dict]] = {}
    for r in records:
        by_family.setdefault(family(r), []).append(r)
    for fam, recs in sorted(by_family.items()):
        curves = _curves(recs)
        for column, axis, at in budgets():
            read = {name: read_curve(c, axis, at, resamples) for name, c in sorted(curves.items())}
            refs = [(name, read[name]) for name in REFERENCES if read.get(name) is not None]
            best = max(refs, key=lambda item: item[1]["miou"]) if refs else None
            for name, value in read.items():
                if value is None:
                    continue
                ci = stats.interval(value["resamples"]) if value["resamples"] is not None else [math.nan] * 2
                row = {"group": family_labels.get(fam, fam), "series": name, "budget": column, "axis": axis,
                       "at": at, "seeds": ",".join(map(str, value["seeds"])), "mIoU": 100 * value["miou"],
                       "mIoU low": 100 * ci[0], "mIoU high": 100 * ci[1], "reference": "",
                       "reference mIoU": math.nan, "Δ": math.nan, "Δ low": math.nan, "Δ high": math.nan,
                       "verdict": "reference" if name in REFERENCES else ""}
                if best is not None and name not in REFERENCES:
                    ref_name, ref = best
                    row.update({"reference": ref_name, "reference mIoU": 100 * ref["miou"],
                                "Δ": 100 * (value["miou"] - ref["miou"])})
                    if value["resamples"] is not None and ref["resamples"] is not None:
                        delta = stats.interval(value["resamples"] - ref["resamples"])
                        row.update({"Δ low": 100 * delta[0], "Δ high": 100 * delta[1],
                                    "verdict": stats.verdict(delta)})
                rows.append(row)
    return rows


def _cell(row: Optional[dict]) -> str:
    if row is None:
        return ""
    text = f"{row['mIoU']:.2f}"
    if not math.isnan(row["mIoU low"]):
        text += f" ±{(row['mIoU high'] - row['mIoU low']) / 2:.2f}"
    if row["verdict"] and row["verdict"] != "reference":
        text += f" {row['verdict']}"
    return text


def wide(rows: list[dict]) -> list[tuple[str, pd.DataFrame]]:
    """Per setting: one row per curve, one column per budget (mIoU ± half-width and mark),
    the best reference's name and mIoU at each budget on a row of its own."""
    columns = [c for c, _, _ in budgets()]
    out = []
    for group in sorted({r["group"] for r in rows}):
        mine = [r for r in rows if r["group"] == group]
        names = sorted({r["series"] for r in mine}, key=lambda n: (n in REFERENCES, n))
        table = []
        for name in names:
            cells = {r["budget"]: r for r in mine if r["series"] == name}
            seeds = next(iter(cells.values()))["seeds"]
            table.append({"method": name + (" (reference)" if name in REFERENCES else ""), "seeds": seeds,
                          **{c: _cell(cells.get(c)) for c in columns}})
        best = {}
        for c in columns:
            ref = next((r for r in mine if r["budget"] == c and r["reference"]), None)
            best[c] = f"{ref['reference']} {ref['reference mIoU']:.2f}" if ref else ""
        table.append({"method": "best reference", "seeds": "", **best})
        out.append((group, pd.DataFrame(table)))
    return out


def markdown(rows: list[dict]) -> str:
    groups = wide(rows)
    lines = []
    for group, df in groups:
        if len(groups) > 1:
            lines += [f"### {group}", ""]
        lines += ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def latex(rows: list[dict]) -> str:
    groups = wide(rows)
    lines = ["% generated by `bench report`; needs \\usepackage{booktabs}"]
    for group, df in groups:
        lines += [f"% {_latex_escape(group)}", f"\\begin{{tabular}}{{ll{'r' * (len(df.columns) - 2)}}}", r"\toprule",
                  " & ".join(_latex_escape(c) for c in df.columns) + r" \\", r"\midrule"]
        lines += [" & ".join(_latex_escape(str(v)).replace("±", r"$\pm$") for v in row) + r" \\"
                  for row in df.itertuples(index=False)]
        lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


HEADER = ("mIoU (%) read off each method's own curve at a fraction of the baseline's GFLOPs and at a batch-{b} "
          "speedup (linear between measured points, blank where the curve does not reach; never extrapolated). "
          "± half the 95% paired bootstrap interval over images (seeds combined where several); better / worse / "
          "within noise: the interval of the difference with the best reference at that budget (the shallow line "
          "ending at the control, the static line ending at the baseline).\n\n")


def iso_budget_report(records: list[dict], dataset: str, out_dir: Path, resamples: Resamples,
                      family_labels: dict[str, str]) -> list[Path]:
    """``<dataset>-iso-budget.md``, ``.tex`` and ``.csv``; nothing when no curve reaches a budget."""
    rows = iso_budget_rows(records, resamples, family_labels)
    if not rows:
        return []
    return [_write_text(out_dir / f"{dataset}-iso-budget.md", HEADER.format(b=SPEED_BATCH) + markdown(rows)),
            _write_text(out_dir / f"{dataset}-iso-budget.tex", latex(rows)),
            _write_csv(out_dir / f"{dataset}-iso-budget.csv", pd.DataFrame(rows))]

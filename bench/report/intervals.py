"""The report's uncertainty: intervals of records that predate them (recomputed from the
per-image statistics stored beside the results), per-record bootstrap resamples, and the
aggregation over training seeds."""
from __future__ import annotations

import json
import math
from typing import Optional

import numpy as np

from bench import per_image, stats
from bench.results import op_label


def with_intervals(records: list[dict], results: str) -> list[dict]:
    """``records``, those without stored intervals given the ones their per-image
    statistics allow (records without statistics stay as they are, without intervals)."""
    out = []
    for r in records:
        if "miou_ci" not in r and r["dataset"] != "speed" and "study" not in r:
            r = {**r, **per_image.record_intervals(results, r)}
        out.append(r)
    return out


class Resamples:
    """Bootstrap mIoU resamples (R,) of each record from its stored per-image counts, all
    on the same image resamples for one image count (paired), computed once."""

    def __init__(self, results: str):
        self.results = results
        self._weights: dict[int, np.ndarray] = {}
        self._cache: dict[str, Optional[np.ndarray]] = {}

    def of(self, rec: dict) -> Optional[np.ndarray]:
        from bench.results import record_identity

        key = record_identity(rec)
        if key not in self._cache:
            counts = per_image.read_counts(self.results, rec)
            if counts is None or len(counts[0]) < 2:
                self._cache[key] = None
            else:
                n = len(counts[0])
                if n not in self._weights:
                    self._weights[n] = stats.resample_weights(n)
                self._cache[key] = stats.resampled_miou(*counts, self._weights[n])
        return self._cache[key]


def family(r: dict) -> str:
    """What a group of rows was trained and measured as, the training seed left out: rows
    of several seeds of one setting share it (their baselines differ)."""
    source = (r.get("baseline_source") or {}).get("released")
    return json.dumps([r.get("model"), r.get("decoder"), r.get("depth"), (r.get("train") or {}).get("steps"),
                       source, r.get("images")], sort_keys=True)


def seed_rows(records: list[dict], resamples: Resamples, family_labels: dict[str, str]) -> list[dict]:
    """One row per (setting, method, operating point) measured at several seeds: the mean
    and standard deviation over seeds of mIoU, ΔmIoU and GFLOPs, and the interval that
    combines seeds and images (empty where a seed's statistics are missing)."""
    by_point: dict[tuple, list[dict]] = {}
    for r in records:
        by_point.setdefault((family(r), r["method"], op_label(r["knobs"])), []).append(r)
    rows = []
    for (fam, method, op), recs in sorted(by_point.items()):
        recs = sorted(recs, key=lambda r: (r.get("seed") or 0))
        seeds = [r.get("seed") or 0 for r in recs]
        if len(set(seeds)) < 2:
            continue
        miou = stats.seed_summary([r["miou"] for r in recs])
        draws = [resamples.of(r) for r in recs]
        ci = [math.nan, math.nan]
        if all(d is not None for d in draws) and len({len(d) for d in draws}) == 1:
            ci = stats.interval(stats.combine_seeds(np.stack(draws)))
        deltas = [r.get("miou_delta") for r in recs]
        known = all(d is not None for d in deltas)
        delta = stats.seed_summary(deltas) if known else {"mean": math.nan, "std": math.nan}
        rows.append({"group": family_labels.get(fam, fam), "method": method, "op": op,
                     "seeds": ",".join(map(str, seeds)), "mIoU mean": 100 * miou["mean"], "mIoU std": 100 * miou["std"],
                     "mIoU low": 100 * ci[0], "mIoU high": 100 * ci[1], "ΔmIoU mean": 100 * delta["mean"],
                     "ΔmIoU std": 100 * delta["std"],
                     "GFLOPs mean": float(np.mean([r["gflops"]["mean"] for r in recs]))})
    return rows

"""Uncertainty of the comparison: per-image counts, paired bootstrap intervals, seed
aggregation and monotone interpolation along a measured curve.

- Every method is evaluated on the same images, so comparisons are *paired*: one set of
  image resamples (``resample_weights``: fixed seed, a function of the image count alone)
  serves every record of a dataset, and a difference is taken resample by resample.
- mIoU of a resample is recomputed from the summed per-class intersections and unions of
  the drawn images (as the metric itself sums a confusion matrix), never averaged per
  image; a class with an empty union in that resample is left out, as in ``bench.metrics``.
- Intervals are percentile intervals (95% by default) over ``RESAMPLES`` resamples.
- Seeds: mean and sample standard deviation (n - 1) over training seeds; the interval that
  combines seeds and images draws, per image resample, the seeds with replacement too.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from bench.errors import BenchError

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def per_image_counts(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and class: (intersection, union) pixel counts, each (B, C) int64.
    Summed over images they give exactly the split's TP and TP + FP + FN."""
    B = pred.shape[0]
    keep = label != ignore_index
    image = torch.arange(B).view(B, *([1] * (pred.dim() - 1))).expand_as(pred)
    code = (image[keep] * num_classes + label[keep].long()) * num_classes + pred[keep].long()
    cm = torch.bincount(code, minlength=B * num_classes ** 2).reshape(B, num_classes, num_classes)
    inter = cm.diagonal(dim1=1, dim2=2)
    return inter.clone(), cm.sum(1) + cm.sum(2) - inter


def miou_from_counts(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """mIoU from summed counts (..., C): mean IoU over the classes with a non-empty union."""
    inter, union = np.asarray(inter, dtype=np.float64), np.asarray(union, dtype=np.float64)
    valid = union > 0
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=valid)
    n = valid.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, iou.sum(-1) / np.maximum(n, 1), np.nan)


def resample_weights(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) how often each image is drawn in each resample (n draws with
    replacement); the same (n, resamples, seed) always gives the same weights."""
    if n < 2:
        raise BenchError(f"a bootstrap over images needs at least 2 images; got {n}")
    if resamples < 1:
        raise BenchError(f"a bootstrap needs at least 1 resample; got {resamples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def resampled_miou(inter: np.ndarray, union: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """mIoU of each resample (R,), from per-image counts (n, C) and weights (R, n)."""
    inter, union = np.asarray(inter), np.asarray(union)
    if inter.shape != union.shape or inter.ndim != 2:
        raise BenchError(f"per-image counts must be two (images, classes) arrays of one shape; "
                         f"got {inter.shape} and {union.shape}")
    if weights.shape[1] != inter.shape[0]:
        raise BenchError(f"resample weights are for {weights.shape[1]} images, the counts for {inter.shape[0]}")
    return miou_from_counts(weights @ inter.astype(np.float64), weights @ union.astype(np.float64))


def interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    """[low, high]: the percentile interval of ``values`` (NaNs left out)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return [math.nan, math.nan]
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return [float(low), float(high)]


def paired_bootstrap(counts: tuple, others: Sequence[Optional[tuple]] = (), resamples: int = RESAMPLES,
                     seed: int = SEED, level: float = LEVEL) -> dict:
    """Intervals of one record's mIoU and of its differences with ``others`` (each an
    (intersection, union) pair on the same images, or None), every side on the same
    resampled images. Returns {"miou_ci": [lo, hi], "delta_ci": [[lo, hi] or None, ...]}."""
    inter, union = counts
    weights = resample_weights(len(inter), resamples, seed)
    mine = resampled_miou(inter, union, weights)
    deltas = []
    for other in others:
        if other is None or np.shape(other[0]) != np.shape(inter):
            deltas.append(None)  # not measured on the same images: no paired interval
            continue
        deltas.append(interval(mine - resampled_miou(other[0], other[1], weights), level))
    return {"miou_ci": interval(mine, level), "delta_ci": deltas}


def seed_summary(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (n - 1; NaN for one seed) over seeds."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise BenchError("seed aggregation needs at least one record")
    std = float(v.std(ddof=1)) if v.size > 1 else math.nan
    return {"mean": float(v.mean()), "std": std, "seeds": int(v.size)}


def seed_draws(seeds: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, seeds) indices: which seeds each resample averages, drawn with
    replacement (a fixed stream of its own, so image and seed draws stay independent)."""
    rng = np.random.default_rng([seed, seeds])
    return rng.integers(0, seeds, size=(resamples, seeds))


def combine_seeds(resampled: np.ndarray, draws: Optional[np.ndarray] = None) -> np.ndarray:
    """(R,) seed-mean per resample from (S, R) per-seed resampled values: resample r averages
    the seeds ``draws[r]`` (drawn with replacement). One seed: its own values."""
    resampled = np.asarray(resampled, dtype=np.float64)
    S, R = resampled.shape
    if S == 1:
        return resampled[0]
    draws = seed_draws(S, R) if draws is None else draws
    return resampled[draws, np.arange(R)[:, None]].mean(1)


def interpolate(xs: Sequence[float], ys: np.ndarray, at: float) -> Optional[np.ndarray]:
    """``ys`` (n, ...) read off the curve through (xs, ys) at ``at``: piecewise linear
    between the neighbouring measured points, so monotone between them (never above or
    below both), exact at a measured point, None outside [min xs, max xs] (never
    extrapolated). Points measured at the same x are averaged."""
    xs = np.asarray(xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    ok = ~np.isnan(xs)
    xs, ys = xs[ok], ys[ok]
    if xs.size == 0 or math.isnan(at) or at < xs.min() - 1e-12 or at > xs.max() + 1e-12:
        return None
    ux = np.unique(xs)
    uy = np.stack([ys[xs == x].mean(0) for x in ux])
    k = int(np.searchsorted(ux, at))
    if k < len(ux) and abs(ux[k] - at) <= 1e-12:
        return uy[k]
    if k == 0 or k == len(ux):  # within float noise of an end
        return uy[min(k, len(ux) - 1)]
    t = (at - ux[k - 1]) / (ux[k] - ux[k - 1])
    return (1 - t) * uy[k - 1] + t * uy[k]


def verdict(delta_ci: Optional[Sequence[float]]) -> str:
    """"better" / "worse" where the interval of a difference excludes 0, else "within noise"
    ("" without an interval)."""
    if delta_ci is None or any(v is None or math.isnan(v) for v in delta_ci):
        return ""
    low, high = delta_ci
    return "better" if low > 0 else "worse" if high < 0 else "within noise"

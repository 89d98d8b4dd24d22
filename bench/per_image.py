"""Per-image statistics of a record, stored beside the results: one compressed ``.npz``
per record, ``<results>/per-image/<dataset>/<identity hash>.npz``, holding per validation
image (in split order) the per-class intersection and union pixel counts. They are keyed
by the record's identity (``bench.results.record_identity``), so a results folder copied
elsewhere keeps them, and they are written before the record is appended: a stored record
either has its statistics or (a record older than them) none.

From them the bootstrap intervals of ``bench.stats`` are recomputed without evaluating
again: ``record_intervals`` (the record's own, its difference with the baseline and with
the equal-budget control measured on the same images).
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Optional

import numpy as np

from bench import stats
from bench.errors import BenchError
from bench.fileio import atomic_write
from bench.results import identity_fields, record_identity

FOLDER = "per-image"
CI_FIELDS = ("miou_ci", "miou_delta_ci", "miou_delta_control_ci")


def sidecar_path(results, rec: dict) -> Path:
    """Where the per-image statistics of ``rec`` (a record or a record-to-be) live."""
    digest = hashlib.sha256(record_identity(rec).encode("utf-8")).hexdigest()[:20]
    return Path(results) / FOLDER / rec["dataset"] / f"{digest}.npz"


def write_counts(results, rec: dict, inter, union) -> Path:
    """Stores (images, classes) intersection and union counts for ``rec``, atomically."""
    inter, union = np.asarray(inter, dtype=np.int64), np.asarray(union, dtype=np.int64)
    if inter.shape != union.shape or inter.ndim != 2:
        raise BenchError(f"per-image counts must be two (images, classes) arrays of one shape; "
                         f"got {inter.shape} and {union.shape}")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, intersection=inter, union=union, identity=np.array(record_identity(rec)))
    path = sidecar_path(results, rec)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def read_counts(results, rec: dict) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(intersection, union) of ``rec``, or None when none are stored (older records) or
    the file is unreadable or belongs to another identity."""
    path = sidecar_path(results, rec)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["identity"]) != record_identity(rec):
                return None
            return data["intersection"], data["union"]
    except (OSError, ValueError, KeyError):
        return None


def companion(rec: dict, method: str, checkpoint: Optional[str]) -> Optional[dict]:
    """The identity of the full-model record (``method``: baseline or the control) measured
    with ``rec``'s settings on ``checkpoint``: where its per-image statistics are found."""
    if not checkpoint:
        return None
    fields = identity_fields(rec)
    fields.update(method=method, knobs={}, checkpoint=checkpoint)
    if isinstance(fields.get("eval"), dict):
        fields["eval"] = {**fields["eval"], "scale": 1.0}
    if rec.get("compile"):
        fields["compile"] = True
    return fields


def intervals(counts, baseline=None, control=None) -> dict:
    """The record fields of ``CI_FIELDS`` from per-image counts (the record's, and where
    known the baseline's and the control's on the same images); {} for fewer than 2 images."""
    if counts is None or len(counts[0]) < 2:
        return {}
    out = stats.paired_bootstrap(counts, [baseline, control])
    fields = {"miou_ci": out["miou_ci"]}
    if out["delta_ci"][0] is not None:
        fields["miou_delta_ci"] = out["delta_ci"][0]
    if out["delta_ci"][1] is not None:
        fields["miou_delta_control_ci"] = out["delta_ci"][1]
    return fields


def record_intervals(results, rec: dict) -> dict:
    """``rec``'s intervals from the statistics stored under ``results`` ({} without them)."""
    counts = read_counts(results, rec)
    if counts is None:
        return {}
    others = []
    for method, key in (("baseline", "baseline_checkpoint"), ("baseline-ft", "control_checkpoint")):
        if rec["method"] == method and rec.get("checkpoint") == rec.get(key):
            others.append(counts)  # itself: a difference of exactly 0
            continue
        ident = companion(rec, method, rec.get(key))
        others.append(read_counts(results, ident) if ident is not None else None)
    return intervals(counts, *others)

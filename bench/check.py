"""Regression check on stored results: ``bench check``.

Re-derives a small, representative set of results (the baseline and a few operating
points of PAUMER, ToMe and early exit) with the same pipeline as ``bench run``:
train the checkpoints (deterministic on CPU), evaluate on a fixed prefix of the
``synthetic`` validation split, count FLOPs, time each method against the baseline
in the same process. The fresh records are compared with the reference stored in
``results/check/synthetic.jsonl``; ``--update`` rewrites that reference.

Why a short budget of its own and not the main checkpoints: retraining those takes
about 35 minutes of CPU and committing them about 16 MB per retraining; the check's
checkpoints train in a few minutes and go through every step the main rows do.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bench.errors import BenchError
from bench.results import ResultsStore, identity_fields, op_label, record_identity

DATASET = "synthetic"
REFERENCE = Path("results") / "check"
# (method, operating points): what a regression in the encoder loop, a policy, the
# FLOP counter, training or the protocol would move
CHECK_SET: list[tuple[str, list[dict]]] = [
    ("baseline", [{}]),
    ("paumer", [{"tau": 0.2}, {"tau": 0.5}]),
    ("tome", [{"r": 16}]),
    ("early-exit", [{"mode": "token", "threshold": 0.95}]),
]
STEPS = 300  # baseline budget; the fine-tunes get half, as in the main rows
IMAGES = 48  # the first 48 validation images
TIMING_IMAGES = 16
REPEATS = 3


@dataclass(frozen=True)
class Tolerance:
    """How far a fresh value may move. ``same_weights``: the retrained checkpoint is
    bit-identical to the reference's, so anything but float noise is a change; otherwise
    (another CPU's rounding during training) looser bounds apply."""

    miou_abs: float  # mIoU may fall by at most this (fraction, not points)
    gflops_rel: float  # GFLOPs may differ by at most this fraction, either way
    speedup_rel: float = 0.25  # a speedup may fall to (1 - this) x the stored one: timing is noisy


SAME_WEIGHTS = Tolerance(miou_abs=1e-4, gflops_rel=1e-9)
OTHER_WEIGHTS = Tolerance(miou_abs=0.005, gflops_rel=0.01)
# identity fields a fresh record may differ in from the reference: its weights, and the
# data fingerprint (the reference may predate it; synthetic is generated, so it is the same)
UNCOMPARED = ("checkpoint", "data_fingerprint")


def interval_tolerance(ref: dict, tol: Tolerance, same_weights: bool) -> tuple[Tolerance, str]:
    """Retrained weights (another CPU's rounding) may move mIoU by what other images
    would: where the reference stores its 95% bootstrap interval (``miou_ci``), the
    tolerance is the interval's lower half-width (never tighter than ``tol``), and the
    row says so. Bit-identical weights keep the tight bound: their mIoU cannot move."""
    ci = ref.get("miou_ci")
    if same_weights or not (isinstance(ci, list) and len(ci) == 2 and ci[0] is not None):
        return tol, ""
    half = ref["miou"] - ci[0]
    return Tolerance(max(tol.miou_abs, half), tol.gflops_rel, tol.speedup_rel), " (stored 95% interval)"


def _key(record: dict) -> str:
    """A record's identity but its weights (a retrained checkpoint is compared under
    looser bounds): the same operating point under the same settings."""
    return record_identity(record, ignore=UNCOMPARED)


def _point(record: dict) -> str:
    return json.dumps([record["method"], record["knobs"]], sort_keys=True)


def _settings_moved(ref: dict, new: dict) -> str:
    a, b = identity_fields(ref, ignore=UNCOMPARED), identity_fields(new, ignore=UNCOMPARED)
    return ", ".join(f"{k} {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}"
                     for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))


def compare(stored: list[dict], fresh: list[dict]) -> list[dict]:
    """One row per (record, metric): stored, fresh, tolerance text and verdict
    ("ok", "better", or "REGRESSION"/"MISSING"/"CHANGED", which fail)."""
    fresh_by_key = {_key(r): r for r in fresh}
    fresh_by_point = {_point(r): r for r in fresh}
    rows = []
    for ref in stored:
        name = f"{ref['method']} {op_label(ref['knobs'])}"
        new = fresh_by_key.get(_key(ref))
        if new is None and _point(ref) in fresh_by_point:  # measured, but not as the reference was
            rows.append({"point": name, "metric": "settings", "stored": "stored",
                         "fresh": _settings_moved(ref, fresh_by_point[_point(ref)]), "tolerance": "same",
                         "verdict": "CHANGED"})
            continue
        if new is None:
            rows.append({"point": name, "metric": "record", "stored": "stored", "fresh": "missing",
                         "tolerance": "", "verdict": "MISSING"})
            continue
        same = new.get("checkpoint") == ref.get("checkpoint")
        tol, source = interval_tolerance(ref, SAME_WEIGHTS if same else OTHER_WEIGHTS, same)
        drop = ref["miou"] - new["miou"]
        verdict = "REGRESSION" if drop > tol.miou_abs else ("better" if -drop > tol.miou_abs else "ok")
        rows.append({"point": name, "metric": "mIoU", "stored": f"{100 * ref['miou']:.2f}",
                     "fresh": f"{100 * new['miou']:.2f}", "tolerance": f"-{100 * tol.miou_abs:.2g} pt{source}",
                     "verdict": verdict})
        g_ref, g_new = ref["gflops"]["mean"], new["gflops"]["mean"]
        moved = abs(g_new - g_ref) > tol.gflops_rel * g_ref
        rows.append({"point": name, "metric": "GFLOPs", "stored": f"{g_ref:.6f}", "fresh": f"{g_new:.6f}",
                     "tolerance": "exact" if tol.gflops_rel <= 1e-9 else f"±{100 * tol.gflops_rel:.2g}%",
                     "verdict": ("REGRESSION" if g_new > g_ref else "CHANGED") if moved else "ok"})
        if ref["method"] == "baseline":
            continue  # its speedup is 1 by definition
        for batch, entry in sorted(ref.get("speed", {}).items(), key=lambda kv: int(kv[0])):
            s_ref = entry["speedup"]
            s_new = new.get("speed", {}).get(batch, {}).get("speedup")
            low = s_ref * (1 - tol.speedup_rel)
            ok = s_new is not None and s_new >= low
            rows.append({"point": name, "metric": f"speedup b{batch}", "stored": f"{s_ref:.2f}x",
                         "fresh": "missing" if s_new is None else f"{s_new:.2f}x",
                         "tolerance": f">= {low:.2f}x", "verdict": "ok" if ok else "REGRESSION"})
    return rows


def failed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["verdict"] not in ("ok", "better")]


def format_rows(rows: list[dict]) -> str:
    cols = ["point", "metric", "stored", "fresh", "tolerance", "verdict"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def reference_path(results: str = "results") -> Path:
    return Path(results) / "check" / f"{DATASET}.jsonl"


def load_reference(results: str = "results") -> list[dict]:
    path = reference_path(results)
    if not path.is_file():
        raise BenchError(f"no reference at {path}; run `bench check --update` to create it")
    records = ResultsStore(path.parent).load(DATASET)
    if not records:
        raise BenchError(f"the reference {path} holds no records; run `bench check --update` to create it")
    stored = {_point(r) for r in records}
    missing = [f"{method} {op_label(knobs)}" for method, ops in CHECK_SET for knobs in ops
               if _point({"method": method, "knobs": knobs}) not in stored]
    if missing:
        raise BenchError(f"the reference {path} lacks point(s) of the check set: {', '.join(missing)}; "
                         "run `bench check --update` to re-derive it")
    return records


def fresh_records(*, checkpoints: str = "checkpoints", threads: int = 2, device: str = "cpu",
                  data_root: Optional[str] = None, progress: bool = True) -> list[dict]:
    """Runs the check set through ``bench.runner.run`` into a scratch results folder."""
    from bench.runner import RunOptions, run

    records = []
    with tempfile.TemporaryDirectory(prefix="bench-check-") as scratch:
        for method, ops in CHECK_SET:
            opts = RunOptions(method=method, dataset=DATASET, ops=ops, steps=STEPS, limit=IMAGES,
                              timing_images=TIMING_IMAGES, repeats=REPEATS, checkpoints=checkpoints,
                              results=scratch, threads=threads, device=device, data_root=data_root,
                              progress=progress)
            records += run(opts)
    return records


def write_reference(records: list[dict], results: str = "results") -> Path:
    """Replaces the reference with ``records`` in one atomic step."""
    return ResultsStore(reference_path(results).parent).rewrite(DATASET, records)

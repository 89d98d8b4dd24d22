"""Intervals in the report (recomputed from stored per-image statistics), the seed
aggregation table and the iso-budget table."""
import numpy as np
import pandas as pd
import pytest

from bench import per_image, stats
from bench.report import csv_frame, markdown, report, table
from bench.report.build import seeds_report
from bench.report.intervals import Resamples, family, seed_rows, with_intervals
from bench.report.iso_budget import iso_budget_report
from bench.results import ResultsStore

IMAGES, CLASSES = 30, 3


def counts(accuracy: float, seed: int):
    """Per-image (intersection, union) of a prediction right on about ``accuracy`` of the pixels."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, CLASSES, size=(IMAGES, 64))
    right = rng.random((IMAGES, 64)) < accuracy
    pred = np.where(right, label, (label + 1) % CLASSES)
    inter = np.stack([[(pred[i] == c) & (label[i] == c) for c in range(CLASSES)] for i in range(IMAGES)]).sum(-1)
    union = np.stack([[(pred[i] == c) | (label[i] == c) for c in range(CLASSES)] for i in range(IMAGES)]).sum(-1)
    return inter, union


def record(method, knobs, ratio, accuracy, seed=0, speedup=None):
    inter, union = counts(accuracy, seed=hash((method, str(knobs), seed)) % 1000)
    miou = float(stats.miou_from_counts(inter.sum(0), union.sum(0)))
    checkpoint = f"{method}{seed}" if method not in ("baseline", "static") else f"base{seed}"
    return {"schema_version": 1, "method": method, "knobs": knobs, "dataset": "toy", "split": "val",
            "checkpoint": checkpoint, "baseline_checkpoint": f"base{seed}", "images": IMAGES, "seed": seed,
            "model": "tiny", "train": {"steps": 10}, "miou": miou, "miou_delta": 0.0,
            **({"control_checkpoint": f"baseline-ft{seed}"} if method in ("baseline-ft", "shallow", "paumer") else {}),
            "gflops": {"mean": 2.0 * ratio}, "gflops_ratio": ratio, "baseline_gflops": 2.0,
            "speed": {"1": {"speedup": speedup or 1 / ratio}, "8": {"speedup": speedup or 1 / ratio}}}, (inter, union)


CURVES = [("baseline", {}, 1.0, 0.80), ("baseline-ft", {}, 1.0, 0.85), ("shallow", {"depth": 2}, 0.4, 0.70),
          ("shallow", {"depth": 4}, 0.7, 0.80), ("static", {"scale": 0.5}, 0.3, 0.5),
          ("paumer", {"tau": 0.1}, 0.9, 0.84), ("paumer", {"tau": 0.5}, 0.6, 0.82),
          ("paumer", {"tau": 1.0}, 0.45, 0.60)]


def store(tmp_path, seeds=(0,), sidecars=True):
    res = ResultsStore(tmp_path / "res")
    stored = []
    for seed in seeds:
        for method, knobs, ratio, accuracy in CURVES:
            rec, c = record(method, knobs, ratio, accuracy, seed)
            if sidecars:
                per_image.write_counts(res.root, rec, *c)
            res.append(rec)
            stored.append((rec, c))
    return stored


def test_old_records_get_intervals_from_their_stored_statistics(tmp_path):
    stored = store(tmp_path)
    report(str(tmp_path / "res"), str(tmp_path / "out"))
    df = pd.read_csv(tmp_path / "out" / "toy.csv")
    assert {"mIoU low", "mIoU high", "ΔmIoU low", "ΔmIoU ctrl low"} <= set(df.columns)
    assert ((df["mIoU low"] < df["mIoU"]) & (df["mIoU"] < df["mIoU high"])).all()
    base = df[df["method"] == "baseline"].iloc[0]
    assert base["ΔmIoU low"] == base["ΔmIoU high"] == 0  # itself: exactly [0, 0]
    assert "mIoU ±" in (tmp_path / "out" / "toy.md").read_text()
    rec, c = next((r, c) for r, c in stored if r["method"] == "paumer")
    assert per_image.record_intervals(tmp_path / "res", rec)["miou_ci"] == stats.paired_bootstrap(c)["miou_ci"]


def tables(tmp_path):
    """What `bench report` writes for toy but its figures (slow): main table, iso-budget, seeds."""
    res = str(tmp_path / "res")
    records = with_intervals(ResultsStore(res).load("toy"), res)
    df = table(records)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "toy.md").write_text(markdown(df))
    csv_frame(df).to_csv(out / "toy.csv", index=False)
    labels = {family(r): "tiny" for r in records}
    iso_budget_report(records, "toy", out, Resamples(res), labels)
    rows = seed_rows(records, Resamples(res), labels)
    if rows:
        seeds_report(rows, "toy", out)


def test_records_without_statistics_still_report_without_intervals(tmp_path):
    store(tmp_path, sidecars=False)
    tables(tmp_path)
    assert "±" not in (tmp_path / "out" / "toy.md").read_text()
    assert "mIoU low" not in pd.read_csv(tmp_path / "out" / "toy.csv").columns
    iso = pd.read_csv(tmp_path / "out" / "toy-iso-budget.csv")
    assert iso["verdict"].fillna("").isin(["", "reference"]).all()  # no interval, no verdict


def test_iso_budget_reads_each_curve_and_is_blank_where_it_does_not_reach(tmp_path):
    stored = store(tmp_path)
    tables(tmp_path)
    iso = pd.read_csv(tmp_path / "out" / "toy-iso-budget.csv")
    paumer = iso[iso["series"] == "paumer"].set_index("budget")
    assert set(paumer.index) == {"80% GFLOPs", "67% GFLOPs", "50% GFLOPs", "1.25x b8", "1.5x b8", "2x b8"}
    miou = {r["knobs"]["tau"]: 100 * r["miou"] for r, _ in stored if r["method"] == "paumer"}
    t = (0.67 - 0.6) / (0.9 - 0.6)
    assert paumer.loc["67% GFLOPs", "mIoU"] == pytest.approx((1 - t) * miou[0.5] + t * miou[0.1], abs=1e-4)
    row = paumer.loc["67% GFLOPs"]
    assert row["mIoU low"] < row["mIoU"] < row["mIoU high"]
    assert row["reference"] == "shallow" and row["verdict"] in ("better", "worse", "within noise")
    assert "35% GFLOPs" not in paumer.index  # below its cheapest point: never extrapolated
    shallow = iso[iso["series"] == "shallow"].set_index("budget")
    assert shallow.loc["80% GFLOPs", "verdict"] == "reference"  # the line ends at the control (ratio 1.0)
    text = (tmp_path / "out" / "toy-iso-budget.md").read_text()
    assert "| best reference |" in text and (tmp_path / "out" / "toy-iso-budget.tex").exists()


def test_seeds_are_aggregated_with_their_spread(tmp_path):
    stored = store(tmp_path, seeds=(0, 1, 2))
    tables(tmp_path)
    seeds = pd.read_csv(tmp_path / "out" / "toy-seeds.csv")
    row = seeds[(seeds["method"] == "paumer") & (seeds["op"] == "tau=0.5")].iloc[0]
    values = [100 * r["miou"] for r, _ in stored if r["method"] == "paumer" and r["knobs"] == {"tau": 0.5}]
    assert row["seeds"] == "0,1,2" and row["mIoU mean"] == pytest.approx(np.mean(values), abs=1e-4)
    assert row["mIoU std"] == pytest.approx(np.std(values, ddof=1), abs=1e-4)
    assert row["mIoU low"] < row["mIoU mean"] < row["mIoU high"]
    main = pd.read_csv(tmp_path / "out" / "toy.csv")
    assert sorted(main[main["method"] == "paumer"]["seed"].unique()) == [0, 1, 2]  # per-seed rows stay
    assert "tiny, seed 1" in set(main["group"])  # each seed's group named by its seed
    iso = pd.read_csv(tmp_path / "out" / "toy-iso-budget.csv")
    assert set(iso["seeds"].astype(str)) == {"0,1,2"}

"""`bench check`: an injected regression fails and names the metric; an unchanged result
passes; `--update` writes a reference the next check passes against."""
import copy
import json

import pytest

from bench import check
from bench.cli import main
from tests.test_cli import assert_one_line_error, run_cli, toy  # noqa: F401 (fixture)


def record(method="paumer", knobs=None, miou=0.6, gflops=0.5, speedups=(1.3, 2.0), checkpoint="w1"):
    return {"schema_version": 1, "method": method, "knobs": {"tau": 0.2} if knobs is None else knobs,
            "dataset": "synthetic", "split": "val", "checkpoint": checkpoint, "miou": miou,
            "gflops": {"mean": gflops}, "speed": {"1": {"speedup": speedups[0]}, "8": {"speedup": speedups[1]}}}


def verdicts(stored, fresh):
    return {(r["point"], r["metric"]): r["verdict"] for r in check.compare(stored, fresh)}


def test_unchanged_results_pass():
    stored = [record("baseline", {}, speedups=(1.0, 1.0)), record()]
    rows = check.compare(stored, copy.deepcopy(stored))
    assert not check.failed(rows)
    assert {r["metric"] for r in rows} == {"mIoU", "GFLOPs", "speedup b1", "speedup b8"}


@pytest.mark.parametrize("change,metric", [
    ({"miou": 0.6 - 0.002}, "mIoU"),
    ({"gflops": 0.5 * 1.001}, "GFLOPs"),
    ({"speedups": (1.3, 2.0 * 0.7)}, "speedup b8"),
    ({"speedups": (0.9, 2.0)}, "speedup b1"),
])
def test_injected_regression_fails_and_names_the_metric(change, metric):
    fresh = record(**change)
    v = verdicts([record()], [fresh])
    assert v[("paumer tau=0.2", metric)] == "REGRESSION"
    assert [m for (_, m), verdict in v.items() if verdict != "ok"] == [metric]


def test_tolerances():
    v = verdicts([record()], [record(miou=0.6 + 0.01, speedups=(1.3 * 0.8, 2.0 * 1.5))])
    assert v[("paumer tau=0.2", "mIoU")] == "better"  # passes: an improvement is not a regression
    assert v[("paumer tau=0.2", "speedup b1")] == "ok"  # within the timing-noise bound
    # fewer GFLOPs is still a change: a FLOP counter that lost a term would look like this
    assert verdicts([record()], [record(gflops=0.4)])[("paumer tau=0.2", "GFLOPs")] == "CHANGED"
    # retrained on another CPU (different weights): looser, stated bounds
    other = record(miou=0.6 - 0.003, gflops=0.5 * 1.005, checkpoint="w2")
    assert not check.failed(check.compare([record()], [other]))
    assert check.failed(check.compare([record()], [record(miou=0.59, checkpoint="w2")]))


def test_missing_point_fails():
    rows = check.compare([record(), record(knobs={"tau": 0.5})], [record()])
    assert [r["point"] for r in check.failed(rows)] == ["paumer tau=0.5"]


@pytest.fixture
def small_check(monkeypatch, toy):  # noqa: F811
    monkeypatch.setattr(check, "DATASET", "toy")
    monkeypatch.setattr(check, "CHECK_SET", [("baseline", [{}]), ("tome", [{"r": 2}])])
    monkeypatch.setattr(check, "STEPS", 4)
    monkeypatch.setattr(check, "IMAGES", 4)
    monkeypatch.setattr(check, "TIMING_IMAGES", 2)
    monkeypatch.setattr(check, "REPEATS", 1)
    # a model this small times in microseconds: the speedup bound is exercised above
    monkeypatch.setattr(check, "SAME_WEIGHTS", check.Tolerance(1e-4, 1e-9, speedup_rel=1.0))


def test_update_then_check_end_to_end(capsys, tmp_path, small_check, monkeypatch):
    args = ["--results", str(tmp_path / "res"), "--checkpoints", str(tmp_path / "ck"), "--quiet"]
    code, _, err = run_cli(capsys, "check", *args)
    assert_one_line_error(code, err, "no reference", "bench check --update")

    main(["check", "--update", *args])
    ref = tmp_path / "res" / "check" / "toy.jsonl"
    stored = [json.loads(l) for l in ref.read_text().splitlines()]
    assert [(r["method"], r["knobs"]) for r in stored] == [("baseline", {}), ("tome", {"r": 2})]
    assert "reference rewritten" in capsys.readouterr().out

    main(["check", *args])  # same deterministic training and evaluation: passes
    assert "bench check passed" in capsys.readouterr().out
    assert ref.read_text().splitlines() == [json.dumps(r) for r in stored]  # a check never writes

    worse = copy.deepcopy(stored)
    worse[1]["gflops"]["mean"] *= 1.5
    monkeypatch.setattr(check, "fresh_records", lambda **_: worse)
    code, out, err = run_cli(capsys, "check", *args)
    assert code == 1 and "Traceback" not in err
    assert "tome r=2: GFLOPs" in err and "REGRESSION" in out


def test_a_point_measured_under_other_settings_is_not_compared():
    # e.g. `bench check` on a GPU against a CPU reference, or another image count
    stored = record() | {"device": "cpu", "images": 48}
    rows = check.compare([stored], [record() | {"device": "cuda:0", "images": 48}])
    assert [(r["metric"], r["verdict"]) for r in rows] == [("settings", "CHANGED")]
    assert rows[0]["fresh"] == 'device "cpu" -> "cuda"'
    assert not check.failed(check.compare([stored], [record() | {"device": "cpu", "images": 48}]))


def test_a_stored_interval_sets_the_tolerance_of_retrained_weights_and_says_so():
    ref = record() | {"miou_ci": [0.6 - 0.02, 0.6 + 0.02]}
    rows = check.compare([ref], [record(miou=0.6 - 0.015, checkpoint="w2")])
    miou = next(r for r in rows if r["metric"] == "mIoU")
    assert miou["verdict"] == "ok" and "stored 95% interval" in miou["tolerance"]
    assert check.failed(check.compare([ref], [record(miou=0.6 - 0.025, checkpoint="w2")]))
    # the same weights cannot move: the interval does not loosen their bound
    assert check.failed(check.compare([ref], [record(miou=0.6 - 0.015)]))

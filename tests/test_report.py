import pandas as pd
import pytest

from bench.errors import BenchError
from bench.report import pareto_front, report


def test_pareto_front_marks_dominated_points_and_keeps_ties():
    cost = pd.Series([1.0, 2.0, 2.0, 3.0, 3.0, 4.0])
    quality = pd.Series([50.0, 60.0, 60.0, 55.0, 70.0, 70.0])
    assert pareto_front(cost, quality).tolist() == [True, True, True, False, True, False]


def record(method, knobs, miou, gflops):
    return {"schema_version": 1, "method": method, "knobs": knobs, "dataset": "toy", "split": "val",
            "checkpoint": "c", "miou": miou, "miou_delta": miou - 0.6, "gflops": {"mean": gflops},
            "gflops_ratio": gflops / 2.0, "speed": {"1": {"throughput": 10 / gflops, "speedup": 2.0 / gflops,
                                                          "latency_ms": {"p50": 1.0, "p90": 2.0}}}}


def test_report_is_deterministic_and_skips_corrupt_lines(tmp_path, capsys):
    from bench.results import ResultsStore

    store = ResultsStore(tmp_path / "res")
    store.append(record("baseline", {}, 0.6, 2.0))
    store.append(record("paumer", {"tau": 0.2}, 0.59, 1.2) | {"tokens_per_block": [1.0, 0.4]})
    with open(tmp_path / "res" / "toy.jsonl", "a") as f:
        f.write("{broken\n")
    report(str(tmp_path / "res"), str(tmp_path / "a"))
    report(str(tmp_path / "res"), str(tmp_path / "b"))
    for name in ("toy.md", "toy.csv", "toy-tradeoff.svg", "toy-tokens-per-block.svg"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "toy.jsonl:3" in capsys.readouterr().out
    assert (tmp_path / "a" / "toy-tradeoff.png").exists()


def test_report_on_empty_results_is_a_clear_error(tmp_path):
    with pytest.raises(BenchError, match="no result records"):
        report(str(tmp_path / "nothing"), str(tmp_path / "out"))


def test_report_index_tokens_figure_and_skipped_datasets(tmp_path, capsys):
    from bench.results import ResultsStore

    store = ResultsStore(tmp_path / "res")
    store.append(record("baseline", {}, 0.6, 2.0) | {"tokens_per_block": [1.0, 1.0]})
    store.append(record("paumer", {"tau": 0.2}, 0.59, 1.2) | {"tokens_per_block": [1.0, 0.4]})
    store.append(record("baseline", {}, 0.5, 2.0) | {"dataset": "cityscapes"})  # drawn with the seed point
    (tmp_path / "res" / "figures").mkdir()
    (tmp_path / "res" / "figures" / "toy-paumer-compute-maps.png").write_bytes(b"png")
    written = report(str(tmp_path / "res"), str(tmp_path / "out"))
    names = {p.name for p in written}
    assert {"toy-tokens-per-block.png", "toy-paumer-compute-maps.png", "cityscapes-tradeoff.svg",
            "README.md"} <= names
    assert "cityscapes-tokens-per-block.png" not in names  # no dynamic method there
    index = (tmp_path / "out" / "README.md").read_text()
    assert "[toy.md](toy.md)" in index and "[toy-paumer-compute-maps.png]" in index
    assert "No records for synthetic, ade20k, idd-lite, folder: skipped." in index
    assert "skipped" in capsys.readouterr().out


def test_series_splits_a_method_by_the_knobs_its_sweep_does_not_vary():
    from bench.report import series

    assert series("paumer", {"tau": 0.2}) == "paumer"
    assert series("paumer", {"tau": 0.2, "batching": "packed"}) == "paumer batching=packed"
    assert series("early-exit", {"mode": "image", "threshold": 0.9}) == "early-exit mode=image"
    assert series("someone-elses", {"k": 1}) == "someone-elses k=1"

import json

import pytest
import torch

from bench.errors import BenchError
from bench.results import record_identity
from bench.speed import SpeedOptions, run_speed
from methods.paumer import PaumerModel, PaumerPolicy, scheduled_selection


def test_scheduled_selection_keeps_the_declared_share_per_image_spread_across_the_batch():
    scores = torch.rand(3, 20, generator=torch.Generator().manual_seed(0))
    leave = scheduled_selection(scores, None, stay=0.5, grid_tokens=20, spread=0.2)
    assert (20 - leave.sum(1)).tolist() == [6, 10, 14]  # 0.3, 0.5, 0.7 of the grid stay
    # the leaving tokens are each image's lowest scores
    for b in range(3):
        k = int(leave[b].sum())
        assert set(scores[b].argsort()[:k].tolist()) == set(leave[b].nonzero().flatten().tolist())


def test_paumer_schedule_criterion_drives_a_real_ragged_forward(small_model):
    model = PaumerModel(small_model, layers=[1, 2]).eval()
    policy = PaumerPolicy(model.pausing, criterion="schedule", stay=[0.75, 0.5], spread=0.25, batching="packed")
    with torch.inference_mode():
        _, state = model.segmenter.forward_state(torch.randn(2, 3, 32, 32), policy)
    # 16 tokens: image 0 keeps 0.5 then 0.25, image 1 keeps 1.0 then 0.75 of the grid
    assert state.trace.tokens.tolist() == [[16, 8, 4, 4], [16, 16, 12, 12]]
    with pytest.raises(ValueError, match="one fraction"):
        PaumerPolicy(model.pausing, criterion="schedule", stay=[0.5])


def test_bench_speed_writes_one_record_per_method_with_flops_and_speedups(tmp_path):
    opts = SpeedOptions(model="tiny", size=32, batch_sizes=[1, 2], methods=["paumer", "tome", "static"],
                        timing_images=2, warmup=0, repeats=1, results=str(tmp_path))
    records = run_speed(opts)
    assert [r["method"] for r in records] == ["baseline", "paumer", "tome", "static"]
    by = {r["method"]: r for r in records}
    assert by["baseline"]["gflops_ratio"] == 1.0 and by["paumer"]["gflops_ratio"] < 1.0
    assert by["static"]["gflops_ratio"] < 0.7 and by["paumer"]["schedule"]["criterion"] == "schedule"
    assert set(by["tome"]["speed"]) == {"1", "2"} and by["baseline"]["speed"]["1"]["speedup"] == 1.0
    stored = [json.loads(line) for line in (tmp_path / "speed.jsonl").read_text().splitlines()]
    assert len(stored) == 4
    # size, model and compile are part of the identity: a 64-pixel run is another record
    other = dict(stored[1], eval=dict(stored[1]["eval"], size=64))
    assert record_identity(other) != record_identity(stored[1])
    assert record_identity(dict(stored[1], compile=True)) != record_identity(stored[1])
    run_speed(opts)  # timed again: replaced, not appended
    assert len((tmp_path / "speed.jsonl").read_text().splitlines()) == 4


def test_bench_speed_refuses_sizes_that_do_not_fit_the_patch(tmp_path):
    with pytest.raises(BenchError, match="multiple of the patch"):
        run_speed(SpeedOptions(model="tiny", size=30, methods=[], timing_images=1, results=str(tmp_path)))
    with pytest.raises(BenchError, match="bench speed times a registered method .*algm.*; got 'algmx'"):
        run_speed(SpeedOptions(model="tiny", size=32, methods=["algmx"], timing_images=1, results=str(tmp_path)))


def test_every_registered_method_is_timed_at_its_ops_or_its_sweep(tmp_path, capsys):
    from bench.cli import main

    args = ["speed", "--model", "tiny", "--size", "32", "--batch-size", "2", "--method", "algm,algm-ft,shallow",
            "--op", "algm:threshold=-1.0", "--op", "algm-ft:threshold=1.01", "--op", "shallow:depth=2",
            "--timing-images", "2", "--warmup", "0", "--repeats", "1", "--results", str(tmp_path)]
    main(args)
    assert "--repeats 1 times each method once: its speedups are noise" in capsys.readouterr().err
    by = {r["method"]: r for r in map(json.loads, (tmp_path / "speed.jsonl").read_text().splitlines())}
    assert set(by) == {"baseline", "algm", "algm-ft", "shallow"}
    # merging every window computes fewer tokens than merging none (its global merge only)
    assert by["algm"]["gflops_ratio"] < 0.5 < by["algm-ft"]["gflops_ratio"]
    assert by["shallow"]["knobs"] == {"depth": 2} and by["shallow"]["gflops_ratio"] < 0.5
    assert by["baseline"]["tokens_per_block"] == [1.0] * 6  # the baseline kept its blocks
    with pytest.raises(SystemExit) as exit_:  # a forced method's points come from its own options
        main(["speed", "--model", "tiny", "--size", "32", "--method", "tome", "--op", "tome:r=2",
              "--results", str(tmp_path)])
    assert exit_.value.code == 2 and "its own options, not --op" in capsys.readouterr().err


def test_report_tabulates_and_plots_speed_records(tmp_path):
    from bench.report import report

    run_speed(SpeedOptions(model="tiny", size=32, batch_sizes=[1], methods=["static"], timing_images=1,
                           warmup=0, repeats=1, results=str(tmp_path / "res")))
    written = {p.name for p in report(str(tmp_path / "res"), str(tmp_path / "rep"))}
    assert {"speed.md", "speed.csv", "speed-speedup.png"} <= written
    text = (tmp_path / "rep" / "speed.md").read_text()
    rows = [line for line in text.splitlines() if "| static | scale=0.75 | 1 |" in line]
    assert len(rows) == 1 and "| baseline | - | 1 |" in text
    summary = text.split("Every record")[0]  # one row per operating point, batch sizes side by side
    assert "| speedup b1 | realised b1 |" in summary and summary.count("| static | scale=0.75 |") == 1


def test_several_operating_points_are_timed_against_one_baseline(tmp_path):
    from click.testing import CliRunner

    from bench.cli import cli

    args = ["speed", "--model", "tiny", "--size", "64", "--batch-size", "2", "--method", "paumer,tome,static",
            "--stay", "0.75,0.5,0.25", "--stay", "0.5,0.3,0.2", "--batching", "pad,packed", "--tome-r", "2,4",
            "--scale", "0.5,0.75", "--timing-images", "2", "--warmup", "0", "--repeats", "1",
            "--results", str(tmp_path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    stored = [json.loads(line) for line in (tmp_path / "speed.jsonl").read_text().splitlines()]
    methods = [r["method"] for r in stored]
    assert methods.count("baseline") == 1 and methods.count("paumer") == 4  # 2 schedules x 2 batchings
    assert methods.count("tome") == 2 and methods.count("static") == 2
    assert len({json.dumps(record_identity(r), sort_keys=True) for r in stored}) == len(stored)
    deeper = [r for r in stored if r["method"] == "paumer" and r["knobs"]["stay"] == [0.5, 0.3, 0.2]]
    lighter = [r for r in stored if r["method"] == "paumer" and r["knobs"]["stay"] == [0.75, 0.5, 0.25]]
    assert max(r["gflops_ratio"] for r in deeper) < min(r["gflops_ratio"] for r in lighter)
    with pytest.raises(BenchError, match="--batching takes pad, packed"):
        cli.main(args=args + ["--batching", "pad,padded"], standalone_mode=False)


def test_dtop_takes_the_schedules_of_its_own_length_and_else_its_default():
    from bench.speed import build_runs
    from methods import paumer
    from methods.segmenter import build_model

    model = build_model(10, "tiny").eval()  # 6 blocks: PAUMER pauses after 3 layers, DToP prunes after 2
    three, two = [0.75, 0.575, 0.4], [0.6, 0.3]
    runs = build_runs(SpeedOptions(model="tiny", size=64, methods=["paumer", "dtop"], stay=[three]), model)
    dtop_stays = [policy.stay for name, _, policy, _, _ in runs.values() if name == "dtop"]
    assert dtop_stays == [paumer.default_stay(2)]  # a 3-layer schedule is PAUMER's, not DToP's
    runs = build_runs(SpeedOptions(model="tiny", size=64, methods=["dtop"], stay=[two]), model)
    assert [policy.stay for name, _, policy, _, _ in runs.values() if name == "dtop"] == [two]

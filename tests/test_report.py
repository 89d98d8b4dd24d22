import pandas as pd
import pytest
import torch

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


# ---- issue 16 (reports) and the report side of issue 13 -------------------------------------

import json  # noqa: E402

from bench.report import csv_frame, latex, markdown, table, tradeoff_figure  # noqa: E402


def full_record(method, knobs, miou, gflops, baseline="b1", **extra):
    """A record as `bench run` stores it today (two batch sizes, provenance)."""
    speed = {"1": {"throughput": 10 / gflops, "speedup": 2.0 / gflops, "latency_ms": {"p50": 1.0, "p90": 2.0}},
             "8": {"throughput": 40 / gflops, "speedup": 2.2 / gflops}}
    return {"schema_version": 1, "method": method, "knobs": knobs, "dataset": "toy", "split": "val",
            "checkpoint": baseline if method in ("baseline", "static", "tome") else f"{method}-{baseline}",
            "baseline_checkpoint": baseline, "model": "tiny", "decoder": "linear", "miou": miou,
            "miou_delta": miou - 0.6, "gflops": {"mean": gflops}, "gflops_ratio": gflops / 2.0, "speed": speed,
            "batch_sizes": [1, 8], "images": 10, "device_name": "cpu-x", "dtype": "float32", "threads": 2,
            "git_commit": "abc1234", "train": {"steps": 10, "config_hash": f"h-{method}-{baseline}"}, **extra}


def store(tmp_path, records, raw_lines=()):
    from bench.results import ResultsStore

    s = ResultsStore(tmp_path / "res")
    for r in records:
        s.append(r)
    with open(tmp_path / "res" / "toy.jsonl", "a") as f:
        for line in raw_lines:
            f.write(line + "\n")
    return str(tmp_path / "res")


def test_report_skips_an_incomplete_record_names_its_line_and_exits_0(tmp_path):
    from click.testing import CliRunner

    from bench.cli import cli

    no_miou = {k: v for k, v in full_record("paumer", {"tau": 0.3}, 0.5, 1.0).items() if k != "miou"}
    no_speed = {k: v for k, v in full_record("paumer", {"tau": 0.4}, 0.5, 1.0).items() if k != "speed"}
    bad_type = full_record("paumer", {"tau": 0.5}, 0.5, 1.0) | {"miou": "0.5"}
    res = store(tmp_path, [full_record("baseline", {}, 0.6, 2.0), full_record("paumer", {"tau": 0.2}, 0.59, 1.2),
                           no_miou, no_speed, bad_type])
    out = CliRunner().invoke(cli, ["report", "--results", res, "--out", str(tmp_path / "out"),
                                   "--checkpoints", str(tmp_path / "ck")])
    assert out.exit_code == 0, out.output
    assert "toy.jsonl:3: lacks field 'miou'" in out.output
    assert "toy.jsonl:4: lacks field 'speed'" in out.output
    assert "toy.jsonl:5: field 'miou' is a string, expected a number" in out.output
    md = (tmp_path / "out" / "toy.md").read_text()
    assert "tau=0.2" in md and "tau=0.3" not in md and "tau=0.5" not in md


def test_records_of_two_baselines_are_two_labelled_groups_with_their_own_pareto_fronts(tmp_path):
    records = [full_record("baseline", {}, 0.60, 2.0, baseline="deep", depth=2),
               full_record("paumer", {"tau": 0.2}, 0.58, 1.5, baseline="deep", depth=2),
               full_record("baseline", {}, 0.61, 1.0, baseline="shallow", depth=1),
               full_record("paumer", {"tau": 0.2}, 0.45, 0.8, baseline="shallow", depth=1)]
    df = table(records)
    assert sorted(df["group"].unique()) == ["tiny, linear decoder, depth 1", "tiny, linear decoder, depth 2"]
    # one front over both groups would drop every deep point (the other baseline is cheaper and better)
    assert df["pareto"].all()
    md = markdown(df)
    assert md.count("### tiny, linear decoder, depth") == 2
    assert md.count("| baseline | - |") == 2
    # without a depth field, the checkpoint tells the groups apart
    for r in records:
        del r["depth"]
    assert set(table(records)["group"]) == {"tiny, linear decoder, baseline deep",
                                            "tiny, linear decoder, baseline shallow"}
    written = {p.name for p in report(store(tmp_path, records), str(tmp_path / "out"), checkpoints=str(tmp_path))}
    assert {"toy-tiny-linear-deep-tradeoff.png", "toy-tiny-linear-shallow-tradeoff.png"} <= written


def test_every_stored_batch_size_is_tabulated_and_plotted():
    from bench.report import figure_style

    records = [full_record("baseline", {}, 0.6, 2.0), full_record("paumer", {"tau": 0.2}, 0.59, 1.2)]
    records[1]["speed"]["32"] = {"throughput": 99.0, "speedup": 1.7}
    df = table(records)
    md = markdown(df)
    header = md.splitlines()[0]
    for bs in (1, 8, 32):
        assert f"img/s b{bs}" in header and f"speedup b{bs}" in header
    assert "| 99.0 | 1.70x |" in md
    assert "speedup b32" in csv_frame(df).columns
    with figure_style() as plt:
        fig = tradeoff_figure(df, "toy")
        labels = [ax.get_xlabel() for ax in fig.axes if ax.get_visible() and ax.get_xlabel()]
        plt.close(fig)
    assert [l for l in labels if l.startswith("speedup")] == [f"speedup at batch {bs} (same run)" for bs in (1, 8, 32)]


def test_csv_has_a_column_per_knob_and_provenance_and_latex_is_booktabs():
    old = full_record("paumer", {"tau": 0.2, "batching": "packed"}, 0.59, 1.2)
    new = full_record("paumer", {"tau": 0.5}, 0.55, 1.0, precision="bfloat16")
    df = table([full_record("baseline", {}, 0.6, 2.0), old, new])
    csv = csv_frame(df)
    for column in ("method", "op", "tau", "batching", "model", "device_name", "precision", "images", "git_commit",
                   "speedup b1 p25", "speedup b1 p75", "ΔmIoU ctrl", "group", "baseline_checkpoint"):
        assert column in csv.columns, column
    rows = csv.set_index("op")
    packed = rows.loc["batching=packed tau=0.2"]
    assert packed["tau"] == 0.2 and packed["batching"] == "packed"
    assert rows.loc["tau=0.5", "precision"] == "bf16"  # named as --precision names it
    assert rows.loc["batching=packed tau=0.2", "precision"] == "fp32"  # old record: its dtype, "float32"
    tex = latex(df)
    assert tex.count(r"\toprule") == 1 and tex.count(r"\bottomrule") == 1 and r"\begin{tabular}{ll" in tex
    assert r"$\Delta$mIoU" in tex and r"$\Delta$GFLOPs (\%)" in tex and r"$\times$" in tex
    assert "$-$" in tex and "\\$" not in tex  # negative deltas typeset as a minus, not escaped
    assert len(tex.splitlines()[3].split(" & ")) == len(markdown(df).splitlines()[0].strip("| ").split(" | "))


def test_latex_escapes_text_and_heads_each_group():
    records = [full_record("baseline", {}, 0.6, 2.0, baseline="a"), full_record("baseline", {}, 0.5, 1.0, baseline="b"),
               full_record("my_method", {"k_1": "a&b"}, 0.5, 1.0, baseline="a")]
    tex = latex(table(records))
    assert r"my\_method" in tex and r"k\_1=a\&b" in tex
    assert tex.count(r"\multicolumn") == 2


def test_null_numbers_read_as_nan(tmp_path):
    r = full_record("paumer", {"tau": 0.2}, 0.59, 1.2, per_class_iou={"a": 0.5, "b": None})
    r["speed"]["8"]["speedup"] = None
    res = store(tmp_path, [full_record("baseline", {}, 0.6, 2.0, per_class_iou={"a": 0.7, "b": 0.1}), r])
    report(res, str(tmp_path / "out"), checkpoints=str(tmp_path))
    per_class = pd.read_csv(tmp_path / "out" / "toy-per-class.csv").set_index("method")
    assert per_class.loc["paumer", "a"] == 50.0 and pd.isna(per_class.loc["paumer", "b"])
    assert "| paumer | tau=0.2 |" in (tmp_path / "out" / "toy.md").read_text()


def test_control_and_shallow_references(tmp_path):
    ctrl = dict(control_checkpoint="ft", control_miou=0.65, miou_delta_control=-0.02)
    records = [full_record("baseline", {}, 0.60, 2.0), full_record("baseline-ft", {}, 0.65, 2.0),
               full_record("paumer", {"tau": 0.2}, 0.63, 1.2, **ctrl),
               full_record("paumer", {"tau": 0.0}, 0.64, 2.0, **ctrl | {"miou_delta_control": -0.01}),
               full_record("shallow", {"depth": 1}, 0.40, 0.8), full_record("shallow", {"depth": 2}, 0.50, 1.2)]
    df = table(records)
    md = markdown(df)
    assert "ΔmIoU ctrl" in md.splitlines()[0] and "| -2.00 |" in md
    assert not df[df["op"] == "depth=2"]["pareto"].any()  # paumer tau=0.2: same cost, better
    # the control is on the front and pushes the baseline (same cost, lower mIoU) off it
    assert df[df["method"] == "baseline-ft"]["pareto"].all() and not df[df["method"] == "baseline"]["pareto"].any()
    assert not df[(df["method"] == "paumer") & (df["op"] == "tau=0.0")]["pareto"].any()
    assert set(df[df["method"] == "shallow"]["series"]) == {"shallow"}  # one line, not one per depth
    from bench.report import figure_style

    with figure_style() as plt:
        fig = tradeoff_figure(df, "toy")
        lines = {l.get_label(): l for l in fig.axes[0].get_lines()}
        plt.close(fig)
    assert lines["baseline-ft (control)"].get_marker() != lines["baseline"].get_marker()
    assert lines["shallow"].get_linestyle() == "--" and list(lines["shallow"].get_xdata()) == [0.8, 1.2]
    # records without the control fields: no control column
    assert "ctrl" not in markdown(table(records[:1] + records[4:])).splitlines()[0]


def test_speedup_panels_join_points_in_knob_order_with_iqr_error_bars():
    from bench.report import figure_style

    records = [full_record("baseline", {}, 0.6, 2.0)]
    for tau, speedup in ((0.1, 1.3), (0.2, 1.2), (0.3, 1.5)):  # noisy: 0.2 reads slower than 0.1
        r = full_record("paumer", {"tau": tau}, 0.6 - tau / 10, 2.0 - tau)
        r["speed"]["1"].update(speedup=speedup, speedup_iqr=[speedup - 0.05, speedup + 0.1])
        records.append(r)
    records[1]["speed"]["1"].pop("speedup_iqr")  # older records have none: no bar
    with figure_style() as plt:
        fig = tradeoff_figure(table(records), "toy")
        ax = fig.axes[1]
        line = next(l for l in ax.get_lines() if l.get_label() == "paumer")
        bars = [c for c in ax.containers if c.has_xerr]
        segments = [s for c in bars for s in c.lines[2][0].get_segments()]
        plt.close(fig)
    assert list(line.get_xdata()) == [1.3, 1.2, 1.5]
    assert sorted((round(s[0][0], 6), round(s[1][0], 6)) for s in segments) == [(1.15, 1.3), (1.45, 1.6)]


def test_figure_widths_and_fonts_fit_a_paper():
    import matplotlib.text

    from bench.report import figure_style, tokens_figure

    records = [full_record("baseline", {}, 0.6, 2.0, tokens_per_block=[1.0, 1.0]),
               full_record("paumer", {"tau": 0.2}, 0.59, 1.2, tokens_per_block=[1.0, 0.4])]
    for width, inches in (("column", 3.3), ("text", 7.0)):
        with figure_style() as plt:
            for fig in (tradeoff_figure(table(records), "toy", width), tokens_figure(records, width)):
                fig.canvas.draw()
                assert fig.get_size_inches()[0] == pytest.approx(inches)
                texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]
                sizes = [t.get_fontsize() for t in texts]
                assert sizes and min(sizes) >= 7
                plt.close(fig)


def test_figures_land_as_png_svg_and_pdf_deterministically(tmp_path):
    res = store(tmp_path, [full_record("baseline", {}, 0.6, 2.0),
                           full_record("paumer", {"tau": 0.2}, 0.59, 1.2, tokens_per_block=[1.0, 0.4])])
    report(res, str(tmp_path / "a"), width="column", checkpoints=str(tmp_path))
    report(res, str(tmp_path / "b"), width="column", checkpoints=str(tmp_path))
    for stem in ("toy-tradeoff", "toy-tokens-per-block"):
        for ext in ("png", "svg", "pdf"):
            a, b = (tmp_path / d / f"{stem}.{ext}" for d in "ab")
            assert a.read_bytes() == b.read_bytes(), a.name
    assert (tmp_path / "a" / "toy-tradeoff.pdf").read_bytes().startswith(b"%PDF")
    assert b"CreationDate" not in (tmp_path / "a" / "toy-tradeoff.pdf").read_bytes()
    for name in ("toy.tex", "toy.csv", "toy.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_failed_write_leaves_the_previous_files_and_no_partial_one(tmp_path, monkeypatch):
    import matplotlib.figure

    res = store(tmp_path, [full_record("baseline", {}, 0.6, 2.0)])
    out = tmp_path / "out"
    report(res, str(out), checkpoints=str(tmp_path))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_savefig(self, f, **kwargs):
        f.write(b"half a figure")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(BenchError, match="disk full"):  # one line (atomic_write), no partial file
        report(res, str(out), checkpoints=str(tmp_path))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_training_curves_are_drawn_from_the_logs_next_to_the_checkpoints(tmp_path, capsys):
    records = [full_record("baseline", {}, 0.6, 2.0), full_record("paumer", {"tau": 0.2}, 0.59, 1.2)]
    res = store(tmp_path, records)
    written = {p.name for p in report(res, str(tmp_path / "out"), checkpoints=str(tmp_path / "ck"))}
    assert "toy-training.png" not in written
    assert capsys.readouterr().out.count("no training logs") == 1
    logs = tmp_path / "ck" / "toy"
    logs.mkdir(parents=True)
    lines = [{"step": s, "loss": 2.0 / s, "lr": 1e-3, "step_time_s": 0.1} for s in (1, 2, 3)]
    (logs / "baseline-tiny-h-baseline-b1.log.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    (logs / "paumer-tiny-h-paumer-b1.log.jsonl").write_text(json.dumps(lines[0]) + "\n{cut off")
    torch.save({"weights": "paumer-b1"}, logs / "paumer-tiny-h-paumer-b1.pt")
    torch.save({"weights": "b1"}, logs / "baseline-tiny-h-baseline-b1.pt")
    written = {p.name for p in report(res, str(tmp_path / "out"), checkpoints=str(tmp_path / "ck"))}
    assert {"toy-training.png", "toy-training.svg", "toy-training.pdf"} <= written
    from bench.report import group_labels, read_training_log, training_logs

    found = training_logs(records, tmp_path / "ck", group_labels(records))
    assert [label for label, _ in found] == ["baseline", "paumer"]
    assert read_training_log(found[1][1])["step"].tolist() == [1]  # the cut-off line is left out
    # the same configuration trained elsewhere has other weights: its log is not this row's
    torch.save({"weights": "other"}, logs / "paumer-tiny-h-paumer-b1.pt")
    assert [label for label, _ in training_logs(records, tmp_path / "ck", group_labels(records))] == ["baseline"]


def test_resumed_training_log_keeps_the_last_entry_of_a_step(tmp_path):
    from bench.report import read_training_log

    path = tmp_path / "x.log.jsonl"
    path.write_text("\n".join(json.dumps({"step": s, "loss": l}) for s, l in ((1, 3.0), (2, 2.0), (2, 1.5), (3, 1.0))))
    assert read_training_log(path).values.tolist() == [[1, 3.0], [2, 1.5], [3, 1.0]]


def test_width_must_be_column_or_text(tmp_path):
    res = store(tmp_path, [full_record("baseline", {}, 0.6, 2.0)])
    with pytest.raises(BenchError, match="expected one of: column, text"):
        report(res, str(tmp_path / "out"), width="wide")


def test_training_curves_of_one_method_with_several_checkpoints_are_told_apart(tmp_path):
    from bench.report import group_labels, training_logs

    records = [dict(full_record("shallow", {"depth": d}, 0.6, d / 3), checkpoint=f"s{d}",
                    train={"steps": 10, "config_hash": f"h{d}"}) for d in (2, 3)]
    logs = tmp_path / "ck" / "toy"
    logs.mkdir(parents=True)
    for d in (2, 3):
        (logs / f"shallow-tiny-h{d}.log.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
        torch.save({"weights": f"s{d}"}, logs / f"shallow-tiny-h{d}.pt")
    found = training_logs(records, tmp_path / "ck", group_labels(records))
    assert [label for label, _ in found] == ["shallow depth=2", "shallow depth=3"]


def study_record(depth, steps, miou, **study):
    """A record as scripts/depth_study.py stores it: accuracy, no timing."""
    return {"schema_version": 1, "method": "baseline", "knobs": {}, "dataset": "toy", "split": "val",
            "checkpoint": f"c{depth}-{steps}", "baseline_checkpoint": f"c{depth}-{steps}", "model": "tiny",
            "miou": miou, "gflops": {"mean": 0.1 * depth}, "git_commit": "abc1234",
            "train": {"steps": steps, "config_hash": f"h{depth}-{steps}", "seconds": steps // 10},
            "study": {"depth": depth, "steps": steps, "lr": 0.001, **study}}


def test_depth_study_records_get_their_own_table_and_figure(tmp_path, capsys):
    records = [study_record(6, 100, 0.40), study_record(2, 100, 0.41),
               study_record(6, 400, 0.50), study_record(2, 400, 0.45)]
    report(store(tmp_path, records), str(tmp_path / "out"))
    assert "warning" not in capsys.readouterr().out  # study records are not incomplete runs
    table = pd.read_csv(tmp_path / "out" / "toy-depth-study.csv")
    assert table["steps"].tolist() == [100, 400]
    assert table["gap d6-d2"].round(6).tolist() == [-1.0, 5.0]  # the deeper model's lead, in points
    assert (tmp_path / "out" / "toy-depth-study.png").exists()
    assert "toy-depth-study.md" in (tmp_path / "out" / "README.md").read_text()
    assert not (tmp_path / "out" / "toy.md").exists()  # no ordinary rows: no trade-off table

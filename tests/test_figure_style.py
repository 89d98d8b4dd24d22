"""One palette: every figure draws a method in the colour (and marker) that
bench.report.style gives it, whichever figure and whichever other methods are there."""
import json

import pytest
from matplotlib.colors import to_hex

from bench.report import figure_style, table, tokens_figure, tradeoff_figure
from bench.report.speed import speed_figure, speed_table
from bench.report.style import METHOD_COLORS, context_line, full_depth_color, method_color, series_style
from bench.report.training import training_figure


def rec(method, knobs, miou, gflops, **over):
    r = {"schema_version": 1, "method": method, "knobs": knobs, "dataset": "toy", "split": "val", "checkpoint": "c",
         "baseline_checkpoint": "b", "model": "tiny", "decoder": "linear", "device": "cpu", "device_name": "CPU X",
         "threads": 2, "precision": "fp32", "miou": miou, "miou_delta": miou - 0.6, "gflops": {"mean": gflops},
         "gflops_ratio": gflops / 2.0, "tokens_per_block": [1.0, 1.0 if method == "baseline" else gflops / 2.0],
         "speed": {"1": {"throughput": 10 / gflops, "speedup": 2.0 / gflops}}}
    r.update(over)
    return r


def records(methods):
    out = [rec("baseline", {}, 0.6, 2.0)]
    for i, m in enumerate(methods):
        knob = {"paumer": "tau", "tome": "r", "algm": "threshold", "static": "scale", "early-exit": "threshold"}[m]
        out += [rec(m, {knob: v}, 0.58 - i / 100 - v / 100, 2.0 - v) for v in (0.2, 0.5, 0.9)]
    return out


def line_colors(fig) -> dict:
    """label -> colour of every labelled line with markers, over all panels."""
    found = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                found.setdefault(line.get_label(), set()).add(to_hex(line.get_color()))
    return found


@pytest.mark.parametrize("methods", [["paumer", "tome"], ["static", "algm", "paumer", "early-exit"]])
def test_trade_off_colours_come_from_the_palette_whatever_else_is_drawn(methods):
    with figure_style() as plt:
        fig = tradeoff_figure(table(records(methods)), "toy")
        colors = line_colors(fig)
        plt.close(fig)
    for m in methods:
        assert colors[m] == {to_hex(method_color(m))}, m
    assert colors["baseline"] == {"#000000"}


def test_every_figure_draws_a_method_in_its_palette_colour(tmp_path):
    recs = records(["paumer", "tome"])
    speed = [dict(r, dataset="speed", eval={"model": "vit_small", "decoder": "mask", "size": s}, speed={
        "1": {"throughput": 1.0, "speedup": 2.0 - r["gflops_ratio"]}}) for r in recs for s in (512, 768)]
    for r in speed:
        r["knobs"] = dict(r["knobs"], size=r["eval"]["size"])
    (tmp_path / "baseline.log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2 / s}) + "\n"
                                                          for s in range(10, 60, 10)))
    (tmp_path / "paumer.log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3 / s}) + "\n"
                                                        for s in range(10, 40, 10)))
    logs = [("baseline", tmp_path / "baseline.log.jsonl"), ("paumer", tmp_path / "paumer.log.jsonl")]
    with figure_style() as plt:
        tokens = tokens_figure(recs)
        titles = {ax.get_title(): to_hex(ax.title.get_color()) for ax in tokens.axes if ax.get_title()}
        sp = speed_figure(speed_table(speed))
        marks = [(to_hex(l.get_color()), l.get_marker()) for ax in sp.axes for l in ax.get_lines()
                 if l.get_linestyle() == "None"]
        tr = training_figure(logs)
        curves = line_colors(tr)
        xs = {l.get_label(): list(l.get_xdata()) for ax in tr.axes for l in ax.get_lines()}
        for fig in (tokens, sp, tr):
            plt.close(fig)
    assert titles == {"paumer": to_hex(method_color("paumer")), "tome": to_hex(method_color("tome"))}
    assert (to_hex(method_color("paumer")), series_style("paumer")["marker"]) in marks
    assert (to_hex(method_color("tome")), series_style("tome")["marker"]) in marks
    assert curves["paumer"] == {to_hex(method_color("paumer"))}
    assert xs["paumer"][0] == 50 + 10  # the fine-tune continues after the baseline's last logged step
    assert len(sp.axes) >= 2  # one panel per input size


def test_palette_is_fixed_distinct_and_stable_for_unknown_methods():
    built_in = [c for m, c in METHOD_COLORS.items() if m != "baseline-ft"]
    assert len(set(built_in)) == len(built_in)
    assert method_color("my-plugin") == method_color("my-plugin") not in METHOD_COLORS.values()
    packed, pad = series_style("paumer batching=packed"), series_style("paumer")
    assert packed["color"] == pad["color"] and packed["marker"] != pad["marker"]
    assert packed.get("markerfacecolor") == "white"  # hollow: it shows on top of the default variant
    assert series_style("early-exit mode=token")["marker"] == series_style("early-exit")["marker"]


def test_full_depth_colour_is_no_class_colour_and_context_names_dataset_model_machine():
    palette = [(255, 255, 255), (242, 242, 242), (0, 0, 0), (128, 64, 128)]
    assert full_depth_color(palette) not in ("#FFFFFF", "#F2F2F2", "#000000")
    line = context_line([rec("baseline", {}, 0.6, 2.0)], "toy")
    assert line == "toy · tiny (linear decoder) · CPU X, 2 threads · fp32"

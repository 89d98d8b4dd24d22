"""The kernel budget (bench.opcount): ops and host reads of one forward, counted, stored
with every timing entry of `bench speed` and `bench run`, and shown by `bench report`
as a ratio to the baseline."""
import torch

from bench.opcount import OpCounter, count_host_reads, forward_counts, parameter_count
from bench.protocol import EvalSettings, predict
from bench.speed import SpeedOptions, run_speed
from bench.timing import time_methods
from methods.encoder import Policy
from methods.paumer import PaumerModel, PaumerPolicy


def test_the_counter_counts_launching_ops_and_not_views_or_no_op_conversions():
    x = torch.ones(4, 3)
    counter = OpCounter()
    with counter:
        y = x + 1  # a kernel
        y.add_(1)  # in place: a kernel
        y[:, None].expand(4, 2, 3).reshape(8, 3)  # views, and a reshape that must copy: one kernel
        y.float()  # already float: returns y, no kernel
        y.T  # a view
    assert counter.ops == 3
    assert counter.dispatched >= 6 and counter.by_name["add"] == 1


def test_host_reads_are_counted_and_the_tensor_methods_restored():
    original = torch.Tensor.tolist
    x = torch.arange(4)
    with count_host_reads() as reads:
        x.tolist()
        int(x[0])
        x[x > 1]
        x + 1  # no read
    assert reads == ["tolist", "__int__", "__getitem__"]
    assert torch.Tensor.tolist is original


def test_pausing_adds_ops_and_host_reads_that_the_baseline_does_not_have(small_model):
    model = PaumerModel(small_model, layers=[1, 2]).eval()
    policy = PaumerPolicy(model.pausing, criterion="schedule", stay=[0.7, 0.4], spread=0.3)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        base = forward_counts(lambda: predict(small_model, Policy(), x, EvalSettings(batch_size=3)), "cpu")
        again = forward_counts(lambda: predict(small_model, Policy(), x, EvalSettings(batch_size=3)), "cpu")
        paused = forward_counts(lambda: predict(small_model, policy, x, EvalSettings(batch_size=3)), "cpu")
    assert base == again  # a property of the code path, not of timing
    assert base["host_syncs_per_forward"] == 0  # the baseline never reads the device
    assert paused["host_syncs_per_forward"] == 2  # one per pausing decision
    assert paused["ops_per_forward"] > base["ops_per_forward"] > 0
    assert parameter_count(small_model, model.pausing) == sum(p.numel() for p in model.parameters())
    assert parameter_count(small_model, small_model) == parameter_count(small_model)


def test_timing_entries_and_speed_records_carry_the_budget_and_the_report_its_ratio(small_model, tmp_path):
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    timed = time_methods({"baseline": (small_model, Policy(), 1.0)}, x, EvalSettings(), batch_size=2, warmup=0,
                         repeats=1)
    assert timed["baseline"]["ops_per_forward"] > 0 and timed["baseline"]["host_syncs_per_forward"] == 0
    records = run_speed(SpeedOptions(model="tiny", size=32, batch_sizes=[2], methods=["paumer", "static"],
                                     timing_images=2, warmup=0, repeats=1, results=str(tmp_path)))
    for r in records:
        entry = r["speed"]["2"]
        assert entry["ops_per_forward"] > 0 and "host_syncs_per_forward" in entry
        assert r["parameters"] > 0
    from bench.report.speed import speed_summary, speed_table

    df = speed_table(records)
    assert (df[df["method"] == "baseline"]["ops_ratio"] == 1.0).all()
    assert (df[df["method"] == "paumer"]["ops_ratio"] > 1.0).all()
    assert "ops x b2" in speed_summary(df).columns
    old = [{k: v for k, v in r.items()} | {"speed": {"2": {k: v for k, v in r["speed"]["2"].items()
                                                       if "ops" not in k and "syncs" not in k}}} for r in records]
    assert "ops_ratio" not in speed_table(old).columns  # records made before the budget: no column

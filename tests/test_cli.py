"""Bad input gets one line, a non-zero exit and no traceback; a tiny run end to end."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from bench import datasets
from bench.cli import main
from bench.datasets import DatasetPreset, DatasetSpec
from tests.conftest import ToyDataset


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def assert_one_line_error(code, err, *words):
    assert code not in (0, None)
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 or lines[-1].startswith("Error:"), err
    for w in words:
        assert w in err, err


def register_toy(monkeypatch, tiny):
    """Registers a 'toy' dataset and makes ``tiny`` (a ModelConfig) the `tiny` preset."""
    spec = DatasetSpec("toy", ("a", "b", "c", "d", "e"),
                       DatasetPreset(eval_mode="whole", crop_size=32, batch_size=4, steps=4, lr=1e-3),
                       "BENCH_TOY_ROOT", "data", lambda split, root: ToyDataset(8 if split == "val" else 16))
    monkeypatch.setitem(datasets.DATASETS, "toy", spec)
    from methods import segmenter

    monkeypatch.setitem(segmenter.PRESETS, "tiny", tiny)
    return spec


@pytest.fixture
def toy(monkeypatch):
    """A registered 'toy' dataset with a tiny preset, so `bench run` finishes in seconds."""
    from methods.segmenter import ModelConfig

    return register_toy(monkeypatch, ModelConfig(depth=3, embed_dim=32, num_heads=2, img_size=32))


@pytest.mark.parametrize("args,words", [
    (["run", "--method", "nope"], ["unknown method 'nope'"]),
    (["run", "--dataset", "nope"], ["unknown dataset 'nope'"]),
    (["run", "--batch-size", "zero"], ["batch-size"]),
    (["run", "--threads", "0"], ["threads"]),
    (["run", "--method", "static", "--op", "scale=big"], ["scale expects float"]),
    (["run", "--method", "static", "--op", "size=2"], ["expected key=value with keys: scale"]),
    (["train", "--method", "tome"], ["nothing of its own to train"]),
])
def test_bad_arguments_are_one_line_errors(capsys, args, words):
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, *words)


def test_run_stores_records_then_resumes_without_duplicates(capsys, tmp_path, toy):
    common = ["--dataset", "toy", "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"), "--quiet",
              "--timing-images", "2", "--repeats", "1"]
    main(["run", "--method", "static", "--op", "scale=1.0", "--op", "scale=0.5", *common])
    lines = (tmp_path / "res" / "toy.jsonl").read_text().splitlines()
    records = [json.loads(l) for l in lines]
    assert [r["knobs"] for r in records] == [{"scale": 1.0}, {"scale": 0.5}]
    for r in records:
        assert set(r["speed"]) == {"1", "8"} and r["speed"]["1"]["latency_ms"]["p50"] > 0
        assert r["flops_unit"] == "GFLOPs (fvcore, MAC)" and r["checkpoint"] == r["baseline_checkpoint"]
    assert records[1]["gflops"]["mean"] < records[0]["gflops"]["mean"]
    assert abs(records[0]["miou_delta"]) < 1e-9  # scale 1 is the baseline itself
    # provenance: the full training configuration beside its hash, and beside the checkpoint
    config = records[0]["train"]["config"]
    assert config["hash"] == records[0]["train"]["config_hash"] and config["optimizer"] == "adamw"
    beside = tmp_path / "ck" / "toy" / f"baseline-tiny-{config['hash']}.config.json"
    assert json.loads(beside.read_text()) == config
    before = (tmp_path / "res" / "toy.jsonl").read_bytes()
    assert "warning: --repeats 1 times each method once: its speedups are noise" in capsys.readouterr().err
    main(["run", "--method", "static", "--op", "scale=1.0", *common])
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "res" / "toy.jsonl").read_bytes() == before
    main(["run", "--method", "static", "--op", "scale=0.5", "--op", "scale=0.75", *common])
    records = [json.loads(l) for l in (tmp_path / "res" / "toy.jsonl").read_text().splitlines()]
    assert [r["knobs"]["scale"] for r in records] == [1.0, 0.5, 0.75]  # only the new point measured


def test_corrupt_checkpoint_is_one_line_error(capsys, tmp_path, toy):
    from bench.runner import RunOptions, checkpoint_path, train_config

    opts = RunOptions(dataset="toy", checkpoints=str(tmp_path / "ck"))
    path = checkpoint_path(opts, train_config(opts, toy))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage")
    code, _, err = run_cli(capsys, "run", "--dataset", "toy", "--checkpoints", str(tmp_path / "ck"),
                           "--results", str(tmp_path / "res"), "--quiet")
    assert_one_line_error(code, err, str(path), "not a readable bench checkpoint")


def test_unwritable_results_folder_is_one_line_error(capsys, tmp_path, toy):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "run", "--dataset", "toy", "--checkpoints", str(tmp_path / "ck"),
                           "--results", str(tmp_path / "afile" / "res"), "--quiet")
    assert_one_line_error(code, err, "afile")


def test_console_script_prints_no_traceback():
    out = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--method", "nope"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: unknown method 'nope'; expected one of: baseline, baseline-ft, shallow, static, paumer, tome, algm, early-exit, dtop, algm-ft"


def test_unknown_model_preset_is_one_line_error(capsys, tmp_path, toy):
    code, _, err = run_cli(capsys, "train", "--dataset", "toy", "--model", "huge", "--checkpoints", str(tmp_path))
    assert_one_line_error(code, err, "unknown model preset 'huge'")


def test_bad_paumer_knob_is_one_line_error_and_stores_nothing(capsys, tmp_path, toy):
    code, _, err = run_cli(capsys, "run", "--method", "paumer", "--op", "tau=1.5", "--dataset", "toy",
                           "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"), "--quiet")
    assert_one_line_error(code, err, "tau must be in [0, 1]")
    assert not (tmp_path / "res" / "toy.jsonl").exists()


def test_a_smaller_limit_does_not_block_a_larger_one(capsys, tmp_path, toy):
    from bench.runner import RunOptions, pending_ops

    common = ["--method", "static", "--op", "scale=0.5", "--dataset", "toy", "--checkpoints", str(tmp_path / "ck"),
              "--results", str(tmp_path / "res"), "--quiet", "--timing-images", "2", "--repeats", "2"]
    main(["run", "--limit", "3", *common])
    opts = RunOptions(method="static", ops=[{"scale": 0.5}], dataset="toy", checkpoints=str(tmp_path / "ck"),
                      results=str(tmp_path / "res"))
    assert pending_ops(replace(opts, limit=3)) == [] and pending_ops(replace(opts, limit=4)) == [{"scale": 0.5}]
    capsys.readouterr()
    main(["run", "--limit", "4", *common])
    assert "1 record(s) appended" in capsys.readouterr().out
    main(["run", "--limit", "3", *common])
    assert "nothing to do" in capsys.readouterr().out
    records = [json.loads(l) for l in (tmp_path / "res" / "toy.jsonl").read_text().splitlines()]
    assert [r["images"] for r in records] == [3, 4]
    assert pending_ops(replace(opts, limit=4)) == [] and pending_ops(replace(opts, batch_size=4)) == [{"scale": 0.5}]
    r = records[0]
    assert r["precision"] == "fp32" and r["device"] == "cpu" and r["cpu_name"] == r["device_name"]
    for entry in r["speed"].values():  # the spread of each batch size over the 2 repeats
        low, high = entry["throughput_range"]
        assert low <= entry["throughput_iqr"][0] <= entry["throughput_iqr"][1] <= high
        assert entry["speedup_range"][0] <= entry["speedup_iqr"][0] <= entry["speedup_iqr"][1] <= entry["speedup_range"][1]


def test_a_checkpoint_changed_after_training_is_refused(capsys, tmp_path, toy):
    from bench.runner import RunOptions, checkpoint_path, train_config

    main(["train", "--dataset", "toy", "--checkpoints", str(tmp_path / "ck"), "--quiet"])
    opts = RunOptions(dataset="toy", checkpoints=str(tmp_path / "ck"))
    path = checkpoint_path(opts, train_config(opts, toy))
    payload = torch.load(path, weights_only=False)
    payload["model"] = {k: v * 1.01 for k, v in payload["model"].items()}  # still loads
    torch.save(payload, path)
    code, _, err = run_cli(capsys, "run", "--dataset", "toy", "--checkpoints", str(tmp_path / "ck"),
                           "--results", str(tmp_path / "res"), "--quiet")
    assert code == 2
    assert_one_line_error(code, err, str(path), "changed after it was written")
    assert not (tmp_path / "res" / "toy.jsonl").exists()


def toy_args(tmp_path):
    return ["--dataset", "toy", "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"), "--quiet",
            "--timing-images", "2", "--repeats", "1"]


def stored(tmp_path):
    return [json.loads(l) for l in (tmp_path / "res" / "toy.jsonl").read_text().splitlines()]


def test_paumer_run_fine_tunes_from_the_baseline_and_is_compared_with_the_equal_budget_control(tmp_path, toy):
    from bench.train import load_checkpoint

    main(["run", "--method", "paumer", "--op", "tau=0", "--op", "tau=1", "--op", "tau=0.5 criterion=oracle",
          *toy_args(tmp_path)])  # the oracle is timed on its timing images' own labels
    records = stored(tmp_path)
    assert [r["knobs"] for r in records] == [{"tau": 0.0}, {"tau": 1.0}, {"tau": 0.5, "criterion": "oracle"}]
    assert records[0]["checkpoint"] != records[0]["baseline_checkpoint"]
    assert records[0]["tokens_per_block"] == [1.0] * 3
    assert records[1]["gflops"]["mean"] < records[0]["gflops"]["mean"]
    assert (tmp_path / "res" / "figures" / "toy-paumer-compute-maps.png").exists()
    ckpts = sorted(p.name.rsplit("-", 2)[0] for p in (tmp_path / "ck" / "toy").glob("*.pt"))
    assert ckpts == ["baseline", "baseline-ft", "paumer"]  # the control is trained alongside

    main(["run", "--method", "baseline-ft", *toy_args(tmp_path)])
    main(["run", "--method", "static", "--op", "scale=0.5", *toy_args(tmp_path)])
    paumer, control, static = [r for r in stored(tmp_path) if r["method"] == "paumer"], *stored(tmp_path)[3:]
    assert control["method"] == "baseline-ft" and static["method"] == "static"
    # baseline-ft: its own checkpoint, its own control
    assert control["checkpoint"] not in (control["baseline_checkpoint"], paumer[0]["checkpoint"])
    assert control["control_checkpoint"] == control["checkpoint"] and control["miou_delta_control"] == 0.0
    assert control["miou_delta"] == control["miou"] - control["baseline_miou"]
    for r in paumer:
        assert r["control_checkpoint"] == control["checkpoint"]
        assert r["control_miou"] == control["miou"]  # evaluated in paumer's run, the same numbers
        assert r["miou_delta_control"] == r["miou"] - r["control_miou"]
        assert r["miou_delta"] == r["miou"] - r["baseline_miou"]
    assert not {"control_checkpoint", "control_miou", "miou_delta_control"} & set(static)
    # tau = 1: everything pauses at the first pausing layer (after block 1 of 3)
    assert paumer[1]["knobs"] == {"tau": 1.0} and max(paumer[1]["tokens_per_block"][1:]) <= 0.005
    # the control trains from the baseline with exactly the fine-tune budget of paumer
    ckpts = {p.name.rsplit("-", 2)[0]: load_checkpoint(p) for p in (tmp_path / "ck" / "toy").glob("*.pt")}
    ft, base, pm = ckpts["baseline-ft"]["config"], ckpts["baseline"]["config"], ckpts["paumer"]["config"]
    assert ft["init_from"] == ckpts["baseline"]["weights"] == control["baseline_checkpoint"]
    assert ckpts["baseline-ft"]["weights"] != ckpts["baseline"]["weights"]
    budget = ("steps", "lr", "warmup_steps", "poly_power", "batch_size", "weight_decay", "seed", "init_from")
    assert {k: ft[k] for k in budget} == {k: pm[k] for k in budget}
    assert ft["steps"] == 2 == base["steps"] // 2 and ft["lr"] == base["lr"] / 2 and ft["method_knobs"] == {}
    assert ckpts["baseline-ft"]["step"] == 2 and ft["hash"] not in (pm["hash"], base["hash"])


def test_shallow_trains_one_checkpoint_per_depth_and_runs_that_many_blocks(capsys, tmp_path, toy):
    from bench.runner import RunOptions, pending_ops

    opts = RunOptions(method="shallow", dataset="toy", checkpoints=str(tmp_path / "ck"), results=str(tmp_path / "res"))
    assert pending_ops(opts) is None  # nothing trained yet
    main(["train", "--method", "shallow", "--dataset", "toy", "--checkpoints", str(tmp_path / "ck"), "--quiet"])
    ready = [l for l in capsys.readouterr().out.splitlines() if l.startswith("checkpoint ready")]
    # toy's tiny has 3 blocks, pausing layers 1 and 2: depths 1, 2 and 3 (= baseline-ft)
    assert [l.split()[2] for l in ready] == ["shallow", "shallow", "baseline-ft"]
    assert pending_ops(opts) == [{"depth": 1}, {"depth": 2}, {"depth": 3}]
    main(["run", "--method", "shallow", *toy_args(tmp_path)])
    records = stored(tmp_path)
    assert [r["knobs"] for r in records] == [{"depth": 1}, {"depth": 2}, {"depth": 3}]
    assert pending_ops(opts) == []
    assert [len(r["tokens_per_block"]) for r in records] == [1, 2, 3]
    flops = [r["gflops"]["mean"] for r in records]
    assert flops[0] < flops[1] < flops[2] == records[2]["baseline_gflops"]
    assert len({r["checkpoint"] for r in records}) == 3 and len({r["baseline_checkpoint"] for r in records}) == 1
    assert records[2]["checkpoint"] == records[2]["control_checkpoint"]  # full depth: baseline-ft's checkpoint
    for r in records:
        assert r["miou_delta"] == r["miou"] - r["baseline_miou"] and r["control_checkpoint"] == records[2]["checkpoint"]
    names = sorted(p.name.rsplit("-", 2)[0] for p in (tmp_path / "ck" / "toy").glob("*.pt"))
    assert names == ["baseline", "baseline-ft", "shallow", "shallow"]


@pytest.mark.parametrize("op,words", [("depth=4", ["depth must be a whole number in [1, 3]"]),
                                      ("", ["bad --op", "keys: depth"])])
def test_bad_shallow_depth_is_one_line_error(capsys, tmp_path, toy, op, words):
    code, _, err = run_cli(capsys, "run", "--method", "shallow", "--op", op, *toy_args(tmp_path))
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "res" / "toy.jsonl").exists()
    assert not list((tmp_path / "ck" / "toy").glob("shallow-*"))


def test_default_sweeps_follow_the_model_and_the_input(tmp_path, toy):
    from bench.runner import RunOptions, eval_tokens, operating_points
    from methods import METHODS

    opts = RunOptions(dataset="toy")
    # toy: 32 x 32 images, 8 x 8 patches -> 16 tokens; 3 blocks -> constant r at most 16 // 4
    assert [k["r"] for k in operating_points(opts, METHODS["tome"], toy) if "schedule" not in k] == [0, 1, 2, 3, 4]
    assert operating_points(opts, METHODS["shallow"], toy) == [{"depth": 1}, {"depth": 2}, {"depth": 3}]
    assert operating_points(replace(opts, ops=[{"r": 2}]), METHODS["tome"], toy) == [{"r": 2}]
    slide = DatasetSpec("slide", ("a",), DatasetPreset(eval_mode="slide", window=48, stride=32), "X", "data",
                        lambda split, root: ToyDataset(2))
    assert eval_tokens(slide, 8, ToyDataset(2)) == 36  # a window's tokens, whatever the image
    resized = DatasetSpec("resized", ("a",), DatasetPreset(eval_mode="whole", resize_short=64), "X", "data", None)
    assert eval_tokens(resized, 8, ToyDataset(2, size=32)) == 64



def test_sweep_runs_every_registered_method_by_default(tmp_path, capsys, toy):
    from methods import all_methods

    main(["sweep", "--dry-run", "--dataset", "toy", "--folder", str(tmp_path / "sweeps"),
          "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"), "--quiet"])
    out = capsys.readouterr().out
    assert {"algm", "algm-ft"} <= set(all_methods())
    for name in all_methods():
        assert f"toy / {name}:" in out, name
    assert not (tmp_path / "ck").exists()


def test_tensorboard_without_the_package_is_one_line_error_before_training(capsys, tmp_path, toy, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    code, _, err = run_cli(capsys, "train", "--tensorboard", "--dataset", "toy", "--checkpoints", str(tmp_path / "ck"),
                           "--quiet")
    assert_one_line_error(code, err, "--tensorboard needs the tensorboard package", "pip install tensorboard")
    assert not list((tmp_path / "ck").rglob("*.pt"))

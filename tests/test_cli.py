"""Bad input gets one line, a non-zero exit and no traceback; a tiny run end to end."""
import json
import subprocess
import sys

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


@pytest.fixture
def toy(monkeypatch):
    """A registered 'toy' dataset with a tiny preset, so `bench run` finishes in seconds."""
    spec = DatasetSpec("toy", ("a", "b", "c", "d", "e"),
                       DatasetPreset(eval_mode="whole", crop_size=32, batch_size=4, steps=4, lr=1e-3),
                       "BENCH_TOY_ROOT", "data", lambda split, root: ToyDataset(8 if split == "val" else 16))
    monkeypatch.setitem(datasets.DATASETS, "toy", spec)
    from methods import segmenter

    monkeypatch.setitem(segmenter.PRESETS, "tiny", segmenter.ModelConfig(depth=3, embed_dim=32, num_heads=2, img_size=32))
    return spec


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
    before = (tmp_path / "res" / "toy.jsonl").read_bytes()
    capsys.readouterr()
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
    assert out.stderr.strip() == "error: unknown method 'nope'; expected one of: baseline, static, paumer, tome, early-exit"


def test_paumer_run_fine_tunes_from_the_baseline_and_draws_maps(capsys, tmp_path, toy):
    common = ["--dataset", "toy", "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"), "--quiet",
              "--timing-images", "2", "--repeats", "1"]
    main(["run", "--method", "paumer", "--op", "tau=0", "--op", "tau=0.9", *common])
    records = [json.loads(l) for l in (tmp_path / "res" / "toy.jsonl").read_text().splitlines()]
    assert [r["knobs"] for r in records] == [{"tau": 0.0}, {"tau": 0.9}]
    assert records[0]["checkpoint"] != records[0]["baseline_checkpoint"]
    assert records[0]["tokens_per_block"] == [1.0] * 3
    assert records[1]["gflops"]["mean"] <= records[0]["gflops"]["mean"]
    assert (tmp_path / "res" / "figures" / "toy-paumer-compute-maps.png").exists()
    ckpts = sorted(p.name.split("-")[0] for p in (tmp_path / "ck" / "toy").iterdir())
    assert ckpts == ["baseline", "paumer"]


def test_unknown_model_preset_is_one_line_error(capsys, tmp_path, toy):
    code, _, err = run_cli(capsys, "train", "--dataset", "toy", "--model", "huge", "--checkpoints", str(tmp_path))
    assert_one_line_error(code, err, "unknown model preset 'huge'")


def test_bad_paumer_knob_is_one_line_error_and_stores_nothing(capsys, tmp_path, toy):
    code, _, err = run_cli(capsys, "run", "--method", "paumer", "--op", "tau=1.5", "--dataset", "toy",
                           "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"), "--quiet")
    assert_one_line_error(code, err, "tau must be in [0, 1]")
    assert not (tmp_path / "res" / "toy.jsonl").exists()

"""The Python door (bench/api.py, bench/measure.py) and the example that walks it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
from bench.errors import BenchError
from tests.test_cli import register_toy

ROOT = Path(__file__).resolve().parents[1]


def test_the_api_is_exported_with_docstrings():
    for name in bench.__all__:
        if name == "load_segmenter" and not (ROOT / "bench" / "loading.py").exists():
            continue  # the reference-fidelity work's, exported once it is merged
        value = getattr(bench, name)
        assert value.__doc__, name


def test_load_records_has_knobs_as_columns():
    stored = ROOT / "results" / "synthetic.jsonl"
    if not stored.exists():
        pytest.skip("no stored synthetic records")
    df = bench.load_records(stored)
    assert len(df) == len(stored.read_text().splitlines())
    paumer = df[df.method == "paumer"]
    assert paumer["tau"].notna().all() and df[df.method == "baseline"]["tau"].isna().all()
    assert all(f"tau={t}" in op.split() for t, op in zip(paumer["tau"], paumer["op"]))
    assert set(paumer["batching"].dropna()) == {"packed"}  # a knob only some records have
    row = df.iloc[0]
    assert row["gflops_mean"] == row["gflops"]["mean"] and row["speedup_b1"] == row["speed"]["1"]["speedup"]
    assert len(bench.load_records("synthetic", results=str(ROOT / "results"))) == len(df)
    with pytest.raises(BenchError, match="no records for 'nowhere'"):
        bench.load_records("nowhere", results=str(ROOT / "results"))


def test_time_interleaves_and_gives_speedups_against_the_first(small_model):
    x = torch.randn(4, 3, 32, 32)
    df = bench.time({"base": small_model, "tome": bench.patch(small_model, "tome", r=3)}, x, batch_sizes=(1, 2),
                    warmup=0, repeats=2)
    assert list(zip(df.model, df.batch_size)) == [("base", 1), ("tome", 1), ("base", 2), ("tome", 2)]
    assert (df[df.model == "base"].speedup == 1.0).all() and (df.throughput > 0).all()
    assert df[df.batch_size == 1].latency_p50_ms.notna().all() and df[df.batch_size == 2].latency_p50_ms.isna().all()
    with pytest.raises(BenchError, match="float tensor"):
        bench.time(small_model, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_flops_of_a_plain_module_is_fvcore_shared_per_image():
    conv = torch.nn.Conv2d(3, 4, 1, bias=False)
    assert bench.flops(conv, torch.randn(2, 3, 8, 8)) == pytest.approx(3 * 4 * 64 / 1e9)


def test_fine_tune_trains_the_heads_and_refuses_what_it_cannot(monkeypatch, small_model):
    from methods.segmenter import PRESETS

    register_toy(monkeypatch, PRESETS["tiny"])
    patched = bench.patch(small_model, "paumer", tau=0.3, layers=[2])
    before = {k: v.clone() for k, v in patched.trainable.pausing.state_dict().items()}
    bench.fine_tune(patched, "toy", steps=2)
    after = patched.trainable.pausing.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(BenchError, match="training-free"):
        bench.fine_tune(bench.patch(small_model, "tome", r=2), "toy")
    with pytest.raises(BenchError, match="has no option"):
        bench.run("tome", "toy", stepz=3)


def test_the_example_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's bench, not an installed one
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"), "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "GFLOPs per image" in out.stdout and "r=24" in out.stdout
    assert (tmp_path / "results" / "synthetic.jsonl").exists()


def test_api_names_stay_functions_when_their_submodules_load_first():
    code = ("import bench.flops, bench.report.build, bench; "
            "from bench.flops import FlopModel; "
            "assert bench.flops.__module__ == 'bench.measure' and bench.report.__module__ == 'bench.api'; "
            "assert 'time' not in vars(bench) or callable(bench.time)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]

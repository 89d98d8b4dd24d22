"""Scaling out: torchrun-launched training and evaluation (gloo on CPU) give what one
process gives; `bench sweep` through submitit's local executor resumes after a job is
killed mid-way; on Slurm it passes the sbatch options and the dependency on the
baseline job.

This file is also the script each torchrun process runs (``__main__`` below): one
launch of two processes does the evaluation, the training and a `bench run` under
torchrun, and the tests compare what they wrote with one process's results.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.sweep import SweepJob

REPO = Path(__file__).resolve().parent.parent
EVAL_IMAGES = 7  # odd: the shards differ in size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_synthetic(root: Path) -> Path:
    """A stand-in for the synthetic cache (same files, shapes and dtypes; 8 random scenes
    repeated), so subprocesses run the real `synthetic` dataset without a minute of
    generation."""
    from bench.datasets.synthetic import IMAGE_SIZE, SPLITS, VERSION

    folder = root / VERSION
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = (images[..., 0].astype(np.int64) * 10 // 256).astype(np.uint8)
    labels[:, :3, :3] = 255
    for split in ("train", "val"):
        pick = np.arange(SPLITS[split][1]) % len(images)
        np.savez(folder / f"{split}.npz", images=images[pick], labels=labels[pick])
    return root


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data"))


def subprocess_env() -> dict:
    """Children import `bench`, `methods` and this test module from the checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ------------------------------------------------------------------ the shared cases

def eval_case():
    """(confusion matrix, evaluate's result) of PAUMER with random heads on a toy split:
    per-image FLOPs and token counts differ from image to image."""
    from bench import protocol
    from bench.flops import FlopModel
    from methods import METHODS
    from methods.segmenter import build_model
    from tests.conftest import ToyDataset

    torch.manual_seed(0)
    seg = build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32, drop_path=0.0)
    paumer = METHODS["paumer"]
    trained = paumer.fine_tune.build(seg, **paumer.fine_tune.knobs)
    policy = paumer.make_policy(trained, tau=0.93)
    seen = []
    real = protocol.iou_scores
    protocol.iou_scores = lambda matrix: seen.append(matrix.clone()) or real(matrix)
    try:
        result = protocol.evaluate(trained.segmenter, policy, ToyDataset(EVAL_IMAGES),
                                   protocol.EvalSettings(batch_size=2), FlopModel(trained.segmenter, policy),
                                   num_classes=5)
    finally:
        protocol.iou_scores = real
    return seen[0], result


def train_config():
    from bench.train import TrainConfig

    # whole 32x32 images, no rescale: every image has the same number of labelled pixels,
    # so the mean of the processes' mean losses is the mean loss of the global batch
    return TrainConfig(dataset="toy", num_classes=5, steps=3, batch_size=4, lr=1e-2, warmup_steps=1, crop_size=32,
                       scale_range=(1.0, 1.0),
                       model_overrides={"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32, "drop_path": 0.0})


def fresh_model(cfg, seed: int):
    from methods.segmenter import build_model

    torch.manual_seed(seed)
    return build_model(cfg.num_classes, cfg.model, **cfg.model_overrides)


def run_args(data_root, out: Path) -> list[str]:
    """`bench run` with tiny settings, as the README runs it (under torchrun or not)."""
    return ["run", "--method", "static", "--op", "scale=1.0", "--op", "scale=0.5", "--dataset", "synthetic",
            "--data-root", str(data_root), "--depth", "1", "--steps", "2", "--limit", "5", "--timing-images", "2",
            "--repeats", "1", "--threads", "1", "--checkpoints", str(out / "ck"), "--results", str(out / "res")]


def worker(out: Path, data_root: Path) -> None:
    """What each process launched by torchrun runs."""
    from bench import distributed
    from bench.cli import main
    from bench.train import default_loss, train
    from tests.conftest import ToyDataset

    torch.set_num_threads(1)
    assert distributed.setup("cpu") == "cpu"
    rank = distributed.rank()
    matrix, result = eval_case()
    cfg = train_config()
    folder = out / "train"
    seen = []

    def loss_fn(model, images, labels):
        seen.append(images.shape[0])
        return default_loss(model, images, labels)

    # each rank starts from different weights: DDP must broadcast rank 0's
    first = train(fresh_model(cfg, 123 + rank), ToyDataset(16), cfg, folder / "ck.pt", loss_fn=loss_fn,
                  progress=False, stop_after=1)
    # a new model, resumed from the checkpoint rank 0 wrote
    final = train(fresh_model(cfg, 999), ToyDataset(16), cfg, folder / "ck.pt", loss_fn=loss_fn, progress=False)
    torch.save({"world": distributed.world_size(), "matrix": matrix, "eval": result, "files": sorted(
        p.name for p in folder.iterdir()), "step1": first["model"], "final": final["model"],
        "weights": final["weights"], "done": final["done"], "batches": seen}, out / f"rank{rank}.pt")
    try:
        main(run_args(data_root, out))
        code = 0
    except SystemExit as e:
        code = e.code
    (out / f"rank{rank}.exit").write_text(str(code))


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory, synthetic_root):
    """One `torchrun --nproc_per_node 2` launch of this file's worker."""
    out = tmp_path_factory.mktemp("torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(out), str(synthetic_root)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_two_process_evaluation_equals_one_process(torchrun):
    out, _ = torchrun
    torch.set_num_threads(1)
    matrix, one = eval_case()
    for rank in (0, 1):
        got = torch.load(out / f"rank{rank}.pt", weights_only=False)
        assert got["world"] == 2
        assert torch.equal(got["matrix"], matrix)  # each image counted once, none twice
        assert got["matrix"].sum() == (EVAL_IMAGES * (32 * 32 - 4))
        assert got["eval"]["miou"] == one["miou"] and got["eval"]["per_class_iou"] == one["per_class_iou"]
        assert got["eval"]["gflops"] == one["gflops"] and got["eval"]["tokens_per_block"] == one["tokens_per_block"]
        assert got["eval"]["images"] == EVAL_IMAGES
        assert all((a == b).all() for a, b in zip(got["eval"]["per_image"], one["per_image"]))  # split order
    assert one["gflops"]["std"] > 0  # images really cost different amounts


def test_two_process_training_writes_one_checkpoint_and_equals_one_process(torchrun, tmp_path):
    from bench.train import load_checkpoint, train
    from tests.conftest import ToyDataset

    out, _ = torchrun
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # one checkpoint and its configuration, no temporary left
    assert ranks[0]["files"] == ranks[1]["files"] == ["ck.config.json", "ck.pt"]
    assert ranks[0]["batches"] == ranks[1]["batches"] == [2, 2, 2]  # each its half of the global batch of 4
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["done"]
    for k, v in ranks[0]["final"].items():
        assert torch.equal(v, ranks[1]["final"][k]), k  # the processes hold the same weights
    stored = load_checkpoint(out / "train" / "ck.pt")
    assert stored["step"] == 3 and stored["weights"] == ranks[0]["weights"]
    assert stored["config"]["hash"] == train_config().hash()  # the configuration does not name the processes

    torch.set_num_threads(1)
    cfg = train_config()
    model = fresh_model(cfg, 123)
    one = train(model, ToyDataset(16), cfg, tmp_path / "one.pt", progress=False, stop_after=1)
    for k, v in one["model"].items():  # the first step on the same global batch (Adam: ~ lr * sign)
        assert torch.allclose(v, ranks[0]["step1"][k], atol=1e-5, rtol=0), k
    one = train(fresh_model(cfg, 999), ToyDataset(16), cfg, tmp_path / "one.pt", progress=False)
    for k, v in one["model"].items():  # two more steps after resuming: gradient magnitudes matter
        assert torch.allclose(v, ranks[0]["final"][k], atol=1e-5, rtol=0), k


def test_bench_run_under_torchrun_writes_each_record_once(torchrun):
    out, proc = torchrun
    assert (out / "rank0.exit").read_text() == "0" and (out / "rank1.exit").read_text() == "0"
    checkpoints = [p.name for p in (out / "ck" / "synthetic").glob("*.pt")]
    assert len(checkpoints) == 1 and checkpoints[0].startswith("baseline-tiny-") and checkpoints[0].endswith(".pt")
    records = [json.loads(line) for line in (out / "res" / "synthetic.jsonl").read_text().splitlines()]
    assert [r["knobs"] for r in records] == [{"scale": 1.0}, {"scale": 0.5}]
    assert all(r["images"] == 5 and r["eval_processes"] == 2 and r["timing_images"] == 2 for r in records)
    assert proc.stdout.count("2 record(s) appended") == 1  # rank 0 reports, rank 1 is silent
    assert "train baseline: global batch 8 = 2 processes x 4, lr 0.001" in proc.stderr


# ------------------------------------------------------------------------- sweeps

class KillAfterFirstRecord(SweepJob):
    """A sweep job killed (SIGKILL, no clean-up) right after it stored its first record."""

    def __call__(self):
        if self.kind == "run":
            from bench.results import ResultsStore

            append = ResultsStore.append

            def append_then_die(store, record, replace=False):
                append(store, record, replace=replace)
                os.kill(os.getpid(), signal.SIGKILL)

            ResultsStore.append = append_then_die
        return super().__call__()


def sweep_args(root: Path, data_root: Path) -> list[str]:
    return ["sweep", "--methods", "static", "--op", "static:scale=1.0", "--op", "static:scale=0.5",
            "--dataset", "synthetic", "--data-root", str(data_root), "--depth", "1", "--steps", "2", "--limit", "3",
            "--timing-images", "2", "--repeats", "1", "--threads", "1", "--quiet", "--cluster", "local",
            "--folder", str(root / "sweeps"), "--checkpoints", str(root / "ck"), "--results", str(root / "res")]


def job_folders(root: Path) -> list:
    return [p for p in (root / "sweeps").iterdir() if p.name.isdigit()]  # "%j": submitit's staging folder


def test_local_sweep_killed_mid_way_resumes_with_each_record_once(tmp_path, synthetic_root, capsys, monkeypatch):
    from bench.cli import main
    from bench.runner import RunOptions
    from bench.sweep import sweep

    monkeypatch.setenv("PYTHONPATH", subprocess_env()["PYTHONPATH"])  # jobs unpickle KillAfterFirstRecord
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # 1. the sweep of `sweep_args`, but its static job is killed after storing 1 of its 2 records
    base = RunOptions(dataset="synthetic", data_root=str(synthetic_root), depth=1, steps=2, limit=3, timing_images=2,
                      repeats=1, threads=1, progress=False, checkpoints=str(tmp_path / "ck"),
                      results=str(tmp_path / "res"))
    lines = []
    reports = sweep(base, ["static"], ["synthetic"], {"static": [{"scale": 1.0}, {"scale": 0.5}]}, cluster="local",
                    folder=str(tmp_path / "sweeps"), job_class=KillAfterFirstRecord, echo=lines.append)
    assert [(r.what, r.state) for r in reports] == [("baseline checkpoint", "done"), ("static", "failed")]
    assert "killed" in reports[1].message
    results = tmp_path / "res" / "synthetic.jsonl"
    first = results.read_text().splitlines()
    assert [json.loads(line)["knobs"] for line in first] == [{"scale": 1.0}]
    assert len(job_folders(tmp_path)) == 2

    # 2. the same sweep again, from the command line: the baseline is not trained again,
    # the stored point is skipped, the missing one measured
    main(sweep_args(tmp_path, synthetic_root))
    out = capsys.readouterr().out
    assert "baseline checkpoint" not in out
    assert f"job folders and logs under {tmp_path / 'sweeps'}" in out and "_log.out" in out
    assert "static: job" in out and "done: 1 record(s) appended" in out
    lines = results.read_text().splitlines()
    assert lines[0] == first[0]  # not measured again
    assert [json.loads(line)["knobs"] for line in lines] == [{"scale": 1.0}, {"scale": 0.5}]
    records = [json.loads(line) for line in lines]
    assert len({r["checkpoint"] for r in records}) == 1 and all(r["images"] == 3 for r in records)
    assert len(job_folders(tmp_path)) == 3

    # 3. once more: nothing is left, no job is started
    main(sweep_args(tmp_path, synthetic_root))
    assert "static: nothing to do" in capsys.readouterr().out
    assert results.read_text().splitlines() == lines
    assert len(job_folders(tmp_path)) == 3


def test_slurm_sweep_passes_options_and_waits_for_the_baseline(tmp_path, capsys, monkeypatch):
    """No cluster here: stand-in `sbatch`/`srun` take the submission; we read what submitit wrote."""
    from bench.cli import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nn=$(cat {tmp_path}/n 2>/dev/null || echo 100)\nn=$((n+1))\n'
                                    f'echo $n > {tmp_path}/n\necho "Submitted batch job $n"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    main(["sweep", "--cluster", "slurm", "--methods", "static,paumer", "--op", "paumer:tau=0.2", "--partition", "gpu",
          "--gpus-per-node", "2", "--time", "30", "--slurm-param", "account=abc", "--device", "cpu",
          "--folder", str(tmp_path / "sweeps"), "--checkpoints", str(tmp_path / "ck"),
          "--results", str(tmp_path / "res")])
    out = capsys.readouterr().out
    assert "[synthetic] baseline checkpoint: job 101" in out
    assert "static: job 102" in out and "paumer: job 103" in out and "after job 101" in out
    assert "3 job(s) submitted" in out
    scripts = {p.parent.name: p.read_text() for p in (tmp_path / "sweeps").rglob("*_submission.sh")}
    assert sorted(scripts) == ["101", "102", "103"]
    for job, text in scripts.items():
        for option in ("--partition=gpu", "--gpus-per-node=2", "--ntasks-per-node=2", "--time=30", "--account=abc"):
            assert f"#SBATCH {option}\n" in text, (job, option)
        depends = "#SBATCH --dependency=afterok:101\n" in text
        assert depends == (job != "101"), job
    assert not (tmp_path / "ck").exists()  # nothing ran here


@pytest.mark.parametrize("args,words", [
    (["--methods", "static", "--op", "paumer:tau=0.2"], ["bad --op 'paumer:tau=0.2'", "one of --methods (static)"]),
    (["--methods", "static", "--op", "static:size=2"], ["expected key=value with keys: scale"]),
    (["--methods", "nope"], ["unknown method 'nope'"]),
    (["--dataset", "synthetic,nope"], ["unknown dataset 'nope'"]),
    (["--slurm-param", "account"], ["bad --slurm-param 'account'"]),
    (["--cluster", "slurm"], ["--cluster slurm", "srun"]),
])
def test_bad_sweep_arguments_are_one_line_errors(tmp_path, capsys, monkeypatch, args, words):
    from bench.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm here, whatever the machine has
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--folder", str(tmp_path / "sweeps"), "--checkpoints", str(tmp_path / "ck"), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "ck").exists()


if __name__ == "__main__":  # a torchrun process (see the `torchrun` fixture)
    worker(Path(sys.argv[1]), Path(sys.argv[2]))

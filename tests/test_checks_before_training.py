"""Everything that can be checked is checked before any training: knobs against the model
and the input size, the device, the checkpoint and results folders, every op of a sweep,
and `bench check`'s reference. A full disk is a one-line error that leaves no partial file."""
import errno
import json

import pytest
import torch

from bench import check, planning, runner
from bench.errors import BenchError
from bench.fileio import atomic_write
from tests.test_cli import assert_one_line_error, run_cli, toy  # noqa: F401  (fixture)


def train_args(tmp_path):
    return ["--dataset", "toy", "--checkpoints", str(tmp_path / "ck"), "--quiet"]


def common(tmp_path):
    return [*train_args(tmp_path), "--results", str(tmp_path / "res"), "--timing-images", "2", "--repeats", "1"]


def nothing_trained(tmp_path) -> bool:
    return not list((tmp_path / "ck").rglob("*.pt")) and not (tmp_path / "res").exists()


# toy: tiny preset of 3 blocks on 32x32 images with 8x8 patches: 16 tokens
@pytest.mark.parametrize("args,words", [
    (["run", "--method", "tome", "--op", "r=9"], ["r=9", "tome", "more than half"]),
    (["run", "--method", "tome", "--op", "r=5 schedule=decreasing"], ["r=5 schedule=decreasing", "more than half"]),
    (["run", "--method", "static", "--op", "scale=5"], ["scale=5.0", "scale must be in (0, 4]"]),
    (["run", "--method", "paumer", "--op", "layers=5"], ["layers=[5]", "no pausing head at layer(s) [5]"]),
    (["run", "--method", "paumer", "--depth", "1"], ["paumer cannot be built", "at least 2 encoder blocks", "got 1"]),
    (["run", "--method", "early-exit", "--depth", "1"], ["early-exit cannot be built", "at least 2 encoder blocks"]),
    (["train", "--method", "paumer", "--depth", "1"], ["paumer cannot be built"]),
    (["run", "--device", "foo"], ["--device 'foo'", "cpu, cuda or cuda:N"]),
    (["train", "--device", "foo"], ["--device 'foo'"]),
    (["run", "--device", "cuda:7"], ["cuda:7"]),
    (["run", "--method", "tome", "--op", ""], ["bad --op ''", "expected key=value"]),
    (["run", "--method", "tome", "--op", "r=2 r=3"], ["r is given twice"]),
    (["run", "--method", "tome", "--op", "r=2", "--op", "r=2"], ["r=2 of tome is given twice"]),
    (["run", "--method", "paumer", "--op", "criterion=best"], ["criterion must be one of entropy"]),
])
def test_bad_knob_or_device_fails_before_any_training(tmp_path, capsys, toy, args, words):  # noqa: F811
    code, _, err = run_cli(capsys, *args, *(train_args if args[0] == "train" else common)(tmp_path))
    assert code == 2
    assert_one_line_error(code, err, *words)
    assert nothing_trained(tmp_path)


def test_ops_are_probed_at_the_evaluation_size_and_input_scale(toy):  # noqa: F811
    from dataclasses import replace

    from methods import METHODS

    opts, val = runner.RunOptions(dataset="toy"), toy.open_split("val", None)
    runner.check_ops(opts, toy, METHODS["tome"], [{"r": 4}], val)  # 32x32: 16, 12, 8 tokens, r=4 fits
    half_scale = replace(METHODS["tome"], input_scale=lambda knobs: 0.5)  # 16x16: 4 tokens
    with pytest.raises(BenchError, match="r=4 in block 1 of 3 is more than half of its 4 tokens"):
        runner.check_ops(opts, toy, half_scale, [{"r": 4}], val)


@pytest.mark.parametrize("where", ["through a file", "full disk"])
def test_unusable_checkpoint_folder_fails_before_any_training(tmp_path, capsys, toy, monkeypatch, where):  # noqa: F811
    args = common(tmp_path)
    if where == "through a file":
        (tmp_path / "afile").write_text("x")
        args[3] = str(tmp_path / "afile" / "ck")
        words = [str(tmp_path / "afile"), "not a folder"]
    else:
        monkeypatch.setattr(planning.shutil, "disk_usage", lambda p: type("U", (), {"free": 10_000})())
        words = ["checkpoint folder", "MiB free", "need about"]
    code, _, err = run_cli(capsys, "run", *args)
    assert_one_line_error(code, err, *words)
    assert nothing_trained(tmp_path)


def test_full_disk_while_saving_a_checkpoint_is_one_line_error_and_leaves_no_partial_file(
        tmp_path, capsys, toy, monkeypatch):  # noqa: F811
    def save_half(obj, f, *a, **kw):  # what torch.save does when the disk fills: a RuntimeError over the OSError
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", save_half)
    code, _, err = run_cli(capsys, "train", *train_args(tmp_path))
    assert_one_line_error(code, err, "cannot write", str(tmp_path / "ck" / "toy"), "No space left on device")
    assert list((tmp_path / "ck" / "toy").rglob("*")) == []  # no checkpoint, no temp file (.locks/: the training lock)


def test_full_disk_while_writing_a_file_keeps_the_old_one(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")

    def fill(f):
        f.write(b"new, but only ha")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(BenchError, match="cannot write .*report.md: No space left on device"):
        atomic_write(path, fill)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_sweep_checks_every_op_before_submitting_anything(tmp_path, capsys, toy):  # noqa: F811
    code, _, err = run_cli(capsys, "sweep", "--methods", "static,paumer", "--op", "paumer:tau=1.5",
                           "--folder", str(tmp_path / "sweeps"), *common(tmp_path))
    assert code == 2
    assert_one_line_error(code, err, "tau=1.5", "paumer", "tau must be in [0, 1]")
    assert not (tmp_path / "sweeps").exists() and nothing_trained(tmp_path)


# ---- bench check's reference -----------------------------------------------------------
@pytest.fixture
def no_retraining(monkeypatch):
    def fail(**kw):
        raise AssertionError("bench check retrained before checking its reference")

    monkeypatch.setattr(check, "fresh_records", fail)


def test_check_with_an_empty_reference_fails_before_retraining(tmp_path, capsys, no_retraining):
    (tmp_path / "check").mkdir()
    (tmp_path / "check" / "synthetic.jsonl").write_text("")
    code, _, err = run_cli(capsys, "check", "--results", str(tmp_path))
    assert_one_line_error(code, err, "holds no records", "bench check --update")


def test_check_with_a_reference_lacking_points_names_them(tmp_path, capsys, no_retraining):
    stored = check.load_reference("results")  # the committed reference: complete
    (tmp_path / "check").mkdir()
    kept = [r for r in stored if r["method"] in ("baseline", "tome")]
    (tmp_path / "check" / "synthetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    code, _, err = run_cli(capsys, "check", "--results", str(tmp_path))
    assert_one_line_error(code, err, "lacks point(s) of the check set", "paumer tau=0.2", "paumer tau=0.5",
                          "early-exit mode=token threshold=0.95")
    assert "tome" not in err.split("check set:")[1]


def test_full_disk_while_writing_a_report_is_one_line_error_and_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    import bench.fileio

    (tmp_path / "README.md").write_text("old")
    monkeypatch.setattr(bench.fileio.os, "fsync", _no_space)
    code, _, err = run_cli(capsys, "report", "--results", "results", "--out", str(tmp_path))  # the committed records
    assert_one_line_error(code, err, "cannot write", str(tmp_path), "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"] and (tmp_path / "README.md").read_text() == "old"


def _no_space(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

"""Hostile input to `bench run`, `bench train` and `bench speed` (issue 28): every case is
exit 2 with one line and no traceback, found before any training, with nothing written
outside --checkpoints/--results; a changed split is re-measured; a checkpoint trained on
other data is refused and kept; a reused checkpoint trained with another thread count
is said; two trainings of one checkpoint take turns."""
import json
import subprocess
import sys

import numpy as np
import pytest

from bench import planning, runner
from tests.test_checks_before_training import common, nothing_trained, train_args
from tests.test_cli import assert_one_line_error, run_cli, toy  # noqa: F401  (fixture)
from tests.test_datasets_real import SMALL, _run_args, _save, make_folder, small  # noqa: F401  (fixture)
from tests.test_hostile_report import cli


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


HUGE_SEED = "1180591620717411303424"


@pytest.mark.parametrize("args,words", [
    (["run", "--seed", HUGE_SEED], [f"--seed {HUGE_SEED}", "expected a whole number"]),
    (["train", "--seed", HUGE_SEED], [f"--seed {HUGE_SEED}"]),
    (["run", "--method", "static", "--op", "scale=1e-9"], ["smallest scale that gives one patch is 0.25"]),
    (["run", "--method", "static", "--op", "scale=0.5,0.75"], ["scale takes one value per --op", "repeat --op"]),
    (["run", "--method", "early-exit", "--op", "threshold=0.5,0.6"], ["threshold takes one value per --op"]),
    (["train", "--method", "shallow", "--op", "depth=1,2"], ["depth takes one value per --op"]),
    (["run", "--method", "paumer", "--op", "tau=0.2 layers=1,1"], ["layers lists 1 twice"]),
    (["run", "--weights", "."], ["is a folder; expected a checkpoint file"]),
])
def test_bad_option_is_one_line_before_any_work(tmp_path, capsys, toy, args, words):  # noqa: F811
    code, _, err = run_cli(capsys, *args, *(train_args if args[0] == "train" else common)(tmp_path))
    assert code == 2
    assert_one_line_error(code, err, *words)
    assert nothing_trained(tmp_path)


def test_per_layer_thresholds_are_still_one_operating_point():
    from methods import METHODS

    assert runner.parse_op(METHODS["paumer"], "tau=0.1,0.2") == {"tau": [0.1, 0.2]}
    assert runner.parse_op(METHODS["tome"], "r=2,1") == {"r": [2, 1]}


def _ck_path(tmp_path, spec, **kw):
    opts = runner.RunOptions(dataset="toy", checkpoints=str(tmp_path / "ck"), **kw)
    return runner.checkpoint_path(opts, runner.train_config(opts, spec))


@pytest.mark.parametrize("case", ["dataset folder is a file", "dataset folder is unwritable", "results file is unwritable",
                                  "training log is a folder", "results file is a folder",
                                  "figures is a file", "results disk is full", "no room for the temporary copy"])
def test_every_output_path_is_checked_before_training(tmp_path, capsys, toy, monkeypatch, case):  # noqa: F811
    from bench.train import log_path

    args, method = common(tmp_path), "baseline"
    if case == "dataset folder is a file":
        (tmp_path / "ck").mkdir()
        (tmp_path / "ck" / "toy").write_text("x")
        words = [str(tmp_path / "ck" / "toy"), "not a folder"]
    elif case in ("dataset folder is unwritable", "results file is unwritable"):
        blocked = tmp_path / "ck" / "toy" if case.startswith("dataset") else tmp_path / "res" / "toy.jsonl"
        if case.startswith("dataset"):
            blocked.mkdir(parents=True)
        else:
            blocked.parent.mkdir()
            blocked.write_text("")
        access = planning.os.access  # root may write anything: say it may not
        monkeypatch.setattr(planning.os, "access", lambda p, mode: str(p) != str(blocked) and access(p, mode))
        words = [str(blocked), "not writable"]
    elif case == "training log is a folder":
        log = log_path(_ck_path(tmp_path, toy))
        log.mkdir(parents=True)
        words = [f"training log {log} is a folder"]
    elif case == "results file is a folder":
        (tmp_path / "res" / "toy.jsonl").mkdir(parents=True)
        words = [f"results file {tmp_path / 'res' / 'toy.jsonl'} is not a file"]
    elif case == "figures is a file":
        (tmp_path / "res").mkdir()
        (tmp_path / "res" / "figures").write_text("x")
        method, words = "paumer", ["compute-map folder", "not a folder"]
    else:
        one = planning._checkpoint_bytes(runner.new_model(runner.train_config(runner.RunOptions(dataset="toy"), toy)),
                                         "adamw")
        full = case == "results disk is full"
        (tmp_path / "ck").mkdir()
        (tmp_path / "res").mkdir()
        free = {True: lambda p: 10 ** 12 if "ck" in str(p) else 1000, False: lambda p: int(1.5 * one)}[full]
        monkeypatch.setattr(planning.shutil, "disk_usage", lambda p: type("U", (), {"free": free(p)})())
        words = ["results folder", "MiB free"] if full else ["checkpoint folder", "MiB free"]
    before = _tree(tmp_path)
    code, _, err = run_cli(capsys, "run", "--method", method, *(["--op", "tau=0.2"] if method == "paumer" else []), *args)
    assert code == 2
    assert_one_line_error(code, err, *words)
    assert not list((tmp_path / "ck").rglob("*.pt"))
    assert _tree(tmp_path) == before  # nothing written, nothing changed


def folder_args(tmp_path, root, *extra):
    return _run_args(tmp_path, "folder", root, "--method", "static", "--op", "scale=1.0", *extra)


@pytest.mark.parametrize("config,words", [
    ({"crop_size": 12}, ["crop_size 12 must be a multiple of the model's patch size 8"]),
    ({"crop_size": 1}, ["crop_size 1 must be a multiple"]),
    ({"scale_range": [0.001, 0.001]}, ["scale_range [0.001, 0.001]", "under one patch"]),
])
def test_training_settings_that_cannot_train_are_refused_before_training(tmp_path, capsys, small, config, words):  # noqa: F811
    root = make_folder(tmp_path / "f", config={**SMALL, **config})
    code, _, err = run_cli(capsys, *folder_args(tmp_path, root))
    assert code == 2
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "res").exists()


def _bad_label(path, value):
    from PIL import Image

    label = np.asarray(Image.open(path)).copy()
    label[0, 0] = value
    _save(path, label)


@pytest.mark.parametrize("split", ["val", "train"])
def test_a_bad_label_value_in_a_used_split_is_found_before_training(tmp_path, capsys, small, split):  # noqa: F811
    root = make_folder(tmp_path / "f", config=SMALL)
    label = root / "labels" / ("val_1.png" if split == "val" else "train/img3.png")
    _bad_label(label, 8)
    code, _, err = run_cli(capsys, *folder_args(tmp_path, root))
    assert code == 2
    assert_one_line_error(code, err, str(label), "label value(s) 8", "expected class indices 0-2")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "res").exists()


def test_an_idd_lite_validation_label_of_value_8_is_found_before_training(tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    from bench import datasets
    from methods import segmenter
    from tests.test_idd_lite import _run_args as idd_args, make_idd_lite

    monkeypatch.setitem(segmenter.PRESETS, "tiny", segmenter.ModelConfig(depth=2, embed_dim=32, num_heads=2, img_size=32))
    spec = datasets.DATASETS["idd-lite"]
    monkeypatch.setitem(datasets.DATASETS, "idd-lite", replace(spec, preset=replace(
        spec.preset, crop_size=16, resize_short=24, batch_size=2, steps=2)))
    monkeypatch.setenv("BENCH_WORKERS", "0")
    root = make_idd_lite(tmp_path / "idd", counts={"train": 2, "val": 2})
    bad = root / "idd20k_lite" / "gtFine" / "val" / "1" / "000001_label.png"
    _bad_label(bad, 8)
    code, _, err = run_cli(capsys, *idd_args(tmp_path, root))
    assert code == 2 and err.startswith("error: idd-lite: ")
    assert_one_line_error(code, err, str(bad), "label value(s) 8", "level-1 ids 0-6 or 255")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "res").exists()


def _records(tmp_path):
    return [json.loads(line) for line in (tmp_path / "res" / "mine.jsonl").read_text().splitlines()]


def _replace_pair(root, image, label, seed):
    from tests.test_datasets_real import _scene

    new_image, new_label = _scene(64, 96, seed=seed, values=[0, 1, 2, 9])
    _save(image, new_image, **({"quality": 95} if image.suffix == ".jpg" else {}))
    _save(label, new_label)


def test_a_changed_validation_split_is_measured_again(tmp_path, capsys, small):  # noqa: F811
    root = make_folder(tmp_path / "f", config=SMALL)
    assert cli(capsys, *folder_args(tmp_path, root))[0] == 0
    code, out, _ = cli(capsys, *folder_args(tmp_path, root))
    assert code == 0 and "nothing to do" in out
    _replace_pair(root, root / "images" / "val_1.jpg", root / "labels" / "val_1.png", seed=999)
    code, out, _ = cli(capsys, *folder_args(tmp_path, root))
    assert code == 0 and "1 record(s) appended" in out, out
    first, second = _records(tmp_path)
    assert first["data_fingerprint"] != second["data_fingerprint"]
    assert first["train_fingerprint"] == second["train_fingerprint"]
    assert first["checkpoint"] == second["checkpoint"]


def test_a_checkpoint_trained_on_other_data_is_refused_and_kept(tmp_path, capsys, small):  # noqa: F811
    root = make_folder(tmp_path / "f", config=SMALL)
    assert cli(capsys, *folder_args(tmp_path, root))[0] == 0
    stored = _tree(tmp_path / "ck")
    _replace_pair(root, root / "images" / "train" / "img0.png", root / "labels" / "train" / "img0.png", seed=998)
    code, _, err = cli(capsys, *folder_args(tmp_path, root, "--op", "scale=0.5"))
    assert code == 2
    assert_one_line_error(code, err, "was trained on a training split with fingerprint", "its files changed")
    assert _tree(tmp_path / "ck") == stored
    assert len(_records(tmp_path)) == 1


def test_a_checkpoint_trained_with_another_thread_count_is_said_when_reused(tmp_path, capsys, toy):  # noqa: F811
    assert cli(capsys, "train", "--threads", "1", *train_args(tmp_path))[0] == 0
    code, out, _ = cli(capsys, "run", "--method", "static", "--op", "scale=1.0", "--threads", "2", *common(tmp_path))
    assert code == 0
    notes = [line for line in out.splitlines() if line.startswith("note: reusing")]
    assert len(notes) == 1 and "trained with 1 thread(s); this run uses 2" in notes[0]
    record = json.loads((tmp_path / "res" / "toy.jsonl").read_text())
    assert record["train_threads"] == 1 and record["threads"] == 2


def test_a_second_training_of_one_checkpoint_waits_for_the_first(tmp_path, capsys, toy):  # noqa: F811
    path = _ck_path(tmp_path, toy)
    lock = tmp_path / "ck" / ".locks" / f"toy-{path.name}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(2)",
                               str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    code, out, _ = cli(capsys, "train", *train_args(tmp_path))
    holder.wait()
    assert code == 0
    assert f"waiting for another process training {path.name}" in out
    assert path.exists()


def test_speed_refuses_a_size_that_cannot_fit_in_memory(tmp_path, capsys):
    code, _, err = run_cli(capsys, "speed", "--model", "tiny", "--size", "100000", "--method", "static",
                           "--results", str(tmp_path / "res"))
    assert code == 2
    assert_one_line_error(code, err, "--size 100000", "GiB", "free")

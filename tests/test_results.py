import json
import math
import os
import platform
import shutil
import subprocess

import pytest

from bench import runner
from bench.errors import BenchError
from bench.fileio import locked
from bench.results import ResultsStore, record_identity


def rec(**over):
    r = {"schema_version": 1, "method": "paumer", "knobs": {"tau": 0.2, "layers": [4, 8]},
         "dataset": "synthetic", "split": "val", "checkpoint": "abc123", "batch_size": 8,
         "miou": 0.61, "per_class_iou": [0.7, float("nan")]}
    r.update(over)
    return r


def temp_files(root):
    return [p.name for p in root.iterdir() if p.name.endswith(".tmp")]


def test_round_trip(tmp_path):
    store = ResultsStore(tmp_path / "results")
    assert store.load() == []
    path = store.append(rec())
    store.append(rec(knobs={"tau": 0.3, "layers": [4, 8]}))
    store.append(rec(dataset="cityscapes"))
    assert path == tmp_path / "results" / "synthetic.jsonl"
    assert [r["knobs"]["tau"] for r in store.load("synthetic")] == [0.2, 0.3]
    assert len(store.load()) == 3
    assert store.load("cityscapes")[0]["miou"] == 0.61
    assert store.exists(record_identity(rec())) and store.exists(rec(dataset="cityscapes"))
    assert not store.exists(rec(knobs={"tau": 1}))


def test_identity_is_canonical():
    a = rec(knobs={"tau": 0.2, "layers": [4, 8]})
    b = {k: a[k] for k in reversed(list(a))} | {"knobs": {"layers": [4, 8], "tau": 0.2}}
    assert record_identity(a) == record_identity(b)
    assert record_identity(a) != record_identity(rec(checkpoint="other"))
    assert "miou" not in json.loads(record_identity(a))


def test_identity_conflict_without_and_with_replace(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(rec(miou=0.5))
    with pytest.raises(BenchError, match="--replace"):
        store.append(rec(miou=0.6))
    assert [r["miou"] for r in store.load()] == [0.5]
    store.append(rec(miou=0.6), replace=True)
    assert [r["miou"] for r in store.load()] == [0.6]


@pytest.mark.parametrize("crash_at", ["os.replace", "os.fsync"])
def test_crash_mid_write_leaves_old_file_intact(tmp_path, monkeypatch, crash_at):
    store = ResultsStore(tmp_path)
    path = store.append(rec())
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash")
    monkeypatch.setattr(crash_at, crash)
    with pytest.raises(KeyboardInterrupt):
        store.append(rec(knobs={"tau": 1}))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []
    assert len(store.load()) == 1


def test_corrupt_line_reported_others_kept_and_preserved(tmp_path):
    store = ResultsStore(tmp_path)
    path = store.append(rec())
    with open(path, "ab") as f:
        f.write(b'{"schema_version": 1, "method": "tome", "kno\n')  # torn write
        f.write(json.dumps({"schema_version": 1, "method": "tome"}).encode() + b"\n")
    store.append(rec(knobs={"tau": 1}))
    records, problems = store.load_with_errors()
    assert [r["knobs"] for r in records] == [{"tau": 0.2, "layers": [4, 8]}, {"tau": 1}]
    assert len(problems) == 2
    assert problems[0].startswith(f"{path}:2: not valid JSON (")
    assert problems[1].startswith(f"{path}:3: missing required field(s): knobs")
    assert all("\n" not in p for p in problems)
    # the rewrite kept the bad lines verbatim
    assert b'"method": "tome", "kno\n' in path.read_bytes()
    with pytest.raises(BenchError, match=rf"{path.name}:2: .*\(and 1 more\)"):
        store.load()


def test_concurrent_appends_lose_nothing(tmp_path):
    pids = []
    for i in range(4):
        pid = os.fork()
        if pid == 0:  # child: append its own records, then leave without pytest teardown
            try:
                for j in range(10):
                    ResultsStore(tmp_path).append(rec(knobs={"tau": 100 * i + j}))
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    assert len(ResultsStore(tmp_path).load()) == 40


def test_locked_excludes_another_process_and_times_out_as_a_bench_error(tmp_path):
    lock = tmp_path / ".lock"
    ready, done = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # child: hold the lock until the parent has tried
        try:
            with locked(lock):
                os.write(ready[1], b"x")
                os.read(done[0], 1)
        finally:
            os._exit(0)
    os.read(ready[0], 1)
    try:
        with pytest.raises(BenchError, match=r"could not lock .*\.lock within 0.05 s"):
            with locked(lock, timeout=0.05):
                pass
    finally:
        os.write(done[1], b"x")
        os.waitpid(pid, 0)
    with locked(lock, timeout=1):  # free again once the holder left
        pass


def test_unwritable_folder_is_a_bench_error(tmp_path):
    # Tests may run as root, which ignores permission bits: use a path under a file.
    (tmp_path / "afile").write_text("not a folder")
    root = tmp_path / "afile" / "results"
    with pytest.raises(BenchError, match=str(root)):
        ResultsStore(root).append(rec())


def test_bad_records_are_refused(tmp_path):
    store = ResultsStore(tmp_path)
    with pytest.raises(BenchError, match="checkpoint"):
        store.append({k: v for k, v in rec().items() if k != "checkpoint"})
    with pytest.raises(BenchError, match="schema_version"):
        store.append(rec(schema_version=2))
    with pytest.raises(BenchError, match="dataset name"):
        store.append(rec(dataset="../escape"))
    assert list(tmp_path.iterdir()) == []


def test_provenance_ignores_stored_results_and_reads_commit_without_git(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("docs\n")
    (tmp_path / "results" / "synthetic.jsonl").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    monkeypatch.setattr(runner, "REPO", tmp_path)

    (tmp_path / "results" / "synthetic.jsonl").write_text("{}\n{}\n")  # a run appended a record
    (tmp_path / "README.md").write_text("edited\n")
    env = runner.environment("cpu", 1)
    assert len(env["git_commit"]) == 40 and env["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert runner.environment("cpu", 1)["git_dirty"] is True

    shutil.rmtree(tmp_path / ".git")  # a source copy without git history
    monkeypatch.setenv("BENCH_GIT_COMMIT", "abc123")
    assert runner.environment("cpu", 1)["git_commit"] == "abc123"


def strict_json(line):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(line, parse_constant=refuse)


def test_nan_is_stored_as_null_that_strict_readers_accept(tmp_path):
    store = ResultsStore(tmp_path)
    path = store.append(rec(per_class_iou={"road": 0.7, "sky": float("nan")}))
    store.rewrite("synthetic", store.load() + [rec(knobs={"tau": 1})])
    lines = [strict_json(l) for l in path.read_text().splitlines()]  # raises on a bare NaN
    assert lines[0]["per_class_iou"] == {"road": 0.7, "sky": None} and lines[1]["per_class_iou"][1] is None
    back = store.load()
    assert math.isnan(back[0]["per_class_iou"]["sky"]) and math.isnan(back[1]["per_class_iou"][1])


def test_files_with_bare_nan_still_read(tmp_path):
    (tmp_path / "synthetic.jsonl").write_text(json.dumps(rec()) + "\n")  # Python's json writes NaN
    assert "NaN" in (tmp_path / "synthetic.jsonl").read_text()
    assert math.isnan(ResultsStore(tmp_path).load()[0]["per_class_iou"][1])


def test_identity_holds_the_settings_that_move_the_numbers():
    settings = dict(images=200, device="cpu", precision="float32", batch_sizes=[1, 8],
                    eval={"mode": "whole", "window": None, "stride": None, "scale": 1.0})
    base = record_identity(rec(**settings))
    for change in [{"images": 3}, {"device": "cuda:0"}, {"precision": "bfloat16"}, {"batch_sizes": [1, 32]},
                   {"eval": {**settings["eval"], "scale": 0.5}}]:
        assert record_identity(rec(**{**settings, **change})) != base, change
    # the device's kind counts, not its index
    cuda = record_identity(rec(**{**settings, "device": "cuda:0"}))
    assert cuda == record_identity(rec(**{**settings, "device": "cuda:1"}))
    # a record from before `precision` (it said `dtype`) is the same measurement
    old = {k: v for k, v in settings.items() if k != "precision"} | {"dtype": "float32"}
    assert record_identity(rec(**old)) == base
    # and one without settings at all has an identity of what it has
    assert json.loads(record_identity(rec())).keys() == {"method", "knobs", "dataset", "split", "checkpoint"}


def test_record_names_the_cpu_model_not_the_architecture(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6230\n")
    assert runner.cpu_name(str(info)) == "Intel(R) Xeon(R) Gold 6230"
    assert runner.cpu_name(str(tmp_path / "none")) in {platform.processor() or platform.machine(), "unknown"}
    monkeypatch.setattr(runner, "cpu_name", lambda: "Some CPU 9000")
    env = runner.environment("cpu", 1)
    assert env["cpu_name"] == env["device_name"] == "Some CPU 9000"

"""Hostile input to `bench report` and the results store (issue 28): a results file is
input, so a name in it never becomes a path outside --out, a bad record is one warning
line naming its file and line and the report goes on, and an append through a symlink
updates the link's target."""
import json
import os

import pytest

from bench.results import ResultsStore
from tests.test_report import full_record


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def write_lines(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def cli(capsys, *args):
    """(exit code, stdout, stderr) of `bench ARGS`; 0 when it returns."""
    from bench.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def report_cli(capsys, tmp_path):
    code, out, err = cli(capsys, "report", "--results", str(tmp_path / "res"), "--out",
                             str(tmp_path / "work" / "out"), "--checkpoints", str(tmp_path / "ck"))
    return code, out, err


def good(tmp_path):
    write_lines(tmp_path / "res" / "toy.jsonl", [full_record("baseline", {}, 0.6, 2.0),
                                                 full_record("paumer", {"tau": 0.2}, 0.59, 1.2)])


@pytest.mark.parametrize("dataset", ["../precious", "../../escaped", "/abs/olute", ".hidden"])
def test_a_dataset_name_from_a_results_file_never_becomes_a_path_outside_out(tmp_path, capsys, dataset):
    good(tmp_path)
    precious = tmp_path / "work" / "precious.md"
    precious.parent.mkdir(parents=True)
    precious.write_text("mine")
    write_lines(tmp_path / "res" / "toy.jsonl", [full_record("baseline", {}, 0.6, 2.0, dataset=dataset)])
    before = _files(tmp_path)
    code, out, err = report_cli(capsys, tmp_path)
    assert code in (0, None), err
    assert precious.read_text() == "mine"
    assert [line for line in out.splitlines() if "toy.jsonl:3" in line] == [
        f"warning: skipped {tmp_path / 'res' / 'toy.jsonl'}:3: field 'dataset' is {dataset!r}, expected a plain "
        "name (no path separator, no leading dot)"]
    outside = [f for f in _files(tmp_path) if f not in before and not f.startswith("work/out")]
    assert outside == []
    assert (tmp_path / "work" / "out" / "toy.md").exists()


@pytest.mark.parametrize("change,why", [
    ({"dataset": ["a", "b"]}, "field 'dataset' is a list, expected a string"),
    ({"dataset": 7}, "field 'dataset' is a number, expected a string"),
    ({"speed": {"²": {"throughput": 1.0, "speedup": 1.0}}}, "speed key '²' is not a batch size"),
])
def test_a_bad_record_is_one_warning_line_and_the_report_goes_on(tmp_path, capsys, change, why):
    good(tmp_path)
    write_lines(tmp_path / "res" / "toy.jsonl", [full_record("paumer", {"tau": 0.3}, 0.5, 1.0) | change])
    code, out, err = report_cli(capsys, tmp_path)
    assert code in (0, None) and "Traceback" not in err, err
    assert f"warning: skipped {tmp_path / 'res' / 'toy.jsonl'}:3: {why}" in out
    assert "tau=0.2" in (tmp_path / "work" / "out" / "toy.md").read_text()


def speed_record(**change):
    r = {"schema_version": 1, "method": "baseline", "knobs": {}, "dataset": "speed", "split": "random",
         "checkpoint": None, "gflops": {"mean": 1.0}, "gflops_ratio": 1.0,
         "speed": {"1": {"throughput": 5.0, "speedup": 1.0}}, "eval": {"model": "tiny", "size": 64}}
    return {k: v for k, v in (r | change).items() if v is not ...}


@pytest.mark.parametrize("change,why", [
    ({"gflops": ...}, "lacks field 'gflops'"),
    ({"speed": {"x": {"throughput": 1.0, "speedup": 1.0}}}, "speed key 'x' is not a batch size"),
    ({"speed": {"²": {"throughput": 1.0, "speedup": 1.0}}}, "speed key '²' is not a batch size"),
])
def test_a_bad_speed_record_is_one_warning_line(tmp_path, capsys, change, why):
    good(tmp_path)
    write_lines(tmp_path / "res" / "speed.jsonl", [speed_record(), speed_record(**change)])
    code, out, err = report_cli(capsys, tmp_path)
    assert code in (0, None) and "Traceback" not in err, err
    assert f"warning: skipped {tmp_path / 'res' / 'speed.jsonl'}:2: {why}" in out
    assert (tmp_path / "work" / "out" / "speed.md").exists()


def test_a_results_file_that_is_a_folder_is_one_warning_line(tmp_path, capsys):
    good(tmp_path)
    (tmp_path / "res" / "synthetic.jsonl").mkdir()
    code, out, err = report_cli(capsys, tmp_path)
    assert code in (0, None) and "Traceback" not in err, err
    assert f"warning: skipped {tmp_path / 'res' / 'synthetic.jsonl'}: cannot be read" in out
    assert (tmp_path / "work" / "out" / "toy.md").exists()


def test_an_append_through_a_symlinked_results_file_updates_its_target(tmp_path):
    target = tmp_path / "elsewhere" / "toy.jsonl"
    write_lines(target, [full_record("baseline", {}, 0.6, 2.0)])
    (tmp_path / "res").mkdir()
    os.symlink(target, tmp_path / "res" / "toy.jsonl")
    ResultsStore(tmp_path / "res").append(full_record("paumer", {"tau": 0.2}, 0.59, 1.2))
    assert (tmp_path / "res" / "toy.jsonl").is_symlink()
    assert [json.loads(line)["method"] for line in target.read_text().splitlines()] == ["baseline", "paumer"]


def test_a_stored_record_without_a_fingerprint_matches_any_and_one_with_another_does_not(tmp_path):
    store = ResultsStore(tmp_path / "res")
    old = full_record("baseline", {}, 0.6, 2.0)
    store.append(old)
    assert store.exists(old | {"data_fingerprint": "abc"})  # stored before fingerprints: not re-measured
    store.append(full_record("paumer", {}, 0.6, 2.0, data_fingerprint="abc"))
    assert store.exists(full_record("paumer", {}, 0.6, 2.0, data_fingerprint="abc"))
    assert not store.exists(full_record("paumer", {}, 0.6, 2.0, data_fingerprint="def"))
    assert not store.exists(full_record("paumer", {}, 0.6, 2.0))

"""A folder dataset's bench.json is checked field by field when the dataset is opened,
a folder dataset has a name of its own (records, checkpoints and reports stay apart), and
`bench datasets` fails on a dataset asked for that is missing or malformed."""
import json
from dataclasses import replace

import pytest

from bench import datasets
from bench.cli import main
from bench.datasets import DatasetPreset
from tests.test_cli import assert_one_line_error
from tests.test_datasets_real import SMALL, _run_args, make_folder, small  # noqa: F401  (fixture)

def run_cli(capsys, *args):
    """(exit code, stdout, stderr), 0 when the command returns."""
    try:
        main(list(args))
    except SystemExit as e:
        out = capsys.readouterr()
        return e.code, out.out, out.err
    out = capsys.readouterr()
    return 0, out.out, out.err


BAD_VALUES = [
    ("crop_size", "big"), ("crop_size", -5), ("lr", "fast"), ("lr", -1), ("steps", 2.5), ("batch_size", 0),
    ("window", 0), ("scale_range", 5), ("scale_range", [2, 1]), ("eval_mode", "blah"), ("resize_short", -1),
    ("stride", 64), ("optimizer", "adam"), ("weight_decay", -0.1), ("decoder", "huge"), ("model", "huge"),
    ("steps", True), ("val_split", ""), ("name", "my results"), ("name", "cityscapes"), ("name", 3),
]


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_bench_json_value_is_one_line_error_before_anything_runs(tmp_path, capsys, small, field, value):  # noqa: F811
    root = make_folder(tmp_path / "f", config={**SMALL, field: value})
    code, _, err = run_cli(capsys, *_run_args(tmp_path, "folder", root))
    assert code == 2
    assert_one_line_error(code, err, str(root / "bench.json"), field)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "res").exists()

    code, out, err = run_cli(capsys, "datasets", "--dataset", "folder", "--data-root", str(root))
    assert code == 2 and "Traceback" not in err
    assert out.split()[1] == "missing" and str(root / "bench.json") in out and field in out


def test_every_preset_field_is_checked_on_every_dataset():
    base = DatasetPreset(eval_mode="whole")
    with pytest.raises(ValueError, match="eval_mode"):
        replace(base, eval_mode="blah")
    with pytest.raises(ValueError, match="window"):
        DatasetPreset(eval_mode="slide", stride=8)
    for spec in datasets.DATASETS.values():  # the built-in presets pass, model names included
        from methods.segmenter import PRESETS

        spec.preset.validate(models=PRESETS)


def test_two_named_folders_keep_separate_records_and_checkpoints(tmp_path, small):  # noqa: F811
    make_folder(tmp_path / "a", config=dict(SMALL, name="alpha"))
    make_folder(tmp_path / "b", config=SMALL)  # named "mine" in its bench.json ...
    main(_run_args(tmp_path, "folder", tmp_path / "a"))
    main(_run_args(tmp_path, "folder", tmp_path / "b", "--name", "beta"))  # ... and --name wins
    assert sorted(p.name for p in (tmp_path / "res").glob("*.jsonl")) == ["alpha.jsonl", "beta.jsonl"]
    for name in ("alpha", "beta"):
        (record,) = [json.loads(line) for line in (tmp_path / "res" / f"{name}.jsonl").read_text().splitlines()]
        assert record["dataset"] == name
        assert [p.name.split("-")[0] for p in (tmp_path / "ck" / name).glob("*.pt")] == ["baseline"]
    assert not (tmp_path / "res" / "folder.jsonl").exists() and not (tmp_path / "ck" / "folder").exists()


def test_a_folder_without_a_name_is_one_line_error(tmp_path, capsys, small):  # noqa: F811
    root = make_folder(tmp_path / "f", config=SMALL)
    config = json.loads((root / "bench.json").read_text())
    del config["name"]
    (root / "bench.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, *_run_args(tmp_path, "folder", root))
    assert_one_line_error(code, err, "no dataset name", "--name")


def test_name_is_for_folder_datasets_only(capsys):
    code, _, err = run_cli(capsys, "train", "--dataset", "synthetic", "--name", "mine")
    assert_one_line_error(code, err, "--name", "synthetic")


def test_datasets_names_where_the_root_came_from_and_fails_on_missing_ones(tmp_path, capsys, small, monkeypatch):  # noqa: F811
    monkeypatch.setenv("BENCH_FOLDER_ROOT", str(tmp_path / "from-env"))
    root = make_folder(tmp_path / "f", config=SMALL)
    code, out, _ = run_cli(capsys, "datasets", "--dataset", "folder", "--data-root", str(root))
    assert code == 0
    assert out.split()[:3] == ["folder", "found", str(root)] and "(--data-root)" in out and "as 'mine'" in out
    code, out, err = run_cli(capsys, "datasets", "--dataset", "folder")
    assert code == 2 and "($BENCH_FOLDER_ROOT)" in out and str(tmp_path / "from-env") in out
    assert_one_line_error(code, err, "folder", "missing or malformed")
    monkeypatch.delenv("BENCH_FOLDER_ROOT")
    code, out, _ = run_cli(capsys, "datasets", "--data-root", str(tmp_path / "nowhere"))  # none asked for: a listing
    assert code == 0 and "missing" in out

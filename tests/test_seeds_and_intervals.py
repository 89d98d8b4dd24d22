"""`bench run --seeds` end to end on the toy dataset: one checkpoint and record per seed,
each record with its intervals and its per-image statistics stored beside it."""
import json

import pytest

from bench import per_image
from bench.cli import main
from tests.test_cli import assert_one_line_error, run_cli, toy, toy_args  # noqa: F401 (fixture)


def test_seeds_train_and_store_each_seed_with_intervals_and_statistics(tmp_path, toy):  # noqa: F811
    main(["run", "--method", "static", "--op", "scale=1.0", "--op", "scale=0.5", "--seeds", "0,1", *toy_args(tmp_path)])
    records = [json.loads(l) for l in (tmp_path / "res" / "toy.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 0, 1, 1]
    assert records[0]["checkpoint"] != records[2]["checkpoint"]  # each seed its own baseline
    for r in records:
        low, high = r["miou_ci"]
        assert low <= r["miou"] <= high
        inter, union = per_image.read_counts(tmp_path / "res", r)
        assert inter.shape == union.shape == (r["images"], 5)
        # recomputed from the stored statistics: the same intervals the run wrote
        assert per_image.record_intervals(tmp_path / "res", r) == {k: r[k] for k in per_image.CI_FIELDS if k in r}
    assert records[0]["miou_delta_ci"] == [0.0, 0.0]  # scale 1 is the baseline itself


@pytest.mark.parametrize("args,words", [
    (["--seeds", "0,x"], ["--seeds", "int"]),
    (["--seeds", "0,0"], ["each seed once"]),
    (["--seeds", "0,1", "--seed", "3"], ["--seed or --seeds"]),
])
def test_bad_seeds_are_one_line_errors(capsys, tmp_path, toy, args, words):  # noqa: F811
    code, _, err = run_cli(capsys, "run", "--method", "static", *args, *toy_args(tmp_path))
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "res" / "toy.jsonl").exists()

"""`bench train` is deterministic: the same options give the same weights, whatever the
process did before, interrupted or not, and the same weights as `bench run`."""
import functools
import shutil

import torch

from bench import runner
from bench import train as train_module
from bench.cli import main
from tests.test_cli import toy  # noqa: F401  (fixture: a tiny registered dataset)


def weights(checkpoints, method="baseline"):
    (path,) = [p for p in (checkpoints / "toy").glob("*.pt") if p.name.rsplit("-", 2)[0] == method]
    return torch.load(path, weights_only=False)["weights"]


def train(checkpoints, *extra):
    main(["train", "--dataset", "toy", "--checkpoints", str(checkpoints), "--quiet", *extra])


def test_train_twice_gives_the_same_weights(tmp_path, toy):  # noqa: F811
    for name, prior in (("a", 1), ("b", 2)):
        torch.manual_seed(prior)  # whatever the process's generator was at
        train(tmp_path / name)
    assert weights(tmp_path / "a") == weights(tmp_path / "b")


def test_train_and_run_give_the_same_baseline_and_fine_tuned_weights(tmp_path, toy):  # noqa: F811
    main(["run", "--method", "paumer", "--op", "tau=0.1", "--dataset", "toy", "--checkpoints", str(tmp_path / "run"),
          "--results", str(tmp_path / "res"), "--timing-images", "2", "--repeats", "1", "--quiet"])
    torch.manual_seed(3)
    train(tmp_path / "train", "--method", "paumer")
    assert weights(tmp_path / "train") == weights(tmp_path / "run")
    assert weights(tmp_path / "train", "paumer") == weights(tmp_path / "run", "paumer")


def test_fine_tuned_heads_start_the_same_whether_the_baseline_was_trained_or_loaded(tmp_path, toy):  # noqa: F811
    train(tmp_path / "a", "--method", "early-exit")  # trains the baseline in this process first
    (baseline,) = (tmp_path / "a" / "toy").glob("baseline-*.pt")
    (tmp_path / "b" / "toy").mkdir(parents=True)
    shutil.copy(baseline, tmp_path / "b" / "toy" / baseline.name)
    torch.manual_seed(4)
    train(tmp_path / "b", "--method", "early-exit")  # loads it
    assert weights(tmp_path / "a", "early-exit") == weights(tmp_path / "b", "early-exit")


def test_interrupted_and_resumed_train_equals_an_uninterrupted_one(tmp_path, toy, monkeypatch):  # noqa: F811
    train(tmp_path / "straight")
    whole = runner.train
    monkeypatch.setattr(runner, "train", functools.partial(whole, stop_after=2))  # stops as a kill would
    torch.manual_seed(5)
    train(tmp_path / "resumed")
    (path,) = (tmp_path / "resumed" / "toy").glob("baseline-*.pt")
    stopped = train_module.load_checkpoint(path)
    assert stopped["step"] == 2 and not stopped["done"]
    monkeypatch.setattr(runner, "train", whole)
    torch.manual_seed(6)
    train(tmp_path / "resumed")  # a new process: only the checkpoint carries over
    assert train_module.load_checkpoint(path)["done"]
    assert weights(tmp_path / "resumed") == weights(tmp_path / "straight")


def test_train_uses_the_threads_asked_for(tmp_path, toy):  # noqa: F811
    assert torch.get_num_threads() == 2
    train(tmp_path / "ck", "--threads", "1")
    assert torch.get_num_threads() == 1

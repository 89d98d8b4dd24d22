"""--deterministic training (deterministic algorithms only, recorded outside the
checkpoint's identity) and the training loop's loss, read on the host at log lines only."""
import json

import pytest
import torch

from bench.cli import main
from bench.errors import BenchError
from bench.train import log_path, train
from tests.test_cli import toy  # noqa: F401 - a fixture
from tests.test_train import config, fresh_model


def test_deterministic_training_on_cpu_gives_the_same_weights_and_says_so(tmp_path, toy_dataset):
    cfg = config(steps=2)
    plain = train(fresh_model(cfg), toy_dataset, cfg, tmp_path / "a.pt", progress=False)
    assert not torch.are_deterministic_algorithms_enabled()
    strict = train(fresh_model(cfg), toy_dataset, cfg, tmp_path / "b.pt", progress=False, deterministic=True)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after training
    assert strict["deterministic"] is True and "deterministic" not in plain
    assert strict["weights"] == plain["weights"]  # the CPU's kernels were deterministic already
    assert strict["config"]["hash"] == plain["config"]["hash"]  # not part of the checkpoint's identity


def test_an_op_without_a_deterministic_kernel_is_a_one_line_error(tmp_path, toy_dataset):
    def loss_fn(model, images, labels):
        torch.zeros(4).put_(torch.tensor([0]), torch.tensor([1.0]))  # no deterministic kernel, even on CPU
        return model(images).mean()

    cfg = config(steps=2)
    with pytest.raises(BenchError, match="^--deterministic: put_ does not have a deterministic implementation on this device") as info:
        train(fresh_model(cfg), toy_dataset, cfg, tmp_path / "x.pt", progress=False, loss_fn=loss_fn,
              deterministic=True)
    assert "\n" not in str(info.value)
    assert not torch.are_deterministic_algorithms_enabled()


def test_bench_train_takes_deterministic(tmp_path, toy):  # noqa: F811
    main(["train", "--dataset", "toy", "--checkpoints", str(tmp_path), "--quiet", "--deterministic"])
    (path,) = (tmp_path / "toy").glob("baseline-*.pt")
    assert torch.load(path, weights_only=False)["deterministic"] is True


def test_the_log_holds_the_mean_loss_of_its_steps_and_divergence_stops_training(tmp_path, toy_dataset):
    cfg = config(steps=4)
    seen = []

    def loss_fn(model, images, labels):
        loss = torch.nn.functional.cross_entropy(model(images), labels, ignore_index=255)
        seen.append(loss.item())
        return loss

    train(fresh_model(cfg), toy_dataset, cfg, tmp_path / "a.pt", progress=False, loss_fn=loss_fn, log_every=2)
    lines = [json.loads(line) for line in log_path(tmp_path / "a.pt").read_text().splitlines()]
    assert [e["step"] for e in lines] == [2, 4]
    assert [e["loss"] for e in lines] == [sum(seen[:2]) / 2, sum(seen[2:]) / 2]  # as a host loop summed them

    def diverging(model, images, labels):
        return model(images).mean() * float("nan")

    with pytest.raises(BenchError, match="diverged between steps 0 and 2"):
        train(fresh_model(cfg), toy_dataset, cfg, tmp_path / "b.pt", progress=False, loss_fn=diverging,
              log_every=2)
    assert not (tmp_path / "b.pt").exists()  # no checkpoint of diverged weights

import pytest
import torch

from bench.errors import BenchError
from bench.train import TrainConfig, augment, learning_rate, load_checkpoint, train
from methods.segmenter import build_model


def config(**over):
    base = dict(dataset="toy", num_classes=5, steps=6, batch_size=4, lr=1e-3, warmup_steps=2,
                crop_size=32, model_overrides={"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32})
    base.update(over)
    return TrainConfig(**base)


def fresh_model(cfg):
    torch.manual_seed(123)
    return build_model(cfg.num_classes, cfg.model, **cfg.model_overrides)


def test_interrupted_then_resumed_training_equals_uninterrupted(tmp_path, toy_dataset):
    cfg = config()
    straight = fresh_model(cfg)
    train(straight, toy_dataset, cfg, tmp_path / "a.pt", progress=False, checkpoint_every=2)

    resumed = fresh_model(cfg)
    train(resumed, toy_dataset, cfg, tmp_path / "b.pt", progress=False, checkpoint_every=2, stop_after=3)
    assert load_checkpoint(tmp_path / "b.pt")["step"] == 3
    again = fresh_model(cfg)  # a new process: only the checkpoint carries over
    payload = train(again, toy_dataset, cfg, tmp_path / "b.pt", progress=False, checkpoint_every=2)
    assert payload["step"] == cfg.steps and payload["done"]
    for (k, a), (_, b) in zip(straight.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_training_lowers_the_loss(tmp_path, toy_dataset):
    cfg = config(steps=30, lr=3e-3)
    model = fresh_model(cfg)
    losses = []

    def loss_fn(m, images, labels):
        loss = torch.nn.functional.cross_entropy(m(images), labels, ignore_index=255)
        losses.append(loss.item())
        return loss

    train(model, toy_dataset, cfg, tmp_path / "c.pt", progress=False, loss_fn=loss_fn)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, toy_dataset):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BenchError, match="not a readable bench checkpoint"):
        train(fresh_model(config()), toy_dataset, config(), path, progress=False)
    assert path.read_bytes() == b"not a checkpoint"  # left for the user to inspect


def test_checkpoint_and_config_json_hold_the_full_configuration_and_the_hash_is_unchanged(tmp_path, toy_dataset):
    import json

    from bench.provenance import config_path, full_config

    cfg = config(steps=2)
    assert cfg.hash() == TrainConfig(**{**cfg.__dict__}).hash() and "optimizer" not in cfg.to_dict()  # old hash form
    payload = train(fresh_model(cfg), toy_dataset, cfg, tmp_path / "a.pt", progress=False)
    stored = load_checkpoint(tmp_path / "a.pt")
    assert stored["train_config"] == payload["train_config"] == full_config(cfg)
    assert stored["train_config"]["optimizer"] == "adamw" and stored["train_config"]["hash"] == cfg.hash()
    assert TrainConfig(**{k: v for k, v in stored["train_config"].items() if k != "hash"}).hash() == cfg.hash()
    assert json.loads(config_path(tmp_path / "a.pt").read_text()) == full_config(cfg)
    assert config_path(tmp_path / "a.pt").name == "a.config.json"


def test_tensorboard_events_beside_the_log_when_installed(tmp_path, toy_dataset):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra, not installed here")
    cfg = config(steps=10)
    train(fresh_model(cfg), toy_dataset, cfg, tmp_path / "a.pt", progress=False, tensorboard=True)
    assert list((tmp_path / "a.tb").glob("events.out.tfevents.*"))


def test_learning_rate_warms_up_then_decays():
    cfg = config(steps=100, warmup_steps=10, lr=1.0)
    lrs = [learning_rate(cfg, s) for s in range(100)]
    assert lrs[0] < lrs[9] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_augment_keeps_image_and_label_aligned():
    """Crop, pad and flip move image and label together (scale fixed at 1 so bilinear
    resampling cannot blur the check)."""
    g = torch.Generator().manual_seed(0)
    label = torch.arange(24 * 40).reshape(24, 40) % 5
    image = (label * 50).to(torch.uint8).expand(3, 24, 40).clone()
    for _ in range(5):
        img, lab = augment(image, label, 32, (1.0, 1.0), g)
        assert img.shape == (3, 32, 32) and lab.shape == (32, 32)
        real = lab != 255
        assert real.sum() == 24 * 32  # rows below the image are padding, ignored
        assert torch.equal(img[0][real].long(), lab[real] * 50)


def test_in_memory_data_is_augmented_in_workers_only_on_cuda(toy_dataset, monkeypatch):
    from bench.train import step_loader

    monkeypatch.setenv("BENCH_WORKERS", "1")
    cfg = TrainConfig(dataset="toy", num_classes=3, steps=4, batch_size=2, crop_size=16)
    assert step_loader(toy_dataset, cfg).num_workers == 0  # CPU: the cores are the model's
    on_gpu = step_loader(toy_dataset, cfg, device="cuda")
    assert on_gpu.num_workers == 1 and on_gpu.pin_memory
    # the same batches either way: each is a function of its step
    workers = step_loader(toy_dataset, cfg, num_workers=2)
    for (a, la), (b, lb) in zip(step_loader(toy_dataset, cfg), workers):
        assert torch.equal(a, b) and torch.equal(la, lb)


def read_log(path):
    import json

    return [json.loads(l) for l in path.read_text().splitlines()]


def test_training_log_every_n_steps_and_a_resume_does_not_repeat_steps(tmp_path, toy_dataset):
    from bench.train import log_path

    cfg = config(steps=12)
    path = tmp_path / "a.pt"
    train(fresh_model(cfg), toy_dataset, cfg, path, progress=False, checkpoint_every=4, stop_after=6, log_every=2)
    assert log_path(path) == tmp_path / "a.log.jsonl"
    assert [e["step"] for e in read_log(log_path(path))] == [2, 4, 6]
    # killed after step 6, last checkpoint at 4: the line for 6 is logged again, once
    payload = load_checkpoint(path)
    payload["step"] = 4
    torch.save(payload, path)
    with open(log_path(path), "a") as f:
        f.write('{"step": 8, "lo')  # torn by the kill
    train(fresh_model(cfg), toy_dataset, cfg, path, progress=False, checkpoint_every=4, log_every=2)
    log = read_log(log_path(path))
    assert [e["step"] for e in log] == [2, 4, 6, 8, 10, 12]
    assert set(log[0]) == {"step", "loss", "lr", "step_time_s"}
    assert all(e["loss"] > 0 and e["step_time_s"] > 0 for e in log)
    assert [e["lr"] for e in log] == [learning_rate(cfg, e["step"] - 1) for e in log]


def test_only_rank_0_writes_the_training_log(tmp_path, toy_dataset, monkeypatch):
    from bench import distributed
    from bench.train import log_path

    monkeypatch.setattr(distributed, "rank", lambda: 1)
    cfg = config(steps=4)
    train(fresh_model(cfg), toy_dataset, cfg, tmp_path / "r1.pt", progress=False, log_every=2)
    assert not log_path(tmp_path / "r1.pt").exists()


def test_a_checkpoint_whose_weights_changed_is_refused(tmp_path, toy_dataset):
    cfg = config(steps=2)
    path = tmp_path / "w.pt"
    train(fresh_model(cfg), toy_dataset, cfg, path, progress=False)
    payload = load_checkpoint(path)
    assert payload["weights"] == load_checkpoint(path)["weights"]
    name = next(iter(payload["model"]))
    payload["model"][name] = payload["model"][name] + 1  # still loads, other weights
    torch.save(payload, path)
    with pytest.raises(BenchError, match=f"checkpoint {path} was changed after it was written") as info:
        load_checkpoint(path)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_fp32_keeps_the_config_hash_and_bf16_is_part_of_the_identity():
    fp32, bf16 = config(), config(precision="bf16")
    assert "precision" not in fp32.to_dict() and fp32.hash() == config().hash()
    assert bf16.to_dict()["precision"] == "bf16" and bf16.hash() != fp32.hash()


def test_bf16_training_runs_on_cpu_deterministically(tmp_path, toy_dataset):
    cfg = config(steps=2, precision="bf16")
    runs = []
    for name in ("a", "b"):
        model = fresh_model(cfg)
        payload = train(model, toy_dataset, cfg, tmp_path / f"{name}.pt", progress=False)
        assert payload["config"]["precision"] == "bf16"
        assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: weights stay fp32
        runs.append(payload["weights"])
    fp32 = train(fresh_model(config(steps=2)), toy_dataset, config(steps=2), tmp_path / "c.pt", progress=False)
    assert runs[0] == runs[1] != fp32["weights"]  # deterministic, and really computed in bf16


@pytest.mark.parametrize("precision, device, expected", [
    ("tf32", "cpu", "needs a CUDA device"), ("fp16", "cpu", "use bf16"), ("half", "cpu", "expected one of")])
def test_unsupported_training_precision_is_refused_before_training(tmp_path, toy_dataset, precision, device, expected):
    cfg = config(precision=precision)
    with pytest.raises(BenchError, match=expected):
        train(fresh_model(cfg), toy_dataset, cfg, tmp_path / "x.pt", progress=False)
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------- per-rank loading: only this rank's slots

@pytest.mark.parametrize("hw", [(20, 24), (32, 32), (90, 50)])
def test_skip_augment_draws_what_augment_draws(hw):
    from bench.datasets.files import SegmentationFiles
    from bench.train import skip_augment

    files = SegmentationFiles("x", "train", [], ["a", "b"], train_short_side=40)
    image = torch.randint(0, 256, (3, *hw), dtype=torch.uint8)
    label = torch.zeros(hw, dtype=torch.long)
    for aug, skip in ((augment, skip_augment), (files.augment, files.skip_augment)):
        for seed in range(5):
            a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            aug(image, label, 32, (0.5, 2.0), a)
            skip(b)
            assert torch.equal(a.get_state(), b.get_state()), (aug, hw, seed)


class CountingDataset(torch.utils.data.Dataset):
    """Counts the items decoded; ``own_augment``: brings an augment with no skip."""

    def __init__(self, base, own_augment=False):
        self.base, self.decoded = base, 0
        if own_augment:
            self.augment = augment

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.decoded += 1
        return self.base[i]


@pytest.mark.parametrize("own_augment", [False, True])
def test_each_rank_builds_only_its_slots_and_gets_the_whole_batch_slice(toy_dataset, own_augment):
    from bench.train import StepBatches

    cfg = config(batch_size=8, crop_size=24)
    whole = StepBatches(CountingDataset(toy_dataset), cfg)
    for world in (2, 4):
        for rank in range(world):
            data = CountingDataset(toy_dataset, own_augment)
            part = StepBatches(data, cfg, slots=range(rank, 8, world))
            for step in (0, 5):
                images, labels = whole[step]
                mine = part[step]
                assert torch.equal(mine[0], images[rank::world]) and torch.equal(mine[1], labels[rank::world])
            # a skip: only this rank's images decoded; an augment without one: the whole batch
            assert data.decoded == 2 * (8 if own_augment else 8 // world)


def test_train_precision_tf32_on_cpu_is_a_one_line_error_from_the_cli(tmp_path, capsys):
    from tests.test_cli import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "train", "--train-precision", "tf32", "--checkpoints", str(tmp_path / "c"), "--quiet")
    assert_one_line_error(code, err, "--train-precision tf32 needs a CUDA device")
    assert code == 2 and not (tmp_path / "c").exists()


def test_a_bf16_run_names_its_training_precision(tmp_path):
    from bench import datasets
    from bench.runspec import RunOptions, checkpoint_path, train_config

    spec = datasets.get_spec("synthetic")
    fp32 = train_config(RunOptions(), spec)
    bf16 = train_config(RunOptions(train_precision="bf16"), spec)
    assert fp32.hash() == "507ac65522a9"  # the stored baseline's configuration
    assert bf16.precision == "bf16" and checkpoint_path(RunOptions(), bf16) != checkpoint_path(RunOptions(), fp32)

"""Training loop: AdamW, linear warm-up then poly decay, CE with ignore index 255,
random rescale + crop + horizontal flip, resumable and deterministic.

Every random draw of step ``s`` (which images, how they are augmented, dropout) is
seeded from (seed, s), never from a running generator, so a run killed at any point and
resumed from its last checkpoint reaches the same weights as an uninterrupted run.
A method that fine-tunes (PAUMER, early exit) passes a ``loss_fn`` and extra modules.

Under torchrun (``bench.distributed``) the loop runs with DistributedDataParallel:
``cfg.batch_size`` is the *global* batch; every process decodes and augments only its
strided slice (rank, rank + W, ...) of the deterministic batch of step ``s`` (the other
slots' random draws skipped, ``StepBatches``) and trains on it, gradients are
averaged across processes, and the learning rate is unchanged, so a run means the same
thing on 1 or N processes. Only rank 0 writes checkpoints, the training log and shows
progress.

The training log (``log_path``: ``x.pt`` -> ``x.log.jsonl``) has one JSON line every
``log_every`` steps: ``{"step", "loss", "lr", "step_time_s"}``, ``step`` the steps done,
``loss`` and ``step_time_s`` means over the steps since the previous line, ``lr`` that
of the last of them. A resumed run first drops the lines past its checkpoint's step
(they were logged by the killed run and are logged again), then appends. Lines come
every ``log_every`` steps only, so a run of fewer steps has no log. ``tensorboard``:
the same lines as TensorBoard events too (``bench.provenance``). The full configuration
goes into every checkpoint (``train_config``) and beside it (``x.config.json``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from bench import distributed
from bench.errors import BenchError
from bench.fileio import atomic_write
from bench.provenance import TensorBoardLog, full_config, write_config
from bench.train_precision import (autocast, check_train_precision, deterministic_algorithms, nondeterministic_op,
                                   train_precision)

IGNORE_INDEX = 255
# ViT/Segmenter normalisation (timm's augreg ViTs use mean = std = 0.5)
MEAN, STD = 0.5, 0.5


@dataclass(frozen=True)
class TrainConfig:
    dataset: str
    num_classes: int
    model: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    method: str = "baseline"
    method_knobs: dict = field(default_factory=dict)
    init_from: Optional[str] = None  # weights hash of the checkpoint fine-tuning starts from
    pretrained: bool = False
    steps: int = 1600
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    poly_power: float = 0.9
    crop_size: int = 128
    scale_range: tuple = (0.5, 2.0)
    seed: int = 0
    optimizer: str = "adamw"  # or "sgd": momentum 0.9 (Segmenter's recipe on real data)
    precision: str = "fp32"  # or "bf16" (autocast; TF32 on CUDA) or "tf32" (CUDA): ``train_precision``

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale_range"] = list(self.scale_range)
        if d["optimizer"] == "adamw":  # added later: the default keeps earlier config hashes
            del d["optimizer"]
        if d["precision"] == "fp32":  # likewise: fp32 checkpoints keep their hashes
            del d["precision"]
        # the model's class token counts only when on (a preset's default included): a model
        # without one hashes as before the option, one with it never loads another's weights
        d["model_overrides"] = {k: v for k, v in d["model_overrides"].items()
                                if k != "class_token" and not _is_default_option(k, v)}
        if _has_class_token(self.model, self.model_overrides):
            d["class_token"] = True
        return d

    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _has_class_token(preset: str, overrides: dict) -> bool:
    from methods.segmenter import model_config

    try:
        return model_config(preset, **overrides).class_token
    except (TypeError, ValueError):  # a bad preset or override is refused where the model is built
        return bool(overrides.get("class_token"))


def _is_default_option(name: str, value) -> bool:
    """A model option added after checkpoints were stored, at bench's default (numerics,
    distillation token, patch bias): left out of the hash, so every stored hash holds."""
    from methods.segmenter import DEFAULT_NUMERICS

    defaults = {**DEFAULT_NUMERICS, "dist_token": False, "patch_bias": True}
    if name not in defaults:
        return False
    default = defaults[name]
    return list(value) == list(default) if isinstance(default, tuple) and isinstance(value, (list, tuple)) \
        else value == default


def normalize(images: Tensor, mean=None, std=None) -> Tensor:
    """uint8 (B, 3, H, W) -> float, normalised as the ViT expects: ``mean`` / ``std`` per
    RGB channel (a model's ``ModelConfig.mean`` / ``std``); None or bench's 0.5: 0.5."""
    if mean is None or (tuple(mean) == (MEAN,) * 3 and tuple(std) == (STD,) * 3):
        return (images.float() / 255.0 - MEAN) / STD  # bench's own, as it always computed
    shape = (1, -1, 1, 1)
    mean = torch.tensor(mean, dtype=torch.float32, device=images.device).reshape(shape)
    std = torch.tensor(std, dtype=torch.float32, device=images.device).reshape(shape)
    return (images.float() / 255.0 - mean) / std


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (1 - progress) ** cfg.poly_power


def _rng(seed: int, *keys: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(hashlib.sha256(repr((seed,) + keys).encode()).hexdigest()[:15], 16))
    return g


def augment(image: Tensor, label: Tensor, crop: int, scale_range, g: torch.Generator):
    """Random rescale, random crop (padding with ignore where the image is smaller),
    random horizontal flip. image uint8 (3, H, W), label int64 (H, W)."""
    lo, hi = scale_range
    s = lo + (hi - lo) * float(torch.rand((), generator=g))
    H, W = label.shape
    h, w = max(1, round(H * s)), max(1, round(W * s))
    img = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    lab = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    ph, pw = max(0, crop - h), max(0, crop - w)
    if ph or pw:
        img = F.pad(img, (0, pw, 0, ph), value=0.0)
        lab = F.pad(lab, (0, pw, 0, ph), value=IGNORE_INDEX)
    top = int(torch.randint(0, img.shape[1] - crop + 1, (), generator=g))
    left = int(torch.randint(0, img.shape[2] - crop + 1, (), generator=g))
    img = img[:, top : top + crop, left : left + crop]
    lab = lab[top : top + crop, left : left + crop]
    if torch.rand((), generator=g) < 0.5:
        img, lab = img.flip(-1), lab.flip(-1)
    return img.round().clamp(0, 255).to(torch.uint8), lab


def skip_augment(g: torch.Generator) -> None:
    """Advance ``g`` past exactly what ``augment`` draws for one image (a uniform, two
    integers, a uniform: a fixed count whatever the sizes), without an image: a process
    that augments only its slots of a batch still gives each slot its draws."""
    torch.rand((), generator=g)
    torch.randint(0, 1, (), generator=g)
    torch.randint(0, 1, (), generator=g)
    torch.rand((), generator=g)


class StepBatches(torch.utils.data.Dataset):
    """Item ``s`` is the augmented batch of step ``s``: a pure function of (seed, s), so
    DataLoader workers and resumed runs see exactly the same batches.

    ``slots``: the positions of the global batch this process trains on (under torchrun
    rank, rank + W, ...); only those images are decoded and augmented, the others' random
    draws skipped (``skip_augment``, or the dataset's own), so every slot gets the image
    and augmentation it gets in one process. A dataset with its own ``augment`` and no
    ``skip_augment`` has the whole batch built and sliced.
    """

    def __init__(self, dataset, cfg: TrainConfig, slots: Optional[Sequence[int]] = None):
        self.dataset, self.cfg = dataset, cfg
        self.slots = None if slots is None else list(slots)

    def __len__(self) -> int:
        return self.cfg.steps

    def indices(self, step: int) -> list[int]:
        n, b = len(self.dataset), self.cfg.batch_size
        per_epoch = max(1, n // b)
        epoch, pos = divmod(step, per_epoch)
        order = torch.randperm(n, generator=_rng(self.cfg.seed, 0, epoch))
        return order[pos * b : pos * b + b].tolist()

    def _skip(self):
        """How to pass over a slot that is not ours: None when it must be built anyway."""
        if not hasattr(self.dataset, "augment"):
            return skip_augment
        return getattr(self.dataset, "skip_augment", None)

    def __getitem__(self, step: int):
        g = _rng(self.cfg.seed, 1, step)
        skip = self._skip() if self.slots is not None else None
        mine = set(self.slots) if skip is not None else None
        images, labels = [], []
        for slot, i in enumerate(self.indices(step)):
            if mine is not None and slot not in mine:
                skip(g)
                continue
            img, lab = self.dataset[i]
            # a file dataset brings its own: same draws, resamples only the crop
            img, lab = getattr(self.dataset, "augment", augment)(img, lab, self.cfg.crop_size,
                                                                 self.cfg.scale_range, g)
            images.append(img)
            labels.append(lab)
        images, labels = torch.stack(images), torch.stack(labels)
        if self.slots is not None and mine is None:  # built whole: keep our slots
            images, labels = images[self.slots], labels[self.slots]
        return images, labels


def step_loader(dataset, cfg: TrainConfig, start: int = 0, *, device: str = "cpu",
                num_workers: Optional[int] = None, slots: Optional[Sequence[int]] = None) -> torch.utils.data.DataLoader:
    """The batches of steps ``start`` .. ``cfg.steps - 1`` (``slots``: only those
    positions of each, ``StepBatches``), decoded and augmented in
    ``num_workers`` processes, pinned when training on CUDA. Default: what the dataset
    asks for (``loader_workers``); for in-memory data, augmentation runs in this process
    on CPU (the cores are the model's) and in workers on CUDA (where it would starve the
    GPU). Every batch is a function of its step, so the workers change no result."""
    if num_workers is None:
        from bench.datasets.files import default_workers

        num_workers = getattr(dataset, "loader_workers", default_workers() if device.startswith("cuda") else 0)
    return torch.utils.data.DataLoader(StepBatches(dataset, cfg, slots), sampler=range(start, cfg.steps), batch_size=None,
                                       num_workers=num_workers, pin_memory=device.startswith("cuda"),
                                       persistent_workers=False)


def state_hash(state: dict) -> str:
    """Content hash of a state dict (independent of how the file was serialised)."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def weights_hash(model: nn.Module) -> str:
    """Content hash of the model's weights: what records name as their checkpoint."""
    return state_hash(model.state_dict())


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic (``bench.fileio.atomic_write``): a kill mid-save leaves the previous
    checkpoint intact, and two processes saving it cannot interleave their bytes."""
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise BenchError(f"checkpoint {path} is not a readable bench checkpoint ({type(e).__name__}); "
                         "delete it to train again") from None
    if not isinstance(payload, dict) or not {"model", "step", "config"} <= payload.keys():
        raise BenchError(f"checkpoint {path} lacks model/step/config; delete it to train again")
    # The hash records carry is that of the weights loaded, never only what the file says
    try:
        actual = state_hash(payload["model"])
    except (AttributeError, TypeError, RuntimeError):
        raise BenchError(f"checkpoint {path} holds no readable model weights; delete it to train again") from None
    if payload.get("weights", actual) != actual:
        raise BenchError(f"checkpoint {path} was changed after it was written: its weights hash to {actual}, "
                         f"not the stored {payload['weights']}; delete it to train again")
    payload["weights"] = actual
    return payload


def log_path(checkpoint: Path) -> Path:
    """Where the training log of a checkpoint lives: next to it, ``.pt`` -> ``.log.jsonl``."""
    return Path(checkpoint).with_suffix(".log.jsonl")


class TrainingLog:
    """Appends a line every ``every`` steps (see the module notes); ``enabled``: rank 0.

    Each step's loss is summed where it was computed (``add``: no host read); ``read``
    brings the sum to the host, the step's one read, made only at a line, before a
    checkpoint and at the end, and raises there if the loss is not finite."""

    def __init__(self, path: Path, every: int, start: int, enabled: bool, tensorboard: Optional[TensorBoardLog] = None):
        self.path, self.every, self.enabled, self.tensorboard = path, every, enabled, tensorboard
        self.total: Optional[Tensor] = None  # float64 sum of this process's losses since the last line
        self.count, self.first = 0, start  # steps in it, and the first of them
        self.since = time.perf_counter()
        if enabled:
            self._keep_up_to(start)

    def _keep_up_to(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_bytes().split(b"\n"):
            try:
                entry = json.loads(line)
            except ValueError:  # a line torn by a kill, or blank
                continue
            if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
                kept.append(line + b"\n")
        atomic_write(self.path, lambda f: f.write(b"".join(kept)))

    def add(self, loss: Tensor) -> None:
        """One step's loss, summed on its device (float64: the sum a host loop would make)."""
        loss = loss.detach().double()
        self.total = loss if self.total is None else self.total + loss
        self.count += 1

    def read(self, completed: int) -> Optional[float]:
        """The mean loss since the last line (over processes: every one calls it at the same
        steps); raises if it is not finite. None when no step was added."""
        if not self.count:
            return None
        total = self.total.item()  # the host read
        if distributed.world_size() > 1:
            total = distributed.all_reduce_sum(torch.tensor([total], dtype=torch.float64)).item() / distributed.world_size()
        value = total / self.count
        if not math.isfinite(value):
            raise BenchError(f"training diverged between steps {self.first} and {completed} (mean loss {value}); "
                             "lower the learning rate")
        return value

    def step(self, completed: int, lr: float) -> Optional[float]:
        """After step ``completed``: a line when one is due; returns the mean loss it read, or None."""
        if completed % self.every:
            return None
        value = self.read(completed)
        now = time.perf_counter()
        entry = {"step": completed, "loss": value, "lr": lr, "step_time_s": (now - self.since) / self.count}
        self.total, self.count, self.first, self.since = None, 0, completed, now
        if self.enabled:
            try:  # the first line may come before the first checkpoint made the folder
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
            except OSError as e:
                raise BenchError(f"cannot write the training log {self.path}: {e.strerror or e}") from None
            if self.tensorboard is not None:
                self.tensorboard.write(entry)
        return value


def default_loss(model, images: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(model(images), labels, ignore_index=IGNORE_INDEX)


class _Loss(nn.Module):
    """``loss_fn(model, images, labels)`` as a module's forward, so that
    DistributedDataParallel wraps any method's loss (heads, simulated pausing) unchanged."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fn(self.model, images, labels)


def train(
    model: nn.Module,
    dataset,
    cfg: TrainConfig,
    path: Path,
    *,
    loss_fn: Callable = default_loss,
    device: str = "cpu",
    checkpoint_every: int = 100,
    num_workers: Optional[int] = None,
    progress: bool = True,
    stop_after: Optional[int] = None,
    log_every: int = 10,
    provenance: Optional[dict] = None,
    tensorboard: bool = False,
    deterministic: bool = False,
) -> dict:
    """Train ``model`` (in place) to ``cfg.steps``, resuming from ``path`` if present.

    Returns the final checkpoint payload. ``stop_after`` ends the run early at that step
    (as an interruption would), used by tests of resumption. ``log_every``: steps between
    lines of the training log (``log_path(path)``); ``tensorboard``: also as events.
    Under torchrun every process
    calls this with the same arguments (see the module notes); the payload they return
    is the same. ``provenance``: fields the checkpoint also stores (the training split's
    fingerprint, the thread count), outside its configuration and its hash.
    ``deterministic``: deterministic algorithms only (``deterministic_algorithms``); the
    checkpoint says so (``deterministic: true``), outside its hash too.
    """
    rank, world = distributed.rank(), distributed.world_size()
    check_train_precision(cfg.precision, device)
    if log_every < 1:
        raise BenchError(f"the training log needs a step interval of at least 1, got {log_every}")
    if cfg.batch_size % world:
        raise BenchError(f"the global batch of {cfg.batch_size} images cannot be split evenly over {world} "
                         f"processes; use a number of processes that divides it")
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise BenchError(f"unknown optimizer {cfg.optimizer!r}; expected 'adamw' or 'sgd'")
    start = 0
    if path.exists():
        payload = load_checkpoint(path)
        if payload["config"].get("hash") != cfg.hash():
            raise BenchError(f"checkpoint {path} was trained with another configuration; "
                             "delete it or choose another checkpoint folder")
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        start = payload["step"]
    if start >= cfg.steps:
        if rank == 0:
            write_config(path, cfg)
        payload.setdefault("train_config", full_config(cfg))  # a checkpoint from before it was stored
        return payload

    slots = range(rank, cfg.batch_size, world) if world > 1 else None  # this process's share of each batch
    loader = step_loader(dataset, cfg, start, device=device, num_workers=num_workers, slots=slots)
    model.train()
    forward = _Loss(model, loss_fn)
    if world > 1:
        # device_ids: the one GPU of this process (None on CPU); parameters are broadcast
        # from rank 0 here, gradients averaged in backward
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    show = progress and rank == 0
    if show:
        split = f" = {world} processes x {cfg.batch_size // world}" if world > 1 else ""
        tqdm.write(f"train {cfg.method}: global batch {cfg.batch_size}{split}, lr {cfg.lr:g} (warm-up "
                   f"{cfg.warmup_steps} steps, poly decay), {cfg.steps} steps, from step {start}", file=sys.stderr)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.method}", unit="it",
               disable=not show, dynamic_ncols=True)
    step = start

    def checkpoint(step: int, final: bool = False) -> Optional[dict]:
        if rank != 0 and not final:  # only rank 0 writes; every rank needs the final payload
            return None
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                   "config": {**cfg.to_dict(), "hash": cfg.hash()}, "done": step >= cfg.steps,
                   "weights": weights_hash(model), "train_config": full_config(cfg), **(provenance or {}),
                   **({"deterministic": True} if deterministic else {})}
        if rank == 0:
            save_checkpoint(path, payload)
            write_config(path, cfg)  # after the checkpoint: no config.json without its checkpoint
        return payload

    # the model's input statistics (an imported DeiT's differ; bench's: 0.5 / 0.5)
    config = getattr(getattr(model, "segmenter", model), "config", None)
    input_stats = (getattr(config, "mean", None), getattr(config, "std", None))
    t0 = time.perf_counter()
    completed, stepping = start, False
    if log_path(path).is_dir():
        raise BenchError(f"training log {log_path(path)} is a folder; expected a file (or nothing) there")
    events = TensorBoardLog(path) if tensorboard and rank == 0 else None
    log = TrainingLog(log_path(path), log_every, start, enabled=rank == 0, tensorboard=events)
    precision = contextlib.ExitStack()  # closed in the finally below
    precision.enter_context(train_precision(cfg.precision, device))
    precision.enter_context(deterministic_algorithms(deterministic, device))
    try:
        for step, (images, labels) in zip(range(start, end), loader):
            # dropout / drop-path: per step, and per process when there are several
            keys = (2, step) if world == 1 else (2, step, rank)
            torch.manual_seed(int(_rng(cfg.seed, *keys).initial_seed()))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            images = normalize(images.to(device, non_blocking=True), *input_stats)
            labels = labels.to(device, non_blocking=True)
            with autocast(cfg.precision, device):
                loss = forward(images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stepping = True
            optimizer.step()
            stepping, completed = False, step + 1
            # the loss stays on the device: read (and checked) at a log line, before a
            # checkpoint and at the end only, so steps queue without waiting on the host
            log.add(loss)
            value = log.step(completed, learning_rate(cfg, step))
            saving = completed % checkpoint_every == 0 and completed < end
            if value is None and (saving or completed == end):
                value = log.read(completed)  # no checkpoint of diverged weights
            bar.update(1)
            if value is not None:
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{learning_rate(cfg, step):.2e}")
            if saving:
                checkpoint(completed)
    except RuntimeError as e:
        refused = nondeterministic_op(e) if deterministic else None
        if refused is None:
            raise
        raise refused from None
    except KeyboardInterrupt:
        if not stepping:  # weights are exactly those after `completed` steps
            checkpoint(completed)
        bar.close()
        raise
    finally:
        if events is not None:
            events.close()
        precision.close()
    bar.close()
    model.eval()
    payload = checkpoint(end, final=True)
    distributed.barrier()  # the checkpoint is on disk before any process goes on
    payload["seconds"] = time.perf_counter() - t0
    return payload

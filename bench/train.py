"""Training loop: AdamW, linear warm-up then poly decay, CE with ignore index 255,
random rescale + crop + horizontal flip, resumable and deterministic.

Every random draw of step ``s`` (which images, how they are augmented, dropout) is
seeded from (seed, s), never from a running generator, so a run killed at any point and
resumed from its last checkpoint reaches the same weights as an uninterrupted run.
A method that fine-tunes (PAUMER, early exit) passes a ``loss_fn`` and extra modules.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from bench.errors import BenchError

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale_range"] = list(self.scale_range)
        return d

    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def normalize(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float, normalised as the ViT expects."""
    return (images.float() / 255.0 - MEAN) / STD


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


class StepBatches(torch.utils.data.Dataset):
    """Item ``s`` is the whole augmented batch of step ``s``: a pure function of
    (seed, s), so DataLoader workers and resumed runs see exactly the same batches."""

    def __init__(self, dataset, cfg: TrainConfig):
        self.dataset, self.cfg = dataset, cfg

    def __len__(self) -> int:
        return self.cfg.steps

    def indices(self, step: int) -> list[int]:
        n, b = len(self.dataset), self.cfg.batch_size
        per_epoch = max(1, n // b)
        epoch, pos = divmod(step, per_epoch)
        order = torch.randperm(n, generator=_rng(self.cfg.seed, 0, epoch))
        return order[pos * b : pos * b + b].tolist()

    def __getitem__(self, step: int):
        g = _rng(self.cfg.seed, 1, step)
        images, labels = [], []
        for i in self.indices(step):
            img, lab = self.dataset[i]
            img, lab = augment(img, lab, self.cfg.crop_size, self.cfg.scale_range, g)
            images.append(img)
            labels.append(lab)
        return torch.stack(images), torch.stack(labels)


def weights_hash(model: nn.Module) -> str:
    """Content hash of the weights (independent of how the file was serialised)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic: a kill mid-save leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise BenchError(f"checkpoint {path} is not a readable bench checkpoint ({type(e).__name__}); "
                         "delete it to train again") from None
    if not isinstance(payload, dict) or not {"model", "step", "config"} <= payload.keys():
        raise BenchError(f"checkpoint {path} lacks model/step/config; delete it to train again")
    return payload


def default_loss(model, images: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(model(images), labels, ignore_index=IGNORE_INDEX)


def train(
    model: nn.Module,
    dataset,
    cfg: TrainConfig,
    path: Path,
    *,
    loss_fn: Callable = default_loss,
    device: str = "cpu",
    checkpoint_every: int = 100,
    num_workers: int = 0,
    progress: bool = True,
    stop_after: Optional[int] = None,
) -> dict:
    """Train ``model`` (in place) to ``cfg.steps``, resuming from ``path`` if present.

    Returns the final checkpoint payload. ``stop_after`` ends the run early at that step
    (as an interruption would), used by tests of resumption.
    """
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
        return payload

    batches = StepBatches(dataset, cfg)
    sampler = range(start, cfg.steps)
    loader = torch.utils.data.DataLoader(batches, sampler=sampler, batch_size=None, num_workers=num_workers,
                                         pin_memory=device.startswith("cuda"), persistent_workers=False)
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.method}", unit="it",
               disable=not progress, dynamic_ncols=True)
    step = start

    def checkpoint(step: int) -> dict:
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                   "config": {**cfg.to_dict(), "hash": cfg.hash()}, "done": step >= cfg.steps,
                   "weights": weights_hash(model)}
        save_checkpoint(path, payload)
        return payload

    t0 = time.perf_counter()
    completed, stepping = start, False
    try:
        for step, (images, labels) in zip(range(start, end), loader):
            torch.manual_seed(int(_rng(cfg.seed, 2, step).initial_seed()))  # dropout / drop-path
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            images, labels = normalize(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
            loss = loss_fn(model, images, labels)
            if not math.isfinite(loss.item()):
                raise BenchError(f"training diverged at step {step} (loss {loss.item()}); lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stepping = True
            optimizer.step()
            stepping, completed = False, step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{learning_rate(cfg, step):.2e}")
            if completed % checkpoint_every == 0 and completed < end:
                checkpoint(completed)
    except KeyboardInterrupt:
        if not stepping:  # weights are exactly those after `completed` steps
            checkpoint(completed)
        bar.close()
        raise
    bar.close()
    model.eval()
    payload = checkpoint(end)
    payload["seconds"] = time.perf_counter() - t0
    return payload

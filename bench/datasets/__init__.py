"""Dataset registry: where each dataset lives, how it is evaluated and trained.

A dataset item is ``(image uint8 (3, H, W), label int64 (H, W))`` with ``ignore_index``
255. Everything a protocol needs to know about a dataset is in its ``DatasetPreset``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from bench.errors import BenchError


@dataclass(frozen=True)
class DatasetPreset:
    """Evaluation and training protocol of one dataset (Segmenter's, for real data)."""

    eval_mode: str  # "whole": the whole image; "slide": windows, each its own image
    window: Optional[int] = None
    stride: Optional[int] = None
    crop_size: int = 128  # training crops
    scale_range: tuple[float, float] = (0.5, 2.0)  # training random rescale
    batch_size: int = 8
    lr: float = 1e-3
    steps: int = 1600  # the default training budget
    model: str = "tiny"
    decoder: str = "linear"
    val_split: str = "val"
    # resize rule: None = as stored; N = short side N (evaluation resizes the image, not
    # the label; training rescales to it before the random rescale)
    resize_short: Optional[int] = None
    optimizer: str = "adamw"  # "adamw", or "sgd" (momentum 0.9, Segmenter's recipe)
    weight_decay: float = 0.05


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: tuple[str, ...]
    preset: DatasetPreset
    root_env: str  # environment variable naming the root
    default_root: str
    open_split: Callable  # (split, root) -> torch Dataset; raises BenchError when malformed
    description: str = ""
    # (root) -> {split: count} without loading everything; None: open each split
    count_splits: Optional[Callable] = None
    # (spec, root) -> the spec for the data under root (classes, preset read from there)
    resolve: Optional[Callable] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def root(self, root: Optional[str] = None) -> Path:
        return Path(root or os.environ.get(self.root_env) or self.default_root)


def _open_synthetic(split: str, root: Path):
    from bench.datasets.synthetic import SyntheticDataset

    if split not in ("train", "val"):
        raise BenchError(f"synthetic has splits 'train' and 'val', not {split!r}")
    return SyntheticDataset(split, root)


def _count_synthetic(root: Path) -> dict:
    from bench.datasets.synthetic import SPLITS, VERSION

    cached = {s: SPLITS[s][1] for s in ("train", "val") if (root / VERSION / f"{s}.npz").exists()}
    if len(cached) < 2:
        raise BenchError(f"not generated yet under {root / VERSION}; made on first use (about a minute)")
    return cached


def _synthetic_classes() -> tuple[str, ...]:
    from bench.datasets.synthetic import CLASSES

    return tuple(CLASSES)


def _preset(name: str) -> DatasetPreset:
    return DATASETS[name].preset


def _open_cityscapes(split: str, root: Path):
    from bench.datasets import cityscapes

    return cityscapes.open_split(split, root)


def _count_cityscapes(root: Path) -> dict:
    from bench.datasets import cityscapes

    return cityscapes.count_splits(root)


def _open_ade20k(split: str, root: Path):
    from bench.datasets import ade20k

    return ade20k.open_split(split, root, train_short_side=_preset("ade20k").resize_short)


def _count_ade20k(root: Path) -> dict:
    from bench.datasets import ade20k

    return ade20k.count_splits(root)


def _open_folder(split: str, root: Path):
    from bench.datasets import folder

    return folder.open_split(split, root, train_short_side=get_spec("folder", str(root)).preset.resize_short)


def _count_folder(root: Path) -> dict:
    from bench.datasets import folder

    return folder.count_splits(root)


def _resolve_folder(spec: "DatasetSpec", root: Path) -> "DatasetSpec":
    from bench.datasets import folder

    return folder.resolve(spec, root)


def _open_idd_lite(split: str, root: Path):
    from bench.datasets import idd_lite

    return idd_lite.open_split(split, root, train_short_side=_preset("idd-lite").resize_short)


def _count_idd_lite(root: Path) -> dict:
    from bench.datasets import idd_lite

    return idd_lite.count_splits(root)


def _idd_lite_classes() -> tuple[str, ...]:
    from bench.datasets.idd_lite import CLASSES

    return CLASSES


def _cityscapes_classes() -> tuple[str, ...]:
    from bench.datasets.cityscapes import CLASSES

    return CLASSES


def _ade20k_classes() -> tuple[str, ...]:
    from bench.datasets.ade20k import CLASSES

    return CLASSES


# Segmenter's recipe (github.com/rstrudel/segmenter, segm/config.yml): SGD, momentum 0.9,
# no weight decay, poly schedule, batch 8; Cityscapes 216 epochs of 2975 images
# (~80k iterations), lr 0.01, crops 768, windows 768 / stride 512; ADE20K 64 epochs of
# 20210 images (~160k iterations), lr 0.001, short side 512, crops and windows 512.
# Model: ViT-S/16 with the mask decoder (Seg-S-Mask/16); --model vit_tiny / vit_base.
DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(
        name="synthetic",
        classes=_synthetic_classes(),
        # a milder rescale than Segmenter's (0.5, 2.0): the scenes are already small
        preset=DatasetPreset(eval_mode="whole", crop_size=128, scale_range=(0.75, 1.5), batch_size=8,
                             lr=1e-3, steps=1600),
        root_env="BENCH_SYNTHETIC_ROOT",
        default_root="data",
        open_split=_open_synthetic,
        description="generated street scenes, 128x128 (cached on first use)",
        count_splits=_count_synthetic,
    ),
    "cityscapes": DatasetSpec(
        name="cityscapes",
        classes=_cityscapes_classes(),
        preset=DatasetPreset(eval_mode="slide", window=768, stride=512, crop_size=768, scale_range=(0.5, 2.0),
                             batch_size=8, lr=0.01, steps=80_000, model="vit_small", decoder="mask",
                             optimizer="sgd", weight_decay=0.0),
        root_env="CITYSCAPES_DATASET",
        default_root="data/cityscapes",
        open_split=_open_cityscapes,
        description="19 train-id classes, 1024x2048 (leftImg8bit + gtFine)",
        count_splits=_count_cityscapes,
    ),
    "ade20k": DatasetSpec(
        name="ade20k",
        classes=_ade20k_classes(),
        preset=DatasetPreset(eval_mode="slide", window=512, stride=512, crop_size=512, scale_range=(0.5, 2.0),
                             batch_size=8, lr=0.001, steps=160_000, model="vit_small", decoder="mask",
                             resize_short=512, optimizer="sgd", weight_decay=0.0),
        root_env="ADE20K_DATASET",
        default_root="data/ade20k",
        open_split=_open_ade20k,
        description="150 classes, short side 512 (ADEChallengeData2016)",
        count_splits=_count_ade20k,
    ),
    # CPU scale, like synthetic (see docs): the tiny model on short side 160, whole images
    "idd-lite": DatasetSpec(
        name="idd-lite",
        classes=_idd_lite_classes(),
        preset=DatasetPreset(eval_mode="whole", crop_size=128, scale_range=(0.75, 1.5), batch_size=8,
                             lr=1e-3, steps=1600, resize_short=160),
        root_env="IDD_LITE_DATASET",
        default_root="data/idd-lite",
        open_split=_open_idd_lite,
        description="7 IDD level-1 classes, 320x227 dash-camera photos (idd20k_lite)",
        count_splits=_count_idd_lite,
    ),
    "folder": DatasetSpec(
        name="folder",
        classes=(),  # read from <root>/classes.txt by `resolve`
        preset=DatasetPreset(eval_mode="slide", window=512, stride=512, crop_size=512, scale_range=(0.5, 2.0),
                             batch_size=8, lr=0.001, steps=20_000, model="vit_small", decoder="mask",
                             optimizer="sgd", weight_decay=0.0),
        root_env="BENCH_FOLDER_ROOT",
        default_root="data/folder",
        open_split=_open_folder,
        description="your images + label PNGs + classes.txt",
        count_splits=_count_folder,
        resolve=_resolve_folder,
    ),
}


def get_spec(name: str, root: Optional[str] = None) -> DatasetSpec:
    """The dataset's spec; for a dataset whose classes live with the data (``folder``),
    read from ``root`` (or its environment variable / default root)."""
    if name not in DATASETS:
        raise BenchError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if spec.resolve is not None:
        spec = spec.resolve(spec, spec.root(root))
    return spec


def open_dataset(name: str, split: str, root: Optional[str] = None):
    if name not in DATASETS:
        get_spec(name)  # raises
    spec = DATASETS[name]
    return spec.open_split(split, spec.root(root))


def dataset_status(name: str, root: Optional[str] = None) -> dict:
    """Where a dataset is looked for, whether it is there, and image counts per split;
    ``problem`` says what is wrong with a tree that is missing or malformed."""
    spec = DATASETS[name] if name in DATASETS else get_spec(name)
    where = spec.root(root)
    status = {"name": name, "root": str(where), "env": spec.root_env, "found": False, "splits": {}, "problem": None}
    try:
        spec = get_spec(name, root)
        if spec.count_splits is not None:
            status["splits"] = spec.count_splits(where)
        else:
            for split in ("train", spec.preset.val_split):
                status["splits"][split] = len(spec.open_split(split, where))
        status["found"] = True
    except BenchError as e:
        status["problem"] = str(e)
    return status


def loader_speed(name: str, root: Optional[str] = None, *, batches: int = 20, workers: Optional[int] = None,
                 device: str = "cpu", seed: int = 0) -> dict:
    """Images per second of the training loader alone (decoding + augmentation in its
    workers, pinned memory and the copy to ``device``), over ``batches`` batches after
    one warm-up batch (worker start-up), with the dataset's preset (crop, batch, scale)."""
    import time

    import torch

    from bench.train import TrainConfig, step_loader

    spec = get_spec(name, root)
    p = spec.preset
    dataset = open_dataset(name, "train", root)
    cfg = TrainConfig(dataset=name, num_classes=spec.num_classes, steps=batches + 1, batch_size=p.batch_size,
                      crop_size=p.crop_size, scale_range=p.scale_range, seed=seed)
    loader = step_loader(dataset, cfg, 0, device=device, num_workers=workers)
    it = iter(loader)
    images, labels = next(it)  # warm-up: workers start, first batch
    start = time.perf_counter()
    n = 0
    for images, labels in it:
        images.to(device, non_blocking=True)
        labels.to(device, non_blocking=True)
        n += len(images)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"dataset": name, "images": n, "seconds": seconds, "images_per_s": n / seconds if seconds else float("inf"),
            "batch_size": p.batch_size, "crop_size": p.crop_size, "batches": batches,
            "workers": loader.num_workers, "pin_memory": loader.pin_memory}

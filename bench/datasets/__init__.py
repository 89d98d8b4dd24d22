"""Dataset registry: where each dataset lives, how it is evaluated and trained.

A dataset item is ``(image uint8 (3, H, W), label int64 (H, W))`` with ``ignore_index``
255. Everything a protocol needs to know about a dataset is in its ``DatasetPreset``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
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

    def __post_init__(self):
        self.validate()

    def validate(self, models=None) -> None:
        """Every field's type, range and allowed values; ValueError naming the first bad
        field (``folder`` adds its file's name). ``models``: the model presets ``model``
        must be one of (None: not checked here; the model code takes seconds to import,
        and building the model names an unknown one before any training)."""

        def fail(name, expected):
            raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        def whole(name, optional=False):
            v = getattr(self, name)
            if not (optional and v is None) and (not _is_int(v) or v < 1):
                fail(name, "a whole number >= 1" + (" or null" if optional else ""))

        def positive(name, zero=False):
            v = getattr(self, name)
            if not _is_number(v) or not (v >= 0 if zero else v > 0):
                fail(name, "a number >= 0" if zero else "a number > 0")

        def one_of(name, allowed):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                fail(name, "one of " + ", ".join(repr(a) for a in allowed))

        one_of("eval_mode", ("whole", "slide"))
        whole("window", optional=True)
        whole("stride", optional=True)
        if self.eval_mode == "slide":
            if self.window is None or self.stride is None:
                fail("window" if self.window is None else "stride", "a whole number >= 1 with eval_mode 'slide'")
            if self.stride > self.window:  # windows would leave pixels no window covers
                fail("stride", f"at most the window ({self.window})")
        whole("crop_size")
        lo_hi = self.scale_range
        if (not isinstance(lo_hi, (tuple, list)) or len(lo_hi) != 2 or not all(_is_number(v) and v > 0 for v in lo_hi)
                or lo_hi[0] > lo_hi[1]):
            fail("scale_range", "two numbers [low, high] with 0 < low <= high")
        whole("batch_size")
        positive("lr")
        whole("steps")
        if models is not None:
            one_of("model", tuple(models))
        elif not isinstance(self.model, str) or not self.model:
            fail("model", "a model preset name")
        one_of("decoder", ("linear", "mask"))
        if not isinstance(self.val_split, str) or not self.val_split:
            fail("val_split", "a split name")
        whole("resize_short", optional=True)
        one_of("optimizer", ("adamw", "sgd"))
        positive("weight_decay", zero=True)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


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
    # (spec, root, name) -> the spec for the data under root (classes, preset and name
    # read from there; ``name``: the user's, e.g. --name)
    resolve: Optional[Callable] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def root(self, root: Optional[str] = None) -> Path:
        return Path(root or os.environ.get(self.root_env) or self.default_root)

    def root_source(self, root: Optional[str] = None) -> str:
        """Where ``root(root)`` came from: --data-root, the environment variable or the default."""
        return "--data-root" if root else f"${self.root_env}" if os.environ.get(self.root_env) else "default"


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

    return folder.open_split(split, root, train_short_side=folder.read_preset(DATASETS["folder"], root).resize_short)


def _count_folder(root: Path) -> dict:
    from bench.datasets import folder

    return folder.count_splits(root)


def _resolve_folder(spec: "DatasetSpec", root: Path, name: Optional[str]) -> "DatasetSpec":
    from bench.datasets import folder

    return folder.resolve(spec, root, name)


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


class DeferredNames(Sequence):
    """Class names read on first use: Cityscapes' come from cityscapesscripts, which a
    machine that only times models (``bench speed``, ``bench report``) may lack."""

    def __init__(self, load: Callable):
        self._load, self._names = load, None

    def _get(self) -> tuple:
        if self._names is None:
            self._names = tuple(self._load())
        return self._names

    def __getitem__(self, i):
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


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
        classes=DeferredNames(_cityscapes_classes),
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


def get_spec(name: str, root: Optional[str] = None, as_name: Optional[str] = None) -> DatasetSpec:
    """The dataset's spec; for a dataset whose classes live with the data (``folder``),
    read from ``root`` (or its environment variable / default root). ``as_name`` (--name):
    what such a dataset is called in records, checkpoints and reports."""
    if name not in DATASETS:
        raise BenchError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if spec.resolve is None:
        if as_name is not None:
            raise BenchError(f"--name {as_name!r}: only a dataset read from its own folder (folder) takes a name; "
                             f"{name} is always {name!r}")
        return spec
    return spec.resolve(spec, spec.root(root), as_name)


def open_dataset(name: str, split: str, root: Optional[str] = None):
    if name not in DATASETS:
        get_spec(name)  # raises
    spec = DATASETS[name]
    return spec.open_split(split, spec.root(root))


def dataset_status(name: str, root: Optional[str] = None, as_name: Optional[str] = None) -> dict:
    """Where a dataset is looked for (``source``: --data-root, $VARIABLE or default),
    whether it is there, and image counts per split; ``problem`` says what is wrong with
    a tree that is missing or malformed; ``as``: the name its records are stored under."""
    spec = DATASETS[name] if name in DATASETS else get_spec(name)
    where = spec.root(root)
    status = {"name": name, "root": str(where), "env": spec.root_env, "source": spec.root_source(root),
              "found": False, "splits": {}, "problem": None, "as": None}
    try:
        spec = get_spec(name, root, as_name)
        status["as"] = spec.name
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
                 device: str = "cpu", seed: int = 0, as_name: Optional[str] = None, ranks: int = 1) -> dict:
    """Images per second of the training loader alone (decoding + augmentation in its
    workers, pinned memory and the copy to ``device``), over ``batches`` batches after
    one warm-up batch (worker start-up), with the dataset's preset (crop, batch, scale).
    ``ranks``: as the loader of rank 0 of that many torchrun processes, which builds only
    its slots of each global batch (``images_per_s``: that rank's; ``steps_per_s``: global
    batches per second it keeps up with)."""
    import time

    import torch

    from bench.train import TrainConfig, step_loader

    spec = get_spec(name, root, as_name)
    p = spec.preset
    if ranks < 1 or p.batch_size % ranks:
        raise BenchError(f"--ranks {ranks}: expected a number of processes that divides the batch of {p.batch_size}")
    dataset = open_dataset(name, "train", root)
    cfg = TrainConfig(dataset=name, num_classes=spec.num_classes, steps=batches + 1, batch_size=p.batch_size,
                      crop_size=p.crop_size, scale_range=p.scale_range, seed=seed)
    loader = step_loader(dataset, cfg, 0, device=device, num_workers=workers,
                         slots=range(0, p.batch_size, ranks) if ranks > 1 else None)
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
            "steps_per_s": batches / seconds if seconds else float("inf"), "ranks": ranks, "batch_size": p.batch_size, "crop_size": p.crop_size, "batches": batches,
            "workers": loader.num_workers, "pin_memory": loader.pin_memory}

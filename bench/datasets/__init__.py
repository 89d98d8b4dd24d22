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
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise BenchError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def open_dataset(name: str, split: str, root: Optional[str] = None):
    spec = get_spec(name)
    return spec.open_split(split, spec.root(root))


def dataset_status(name: str, root: Optional[str] = None) -> dict:
    """Where a dataset is looked for, whether it is there, and image counts per split."""
    spec = get_spec(name)
    where = spec.root(root)
    status = {"name": name, "root": str(where), "env": spec.root_env, "found": False, "splits": {}, "problem": None}
    try:
        if spec.count_splits is not None:
            status["splits"] = spec.count_splits(where)
        else:
            for split in ("train", spec.preset.val_split):
                status["splits"][split] = len(spec.open_split(split, where))
        status["found"] = True
    except BenchError as e:
        status["problem"] = str(e)
    return status

"""IDD-Lite, the small release of the India Driving Dataset, in its official layout.

Root: ``--data-root``, else ``$IDD_LITE_DATASET``, else ``data/idd-lite``; either the
``idd20k_lite`` folder (what ``idd20k_lite.tar.gz`` unpacks to) or a folder holding it::

    idd20k_lite/leftImg8bit/{train,val}/<sequence>/<frame>_image.jpg   RGB, 320x227
    idd20k_lite/gtFine/{train,val}/<sequence>/<frame>_label.png        single channel

Labels are IDD's level-1 ids, used as they are: 7 classes (0-6) and 255 (void,
ignored); any other value is an error. The official test split has no labels, so only
``train`` (1,403 images) and ``val`` (204) are read. Research use only, as IDD's terms
ask: download it from the IDD website (https://idd.insaan.iiit.ac.in/).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from bench.datasets.files import LabelTable, SegmentationFiles, require_dir, unpaired
from bench.errors import BenchError

FOLDER = "idd20k_lite"
IMAGE_SUFFIX = "_image.jpg"
LABEL_SUFFIX = "_label.png"
SPLITS = ("train", "val")

# IDD level-1 ids 0-6, named as the IDD label table's level-1 categories
CLASSES: tuple[str, ...] = ("drivable", "non-drivable", "living thing", "vehicle", "roadside object",
                            "far object", "sky")
# IDD ships no level-1 colours: each class takes the Cityscapes colour of its main member
# (road, sidewalk, person, car, traffic sign, building, sky), so figures read alike
PALETTE: tuple[tuple[int, int, int], ...] = ((128, 64, 128), (244, 35, 232), (220, 20, 60), (0, 0, 142),
                                             (220, 220, 0), (70, 70, 70), (70, 130, 180))

LABELS = LabelTable({**{i: i for i in range(len(CLASSES))}, 255: 255},
                    f"IDD level-1 ids 0-{len(CLASSES) - 1} or 255 (void)")


def base_folder(root: Path) -> Path:
    """``root/idd20k_lite`` when there, else ``root`` itself."""
    nested = root / FOLDER
    return nested if nested.is_dir() else root


def _expected() -> str:
    return (f"{FOLDER}/leftImg8bit/<split>/<sequence>/*{IMAGE_SUFFIX} and "
            f"{FOLDER}/gtFine/<split>/<sequence>/*{LABEL_SUFFIX}; set --data-root or $IDD_LITE_DATASET")


def _by_frame(folder: Path, suffix: str) -> dict[str, Path]:
    """``<sequence>/<frame>`` -> file, for the files ``<sequence>/<frame><suffix>``."""
    return {p.relative_to(folder).as_posix()[: -len(suffix)]: p for p in sorted(folder.glob(f"*/*{suffix}"))
            if p.is_file()}


def open_split(split: str, root: Path, train_short_side: Optional[int] = None) -> SegmentationFiles:
    if split not in SPLITS:
        raise BenchError(f"idd-lite has splits {', '.join(SPLITS)} (the test split has no labels), not {split!r}")
    base = base_folder(require_dir(root, "idd-lite", _expected()))
    images_dir = require_dir(base / "leftImg8bit" / split, "idd-lite", _expected())
    labels_dir = require_dir(base / "gtFine" / split, "idd-lite", _expected())
    images = _by_frame(images_dir, IMAGE_SUFFIX)
    if not images:
        raise BenchError(f"idd-lite: no images in {images_dir}; expected <sequence>/*{IMAGE_SUFFIX}")
    labels = _by_frame(labels_dir, LABEL_SUFFIX)
    unpaired("idd-lite", images, labels, labels_dir, "image", f"label (*{LABEL_SUFFIX})")
    unpaired("idd-lite", labels, images, images_dir, "label", f"image (*{IMAGE_SUFFIX})")
    items = [(image, labels[k], LABELS) for k, image in images.items()]
    return SegmentationFiles("idd-lite", split, items, CLASSES, PALETTE, train_short_side=train_short_side)


def count_splits(root: Path) -> dict:
    """Images per split, pairing checked (no file is decoded)."""
    return {s: len(open_split(s, root)) for s in SPLITS}

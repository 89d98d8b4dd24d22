"""Cityscapes in its own on-disk layout (what cityscapesscripts and mmsegmentation read).

Root: ``--data-root`` or ``$CITYSCAPES_DATASET`` (cityscapesscripts' variable)::

    <root>/leftImg8bit/{train,val,test}/<city>/<name>_leftImg8bit.png
    <root>/gtFine/{train,val,test}/<city>/<name>_gtFine_labelTrainIds.png
                                      or <name>_gtFine_labelIds.png

A ``_labelTrainIds`` file (made by cityscapesscripts' ``createTrainIdLabelImgs``) is
used as it is: values 0-18 and 255. Where only ``_labelIds`` exists, its label ids are
mapped to the 19 train ids with the table of ``cityscapesscripts.helpers.labels``
(every id whose train id is 255 or -1 becomes 255, ignored). Class names and colours
come from the same table. Images are evaluated as stored (1024x2048).
"""
from __future__ import annotations

from pathlib import Path

from bench.datasets.files import LabelTable, SegmentationFiles, require_dir, unpaired
from bench.errors import BenchError

IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
SPLITS = ("train", "val", "test")


def _labels():
    from cityscapesscripts.helpers.labels import labels

    return labels


def train_classes() -> list:
    """The 19 evaluated classes (cityscapesscripts' ``Label`` tuples), by train id."""
    by_id = {l.trainId: l for l in _labels() if 0 <= l.trainId < 255}
    return [by_id[i] for i in range(len(by_id))]


CLASSES: tuple[str, ...] = tuple(l.name for l in train_classes())
PALETTE: tuple[tuple[int, int, int], ...] = tuple(tuple(l.color) for l in train_classes())


def label_id_to_train_id() -> dict[int, int]:
    """Every label id of cityscapesscripts' table -> its train id (255 where ignored)."""
    return {l.id: (l.trainId if 0 <= l.trainId < 255 else 255) for l in _labels() if l.id >= 0}


LABEL_IDS = LabelTable(label_id_to_train_id(),
                       f"Cityscapes label ids 0-{max(label_id_to_train_id())} (cityscapesscripts' table)")
TRAIN_IDS = LabelTable({**{i: i for i in range(len(CLASSES))}, 255: 255},
                       f"train ids 0-{len(CLASSES) - 1} or 255 (ignore)")


def _where(root: Path) -> str:
    return (f"leftImg8bit/<split>/<city>/*{IMAGE_SUFFIX} and gtFine/<split>/<city>/*{TRAIN_IDS_SUFFIX} "
            f"(or *{LABEL_IDS_SUFFIX}) under the root; set --data-root or $CITYSCAPES_DATASET")


def open_split(split: str, root: Path) -> SegmentationFiles:
    if split not in SPLITS:
        raise BenchError(f"cityscapes has splits {', '.join(SPLITS)}, not {split!r}")
    root = require_dir(root, "cityscapes", _where(root))
    images_dir = require_dir(root / "leftImg8bit" / split, "cityscapes", _where(root))
    labels_dir = require_dir(root / "gtFine" / split, "cityscapes", _where(root))
    images = {p.relative_to(images_dir).as_posix()[: -len(IMAGE_SUFFIX)]: p
              for p in sorted(images_dir.glob(f"*/*{IMAGE_SUFFIX}"))}
    if not images:
        raise BenchError(f"cityscapes: no images in {images_dir}; expected <city>/*{IMAGE_SUFFIX}")
    train_ids, label_ids = {}, {}
    for p in sorted(labels_dir.glob("*/*_gtFine_label*Ids.png")):
        key = p.relative_to(labels_dir).as_posix()
        if key.endswith(TRAIN_IDS_SUFFIX):
            train_ids[key[: -len(TRAIN_IDS_SUFFIX)]] = p
        elif key.endswith(LABEL_IDS_SUFFIX):
            label_ids[key[: -len(LABEL_IDS_SUFFIX)]] = p
    unpaired("cityscapes", images, set(train_ids) | set(label_ids), labels_dir, "image",
             f"label (*{TRAIN_IDS_SUFFIX} or *{LABEL_IDS_SUFFIX})")
    unpaired("cityscapes", {**label_ids, **train_ids}, images, images_dir, "label", "image")
    items = [(image, train_ids[k], TRAIN_IDS) if k in train_ids else (image, label_ids[k], LABEL_IDS)
             for k, image in images.items()]
    return SegmentationFiles("cityscapes", split, items, CLASSES, PALETTE)


def count_splits(root: Path) -> dict:
    """Images per split (train and val required, test where present), pairing checked."""
    counts = {s: len(open_split(s, root)) for s in ("train", "val")}
    if (root / "leftImg8bit" / "test").is_dir():
        counts["test"] = len(open_split("test", root))
    return counts

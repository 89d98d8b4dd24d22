"""``folder``: bring your own images, label PNGs and class names.

Root: ``--data-root`` or ``$BENCH_FOLDER_ROOT``::

    <root>/classes.txt        one class name per line; line k (from 0) is label value k
    <root>/bench.json         {"name": "mine", "ignore_index": 255, ...preset overrides}
    splits as subfolders:     <root>/images/<split>/<name>.{png,jpg,...}
                              <root>/labels/<split>/<name>.png
    or as list files:         <root>/<split>.txt (one name per line, no extension)
                              <root>/images/<name>.{png,jpg,...}, <root>/labels/<name>.png

An image and its label are paired by name (the path under ``images/<split>/`` without
its extension; names may contain subfolders). A list file wins over a subfolder of the
same split. Labels are single-channel PNGs whose values are class indices 0..C-1 or the
ignore index (default 255; ``"ignore_index"`` in ``bench.json``); any other value is an
error. Splits: ``train`` for training, ``val`` for evaluation.

``bench.json`` may also override any field of the dataset's preset
(``bench.datasets.DatasetPreset``), e.g. ``{"eval_mode": "whole", "crop_size": 256,
"steps": 20000}``; every value is checked when the dataset is opened.

A folder dataset has a name of its own (``"name"`` in ``bench.json``, or ``--name``,
which wins): records, checkpoints and reports are kept under it, so two folders never
share a results file. A name is a letter followed by letters, digits, ``_`` or ``-``.
"""
from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from pathlib import Path

from bench.datasets.files import (IGNORE_INDEX, IMAGE_SUFFIXES, LabelTable, SegmentationFiles, files_by_stem,
                                  require_dir, unpaired)
from bench.errors import BenchError

CLASSES_FILE = "classes.txt"
CONFIG_FILE = "bench.json"
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def _expected() -> str:
    return (f"{CLASSES_FILE}, images/<split>/ and labels/<split>/ (or <split>.txt with images/ and labels/) "
            "under the root; set --data-root or $BENCH_FOLDER_ROOT")


def read_classes(root: Path) -> tuple[str, ...]:
    require_dir(root, "folder", _expected())
    path = root / CLASSES_FILE
    if not path.is_file():
        raise BenchError(f"folder: {path} not found; expected a class-name file, one name per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"folder: {path} is not readable UTF-8 text ({type(e).__name__})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names:
        raise BenchError(f"folder: {path} is empty; expected one class name per line")
    for i, name in enumerate(names):
        if not name:
            raise BenchError(f"folder: {path} line {i + 1} is empty; expected one class name per line")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BenchError(f"folder: {path} names {dupes[0]!r} twice; expected each class once")
    if len(names) > 255:
        raise BenchError(f"folder: {path} has {len(names)} classes; at most 255 are supported")
    return tuple(names)


def read_config(root: Path) -> dict:
    path = root / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BenchError(f"folder: {path} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise BenchError(f"folder: {path} must hold a JSON object")
    return config


def ignore_index(root: Path, num_classes: int) -> int:
    value = read_config(root).get("ignore_index", IGNORE_INDEX)
    if not isinstance(value, int) or isinstance(value, bool) or not num_classes <= value <= 65535:
        raise BenchError(f"folder: {root / CONFIG_FILE}: ignore_index must be a whole number from "
                         f"{num_classes} (after the class indices 0-{num_classes - 1}) to 65535, got {value!r}")
    return value


def read_preset(spec, root: Path):
    """The dataset's preset with the overrides of ``bench.json``, every value checked."""
    from bench.datasets import DatasetPreset

    path = root / CONFIG_FILE
    config = read_config(root)
    known = {f.name for f in fields(DatasetPreset)}
    overrides = {k: v for k, v in config.items() if k not in ("ignore_index", "name")}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise BenchError(f"folder: {path}: unknown key {unknown[0]!r}; expected name, ignore_index "
                         f"or a preset field: {', '.join(sorted(known))}")
    if isinstance(overrides.get("scale_range"), list):
        overrides["scale_range"] = tuple(overrides["scale_range"])
    try:
        preset = replace(spec.preset, **overrides)  # checks every field
        if "model" in overrides:
            from methods.segmenter import PRESETS

            preset.validate(models=PRESETS)
    except ValueError as e:
        raise BenchError(f"folder: {path}: {e}") from None
    return preset


def dataset_name(root: Path, given=None) -> str:
    """``given`` (--name), else ``"name"`` of ``bench.json``; a plain identifier that is
    not another dataset's name."""
    from bench.datasets import DATASETS

    if given is not None:
        name, where = given, "--name"
    else:
        name, where = read_config(root).get("name"), f"{root / CONFIG_FILE}: name"
        if name is None:
            raise BenchError(f"folder: {root} has no dataset name; set \"name\" in {root / CONFIG_FILE} or pass "
                             "--name (its records, checkpoints and reports are kept under that name)")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BenchError(f"folder: {where} must be a letter followed by letters, digits, _ or - "
                         f"(at most 64), got {name!r}")
    if name in DATASETS and name != "folder":
        raise BenchError(f"folder: {where} {name!r} is a built-in dataset's name; choose another")
    return name


def resolve(spec, root: Path, name=None):
    """The folder's spec: class names from ``classes.txt``, the preset with the overrides
    of ``bench.json``, the name (``name`` if given, else the file's)."""
    classes = read_classes(root)
    ignore_index(root, len(classes))
    preset = read_preset(spec, root)
    return replace(spec, name=dataset_name(root, name), classes=classes, preset=preset)


def open_split(split: str, root: Path, train_short_side=None) -> SegmentationFiles:
    classes = read_classes(root)
    ignore = ignore_index(root, len(classes))
    table = LabelTable({**{i: i for i in range(len(classes))}, ignore: IGNORE_INDEX},
                       f"class indices 0-{len(classes) - 1} (from {root / CLASSES_FILE}) or the ignore index {ignore}")
    list_file = root / f"{split}.txt"
    if list_file.is_file():
        items = _from_list(list_file, root, table)
    else:
        images_dir = root / "images" / split
        if not images_dir.is_dir():
            raise BenchError(f"folder: split {split!r} not found: neither {list_file} nor {images_dir}/; "
                             f"expected one of them ({_expected()})")
        labels_dir = require_dir(root / "labels" / split, "folder", f"label PNGs for {images_dir}")
        images = files_by_stem(images_dir, IMAGE_SUFFIXES, "folder", "images")
        if not images:
            raise BenchError(f"folder: no images in {images_dir}; expected files ending in "
                             f"{', '.join(IMAGE_SUFFIXES)}")
        labels = files_by_stem(labels_dir, (".png",), "folder", "labels")
        unpaired("folder", images, labels, labels_dir, "image", "label (.png)")
        unpaired("folder", labels, images, images_dir, "label", "image")
        items = [(image, labels[k], table) for k, image in images.items()]
    return SegmentationFiles("folder", split, items, classes, train_short_side=train_short_side)


def _from_list(list_file: Path, root: Path, table: LabelTable) -> list:
    images_dir = require_dir(root / "images", "folder", f"the images named in {list_file}")
    labels_dir = require_dir(root / "labels", "folder", f"the labels named in {list_file}")
    try:
        names = [line.strip() for line in list_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"folder: {list_file} is not readable UTF-8 text ({type(e).__name__})") from None
    if not names:
        raise BenchError(f"folder: {list_file} lists no images; expected one name per line")
    items = []
    for n, name in enumerate(names):
        candidates = [images_dir / f"{name}{suffix}" for suffix in IMAGE_SUFFIXES]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise BenchError(f"folder: {list_file} line {n + 1} names {name!r} but there is no image "
                             f"{images_dir}/{name}.<{'|'.join(s[1:] for s in IMAGE_SUFFIXES)}>")
        if len(found) > 1:
            raise BenchError(f"folder: {found[0]} and {found[1]} are two images for {name!r}; expected one")
        label = labels_dir / f"{name}.png"
        if not label.is_file():
            raise BenchError(f"folder: image {found[0]} has no label {label}; expected images and labels "
                             "paired by file name")
        items.append((found[0], label, table))
    return items


def count_splits(root: Path) -> dict:
    """Images per split: every <split>.txt and images/<split>/ found (train, val first)."""
    read_classes(root)
    splits = {p.stem for p in root.glob("*.txt") if p.name != CLASSES_FILE}
    if (root / "images").is_dir():  # subfolder splits: images/<split>/ with labels/<split>/
        splits |= {p.name for p in (root / "images").iterdir() if p.is_dir() and (root / "labels" / p.name).is_dir()}
    order = [s for s in ("train", "val") if s in splits] + sorted(splits - {"train", "val"})
    counts = {s: len(open_split(s, root)) for s in order}
    for required in ("train", "val"):
        if required not in counts:
            open_split(required, root)  # raises: says what is missing
    return counts

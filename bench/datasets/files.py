"""Datasets stored as image files and label PNGs: Cityscapes, ADE20K and ``folder``.

What they share lives here:

* ``SegmentationFiles``: a torch ``Dataset`` over (image path, label path, label table)
  triples. It holds paths only; item ``i`` is decoded when it is asked for (in a
  DataLoader worker during training), its label values are mapped to train ids through
  the table (values the table does not know are an error, not a silent ignore), and the
  image and label must be the same size.
* ``SegmentationFiles.augment``: training augmentation (random rescale, crop, flip) that
  draws exactly what ``bench.train.augment`` draws and gives the same crop (to float
  rounding), but resamples only the pixels that end up in the crop: on a 1024x2048
  Cityscapes image rescaled by 2 that is a few times less work than resizing the whole
  image first. It also applies the dataset's resize rule (ADE20K: short side 512 before
  the random rescale), in the same single resampling.
* ``DataError``: a ``BenchError`` raised while loading an item. A DataLoader worker
  re-raises an exception in the main process as ``type(message + worker traceback)``;
  this class keeps only the original one-line message, so ``bench`` still prints one
  line.
* ``default_workers()``: DataLoader workers for file datasets.

Every problem is reported as one line naming the file or folder and what was expected.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from bench.errors import BenchError

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(BenchError):
    """A bad file met while loading an item (possibly in a DataLoader worker)."""

    def __init__(self, message: str, exit_code: int = 2):
        message = str(message)
        if "\nOriginal Traceback" in message:  # re-raised by torch's DataLoader: unwrap
            message = _original_message(message)
        super().__init__(message, exit_code)


def _original_message(wrapped: str) -> str:
    """The message of the exception a DataLoader worker raised, from torch's wrapper
    text ("Caught DataError in DataLoader worker process 0.\\nOriginal Traceback ...\\n
    bench.datasets.files.DataError: <message>")."""
    marker = f"{DataError.__module__}.{DataError.__qualname__}: "
    lines = [line for line in wrapped.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(marker):
            return " ".join([lines[i][len(marker):]] + [l.strip() for l in lines[i + 1:]])
    return lines[-1] if lines else wrapped


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def default_workers() -> int:
    """DataLoader worker processes for file datasets: ``$BENCH_WORKERS`` if set, else
    the CPU cores of this process's share of the machine (all cores / local ranks under
    torchrun) less one for the training loop, at most 8 and at least 1."""
    env = os.environ.get("BENCH_WORKERS")
    if env is not None:
        try:
            value = int(env)
        except ValueError:
            raise BenchError(f"$BENCH_WORKERS must be a whole number, got {env!r}") from None
        if value < 0:
            raise BenchError(f"$BENCH_WORKERS must be 0 or more, got {value}")
        return value
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(8, cores // ranks - 1))


# --------------------------------------------------------------------------- decoding
def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); any decoding problem (not an image, truncated) is a DataError."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")  # decodes everything: a truncated file fails here
        return np.asarray(rgb)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        raise DataError(f"{path}: not a readable image ({one_line(e)}); expected a complete image file") from None


def read_label(path: Path) -> np.ndarray:
    """Single-channel label PNG (mode L, P or I*) as an integer array (H, W)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("L", "P") and not mode.startswith("I"):
                raise DataError(f"{path}: label image has mode {mode}; expected a single-channel PNG "
                                "(mode L, P or I) of class indices")
            im.load()
            return np.asarray(im)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable label PNG ({one_line(e)}); expected a complete image file") from None


class LabelTable:
    """Raw label value -> train id (0..C-1 or 255 = ignore); values outside the table
    are an error whose message says what was expected (``expected``)."""

    def __init__(self, mapping: dict, expected: str):
        size = max(256, max(mapping) + 1)
        self.lut = np.full(size, -1, np.int16)
        for raw, train_id in mapping.items():
            self.lut[raw] = train_id
        self.expected = expected

    def __call__(self, label: np.ndarray, path: Path) -> np.ndarray:
        label = label.astype(np.int64, copy=False)
        bad = (label < 0) | (label >= len(self.lut))
        mapped = self.lut[np.clip(label, 0, len(self.lut) - 1)]
        bad |= mapped < 0
        if bad.any():
            values = np.unique(label[bad])
            shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
            raise DataError(f"{path}: label value(s) {shown} are outside the classes and the ignore index; "
                            f"expected {self.expected}")
        return mapped.astype(np.int64)


# --------------------------------------------------------------------------- dataset
class SegmentationFiles(Dataset):
    """Image/label file pairs of one split, decoded lazily, one item at a time.

    Items are ``(image uint8 (3, H, W), label int64 (H, W))`` with ignore 255, as every
    dataset of the bench. ``train_short_side``: the preset's resize rule for training
    (the image is brought to this short side before the random rescale; evaluation
    applies it in the protocol, so labels keep their stored resolution there).
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, name: str, split: str, items: Sequence[tuple[Path, Path, LabelTable]],
                 classes: Sequence[str], palette: Optional[Sequence] = None,
                 train_short_side: Optional[int] = None):
        self.name, self.split = name, split
        self.items = list(items)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.palette = [tuple(int(c) for c in p) for p in palette] if palette is not None else generated_palette(
            self.num_classes)
        self.train_short_side = train_short_side

    @property
    def loader_workers(self) -> int:
        """DataLoader workers the training loop uses by default (decoding is the work)."""
        return default_workers()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path, table = self.items[index]
        try:
            image = read_image(image_path)
            label = read_label(label_path)
            if label.shape != image.shape[:2]:
                raise DataError(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
                                f"{image_path} is {image.shape[1]}x{image.shape[0]}; expected the same size")
            label = table(label, label_path)
        except DataError as e:
            raise DataError(f"{self.name}: {e}") from None
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(label)

    def augment(self, image: torch.Tensor, label: torch.Tensor, crop: int, scale_range, g: torch.Generator):
        """``bench.train.augment`` (same random draws, same result to float rounding),
        computing only the crop, with the dataset's training resize rule folded in."""
        lo, hi = scale_range
        s = lo + (hi - lo) * float(torch.rand((), generator=g))
        H, W = label.shape
        if self.train_short_side:
            s *= self.train_short_side / min(H, W)
        h, w = max(1, round(H * s)), max(1, round(W * s))
        top = int(torch.randint(0, max(h, crop) - crop + 1, (), generator=g))
        left = int(torch.randint(0, max(w, crop) - crop + 1, (), generator=g))
        rows = torch.arange(top, min(top + crop, h))
        cols = torch.arange(left, min(left + crop, w))
        img = _bilinear(image, rows, cols, (H, W), (h, w))
        lab = label.index_select(0, _nearest(rows, H, h)).index_select(1, _nearest(cols, W, w))
        ph, pw = crop - len(rows), crop - len(cols)
        if ph or pw:
            img = torch.nn.functional.pad(img, (0, pw, 0, ph), value=0.0)
            lab = torch.nn.functional.pad(lab, (0, pw, 0, ph), value=IGNORE_INDEX)
        if torch.rand((), generator=g) < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        return img.round().clamp(0, 255).to(torch.uint8), lab

    def skip_augment(self, g: torch.Generator) -> None:
        """Advance ``g`` past what ``augment`` draws for one image: ``bench.train.skip_augment``
        (the same draws), without decoding the image."""
        from bench.train import skip_augment

        skip_augment(g)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, images={len(self)})"


def _source(dst: torch.Tensor, size: int, out: int):
    """F.interpolate's bilinear source indices and weights (align_corners=False)."""
    scale = torch.tensor(size / out, dtype=torch.float32)
    u = ((dst.float() + 0.5) * scale - 0.5).clamp(min=0)
    i0 = u.long().clamp(max=size - 1)
    i1 = (i0 + 1).clamp(max=size - 1)
    return i0, i1, (u - i0.float())


def _bilinear(image: torch.Tensor, rows, cols, size, out) -> torch.Tensor:
    """The pixels ``rows`` x ``cols`` of ``image`` (uint8 (3, H, W)) bilinearly resized to
    ``out``: gathers the 4 neighbours of each output pixel, so the work scales with the
    crop, not with the (rescaled) image."""
    r0, r1, wr = _source(rows, size[0], out[0])
    c0, c1, wc = _source(cols, size[1], out[1])
    top, bottom = image.index_select(1, r0), image.index_select(1, r1)
    shape = (image.shape[0], len(rows), len(cols))
    c0, c1 = c0.expand(shape), c1.expand(shape)  # gather: much faster than index_select on the last dim
    wr, wc = wr[None, :, None], wc[None, None, :]
    t = torch.lerp(top.gather(2, c0).float(), top.gather(2, c1).float(), wc)
    b = torch.lerp(bottom.gather(2, c0).float(), bottom.gather(2, c1).float(), wc)
    return torch.lerp(t, b, wr)


def _nearest(dst: torch.Tensor, size: int, out: int) -> torch.Tensor:
    """F.interpolate's 'nearest' source index: floor(dst * in/out) in float32."""
    if size == out:
        return dst
    scale = torch.tensor(size / out, dtype=torch.float32)
    return (dst.float() * scale).floor().long().clamp(max=size - 1)


def generated_palette(n: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(0)
    return [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(n)]


# --------------------------------------------------------------------------- helpers
def require_dir(path: Path, dataset: str, expected: str) -> Path:
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "not found"
        raise BenchError(f"{dataset}: {path} {what}; expected {expected}")
    return path


def files_by_stem(folder: Path, suffixes: Sequence[str], dataset: str, what: str) -> dict[str, Path]:
    """Files under ``folder`` (recursively) with one of ``suffixes``, keyed by their path
    relative to ``folder`` without the suffix; two files with one key are an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in suffixes and path.is_file():
            key = path.relative_to(folder).with_suffix("").as_posix()
            if key in found:
                raise BenchError(f"{dataset}: {found[key]} and {path} are two {what} for one name; "
                                 "expected one file per name")
            found[key] = path
    return found


def unpaired(dataset: str, files: dict, partners, where: Path, kind: str, partner: str) -> None:
    """Error naming the first of ``files`` (key -> path) whose key is not in ``partners``."""
    missing = sorted(set(files) - set(partners))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BenchError(f"{dataset}: {kind} {files[missing[0]]} has no {partner} under {where}{more}; "
                         f"expected every {kind} paired with its {partner} by file name")

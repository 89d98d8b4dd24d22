"""Segmenter's released checkpoints and their published single-scale mIoU, as data.

Every number is copied from the page named in ``source`` (the model zoo tables of
rstrudel/segmenter's README and of mmsegmentation's configs/segmenter/README.md, whose
metafile.yaml repeats them). Only checkpoints bench can import are listed: a ViT
backbone with one class token, ImageNet-0.5 normalisation, and a dataset bench has
(not listed: Seg-B/8 (no patch-8 preset), the DeiT-backbone models (a distillation
token and ImageNet mean/std normalisation), Pascal Context).

An imported file is recognised as one of them by its name as downloaded: rstrudel's
``<folder>/checkpoint.pth`` (the README's folder, e.g. ``seg_tiny_mask``) on the same
dataset; mmsegmentation's file name, whose ``-xxxxxxxx`` suffix is the first 8 hex
digits of the file's SHA-256 (its publish script names files so) and is checked.
``bench report`` then draws the published mIoU at the baseline's cost ("published").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

RSTRUDEL_README = "https://github.com/rstrudel/segmenter/blob/master/README.md (Model Zoo)"
MMSEG_README = "https://github.com/open-mmlab/mmsegmentation/blob/main/configs/segmenter/README.md (Results and models)"
RSTRUDEL_URL = "https://www.rocq.inria.fr/cluster-willow/rstrudel/segmenter/checkpoints"
MMSEG_URL = "https://download.openmmlab.com/mmsegmentation/v0.5/segmenter"


@dataclass(frozen=True)
class Released:
    name: str  # as the source names the model
    source: str  # where the published number is
    dataset: str  # bench's dataset name
    model: str  # the bench preset of its shape
    decoder: str
    resolution: int  # training crop (square), pixels
    miou: float  # published single-scale mIoU, %
    format: str  # "segmenter" (rstrudel) or "mmseg"
    url: str  # where to download it

    @property
    def key(self) -> str:
        """How records name it (``baseline_source.released``)."""
        return f"{self.format}:{self.name}:{self.dataset}"

    def matches(self, path: Path, dataset: str, sha256: str) -> bool:
        if dataset != self.dataset:
            return False
        parts = self.url.rsplit("/", 2)
        if self.format == "segmenter":  # .../<folder>/checkpoint.pth
            return path.name == parts[-1] and path.parent.name == parts[-2]
        digest = path.stem.rsplit("-", 1)[-1]
        return path.name == parts[-1] and sha256.startswith(digest)


def _rstrudel(name, dataset, model, resolution, miou, folder):
    return Released(name, RSTRUDEL_README, dataset, model, "mask", resolution, miou, "segmenter",
                    f"{RSTRUDEL_URL}/{dataset}/{folder}/checkpoint.pth")


def _mmseg(name, model, decoder, resolution, miou, stem):
    config = stem.rsplit("_2022", 1)[0]
    return Released(name, MMSEG_README, "ade20k", model, decoder, resolution, miou, "mmseg",
                    f"{MMSEG_URL}/{config}/{stem}.pth")


RELEASED: tuple[Released, ...] = (
    _rstrudel("Seg-T-Mask/16", "ade20k", "vit_tiny", 512, 38.1, "seg_tiny_mask"),
    _rstrudel("Seg-S-Mask/16", "ade20k", "vit_small", 512, 45.3, "seg_small_mask"),
    _rstrudel("Seg-B-Mask/16", "ade20k", "vit_base", 512, 48.5, "seg_base_mask"),
    _rstrudel("Seg-L-Mask/16", "ade20k", "vit_large", 640, 51.8, "seg_large_mask_640"),
    _rstrudel("Seg-L-Mask/16", "cityscapes", "vit_large", 768, 79.1, "seg_large_mask"),
    _mmseg("Segmenter Mask ViT-T_16", "vit_tiny", "mask", 512, 39.99,
           "segmenter_vit-t_mask_8x1_512x512_160k_ade20k_20220105_151706-ffcf7509"),
    _mmseg("Segmenter Linear ViT-S_16", "vit_small", "linear", 512, 45.75,
           "segmenter_vit-s_linear_8x1_512x512_160k_ade20k_20220105_151713-39658c46"),
    _mmseg("Segmenter Mask ViT-S_16", "vit_small", "mask", 512, 46.19,
           "segmenter_vit-s_mask_8x1_512x512_160k_ade20k_20220105_151706-511bb103"),
    _mmseg("Segmenter Mask ViT-B_16", "vit_base", "mask", 512, 49.60,
           "segmenter_vit-b_mask_8x1_512x512_160k_ade20k_20220105_151706-bc533b08"),
    _mmseg("Segmenter Mask ViT-L_16", "vit_large", "mask", 640, 52.16,
           "segmenter_vit-l_mask_8x1_512x512_160k_ade20k_20220105_162750-7ef345be"),
)


def find_released(path, dataset: str, sha256: str, model: str, decoder: str) -> Optional[Released]:
    """The released checkpoint this file is, or None."""
    path = Path(path)
    for row in RELEASED:
        if row.model == model and row.decoder == decoder and row.matches(path, dataset, sha256):
            return row
    return None


def by_key(key) -> Optional[Released]:
    return next((row for row in RELEASED if row.key == key), None)

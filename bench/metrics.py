"""Segmentation accuracy: confusion matrix and IoU, with mmsegmentation's conventions.

- One confusion matrix is accumulated over the whole split at label resolution; IoU is
  computed from the totals, never averaged per image.
- Matrix layout: rows = ground-truth label, columns = prediction, ``int64`` counts.
- Pixels whose label is ``ignore_index`` (255) are dropped before counting, whatever
  was predicted there. Dataset-specific label handling (Cityscapes id -> train id,
  ADE20K's reduce_zero_label: 0 -> 255, others minus 1) is the dataset's job, done
  before the labels reach this module.
- IoU_c = TP / (TP + FP + FN). A class with an empty union (never in the labels, never
  predicted) has IoU NaN and is left out of the mean; a class that is only predicted
  (false positives only) has IoU 0 and counts.
- mIoU = nanmean of per-class IoU (mmseg's ``np.nanmean``).
- Unlike mmseg, which silently drops them, label values outside [0, C) other than
  ``ignore_index`` are an error: they mean the dataset's label mapping is wrong.
"""
from __future__ import annotations

import math

import torch

from bench.errors import BenchError


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(C, C) int64 counts, rows = label, cols = prediction, on the inputs' device."""
    if pred.shape != label.shape:
        raise BenchError(f"prediction shape {tuple(pred.shape)} does not match "
                         f"label shape {tuple(label.shape)}; expected equal shapes")
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()
    bad = (label < 0) | (label >= num_classes)
    if bad.any():
        values = torch.unique(label[bad]).tolist()
        raise BenchError(f"label values {values[:10]} are outside [0, {num_classes}) "
                         f"and are not ignore_index {ignore_index}")
    if ((pred < 0) | (pred >= num_classes)).any():
        raise BenchError(f"predicted class ids must lie in [0, {num_classes})")
    # Encode each (label, pred) pair as one index so a single bincount fills the matrix.
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches (and, via ``add``, over shards)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64,
                                  device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> "ConfusionMatrix":
        m = confusion_matrix(pred, label, self.num_classes, self.ignore_index)
        self.matrix += m.to(self.matrix.device)
        return self

    def add(self, other: "ConfusionMatrix | torch.Tensor") -> "ConfusionMatrix":
        """Adds another accumulator or raw matrix in place (e.g. another rank's)."""
        m = other.matrix if isinstance(other, ConfusionMatrix) else other
        if tuple(m.shape) != tuple(self.matrix.shape):
            raise BenchError(f"cannot merge a {tuple(m.shape)} confusion matrix into "
                             f"a {tuple(self.matrix.shape)} one")
        self.matrix += m.to(self.matrix.device, torch.int64)
        return self

    merge = add

    def __iadd__(self, other):
        return self.add(other)

    def iou(self) -> tuple[list[float], float]:
        return iou_scores(self.matrix)


def iou_scores(matrix: torch.Tensor) -> tuple[list[float], float]:
    """(per-class IoU with NaN for empty unions, mIoU over the non-NaN classes)."""
    m = matrix.detach().cpu().to(torch.float64)
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp  # TP + FP + FN
    iou = tp / union  # 0/0 -> NaN for classes with an empty union
    valid = ~torch.isnan(iou)
    miou = iou[valid].mean().item() if valid.any() else math.nan
    return iou.tolist(), miou

"""Trained references that keep the comparison fair.

``baseline-ft``: the baseline trained on from its checkpoint for exactly the budget
every fine-tuning method gets (``methods.FineTune``: steps, learning rate, warm-up,
schedule), with the plain segmentation loss. A method's margin over it is what its
adaptivity buys; its margin over the baseline alone also counts the extra training.

``shallow`` (``depth=k``): the baseline's first k blocks, its final norm and decoder,
fine-tuned from the baseline with the same budget. ``depth`` is the number of blocks
kept; PAUMER's pausing layer l sits after block l, so ``depth=l`` is the network that
a patch pausing at l has been through, for every patch. Cutting the model really
removes the blocks: FLOPs and time are those of a k-block network.
"""
from __future__ import annotations

from dataclasses import replace

import torch.nn.functional as F
from torch import Tensor, nn

from methods.paumer import default_layers

IGNORE_INDEX = 255


def segmentation_loss(model: nn.Module, images: Tensor, labels: Tensor, policy=None, **_) -> Tensor:
    """Pixel cross-entropy of the final output: the baseline's own loss. ``policy``: the
    output of the forward under it (algm-ft trains with ALGM's merging in place)."""
    logits = model(images) if policy is None else model(images, policy)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def check_depth(depth, full_depth: int) -> int:
    if depth is None:
        raise ValueError("shallow needs depth=k, the number of encoder blocks it keeps")
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= full_depth:
        raise ValueError(f"depth must be a whole number in [1, {full_depth}] (the baseline's blocks), got {depth!r}")
    return depth


def truncate(segmenter: nn.Module, depth) -> nn.Module:
    """``segmenter`` cut after block ``depth``, in place: its first ``depth`` blocks, then
    its final norm and decoder, as they are. Returns it."""
    check_depth(depth, segmenter.depth)
    segmenter.blocks = nn.ModuleList(list(segmenter.blocks)[:depth])
    segmenter.config = replace(segmenter.config, depth=depth)
    return segmenter


def default_depths(depth: int) -> list[int]:
    """Shallow's default sweep for a ``depth``-block baseline: one model per PAUMER
    pausing layer (6 blocks: 2, 3, 4), plus the full depth (the same checkpoint as
    ``baseline-ft``)."""
    return sorted(set(default_layers(depth)) | {depth})

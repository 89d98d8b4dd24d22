"""Early exit: a confident intermediate prediction is the final one.

Heads (LayerNorm + Linear to C classes, PAUMER's ``PausingHeads``) sit after the same
blocks as PAUMER's. A head's confidence in a token is its max softmax probability.
Two modes, one ``threshold`` in [0, 1]; a test passes where confidence > threshold
(strictly, so threshold 1 never exits: the baseline's output; threshold 0 exits all):

  token  a token whose confidence passes exits: it leaves the active set (a real
         gather, ``TokenState.keep``) and its head's logits become its pixels' final
         logits, nearest-upsampled, so every pixel of the patch takes the head's label.
         The decoder still runs on the full grid, exited tokens parked as they left: it
         labels the other patches (for the mask decoder the exited ones are context),
         and its cost is counted for every image: the price of this variant.
  image  an image exits at the first head where the mean confidence over its tokens
         passes: all its tokens leave, no later block runs for it, and its prediction is
         that head's logits, bilinearly upsampled (as the decoder's). The decoder does
         not run for it (``Policy.decodes``), nor is it counted.

A class token (``ModelConfig.class_token``) never exits, in either mode: it is no grid
row, no head scores it, and every block runs it (``methods.encoder``), so an image that
exited whole still pays one token per later block (the class token alone; its output is
not read).

Unlike PAUMER (whose paused tokens re-join and are labelled by the decoder), an exited
token's label is final. Compute trace: ("head",) at each exit layer on the tokens still
active (head + log-softmax), ("paint", H, W) for each image with exited pixels (the
upsampling in ``finish``).

Training (``early_exit_loss``) fine-tunes backbone and heads together on PAUMER's
budget, with no exit simulated: CE on the final output plus weighted CE of each head
against patch labels (PAUMER's loss without the pausing). The backbone trains because
that is what PAUMER gets (the same budget buys the same freedom) and what lets the
intermediate features become linearly decodable; with it frozen the final-output term
would be a constant. So threshold 1 reproduces the fine-tuned model, not the baseline.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.encoder import Policy, TokenState, check_batching
from methods.paumer import HeadScore, PausingHeads, SegmenterWithHeads, patch_labels, scheduled_order

MODES = ("token", "image")
UPSAMPLE = {"token": "nearest", "image": "bilinear"}


def confidence(logits: Tensor) -> Tensor:
    """Max softmax probability over the last dim (via log-softmax, which the FLOP model
    prices at C flops per token, as PAUMER's entropy)."""
    return F.log_softmax(logits, dim=-1).amax(-1).exp()


def paint(logits: Tensor, head_logits: Tensor, where: Tensor, mode: str) -> Tensor:
    """Decoder logits (B, C, H, W) with the patch-level ``head_logits`` (B, C, gh, gw),
    upsampled by ``mode``, wherever ``where`` (B, 1, gh, gw), nearest-upsampled, is True."""
    size = logits.shape[-2:]
    head = F.interpolate(head_logits, size=size, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    mask = F.interpolate(where.to(logits.dtype), size=size, mode="nearest") > 0.5
    return torch.where(mask, head, logits)


class EarlyExitModel(SegmenterWithHeads):
    """A Segmenter plus its exit heads (``.heads``)."""

    heads_attr = "heads"


class EarlyExitPolicy(Policy):
    """Token or image early exit at inference (gather)."""

    name = "early-exit"
    quadratic_costs = (("head",),)  # priced by a fitted polynomial (bench.flops)

    def __init__(self, heads: PausingHeads, threshold: float = 0.9, mode: str = "token", batching: str = "pad",
                 stay: Optional[list] = None, spread: float = 0.1):
        """``stay`` (token mode, ``bench speed``): instead of the threshold, a forced
        schedule: the share of the grid still active after each exit layer, the most
        confident tokens leaving (``paumer.scheduled_selection``, spread +-``spread``)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        self.batching = check_batching(batching)
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.heads, self.threshold, self.mode = heads, threshold, mode
        self.stay, self.spread = (None if stay is None else [float(v) for v in stay]), float(spread)
        if self.stay is not None and (mode != "token" or len(self.stay) != len(heads.layers)):
            raise ValueError(f"stay needs token mode and one fraction per exit layer {heads.layers}")
        # per forward, set in `finish`: where each grid position exited, with what logits
        self.exited: Optional[Tensor] = None  # (B, N) bool
        self.head_logits: Optional[Tensor] = None  # (B, N, C) the exit head's, at exited positions
        self._exit_layer: Optional[Tensor] = None  # ``exit_layer``
        self._batch: Optional[tuple] = None  # (B, depth, device) of the last forward
        self._grid_logits: Optional[Tensor] = None  # ``TokenState.at_grid`` buffer of the heads' logits

    def describe(self) -> dict:
        if self.stay is not None:
            return {"stay": self.stay, "spread": self.spread, "mode": self.mode, "layers": self.heads.layers}
        return {"threshold": self.threshold, "mode": self.mode, "layers": self.heads.layers}

    @property
    def exit_layer(self) -> Optional[Tensor]:
        """(B,) image mode: the layer each image exited at (depth: never); token mode: depth."""
        if self._exit_layer is None and self._batch is not None:  # token mode: made when read
            B, depth, device = self._batch
            self._exit_layer = torch.full((B,), depth, dtype=torch.long, device=device)
        return self._exit_layer

    def start(self, model, state: TokenState) -> None:
        self.exited = self.head_logits = self._grid_logits = self._exit_layer = None
        self._batch = (state.batch_size, model.depth, state.device)
        if self.mode == "image":
            self.exit_layer  # made now: the decisions write it

    def after_block(self, index: int, block, state: TokenState) -> None:
        head = self.heads.head_at(index + 1)
        if head is None or state.n == 0:
            return
        logits = head(state.x)
        state.trace.add(("head",), state.counts())
        # every active row's logits at its grid position: an exited token's are those of
        # the head it exited at (later heads no longer see it)
        self._grid_logits = state.at_grid(logits, self._grid_logits)
        if self.stay is not None:  # the least confident stay: ascending max log-probability
            stay = self.stay[self.heads.layers.index(index + 1)]
            order, kept = scheduled_order(state, F.log_softmax(logits, dim=-1).amax(-1), stay, self.spread)
            state.keep_first(order, kept, layer=index + 1)
            return
        conf = confidence(logits)
        if self.mode == "token":
            leave = conf > self.threshold
            leave = leave if state.valid is None else leave & state.valid
        else:
            valid = state.valid if state.valid is not None else torch.ones_like(conf, dtype=torch.bool)
            mean = (conf * valid).sum(1) / valid.sum(1).clamp(min=1)
            gone = valid.any(1) & (mean > self.threshold)
            self.exit_layer.masked_fill_(gone & (self.exit_layer == state.trace.depth), index + 1)
            leave = gone[:, None] & valid
        state.keep(~leave, layer=index + 1)

    def decodes(self, state: TokenState) -> Optional[Tensor]:
        return None if self.mode == "token" else self.exit_layer == state.trace.depth

    def decoded_images(self, state: TokenState, decode: Tensor) -> list[int]:
        """Image mode: an image is decoded unless it exited, and an exited image has no
        active row left, so the host row counts ``keep`` already read say which (no sync)."""
        B, n = state.batch_size, state.n
        if n == 0:
            return []
        if state.row_counts is None:  # every image keeps the same (non-zero) count
            return list(range(B))
        return [b for b, count in enumerate(state.row_counts) if count > 0]

    def finish(self, logits: Tensor, state: TokenState) -> Tensor:
        B, C = logits.shape[:2]
        if not state.any_left:  # host flag set by `keep`: exited tokens are the ones that left
            self.exited = torch.zeros(B, state.grid_tokens, dtype=torch.bool, device=logits.device)
            return logits
        self.exited, self.head_logits = state.left_mask(), state.grid_view(self._grid_logits)
        head = self.head_logits.transpose(1, 2).reshape(B, C, *state.grid)
        out = paint(logits, head, self.exited.reshape(B, 1, *state.grid), UPSAMPLE[self.mode])
        # images with exited pixels: those with fewer active rows than grid tokens, known on the host
        rows = state.row_counts if state.row_counts is not None else [state.n] * B
        state.trace.add(("paint", *logits.shape[-2:]), torch.tensor([int(r < state.grid_tokens) for r in rows]))
        return out

    def cost_probe(self, model, key: tuple, n: int):
        p = next(self.heads.parameters())
        if key == ("head",):
            head = self.heads.heads[0]  # every head has the same shape
            return HeadScore(head, confidence), (torch.zeros(1, n, p.shape[-1], dtype=p.dtype, device=p.device),)
        if key[0] == "paint":  # n = 1: the image had exited pixels
            H, W = key[1:]
            gh, gw = model.grid_size(H, W)
            C = model.num_classes
            inputs = (torch.zeros(1, C, H, W, dtype=p.dtype, device=p.device),
                      torch.zeros(1, C, gh, gw, dtype=p.dtype, device=p.device),
                      torch.ones(1, 1, gh, gw, dtype=torch.bool, device=p.device))
            return partial(paint, mode=UPSAMPLE[self.mode]), inputs
        return super().cost_probe(model, key, n)


class _HeadOutputs(Policy):
    """Training: every token through every block; keeps each head's logits."""

    def __init__(self, heads: PausingHeads):
        self.heads = heads
        self.logits: list[Tensor] = []

    def after_block(self, index: int, block, state: TokenState) -> None:
        head = self.heads.head_at(index + 1)
        if head is not None:
            self.logits.append(head(state.x))


def early_exit_loss(model: EarlyExitModel, images: Tensor, labels: Tensor, *, head_weight: float = 0.5) -> Tensor:
    """CE on the final output plus ``head_weight`` x CE of each exit head against
    patch-level labels (majority class per patch)."""
    seg = model.segmenter
    policy = _HeadOutputs(model.heads)
    loss = F.cross_entropy(seg(images, policy), labels, ignore_index=255)
    target = patch_labels(labels, seg.patch_size, seg.num_classes).flatten()
    for head_logits in policy.logits:
        loss = loss + head_weight * F.cross_entropy(head_logits.flatten(0, 1), target, ignore_index=255)
    return loss

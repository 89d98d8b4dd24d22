"""PAUMER: patches whose intermediate prediction is confident *pause*.

At each pausing layer l (after block l, counting from 1) a head (LayerNorm + Linear to
C classes) predicts every active patch's class; a patch whose score is below tau_l
leaves the active set: it is neither query nor key/value of any later block, and it
re-joins at its grid position, with the state it had when it paused, before the decoder.

Scores (``criterion``), each in [0, 1], low = confident:
  entropy     normalised entropy  H = -sum p log p / log C   (the paper's criterion)
  confidence  1 - max p
  random      pauses as many patches per image as entropy would, chosen at random
  oracle      entropy, but only patches whose head prediction is right may pause
              (needs labels: evaluation only, an upper bound for the heads)
  schedule    forced selection for timing untrained models (``bench speed``): after
              each pausing layer a declared fraction of the grid stays active
              (``stay``, one per layer), spread image to image by +-``spread``; the
              lowest-entropy tokens pause (``scheduled_order``: one sort)

A class token (``ModelConfig.class_token``) never pauses: it is not a grid row, no head
scores it, and it runs through every block (``methods.encoder``).

Inference gathers (``TokenState.keep``): compute really falls. Training *simulates*
pausing with an attention mask (a paused token neither attends nor is attended to, and
its state is frozen), tau drawn at random per batch, so one network serves every tau;
``test_paumer`` holds the masked forward equal to the gathered one.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.encoder import Policy, TokenState, check_batching, masked_block

CRITERIA = ("entropy", "confidence", "random", "oracle", "schedule")


def default_layers(depth: int) -> list[int]:
    """Three evenly spaced layers from a third to two thirds of the depth (12 blocks:
    4, 6, 8; 6 blocks: 2, 3, 4). Earlier heads are too unsure to pause much; later
    pauses save little."""
    return sorted({max(1, round(depth * f)) for f in (1 / 3, 1 / 2, 2 / 3)})


def plogp(logits: Tensor) -> Tensor:
    """sum p log p over the last dim: minus the entropy, in [-log C, 0]."""
    logp = F.log_softmax(logits, dim=-1)
    return (logp.exp() * logp).sum(-1)


def normalized_entropy(logits: Tensor) -> Tensor:
    """-sum p log p / log C over the last dim, in [0, 1]."""
    # dividing by -log C is bitwise -(x / log C) (rounding is symmetric): one op fewer
    return plogp(logits) / -math.log(logits.shape[-1])


def default_stay(layers: int) -> list[float]:
    """``bench speed``'s default schedule: the share of the token grid still active
    after each pausing layer, from 0.75 to 0.4 (3 layers: 0.75, 0.575, 0.4)."""
    return [round(0.75 - 0.35 * i / max(layers - 1, 1), 4) for i in range(layers)]


@functools.lru_cache(maxsize=256)
def _scheduled_targets(B: int, stay: float, grid_tokens: int, spread: float, device) -> Tensor:
    """(B,) tokens each image keeps under the schedule: a constant per batch shape,
    computed once (on the CPU, as it always was) instead of five ops per decision."""
    offset = torch.linspace(-spread, spread, B) if B > 1 else torch.zeros(B)
    return ((stay + offset).clamp(0.0, 1.0) * grid_tokens).round().long().to(device)


def scheduled_selection(scores: Tensor, candidates: Optional[Tensor], stay: float, grid_tokens: int,
                        spread: float, active: Optional[Tensor] = None) -> Tensor:
    """Boolean (B, n): the lowest-``scores`` candidates of each image that must leave so
    that ``stay`` of its ``grid_tokens`` stay active; image b's share is offset by
    ``spread`` x a value from -1 (first image) to +1 (last), so batches are ragged.
    ``active``: the candidates' count per image, where the caller has it."""
    B, n = scores.shape
    target = _scheduled_targets(B, stay, grid_tokens, spread, scores.device)
    if active is None:
        active = candidates.sum(1) if candidates is not None else torch.full((B,), n, device=scores.device)
    leave = active - target  # below 0: no rank is below it, none leaves
    if candidates is not None:
        scores = scores.where(candidates, float("inf"))  # ranked after every candidate
    ranks = scores.argsort(dim=1, stable=True).argsort(dim=1)
    return ranks < leave[:, None]


def scheduled_order(state: TokenState, scores: Tensor, stay: float, spread: float) -> tuple[Tensor, Tensor]:
    """``scheduled_selection`` as ``TokenState.keep_first`` takes it, in one sort: each
    image's rows by ascending ``scores`` (B, n), padded rows last, and how many of them
    stay: ``stay`` of the grid, offset by ``spread`` from image to image, at most its rows.
    The rows that stay run on in score order."""
    target = _scheduled_targets(state.batch_size, stay, state.grid_tokens, spread, scores.device)
    return state.padded_last(scores).argsort(dim=1, stable=True), torch.minimum(state.counts(), target)


def pause_scores(logits: Tensor, criterion: str) -> Tensor:
    """Per-token score in [0, 1]; a token pauses where score < tau."""
    if criterion == "confidence":
        return 1.0 - F.softmax(logits, dim=-1).amax(-1)
    return normalized_entropy(logits)  # entropy, and the base of random / oracle


class PausingHeads(nn.Module):
    """One LayerNorm + Linear head per pausing layer."""

    def __init__(self, dim: int, num_classes: int, layers: Sequence[int]):
        super().__init__()
        self.layers = list(layers)
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes)) for _ in layers)

    def head_at(self, layer: int) -> Optional[nn.Module]:
        return self.heads[self.layers.index(layer)] if layer in self.layers else None


class SegmenterWithHeads(nn.Module):
    """A Segmenter plus per-layer heads: what a method that fine-tunes (PAUMER, early
    exit) trains and checkpoints. ``heads_attr`` names the heads' attribute, which is
    also their state-dict prefix (part of the checkpoints' weights hashes)."""

    heads_attr = "heads"

    def __init__(self, segmenter: nn.Module, layers: Optional[Sequence[int]] = None):
        super().__init__()
        layers = list(layers) if layers is not None else default_layers(segmenter.depth)
        check_layers(layers, segmenter.depth)
        self.segmenter = segmenter
        setattr(self, self.heads_attr, PausingHeads(segmenter.config.embed_dim, segmenter.num_classes, layers))

    def forward(self, images: Tensor, policy: Optional[Policy] = None) -> Tensor:
        return self.segmenter(images, policy)


class PaumerModel(SegmenterWithHeads):
    """A Segmenter plus its pausing heads (``.pausing``)."""

    heads_attr = "pausing"


def check_layers(layers: Sequence[int], depth: int) -> None:
    if depth < 2:  # else the range below is empty: [1, 0]
        raise ValueError(f"it needs at least 2 encoder blocks (its heads sit after a block, before the last), got {depth}")
    if not layers:
        raise ValueError("at least one pausing layer is needed")
    bad = [l for l in layers if not 1 <= l < depth]
    if bad:
        raise ValueError(f"pausing layers must be in [1, {depth - 1}] (after that block), got {bad}")
    if sorted(set(layers)) != list(layers):
        raise ValueError(f"pausing layers must be increasing and distinct, got {list(layers)}")


def resolve_tau(tau: Union[float, Sequence[float]], layers: Sequence[int]) -> list[float]:
    taus = [float(t) for t in tau] if isinstance(tau, (list, tuple)) else [float(tau)] * len(layers)
    if len(taus) != len(layers):
        raise ValueError(f"tau has {len(taus)} values for {len(layers)} pausing layers {list(layers)}")
    if any(not 0.0 <= t <= 1.0 for t in taus):
        raise ValueError(f"tau must be in [0, 1], got {taus}")
    return taus


def patch_labels(labels: Tensor, patch: int, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(B, H, W) pixel labels -> (B, H/p * W/p) majority class per patch; a patch that is
    mostly ignore pixels is ``ignore_index``."""
    B, H, W = labels.shape
    onehot = F.one_hot(torch.where(labels == ignore_index, num_classes, labels), num_classes + 1)
    share = F.avg_pool2d(onehot.permute(0, 3, 1, 2).float(), patch)  # (B, C+1, gh, gw)
    majority = share[:, :num_classes].argmax(1)
    majority.masked_fill_(share[:, num_classes] > 0.5, ignore_index)  # no boolean-mask write: no host read
    return majority.flatten(1)


class PaumerPolicy(Policy):
    """Pausing at inference (gather) or in training (mask)."""

    name = "paumer"
    quadratic_costs = (("head",),)  # priced by a fitted polynomial (bench.flops)

    def __init__(self, heads: PausingHeads, tau: Union[float, Sequence[float]] = 0.1,
                 criterion: str = "entropy", layers: Optional[Sequence[int]] = None,
                 batching: str = "pad", simulate: bool = False, seed: int = 0,
                 stay: Optional[Sequence[float]] = None, spread: float = 0.1):
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
        self.batching = check_batching(batching)
        self.heads = heads
        self.layers = list(heads.layers if layers is None else layers)
        missing = [l for l in self.layers if l not in heads.layers]
        if missing or not self.layers:
            raise ValueError(f"no pausing head at layer(s) {missing or '[]'}; heads were trained at {heads.layers}")
        self.taus = resolve_tau(tau, self.layers)
        self.criterion = criterion
        self.stay = [float(v) for v in (stay if stay is not None else default_stay(len(self.layers)))]
        self.spread = float(spread)
        if criterion == "schedule":
            if len(self.stay) != len(self.layers) or any(not 0.0 <= v <= 1.0 for v in self.stay):
                raise ValueError(f"stay needs one fraction in [0, 1] per pausing layer {self.layers}, got {self.stay}")
            if not 0.0 <= self.spread <= 1.0:
                raise ValueError(f"spread must be in [0, 1], got {self.spread}")
        self.simulate = simulate  # training: mask instead of gather
        self.seed = seed
        self.targets: Optional[Tensor] = None  # (B, N) patch labels, for `oracle`
        self.pixel_labels: Optional[Tensor] = None  # set by the protocol when `needs_labels`
        self.head_logits: list[Tensor] = []  # (B, N, C) per pausing layer, in `simulate` mode

    @property
    def needs_labels(self) -> bool:
        return self.criterion == "oracle"

    def describe(self) -> dict:
        if self.criterion == "schedule":
            return {"stay": self.stay, "spread": self.spread, "layers": self.layers, "criterion": self.criterion}
        return {"tau": self.taus, "layers": self.layers, "criterion": self.criterion}

    # --- the pausing decision -------------------------------------------------------
    def _pause(self, logits: Tensor, tau: float, targets: Optional[Tensor], candidates: Optional[Tensor]) -> Tensor:
        """Boolean (B, n): which of the given tokens pause at this layer. ``candidates``
        (B, n): the rows that are tokens still running (None: all); padded rows (a ragged
        batch) and tokens already paused (training) neither pause nor count. ``targets``:
        the oracle's labels of the rows (None: ``self.targets``, rows in grid order)."""
        pause = pause_scores(logits, self.criterion) < tau
        if candidates is not None:
            pause &= candidates
        if self.criterion == "random":
            pause = self._random_like(pause, candidates)
        elif self.criterion == "oracle":
            if self.targets is None:
                raise ValueError("the oracle criterion needs labels (evaluation only)")
            pause &= logits.argmax(-1) == (targets if targets is not None else self.targets)
        return pause

    def _random_like(self, pause: Tensor, candidates: Optional[Tensor]) -> Tensor:
        """As many pauses per image as ``pause`` has, at random candidate positions."""
        g = torch.Generator(device=pause.device).manual_seed(self.seed)  # on the device: no copy
        self.seed += 1
        noise = torch.rand(pause.shape, generator=g, device=pause.device)
        if candidates is not None:
            noise = noise.masked_fill(~candidates, 2.0)  # ranked after every candidate: never chosen
        ranks = noise.argsort(1).argsort(1)
        return ranks < pause.sum(1, keepdim=True)

    # --- the hooks --------------------------------------------------------------------
    def start(self, model, state: TokenState) -> None:
        self.head_logits = []
        if self.pixel_labels is not None:
            self.targets = patch_labels(self.pixel_labels, model.patch_size, model.num_classes)
        if self.simulate:
            self.active = torch.ones(state.x.shape[:2], dtype=torch.bool, device=state.x.device)

    def run_block(self, index: int, block, state: TokenState) -> None:
        if not self.simulate:
            return super().run_block(index, block, state)
        masked_block(block, state, self.active)  # paused tokens hidden as keys, outputs discarded

    def after_block(self, index: int, block, state: TokenState) -> None:
        if index + 1 not in self.layers:
            return
        head = self.heads.head_at(index + 1)
        tau = self.taus[self.layers.index(index + 1)]
        if self.criterion == "schedule":
            tau = 1.0  # the schedule decides; the head still runs (and is priced)
        if tau <= 0.0 and not self.simulate:
            return  # no score is below 0: nothing can pause, so the head is not run (nor priced)
        logits = head(state.x)
        state.trace.add(("head",), state.counts() if not self.simulate else self.active.sum(1))
        if self.simulate:
            self.head_logits.append(logits)
            pause = self._pause(logits.detach(), tau, None, self.active)
            state.left_at.masked_fill_(pause, index + 1)  # not left_at[pause] =: that reads the host
            self.active = self.active & ~pause
            return
        if self.criterion == "schedule":  # the most unsure stay: ascending sum p log p
            order, kept = scheduled_order(state, plogp(logits), self.stay[self.layers.index(index + 1)], self.spread)
            state.keep_first(order, kept, layer=index + 1)  # its one host read
            return
        targets = state.at_rows(self.targets.to(logits.device)) if self.criterion == "oracle" else None
        pause = self._pause(logits, tau, targets, state.valid)
        state.keep(~pause, layer=index + 1)  # its one host read; unchanged when none pauses

    def cost_probe(self, model, key: tuple, n: int):
        if key != ("head",):
            return super().cost_probe(model, key, n)
        head = self.heads.heads[0]  # every head has the same shape
        p = next(head.parameters())
        return HeadScore(head, normalized_entropy), (torch.zeros(1, n, p.shape[-1], dtype=p.dtype, device=p.device),)


class HeadScore(nn.Module):
    """What a decision layer computes per token: head logits and a score of them (the
    cost probe of ("head",) for PAUMER's entropy and early exit's confidence)."""

    def __init__(self, head: nn.Module, score):
        super().__init__()
        self.head, self.score = head, score

    def forward(self, tokens: Tensor) -> Tensor:
        return self.score(self.head(tokens))


def paumer_loss(paumer: PaumerModel, images: Tensor, labels: Tensor, *, tau_max: float = 0.5,
                head_weight: float = 0.5) -> Tensor:
    """CE on the final output with pausing simulated at a random tau, plus ``head_weight``
    x CE of each pausing head against patch-level labels. tau ~ U(0, tau_max) from
    torch's generator, which training seeds per step (resumable)."""
    seg = paumer.segmenter
    # a draw of the CPU generator, read through numpy: the same value as float(tensor), and
    # no Tensor read that a host-read counter would take for a device sync
    tau = float(torch.rand(()).numpy()) * tau_max
    policy = PaumerPolicy(paumer.pausing, tau=tau, simulate=True)
    logits = seg(images, policy)
    loss = F.cross_entropy(logits, labels, ignore_index=255)
    target = patch_labels(labels, seg.patch_size, seg.num_classes)
    for head_logits in policy.head_logits:
        loss = loss + head_weight * F.cross_entropy(head_logits.flatten(0, 1), target.flatten(), ignore_index=255)
    return loss

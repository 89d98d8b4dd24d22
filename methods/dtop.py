"""DToP (Tang et al., ICCV 2023): dynamic token pruning with class-query auxiliary heads.

After each pruning layer l (after block l, counting from 1) a ``DToPHead`` decodes the
active tokens; a token whose score (P(class present) x sigmoid(its mask logit), best
class) is above ``threshold`` is *pruned*, except the ``top_k`` best tokens of each
class (``methods.dtop_head``). A pruned token leaves entirely: it is no query and no
key of any later block (a real gather, ``TokenState.keep``), no later head's query
attends to it, and the final decoder runs on the active rows only.

Finishing (the reference's canvas): every grid position keeps the mask logits of the
last head that saw it. After the last block a final ``DToPHead`` runs on the tokens
still active; a pruned token's label is that final head's class probability x the
sigmoid of its own exit head's mask, so it can still change after it left. The active
tokens are labelled by the Segmenter's decoder (ours, so that nothing pruned is exactly
the fine-tuned Segmenter: docs/methods.md#dtop-dynamic-token-pruning-as-published).
An image with a pruned token returns the log of that probability grid (the decoder's
softmax at active positions), upsampled bilinearly; the others the decoder's logits.

Layers: DToP's own (6, 8 of 12; 8, 16 of 24); other depths take ViT-B's fractions
(1/2, 2/3: 6 blocks -> 3, 4). Training (``dtop_loss``) fine-tunes with pruning on at
DToP's training threshold (0.9; 0.95 for 24 blocks), simulated by masking (a pruned
token is hidden as key and frozen; ``test_dtop`` holds it equal to the gather): pixel
CE of the decoder on the unpruned patches + DToP's ATM loss on every head's canvas.
A class token (``ModelConfig.class_token``) is never pruned (DToP's configs drop it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.dtop_head import DToPHead, atm_loss, present_classes, prune_decision, token_scores
from methods.encoder import Policy, TokenState, check_batching, masked_block
from methods.paumer import check_layers, scheduled_selection

# from nothing pruned (scores are below 1) to everything prunable pruned at the first head
DEFAULT_THRESHOLDS = (1.0, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3, 0.0)
TOP_K = 5


def default_layers(depth: int) -> list[int]:
    """DToP's pruning layers: after blocks 6 and 8 of 12 (ViT-B), 8 and 16 of 24 (ViT-L);
    other depths at ViT-B's fractions 1/2 and 2/3 (6 blocks: 3, 4)."""
    known = {12: [6, 8], 24: [8, 16]}
    return known.get(depth) or sorted({max(1, round(depth / 2)), max(1, round(2 * depth / 3))})


def default_threshold(depth: int) -> float:
    """DToP's threshold: 0.9 for ViT-B (12 blocks), 0.95 for ViT-L (24)."""
    return 0.95 if depth >= 24 else 0.9


class DToPHeads(nn.Module):
    """One ``DToPHead`` per pruning layer, plus the final one (after the last block)."""

    def __init__(self, dim: int, num_classes: int, layers: Sequence[int]):
        super().__init__()
        self.layers = list(layers)
        self.heads = nn.ModuleList(DToPHead(dim, num_classes) for _ in self.layers)
        self.final = DToPHead(dim, num_classes)

    def head_at(self, layer: int) -> Optional[DToPHead]:
        return self.heads[self.layers.index(layer)] if layer in self.layers else None


class DToPModel(nn.Module):
    """A Segmenter plus DToP's heads (``.heads``): what ``dtop`` trains and checkpoints."""

    def __init__(self, segmenter: nn.Module, layers: Optional[Sequence[int]] = None):
        super().__init__()
        layers = list(layers) if layers is not None else default_layers(segmenter.depth)
        check_layers(layers, segmenter.depth)
        self.segmenter = segmenter
        self.heads = DToPHeads(segmenter.config.embed_dim, segmenter.num_classes, layers)

    def forward(self, images: Tensor, policy: Optional[Policy] = None) -> Tensor:
        return self.segmenter(images, policy)


def finish_pruned(logits: Tensor, patch_logits: Tensor, presence: Tensor, canvas: Tensor, pruned: Tensor,
                  grid: tuple[int, int], every_image: bool = False) -> Tensor:
    """DToP's finishing, for each image with a pruned token (``every_image``: for all):
    the probability grid (B, N, C), the decoder's softmax of ``patch_logits`` at active
    positions and P(present) (B, C) x sigmoid(``canvas``) at ``pruned`` (B, N) ones,
    upsampled bilinearly, as its log; the other images keep the decoder's ``logits``
    (B, C, H, W)."""
    B, C = logits.shape[:2]
    exit_pred = presence[:, None, :] * canvas.sigmoid()
    pred = torch.where(pruned[..., None], exit_pred, patch_logits.softmax(-1)).transpose(1, 2).reshape(B, C, *grid)
    pred = F.interpolate(pred, size=logits.shape[-2:], mode="bilinear", align_corners=False)
    finished = pred.clamp_min(torch.finfo(pred.dtype).tiny).log()
    if every_image:
        return finished
    return torch.where(pruned.any(1)[:, None, None, None], finished, logits)


class HeadScore(nn.Module):
    """What a pruning layer computes per token (the cost probe of ("dtop-head",))."""

    def __init__(self, head: DToPHead):
        super().__init__()
        self.head = head

    def forward(self, tokens: Tensor) -> Tensor:
        return token_scores(*self.head(tokens)).max(-1)[0]


class DToPPolicy(Policy):
    """DToP pruning at inference (gather) or in training (``simulate``: mask)."""

    name = "dtop"

    def __init__(self, heads: DToPHeads, threshold: Optional[float] = None, layers: Optional[Sequence[int]] = None,
                 top_k: int = TOP_K, batching: str = "pad", simulate: bool = False, depth: Optional[int] = None,
                 stay: Optional[Sequence[float]] = None, spread: float = 0.1):
        """``threshold`` None: DToP's for ``depth`` blocks. ``stay`` (``bench speed``): a
        forced schedule instead, the share of the grid still active after each pruning
        layer, the best-scoring unprotected tokens leaving (spread +-``spread``)."""
        self.batching = check_batching(batching)
        self.heads = heads
        self.layers = list(heads.layers if layers is None else layers)
        missing = [l for l in self.layers if l not in heads.layers]
        if missing or not self.layers:
            raise ValueError(f"no DToP head at layer(s) {missing or '[]'}; heads were trained at {heads.layers}")
        if threshold is None:
            threshold = default_threshold(depth or 12)
        self.threshold = float(threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be a whole number >= 0, got {top_k!r}")
        self.top_k = top_k
        self.stay = None if stay is None else [float(v) for v in stay]
        self.spread = float(spread)
        if self.stay is not None and (len(self.stay) != len(self.layers) or any(not 0 <= v <= 1 for v in self.stay)):
            raise ValueError(f"stay needs one fraction in [0, 1] per pruning layer {self.layers}, got {self.stay}")
        self.simulate = simulate
        self.model = None
        self.canvas: Optional[Tensor] = None  # (B, N, C) mask logits of the last head that saw each position
        self.pruned: Optional[Tensor] = None  # (B, N) bool
        self.presence: Optional[Tensor] = None  # (B, C) the final head's P(class present)
        self.outputs: list[tuple[Tensor, Tensor]] = []  # training: (class logits, canvas) per head

    def describe(self) -> dict:
        if self.stay is not None:
            return {"stay": self.stay, "spread": self.spread, "layers": self.layers, "top_k": self.top_k}
        return {"threshold": self.threshold, "layers": self.layers, "top_k": self.top_k}

    def start(self, model, state: TokenState) -> None:
        B, N = state.batch_size, state.grid_tokens
        self.model, self.outputs, self.presence, self._canvas = model, [], None, None
        self.pruned = torch.zeros(B, N, dtype=torch.bool, device=state.device)  # inference: set at the last block
        self.canvas = state.x.new_zeros(B, N, model.num_classes) if self.simulate else None
        if self.simulate:
            self.active = torch.ones(B, N, dtype=torch.bool, device=state.device)

    def run_block(self, index: int, block, state: TokenState) -> None:
        if not self.simulate:
            return super().run_block(index, block, state)
        masked_block(block, state, self.active)  # pruned tokens hidden as keys, states frozen

    def _paint_canvas(self, masks: Tensor, state: TokenState) -> None:
        """Mask logits of the active rows (B, n, C) onto their grid positions."""
        self._canvas = state.at_grid(masks, self._canvas)
        self.canvas = state.grid_view(self._canvas)

    def after_block(self, index: int, block, state: TokenState) -> None:
        last = index + 1 == len(state.trace.tokens[0])
        head = self.heads.final if last else self.heads.head_at(index + 1)
        if head is None or (index + 1 not in self.layers and not last):
            return
        if last and not (self.simulate or state.any_left):
            return  # nothing was pruned: the decoder labels every pixel, the final head is not needed
        valid = self.active if self.simulate else state.valid
        class_logits, masks = head(state.x, valid)
        if last and not self.simulate:
            self.pruned = state.left_mask()
        counts = self.active.sum(1) if self.simulate else state.counts()
        # the final head is priced for the images it finishes (those with a pruned token)
        state.trace.add(("dtop-head",), counts * self.pruned.any(1) if last else counts)
        if self.simulate:
            self.canvas = torch.where(self.active[..., None], masks, self.canvas)
            self.outputs.append((class_logits, self.canvas))
        else:
            self._paint_canvas(masks, state)
        if last:
            self.presence = class_logits.softmax(-1)[..., 0]
            return
        with torch.no_grad():
            scores = token_scores(class_logits, masks)
            prune = self._decide(scores, self.active if self.simulate else state.valid, state, index + 1)
        if self.simulate:
            state.left_at.masked_fill_(prune, index + 1)  # not left_at[prune] =: that reads the host
            self.pruned |= prune
            self.active = self.active & ~prune
            return
        state.keep(~prune, layer=index + 1)  # its one host read; unchanged when none is pruned

    def _decide(self, scores: Tensor, candidates: Optional[Tensor], state: TokenState, layer: int) -> Tensor:
        if self.stay is None:
            return prune_decision(scores, self.threshold, self.top_k, candidates)
        # forced schedule: the best-scoring tokens leave, the top-k of each class still stay
        everything = prune_decision(scores, -1.0, 0, candidates)
        free = prune_decision(scores, -1.0, self.top_k, candidates)
        stay = self.stay[self.layers.index(layer)]
        return scheduled_selection(-scores.max(-1)[0], free, stay, state.grid_tokens, self.spread) & everything

    def decodes(self, state: TokenState) -> Optional[Tensor]:
        # with a token pruned the decoder must not see it: ``finish`` decodes the active rows
        if self.simulate or state.any_left:
            return torch.zeros(state.batch_size, dtype=torch.bool, device=state.device)
        return None

    def decoded_images(self, state: TokenState, decode: Tensor) -> list[int]:
        return []  # ``decodes`` is all False whenever it is not None: no need to read it

    def finish(self, logits: Tensor, state: TokenState) -> Tensor:
        if not (self.simulate or state.any_left):
            return logits
        model, out_size = self.model, logits.shape[-2:]
        # simulate: rows still in grid order, pruned ones hidden from the decoder
        valid = self.active if self.simulate else state.valid
        # Segmenter.decode_rows, split to keep the per-patch logits: the decoder on the active rows
        rows = model.decoder(model.norm(state.x), None, valid)
        patch_logits = rows if self.simulate else state.grid_view(state.at_grid(rows))
        B = patch_logits.shape[0]
        logits = F.interpolate(patch_logits.transpose(1, 2).reshape(B, -1, *state.grid), size=out_size,
                               mode="bilinear", align_corners=False)
        state.trace.decoded = None  # the decoder did run for every image, on its active rows
        state.trace.decoder_rows = self.active.sum(1) if self.simulate else state.counts()
        if not self.simulate:
            state.trace.add(("dtop-paint", *out_size), self.pruned.any(1))
        return finish_pruned(logits, patch_logits, self.presence, self.canvas, self.pruned, state.grid,
                             every_image=self.simulate)

    def cost_probe(self, model, key: tuple, n: int):
        p = next(self.heads.parameters())
        if key == ("dtop-head",):  # every head has the same shape
            dim = model.config.embed_dim
            return HeadScore(self.heads.final), (torch.zeros(1, n, dim, dtype=p.dtype, device=p.device),)
        if key[0] == "dtop-paint":  # n = 1: the image had pruned tokens
            H, W = key[1:]
            grid = model.grid_size(H, W)
            N, C = grid[0] * grid[1], model.num_classes
            zeros = lambda *shape: torch.zeros(*shape, dtype=p.dtype, device=p.device)  # noqa: E731
            inputs = (zeros(1, C, H, W), zeros(1, N, C), zeros(1, C), zeros(1, N, C),
                      torch.ones(1, N, dtype=torch.bool, device=p.device))
            return (lambda *a: finish_pruned(*a, grid)), inputs
        return super().cost_probe(model, key, n)


def dtop_loss(model: DToPModel, images: Tensor, labels: Tensor, *, threshold: Optional[float] = None,
              top_k: int = TOP_K) -> Tensor:
    """DToP's fine-tuning loss with pruning on (simulated): pixel CE of the decoder on the
    patches it labels (the unpruned ones) + ``atm_loss`` of every head (pruning heads and
    the final one) on its canvas, all weighted 1 as in DToP's configs."""
    seg = model.segmenter
    policy = DToPPolicy(model.heads, threshold=threshold, top_k=top_k, simulate=True, depth=seg.depth)
    logits, state = seg.forward_state(images, policy, host_trace=False)
    grid = state.grid
    B = labels.shape[0]
    pruned = F.interpolate(policy.pruned.reshape(B, 1, *grid).float(), size=labels.shape[-2:], mode="nearest")[:, 0]
    # ``logits`` are log-probabilities here (``finish_pruned``): NLL is the pixel CE
    target = labels.masked_fill(pruned > 0.5, 255)
    # a sum over the counted pixels: a batch whose unpruned pixels are all ignored adds 0, not NaN
    loss = F.nll_loss(logits, target, ignore_index=255, reduction="sum") / (target != 255).sum().clamp(min=1)
    present = present_classes(labels, seg.num_classes)  # the step's one host read, shared by the heads
    for class_logits, canvas in policy.outputs:
        loss = loss + atm_loss(class_logits, canvas, labels, grid, present)
    return loss

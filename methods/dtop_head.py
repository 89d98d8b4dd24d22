"""DToP's auxiliary head, its token score, its top-k rule and its training loss, as pure
pieces a test can call on hand-made tensors (``methods.dtop`` runs them in the encoder).

Read against zbwxp/Dynamic-Token-Pruning (docs/methods.md#dtop names each file):

``DToPHead`` (``PruneHead`` over ``TPN_Decoder``): the tokens are projected to half the
width and normalised; one learnt query per class goes through ``layers`` post-norm
decoder layers (query self-attention, cross-attention to the tokens, ReLU MLP); a
query's *mask* over the tokens is its last cross-attention's logits, averaged over
heads; a Linear gives each query two logits (class present / absent).

``token_scores``: per token and class, P(class present) x sigmoid(mask logit); a
token's score is its best class's value, its label that class.

``prune_decision``: a token is pruned where its score is above the threshold, except
the ``top_k`` highest-scoring tokens of each label, which are always kept.

``atm_loss`` (``ATMLoss`` / ``SetCriterion`` with DToP's fixed query-class matching):
presence cross-entropy (absent weighted 0.1) + 20 x sigmoid focal + 1 x dice loss on
the masks of the classes present, upsampled bilinearly to the labels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255
ABSENT_WEIGHT = 0.1  # DETR's eos_coef, DToP's default
MASK_WEIGHT, DICE_WEIGHT, CLASS_WEIGHT = 20.0, 1.0, 1.0


class QueryLayer(nn.Module):
    """One ``TPN_DecoderLayer``: post-norm self-attention of the queries, cross-attention
    to the tokens (whose head-averaged logits are the masks), ReLU feed-forward."""

    def __init__(self, width: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.heads = heads
        self.self_qkv = nn.Linear(width, 3 * width)
        self.self_proj = nn.Linear(width, width)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.proj = nn.Linear(width, width)
        self.linear1, self.linear2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(width) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def _split(self, t: Tensor) -> Tensor:  # (B, L, W) -> (B, heads, L, W / heads)
        B, L, W = t.shape
        return t.reshape(B, L, self.heads, W // self.heads).transpose(1, 2)

    def forward(self, queries: Tensor, memory: Tensor, valid: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        B, C, W = queries.shape
        scale = (W // self.heads) ** -0.5
        q, k, v = (self._split(t) for t in self.self_qkv(queries).chunk(3, -1))
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(B, C, W)
        queries = self.norm1(queries + self.drop(self.self_proj(out)))
        q, k, v = self._split(self.q(queries)), self._split(self.k(memory)), self._split(self.v(memory))
        logits = (q @ k.transpose(-2, -1)) * scale  # (B, heads, C, n)
        if valid is not None:  # padded (or pruned, in training) tokens are no keys
            logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        masks = logits.mean(1)  # the reference's sum / heads of the raw logits
        out = (self.drop(logits.softmax(-1)) @ v).transpose(1, 2).reshape(B, C, W)
        queries = self.norm2(queries + self.drop(self.proj(out)))
        queries = self.norm3(queries + self.drop(self.linear2(self.drop(F.relu(self.linear1(queries))))))
        return queries, masks


class DToPHead(nn.Module):
    """Class queries decoding the tokens after one block (DToP's ``PruneHead``)."""

    def __init__(self, dim: int, num_classes: int, layers: int = 3, width: Optional[int] = None):
        super().__init__()
        width = width or dim // 2  # the reference's channels = in_channels / 2
        heads = max(1, width // 64)  # 64 per head, as DToP's ViT-B (6 x 64) and ViT-L (8 x 64)
        self.input_proj = nn.Linear(dim, width)
        self.proj_norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(num_classes, width))  # nn.Embedding's N(0, 1)
        self.layers = nn.ModuleList(QueryLayer(width, heads) for _ in range(layers))
        self.class_embed = nn.Linear(width, 2)
        for m in self.modules():  # the reference's init_weights
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor, valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Tokens (B, n, D), ``valid`` (B, n) the real ones -> class logits (B, C, 2)
        (present, absent) and mask logits (B, n, C)."""
        memory = self.proj_norm(self.input_proj(tokens))
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        masks = None
        for layer in self.layers:
            queries, masks = layer(queries, memory, valid)
        return self.class_embed(queries), masks.transpose(1, 2)


def token_scores(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """(B, n, C): P(class present) (softmax of the two class logits) x sigmoid(mask)."""
    presence = class_logits.softmax(-1)[..., 0]  # (B, C)
    return presence[:, None, :] * mask_logits.sigmoid()


def prune_decision(scores: Tensor, threshold: float, top_k: int, candidates: Optional[Tensor] = None) -> Tensor:
    """Boolean (B, n): tokens to prune. ``scores`` (B, n, C) from ``token_scores``; a token
    is pruned where its best value is above ``threshold`` unless it is one of the
    ``top_k`` best-scoring candidates of its label (argmax class) in its image.
    ``candidates`` (B, n): the rows that are running tokens (None: all)."""
    score, label = scores.max(-1)
    B, n, C = scores.shape
    cand = torch.ones_like(score, dtype=torch.bool) if candidates is None else candidates
    prune = (score > threshold) & cand
    if top_k > 0:
        order = score.masked_fill(~cand, float("-inf")).argsort(dim=1, descending=True, stable=True)
        in_class = F.one_hot(label.gather(1, order), C).bool() & cand.gather(1, order)[..., None]
        rank = (in_class.long().cumsum(1) * in_class).sum(-1)  # 1-based rank within its label, 0: no candidate
        protected = torch.zeros_like(prune).scatter_(1, order, (rank >= 1) & (rank <= top_k))
        prune &= ~protected
    return prune


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """(M, P) mask logits and 0/1 targets -> per-mask focal loss, mean over pixels (M,)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    return (alpha * targets + (1 - alpha) * (1 - targets)) * loss if alpha >= 0 else loss


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """(M, P) -> per-mask dice loss (M,), smoothed by 1."""
    prob = logits.sigmoid()
    return 1 - (2 * (prob * targets).sum(-1) + 1) / (prob.sum(-1) + targets.sum(-1) + 1)


def present_classes(labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(B, C) bool: class c occurs in image b (ignore is no class); and the flat indices
    (M,) of its True entries, in row-major order (what boolean indexing picks): the one
    host read of ``atm_loss``, made once for every head of a forward."""
    classes = torch.arange(num_classes, device=labels.device)
    present = (labels[:, None] == classes[None, :, None, None]).flatten(2).any(-1)
    return present, present.flatten().nonzero().flatten()


def atm_loss(class_logits: Tensor, mask_logits: Tensor, labels: Tensor, grid: tuple[int, int],
             present: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """DToP's head loss. ``class_logits`` (B, C, 2), ``mask_logits`` (B, N, C) on the full
    grid, ``labels`` (B, H, W) with ``IGNORE_INDEX``: query c's target is "present" where
    class c occurs in the image (fixed matching), its mask that class's pixels.
    ``present``: ``present_classes(labels, C)``, where the caller has it."""
    B, C = class_logits.shape[:2]
    present, picked = present if present is not None else present_classes(labels, C)
    weight = torch.tensor([1.0, ABSENT_WEIGHT], device=class_logits.device, dtype=class_logits.dtype)
    loss = CLASS_WEIGHT * F.cross_entropy(class_logits.reshape(B * C, 2), (~present).long().reshape(-1), weight)
    num_masks = present.sum().clamp(min=1)
    # the present classes' masks (M, gh, gw): index_select by the host-read indices, the
    # same rows as boolean indexing without a read per head
    masks = mask_logits.transpose(1, 2).reshape(B * C, *grid).index_select(0, picked)
    if masks.shape[0]:
        classes = torch.arange(C, device=labels.device)
        targets = (labels[:, None] == classes[None, :, None, None]).flatten(0, 1).index_select(0, picked)
        masks = F.interpolate(masks[:, None], size=labels.shape[-2:], mode="bilinear", align_corners=False)
        masks, targets = masks.flatten(1), targets.flatten(1).to(masks.dtype)
        loss = loss + MASK_WEIGHT * sigmoid_focal_loss(masks, targets).mean(1).sum() / num_masks
        loss = loss + DICE_WEIGHT * dice_loss(masks, targets).sum() / num_masks
    return loss

"""ALGM: adaptive local-then-global token merging (Norouzi et al., CVPR 2024), as in its
public code for Segmenter (tue-mps/algm-segmenter).

Merging happens inside a few *selected layers* (1-based, the reference's
``selected_layers``), between the attention residual and the MLP, on the block's tokens
themselves (the residual stream, not the attention keys):

1. local, in the first selected layer: the grid is cut into 2x2 windows; a window whose
   mean pairwise cosine similarity (the 12 off-diagonal pairs) is at least ``threshold``
   becomes one token, the average of its four;
2. global, in every later selected layer: ToMe's bipartite matching (A = even rows,
   B = odd rows, every A token's most similar B token), but every A token whose best
   similarity is at least mean + std / layer of the image's best similarities merges
   into its match (``global_threshold`` fixes that threshold instead).

So how many tokens merge depends on the image. Merged rows are size-weighted averages
(``state.size``); attention is *not* proportional to the sizes, in the encoder or the
mask decoder (the reference passes no sizes to either). The decoder runs on the merged
rows and every patch takes its row's masks (``unmerge='after'``, as the reference does).
Training-free: it runs on the baseline's weights.

Differences from the reference, all because of how our harness batches:
 - the reference takes the *smallest* merge count over the batch (and the global
   threshold's mean and std averaged over the batch) so that shapes stay fixed; by
   default every image merges its own count (the reference at batch size 1) and batches
   become ragged, run with padding or packed like the other adaptive methods
   (``batching``). ``batching="reference"`` does what the reference does: every image of
   a batch merges the batch's smallest count, its most similar windows / A tokens, with
   the global threshold from the batch-averaged statistics (``*_reference`` plans);
 - a model without a class token (``tiny``) has its global statistics over every A
   token (the reference cannot run without one: its local merge always sets row 0
   apart, and its statistics skip that row);
 - a distillation token (``ModelConfig.dist_token``) is held apart from the matching
   (which sees the class token and the grid rows) and keeps its row: it never merges and
   nothing merges into it (the reference's local merge cannot run with one);
 - grids with an odd side keep the last row / column out of the windows (the reference
   refuses them).

A class token (``ModelConfig.class_token``) is handled as the reference does: local
merging sees the grid tokens only; global matching runs on the class token then the
rows, the class token being row 0 of set A, never merged and left out of the
statistics, and the unmerged A rows keep their order (so it stays row 0). It takes part
in every attention, in no merge, and the decoder never sees it.

Default layers: the reference's, layers 1 and 5 of 12 and 1 and 7 of 24 (Seg-L). For
other depths local merging stays in layer 1 and the global layer keeps the share of
blocks before it of the 12-block case: 1 + round(4 * depth / 12), i.e. layer 3 of our
6-block ``tiny``; its threshold divides the std by that layer number.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.encoder import Policy, TokenState

WINDOW = 2  # the reference's merging window, 2 x 2
UNMERGE = ("before", "after")
# the swept local threshold: > 1 merges no window, -1 every window (tiny on synthetic: about
# 0.83 down to 0.26 of the full model's FLOPs; the adaptive global merge always runs)
DEFAULT_THRESHOLDS = (1.01, 0.98, 0.95, 0.9, 0.88, 0.85, 0.8, 0.7, 0.5, 0.3, 0.0, -1.0)


REFERENCE_LAYERS = {12: [1, 5], 24: [1, 7]}  # the reference's selected_layers for ViT-T/S/B and ViT-L
BATCHINGS = ("pad", "packed", "reference")


def default_layers(depth: int) -> list[int]:
    """The reference's layers for 12 and 24 blocks; otherwise layers 1 and 5 of 12 scaled
    to ``depth`` blocks: [1, 1 + round(4 depth / 12)]."""
    if depth in REFERENCE_LAYERS:
        return list(REFERENCE_LAYERS[depth])
    return [1, max(2, 1 + round(4 * depth / 12))] if depth >= 2 else [1]


def check_layers(layers: Sequence[int], depth: int) -> list[int]:
    layers = list(layers)
    if (not layers or any(isinstance(v, bool) or not isinstance(v, int) for v in layers)
            or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 1 or layers[-1] > depth):
        raise ValueError(f"layers must be increasing 1-based layer numbers in 1..{depth}, got {layers!r}")
    return layers


def windows_of(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Tokens (B, gh * gw, D) in grid order -> the 2x2 windows (B, W, 4, D), each window's
    tokens in row-major order (index 3 = bottom right); an odd last row / column is left out."""
    B, _, D = x.shape
    gh, gw = grid
    wh, ww = gh // WINDOW, gw // WINDOW
    x = x.reshape(B, gh, gw, D)[:, : wh * WINDOW, : ww * WINDOW]
    return x.reshape(B, wh, WINDOW, ww, WINDOW, D).permute(0, 1, 3, 2, 4, 5).reshape(B, wh * ww, WINDOW**2, D)


def window_similarity(windows: Tensor) -> Tensor:
    """(B, W, k, D) -> (B, W): mean cosine similarity of the k (k - 1) ordered pairs of
    distinct tokens in each window (the reference's ``similarity_map``)."""
    k = windows.shape[-2]
    unit = F.normalize(windows, dim=-1)
    sims = unit @ unit.transpose(-1, -2)
    off_diagonal = 1 - torch.eye(k, dtype=sims.dtype, device=sims.device)
    return (sims * off_diagonal).sum((-1, -2)) / (k * (k - 1))


def local_merge_plan(x: Tensor, grid: tuple[int, int], threshold: float) -> tuple[Tensor, Tensor]:
    """Which row each token of ``x`` (B, N, D), in grid order, goes to: ``dest`` (B, N), and
    the rows per image (B,). Windows with ``window_similarity >= threshold`` become one row
    each, most similar window first; the other tokens follow in grid order (the
    reference's order)."""
    B, N, _ = x.shape
    gh, gw = grid
    sim = window_similarity(windows_of(x, grid))  # (B, W)
    W = sim.shape[1]
    merged = sim >= threshold
    r = merged.sum(1)  # windows merged per image
    rank = sim.argsort(dim=1, descending=True, stable=True).argsort(1)  # 0 = most similar window
    # grid position -> its window (or -1 outside the windows)
    wh, ww = gh // WINDOW, gw // WINDOW
    rows, cols = torch.arange(gh, device=x.device), torch.arange(gw, device=x.device)
    inside = (rows[:, None] < wh * WINDOW) & (cols[None, :] < ww * WINDOW)
    window = torch.where(inside, (rows[:, None] // WINDOW) * ww + cols[None, :] // WINDOW, -1).reshape(N)
    token_merged = merged[:, window.clamp(min=0)] & (window >= 0)  # (B, N)
    unmerged_rank = (~token_merged).long().cumsum(1) - 1
    dest = torch.where(token_merged, rank[:, window.clamp(min=0)], r[:, None] + unmerged_rank)
    assert W == wh * ww
    return dest, N - (WINDOW**2 - 1) * r


def local_merge_plan_reference(x: Tensor, grid: tuple[int, int], threshold: float) -> tuple[Tensor, Tensor]:
    """``local_merge_plan`` as the reference batches it: every image merges its ``r``
    most similar windows, r the smallest count over the batch of windows with
    ``window_similarity >= threshold``. Same outputs; every image keeps the same rows."""
    B, N, _ = x.shape
    gh, gw = grid
    sim = window_similarity(windows_of(x, grid))  # (B, W)
    r = (sim >= threshold).sum(1).min()
    rank = sim.argsort(dim=1, descending=True, stable=True).argsort(1)  # 0 = most similar window
    merged = rank < r
    wh, ww = gh // WINDOW, gw // WINDOW
    rows, cols = torch.arange(gh, device=x.device), torch.arange(gw, device=x.device)
    inside = (rows[:, None] < wh * WINDOW) & (cols[None, :] < ww * WINDOW)
    window = torch.where(inside, (rows[:, None] // WINDOW) * ww + cols[None, :] // WINDOW, -1).reshape(N)
    token_merged = merged[:, window.clamp(min=0)] & (window >= 0)
    unmerged_rank = (~token_merged).long().cumsum(1) - 1
    dest = torch.where(token_merged, rank[:, window.clamp(min=0)], r + unmerged_rank)
    return dest, (N - (WINDOW**2 - 1) * r).expand(B).clone()


def global_merge_plan_reference(x: Tensor, layer: int, threshold: Optional[float] = None,
                                protect_cls: bool = False) -> tuple[Tensor, Tensor]:
    """``global_merge_plan`` as the reference batches it (``turbo_matching``), on a batch
    whose images have the same rows: the threshold is the batch mean of the images' means
    plus the batch mean of their (unbiased) stds over ``layer``; every image merges its
    ``r`` A tokens with the most similar matches, r the smallest count over the batch of
    A tokens at or above the threshold. ``protect_cls``: row 0, a class token, never
    merges and is left out of the statistics."""
    B, n, _ = x.shape
    best, match = bipartite_scores(x).max(-1)  # (B, |A|)
    if protect_cls:
        best = best.clone()
        best[:, 0] = float("-inf")
    stats = best[:, 1:] if protect_cls else best
    if threshold is None:
        cut = stats.mean(1).mean() + stats.std(1).mean() / layer if stats.shape[1] > 1 else best.new_tensor(float("inf"))
    else:
        cut = best.new_tensor(float(threshold))
    r = (best >= cut).sum(1).min()
    rank = best.argsort(dim=1, descending=True, stable=True).argsort(1)
    merges = rank < r
    kept_a = best.shape[1] - r
    kept_row = (~merges).long().cumsum(1) - 1 if protect_cls else rank - r
    dest = torch.empty(B, n, dtype=torch.long, device=x.device)
    dest[:, ::2] = torch.where(merges, kept_a + match, kept_row)
    dest[:, 1::2] = kept_a + torch.arange(n // 2, device=x.device)
    return dest, (n - r).expand(B).clone()


def bipartite_scores(metric: Tensor) -> Tensor:
    """Cosine similarities (B, |A|, |B|) of the even rows (A) to the odd rows (B)."""
    metric = F.normalize(metric, dim=-1)
    return metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)


def global_merge_plan(x: Tensor, valid: Optional[Tensor], layer: int,
                      threshold: Optional[float] = None, protect_cls: bool = False) -> tuple[Tensor, Tensor]:
    """ALGM's global merging on ``x`` (B, n, D), real rows first (``valid``; None: all):
    ``dest`` (B, n) and the rows per image (B,). Every A token whose best B similarity is
    at least the threshold merges into that B token; the threshold is ``threshold`` or,
    per image, mean + std / ``layer`` of the A tokens' best similarities. Rows come in the
    reference's order: unmerged A tokens (most similar first), then every B token.
    Padded rows go to row ``n`` (a row past the end, dropped). ``protect_cls``: row 0 is
    a class token: it never merges, is left out of the statistics, and the unmerged A
    tokens keep their order, so it stays row 0 (the reference's ``class_token``)."""
    B, n, _ = x.shape
    if valid is None:
        valid = torch.ones(B, n, dtype=torch.bool, device=x.device)
    a_valid, b_valid = valid[:, ::2], valid[:, 1::2]
    scores = bipartite_scores(x).masked_fill(~b_valid[:, None, :], float("-inf"))
    best, match = scores.max(-1)  # (B, |A|)
    if protect_cls:
        best = best.clone()
        best[:, 0] = float("-inf")
    real = a_valid & (best > float("-inf"))  # A tokens that have some B token to merge into
    if threshold is None:
        count = real.sum(1, keepdim=True)
        filled = torch.where(real, best, 0.0)
        mean = filled.sum(1, keepdim=True) / count.clamp(min=1)
        var = (torch.where(real, best - mean, 0.0) ** 2).sum(1, keepdim=True) / (count - 1).clamp(min=1)
        # std is unbiased (torch's default in the reference); one A token: no merge
        cut = torch.where(count > 1, mean + var.sqrt() / layer, float("inf"))
    else:
        cut = torch.full((B, 1), float(threshold), dtype=best.dtype, device=x.device)
    merges = real & (best >= cut)
    r = merges.sum(1)
    order_key = torch.where(a_valid, best, float("-inf"))
    rank = order_key.argsort(dim=1, descending=True, stable=True).argsort(1)
    kept_a = a_valid.sum(1) - r  # unmerged A tokens per image
    dest = torch.full((B, n), n, dtype=torch.long, device=x.device)
    kept_row = (a_valid & ~merges).long().cumsum(1) - 1 if protect_cls else rank - r[:, None]
    dest[:, ::2] = torch.where(merges, kept_a[:, None] + match, kept_row)
    dest[:, 1::2] = kept_a[:, None] + torch.arange(b_valid.shape[1], device=x.device)
    dest = torch.where(valid, dest, n)
    return dest, valid.sum(1) - r


def merge_rows(x: Tensor, dest: Tensor, size: Optional[Tensor], valid: Optional[Tensor],
               counts: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Rows of ``x`` (B, n, D) with the same ``dest`` become their size-weighted average;
    image b keeps ``counts[b]`` rows, padded after. ``dest == n`` drops a row. Returns the
    rows, their sizes (0 on padding) and ``valid`` (None when no image is padded)."""
    B, n, D = x.shape
    n_out = int(counts.max())
    if size is None:
        size = x.new_ones(B, n)
    if valid is not None:
        size = size * valid
    dest = dest.clamp(max=n_out)  # dropped rows land on the extra row n_out
    total = x.new_zeros(B, n_out + 1, D).scatter_add_(1, dest[..., None].expand(B, n, D), x * size[..., None])
    new_size = size.new_zeros(B, n_out + 1).scatter_add_(1, dest, size)
    total, new_size = total[:, :n_out], new_size[:, :n_out]
    rows = torch.arange(n_out, device=x.device).expand(B, n_out)
    new_valid = None if bool((counts == n_out).all()) else rows < counts[:, None].to(x.device)
    return total / new_size.clamp(min=1)[..., None], new_size, new_valid


def attention_residual(block: nn.Module, x: Tensor, valid: Optional[Tensor], batching: str) -> Tensor:
    """The first half of timm's ``Block.forward``: x + attention(norm1(x)), on the real rows
    (``valid``) by a key-padding mask ("pad") or image by image ("packed")."""
    if valid is None or batching == "pad":
        mask = None if valid is None else valid[:, None, None, :]
        return x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=mask)))
    attn = block.attn  # packed: as methods.encoder.packed_block, attention half only
    rows = x[valid]
    T = rows.shape[0]
    qkv = attn.qkv(block.norm1(rows)).reshape(T, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    segments = valid.sum(1).tolist()
    out = torch.cat([F.scaled_dot_product_attention(qs, ks, vs)
                     for qs, ks, vs in zip(q.split(segments, 1), k.split(segments, 1), v.split(segments, 1))], 1)
    out = attn.proj(attn.norm(out.transpose(0, 1).reshape(T, attn.attn_dim)))
    result = torch.zeros_like(x)
    result[valid] = rows + block.drop_path1(block.ls1(out))
    return result


def mlp_residual(block: nn.Module, x: Tensor, valid: Optional[Tensor], batching: str) -> Tensor:
    """The second half of timm's ``Block.forward``: x + mlp(norm2(x)), per row."""
    if valid is None or batching == "pad":
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    rows = x[valid]
    result = torch.zeros_like(x)
    result[valid] = rows + block.drop_path2(block.ls2(block.mlp(block.norm2(rows))))
    return result


def _with_lead(valid: Optional[Tensor], lead: int) -> Optional[Tensor]:
    """``valid`` (B, n) with ``lead`` real rows (the class token) first."""
    if valid is None or not lead:
        return valid
    return torch.cat([valid.new_ones(valid.shape[0], lead), valid], 1)


class ALGMPolicy(Policy):
    """Local merging in ``layers[0]``, global merging in every later layer of ``layers``."""

    name = "algm"
    unmerge = "after"
    quadratic_costs = (("algm_attention",), ("algm_mlp",))  # fitted polynomials (bench.flops)
    prop_attn = False  # the reference's attention ignores the token sizes (decoder too)

    def __init__(self, depth: int, threshold: float = 0.88, layers: Optional[Sequence[int]] = None,
                 global_threshold: Optional[float] = None, batching: str = "pad", unmerge: str = "after"):
        if unmerge not in UNMERGE:
            raise ValueError(f"unknown unmerge {unmerge!r}; expected 'before' or 'after' (the decoder)")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"threshold must be a number, got {threshold!r}")
        if global_threshold is not None and (isinstance(global_threshold, bool)
                                             or not isinstance(global_threshold, (int, float))):
            raise ValueError(f"global_threshold must be a number or None, got {global_threshold!r}")
        self.layers = check_layers(default_layers(depth) if layers is None else layers, depth)
        self.threshold, self.global_threshold = float(threshold), global_threshold
        if batching not in BATCHINGS:
            raise ValueError(f"unknown batching {batching!r}; expected one of {', '.join(BATCHINGS)}")
        self.batching, self.unmerge = batching, unmerge

    def describe(self) -> dict:
        return {"threshold": self.threshold, "layers": self.layers, "global_threshold": self.global_threshold,
                "batching": self.batching, "unmerge": self.unmerge}

    def run_block(self, index: int, block, state: TokenState) -> None:
        layer = index + 1
        if layer not in self.layers:
            return super().run_block(index, block, state)
        counts = state.counts()
        x = attention_residual(block, state.joined(), state.joined_valid(), self.batching)
        local = layer == self.layers[0]
        reference = self.batching == "reference"
        # rows of x before the grid's: local merging sees the grid only, global matching the
        # class token too, as row 0, never merged (both as the reference); further prefix
        # rows (a distillation token) are held out of the matching and keep their rows
        lead = 0 if local else min(state.num_prefix, 1)
        held = None
        if local:  # nothing merged before: rows are the grid, in order
            x = state.split(x)
            plan = local_merge_plan_reference if reference else local_merge_plan
            dest, kept = plan(x, state.grid, self.threshold)
            gh, gw = state.grid
            decide = ("algm_local", (gh // WINDOW) * (gw // WINDOW))
        else:
            if state.num_prefix > 1:
                held, x = x[:, 1:state.num_prefix], torch.cat([x[:, :1], x[:, state.num_prefix:]], 1)
            if reference:
                dest, kept = global_merge_plan_reference(x, layer, self.global_threshold, protect_cls=lead > 0)
            else:
                dest, kept = global_merge_plan(x, _with_lead(state.valid, lead), layer, self.global_threshold,
                                               protect_cls=lead > 0)
            decide = ("algm_global",)
        if bool((kept != counts.to(kept.device) + lead).any()):  # no merge anywhere: rows keep their order
            size = state.size
            if size is not None and lead:
                size = torch.cat([size.new_ones(size.shape[0], lead), size], 1)
            valid = state.valid if local else _with_lead(state.valid, lead)
            x, size, valid = merge_rows(x, dest, size, valid, kept)
            # ALGM parks nothing: every position has a row
            state.source = dest.gather(1, state.source + lead) - lead
            state.size, state.valid = size[:, lead:], None if valid is None else valid[:, lead:]
        if not local:
            x = state.split(x if held is None else torch.cat([x[:, :1], held, x[:, 1:]], 1))
        state.x = state.split(mlp_residual(block, state.joined(x), state.joined_valid(), self.batching))
        state.trace.add(("algm_attention",), state.block_counts(counts))
        state.trace.add(decide, counts + lead)  # local: priced by its windows, whatever the count
        state.trace.add(("algm_mlp",), state.block_counts())

    def cost_probe(self, model, key: tuple, n: int):
        p = next(model.parameters())
        D = model.config.embed_dim
        block = model.blocks[0]  # every block has the same shape
        if key == ("algm_attention",):
            return (lambda x: attention_residual(block, x, None, "pad")), (p.new_zeros(1, n, D),)
        if key == ("algm_mlp",):
            return (lambda x: mlp_residual(block, x, None, "pad")), (p.new_zeros(1, n, D),)
        if key[0] == "algm_local":  # priced by its windows: the grid decides them, not n
            return window_similarity, (p.new_zeros(1, key[1], WINDOW**2, D),)
        if key == ("algm_global",):
            return bipartite_scores, (p.new_zeros(1, n, D),)
        return super().cost_probe(model, key, n)

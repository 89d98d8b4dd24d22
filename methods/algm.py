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

from methods.encoder import Policy, TokenState, known_counts, packed_index
from methods.ragged import segment_attention
from methods.tome import arange, constant

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
    off_diagonal = constant(("algm_off_diagonal", k, sims.dtype), sims.device,
                            lambda: 1 - torch.eye(k, dtype=sims.dtype, device=sims.device))
    return (sims * off_diagonal).sum((-1, -2)) / (k * (k - 1))


def _grid_windows(grid: tuple[int, int], device) -> tuple[Tensor, Optional[Tensor]]:
    """Each grid position's window (N,) (0 outside the windows) and which positions are
    inside one (None: all, an even grid); kept between forwards (``constant``)."""
    def make():
        gh, gw = grid
        wh, ww = gh // WINDOW, gw // WINDOW
        rows, cols = torch.arange(gh, device=device), torch.arange(gw, device=device)
        inside = ((rows[:, None] < wh * WINDOW) & (cols[None, :] < ww * WINDOW)).reshape(-1)
        window = ((rows[:, None] // WINDOW) * ww + cols[None, :] // WINDOW).reshape(-1)
        return window.where(inside, 0), None if gh % WINDOW == 0 and gw % WINDOW == 0 else inside

    return constant(("algm_windows", tuple(grid)), device, make)


def local_merge_plan(x: Tensor, grid: tuple[int, int], threshold: float) -> tuple[Tensor, Tensor]:
    """Which row each token of ``x`` (B, N, D), in grid order, goes to: ``dest`` (B, N), and
    the rows per image (B,). Windows with ``window_similarity >= threshold`` become one row
    each, most similar window first; the other tokens follow in grid order (the
    reference's order)."""
    B, N, _ = x.shape
    sim = window_similarity(windows_of(x, grid))  # (B, W)
    merged = sim >= threshold
    r = merged.sum(1)  # windows merged per image
    rank = sim.argsort(dim=1, descending=True, stable=True).argsort(1)  # 0 = most similar window
    window, inside = _grid_windows(grid, x.device)
    token_merged = merged[:, window] if inside is None else merged[:, window] & inside  # (B, N)
    # an unmerged token at position p is the (p - merged tokens up to p)-th unmerged one
    dest = torch.where(token_merged, rank[:, window], (r[:, None] + arange(N, x.device)) - token_merged.cumsum(1))
    return dest, torch.rsub(r, N, alpha=WINDOW**2 - 1)


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
    device = x.device
    scores = bipartite_scores(x)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, 1::2], float("-inf"))
    best, match = scores.max(-1)  # (B, |A|)
    if protect_cls:
        best[:, 0] = float("-inf")  # ``max``'s own output: no copy needed
    n_a = best.shape[1]
    # A tokens that have some B token to merge into (None: every one); with no padding
    # they and their count are known from the shapes
    if valid is None:
        real = constant(("algm_real", n_a), device, lambda: torch.arange(n_a, device=device) > 0) \
            if protect_cls else None
        c = int(n_a) - int(protect_cls)  # int(): the JIT tracer (fvcore) may hand shapes over as tensors
        # the divisors as tensors, as with padding (a scalar divisor may round differently)
        den_mean, den_var = constant(("algm_count", c), device,
                                     lambda: torch.tensor([[max(c, 1)], [max(c - 1, 1)]], device=device)[:, None])
        several = c > 1
    else:
        real = valid[:, ::2] & (best > float("-inf"))
        count = real.sum(1, keepdim=True)
        den_mean, den_var, several = count.clamp(min=1), (count - 1).clamp(min=1), None
    if threshold is None:
        filled = best if real is None else torch.where(real, best, 0.0)
        mean = filled.sum(1, keepdim=True) / den_mean
        centred = best - mean if real is None else torch.where(real, best - mean, 0.0)
        var = (centred**2).sum(1, keepdim=True) / den_var
        # std is unbiased (torch's default in the reference); one A token: no merge
        cut = mean + var.sqrt() / layer
        if several is None:
            cut = torch.where(count > 1, cut, float("inf"))
        elif not several:
            cut = torch.full_like(cut, float("inf"))
    else:
        cut = float(threshold)
    # without padding, rows out of ``real`` (the class token) have -inf: they never merge
    merges = best >= cut if valid is None else real & (best >= cut)
    r = merges.sum(1)
    kept_a = torch.rsub(r, n_a) if valid is None else valid[:, ::2].sum(1) - r  # unmerged A tokens per image
    if protect_cls:  # unmerged A tokens keep their order: the one at p is the (p - merges up to p)-th
        kept_row = arange(n_a, device) - merges.cumsum(1)
    else:
        order_key = best if valid is None else torch.where(valid[:, ::2], best, float("-inf"))
        kept_row = order_key.argsort(dim=1, descending=True, stable=True).argsort(1) - r[:, None]
    dest = torch.empty(B, n, dtype=torch.long, device=device)
    torch.where(merges, kept_a[:, None] + match, kept_row, out=dest[:, ::2])
    torch.add(arange(n // 2, device), kept_a[:, None], out=dest[:, 1::2])
    if valid is None:
        return dest, torch.rsub(r, n)
    return torch.where(valid, dest, n), valid.sum(1) - r


def merge_rows(x: Tensor, dest: Tensor, size: Optional[Tensor], valid: Optional[Tensor],
               counts: Tensor, host_counts: Optional[list] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Rows of ``x`` (B, n, D) with the same ``dest`` become their size-weighted average;
    image b keeps ``counts[b]`` rows, padded after (``host_counts``: the same on the host,
    read here when not given). ``dest == n`` drops a row (padded rows have it, so
    ``valid`` is not read). Returns the rows, their sizes (0 on padding) and ``valid``
    (None when no image is padded)."""
    B, n, D = x.shape
    if host_counts is None:
        host_counts = counts.tolist()
    n_out = max(host_counts)
    # one scatter for the rows and their sizes (an extra channel); dropped rows land on
    # the extra rows past n_out
    if size is None:
        ones = constant(("algm_ones", B, n, x.dtype), x.device, lambda: x.new_ones(B, n, 1))
        weighted = torch.cat([x, ones], -1)
    else:
        weighted = torch.cat([x * size[..., None], size[..., None]], -1)
    total = x.new_zeros(B, n + 1, D + 1).scatter_add_(1, dest[..., None].expand(B, n, D + 1), weighted)
    total = total[:, :n_out]
    new_size = total[..., D]
    new_valid = None if min(host_counts) == n_out else arange(n_out, x.device) < counts[:, None].to(x.device)
    return total[..., :D] / total[..., D:].clamp(min=1), new_size, new_valid


def _packed(state: TokenState) -> tuple[list, Tensor]:
    """Host segments (prefix rows included) and ``packed_index`` of the joined rows of a
    ragged batch, kept per active set as the encoder's packed blocks keep them."""
    segments = [c + state.num_prefix for c in state.row_counts]
    valid = state._cached("joined_valid", state.joined_valid)
    return segments, state._cached("packed_index", lambda: packed_index(valid, sum(segments)))


def attention_residual(block: nn.Module, x: Tensor, valid: Optional[Tensor], batching: str,
                       packed: Optional[tuple] = None) -> Tensor:
    """The first half of timm's ``Block.forward``: x + attention(norm1(x)), on the real rows
    (``valid``) by a key-padding mask ("pad") or image by image ("packed": ``packed`` is
    (host segments, packed index), as ``_packed``; read from ``valid`` when not given)."""
    if valid is None or batching != "packed":
        mask = None if valid is None else valid[:, None, None, :]
        return x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=mask)))
    attn = block.attn  # packed: as methods.encoder.packed_block, attention half only
    segments, index = packed if packed is not None else (valid.sum(1).tolist(), None)
    T = sum(segments)
    index = packed_index(valid, T) if index is None else index
    B, n, D = x.shape
    rows = x.reshape(B * n, D).index_select(0, index)
    qkv = attn.qkv(block.norm1(rows)).reshape(T, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = segment_attention(q, k, v, segments)  # (heads, T, head_dim): one fused call on CUDA
    out = attn.proj(attn.norm(out.transpose(0, 1).reshape(T, attn.attn_dim)))
    rows = rows + block.drop_path1(block.ls1(out))
    return x.new_zeros(B * n, D).index_copy_(0, index, rows).reshape(B, n, D)


def mlp_residual(block: nn.Module, x: Tensor, valid: Optional[Tensor], batching: str,
                 index: Optional[Tensor] = None) -> Tensor:
    """The second half of timm's ``Block.forward``: x + mlp(norm2(x)), per row ("packed":
    on the real rows only, ``index`` their ``packed_index``; read from ``valid`` when not given)."""
    if valid is None or batching != "packed":
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    B, n, D = x.shape
    index = packed_index(valid, int(valid.sum())) if index is None else index
    rows = x.reshape(B * n, D).index_select(0, index)
    rows = rows + block.drop_path2(block.ls2(block.mlp(block.norm2(rows))))
    return x.new_zeros(B * n, D).index_copy_(0, index, rows).reshape(B, n, D)


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
        B, P = state.batch_size, state.num_prefix
        if state.valid is not None and state.row_counts is None:  # not ours: read the rows once
            state.row_counts = state.valid.sum(1).tolist()
        before = state.row_counts if state.valid is not None else [state.x.shape[1]] * B  # host counts
        block_counts = state.block_counts()  # before the merge, as the attention ran
        packed = state.valid is not None and self.batching == "packed"
        joined_valid = None if state.valid is None else state.key_mask()[:, 0, 0]
        x = attention_residual(block, state.joined(), joined_valid, self.batching, _packed(state) if packed else None)
        local = layer == self.layers[0]
        reference = self.batching == "reference"
        # rows of x before the grid's: local merging sees the grid only, global matching the
        # class token too, as row 0, never merged (both as the reference); further prefix
        # rows (a distillation token) are held out of the matching and keep their rows
        lead = 0 if local else min(P, 1)
        held = None
        decided = state.counts() if local else block_counts if lead == P else state.counts() + lead
        lead_valid = state.valid if local else joined_valid if lead == P else _with_lead(state.valid, lead)
        if local:  # nothing merged before: rows are the grid, in order
            x = state.split(x)
            plan = local_merge_plan_reference if reference else local_merge_plan
            dest, kept = plan(x, state.grid, self.threshold)
            gh, gw = state.grid
            decide = ("algm_local", (gh // WINDOW) * (gw // WINDOW))
        else:
            if P > 1:
                held, x = x[:, 1:P], torch.cat([x[:, :1], x[:, P:]], 1)
            if reference:
                dest, kept = global_merge_plan_reference(x, layer, self.global_threshold, protect_cls=lead > 0)
            else:
                dest, kept = global_merge_plan(x, lead_valid, layer, self.global_threshold, protect_cls=lead > 0)
            decide = ("algm_global",)
        host = kept.tolist()  # the layer's one host read: the rows each image keeps
        merged = host != [c + lead for c in before]  # no merge anywhere: rows keep their order
        if merged:
            size = state.size
            if size is not None and lead:
                ones = constant(("algm_ones", B, lead, size.dtype), size.device, lambda: size.new_ones(B, lead))
                size = torch.cat([ones, size], 1)
            x, size, valid = merge_rows(x, dest, size, lead_valid, kept, host)
            # ALGM parks nothing: every position has a row
            state.source = dest[:, lead:].gather(1, state.source) - lead if lead else dest.gather(1, state.source)
            state.size, state.valid = size[:, lead:], None if valid is None else valid[:, lead:]
            state.row_counts = None if valid is None else [h - lead for h in host]
        if not local:
            x = state.split(x if held is None else torch.cat([x[:, :1], held, x[:, 1:]], 1))
        state.x = x
        if merged:  # the new active set's counts are the plan's
            counts = kept - lead if lead else kept
            known_counts(state, counts, kept if lead == P else counts + P if P else counts)
        packed = state.valid is not None and self.batching == "packed"
        index = _packed(state)[1] if packed else None
        state.x = state.split(mlp_residual(block, state.joined(), state.valid, self.batching, index))
        state.trace.add(("algm_attention",), block_counts)
        state.trace.add(decide, decided)  # local: priced by its windows, whatever the count
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

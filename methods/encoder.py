"""The encoder loop every method plugs into.

A method is a *policy*: after each block it may take tokens out of the active set
(pause, exit) or merge them, and it may replace how a block is run (ToMe merges inside
the block). The loop keeps, for every image, where each grid position's token lives:
in the active set (``source[b, p]`` = row of ``x``) or parked with the state it had when
it left (``source[b, p] == -1``). ``TokenState.to_grid`` puts every token back on its
grid position before the decoder. The baseline is ``Policy`` itself: it does nothing.

Images of one batch may keep different numbers of tokens. Active rows are then padded
to the batch maximum and ``valid`` marks the real ones. How a block runs on such a
ragged batch is the policy's ``batching``: "pad" runs timm's block on the padded batch
with a key-padding mask (padded rows are computed and thrown away); "packed" runs the
block's linear layers on the real rows only and attention image by image
(``packed_block``). A batch where every image keeps the same number of tokens (always
the case at batch 1) runs with no mask either way: exactly the baseline's path.

A model with a class token (``ModelConfig.class_token``) hands the loop its *prefix*:
``TokenState.prefix`` (B, P, D) holds it apart from the grid rows ``x``, so that no
policy's decision (pause, exit, merge) ever sees it. Every block runs on the prefix
followed by the active rows (``TokenState.joined`` / ``split``), so the class token
attends and is attended to in every block, and the decoder never sees it. Traces count
it where compute is priced (``TokenState.block_counts``), not in ``tokens`` (grid tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ComputeTrace:
    """What one forward computed, per image, in units a FLOP model can price.

    ``tokens`` is (B, depth): how many grid tokens each block processed for each image
    (a class token is not counted here; it is in the blocks' ``items``).
    ``items`` lists (component key, per-image token counts) for every priced component
    that ran: the loop adds one ("block", counts) per block; a method adds its own
    (heads, matching). ``bench.flops`` prices each key at each count once and caches it.
    """

    tokens: Tensor
    items: list[tuple[tuple, Tensor]] = field(default_factory=list)
    decoded: Optional[Tensor] = None  # (B,) bool: images the decoder ran for; None: all
    decoder_rows: Optional[Tensor] = None  # (B,) rows the decoder ran on (merged rows); None: the full grid

    def add(self, key: tuple, counts: Tensor) -> None:
        # kept where they were computed (no host sync per block); ``to_host`` moves them
        self.items.append((key, counts.detach().long()))

    def to_host(self) -> None:
        """Every count onto the CPU in one device-to-host copy (once per forward)."""
        parts = [self.tokens] + [c[:, None] for _, c in self.items]
        for extra in (self.decoded, self.decoder_rows):
            if extra is not None:
                parts.append(extra.long()[:, None])
        if all(p.device.type == "cpu" for p in parts):
            host = parts
        else:
            device = next(p.device for p in parts if p.device.type != "cpu")
            widths = [p.shape[1] for p in parts]
            host = list(torch.cat([p.to(device) for p in parts], 1).cpu().split(widths, 1))
        self.tokens = host[0]
        self.items = [(key, h[:, 0]) for (key, _), h in zip(self.items, host[1:])]
        rest = host[1 + len(self.items):]
        if self.decoded is not None:
            self.decoded = rest.pop(0)[:, 0].bool()
        if self.decoder_rows is not None:
            self.decoder_rows = rest.pop(0)[:, 0]


class TokenState:
    """Active tokens of a batch plus the map back to the full token grid."""

    def __init__(self, tokens: Tensor, grid: tuple[int, int], depth: int, prefix: int = 0):
        """``tokens`` (B, P + N, D): ``prefix`` = P tokens with no grid position (the class
        token) first, then the N grid tokens."""
        self.prefix: Optional[Tensor] = tokens[:, :prefix] if prefix else None  # (B, P, D)
        tokens = tokens[:, prefix:]
        B, N, _ = tokens.shape
        self.x = tokens
        self.grid = grid
        self.source = torch.arange(N, device=tokens.device).expand(B, N).clone()
        self.valid: Optional[Tensor] = None  # (B, n) bool; None: every row is real
        self.size: Optional[Tensor] = None  # (B, n) tokens merged into each row (ToMe)
        self.parked: Optional[Tensor] = None  # (B, N, D) states of tokens that left
        self.left_at = torch.full((B, N), depth, dtype=torch.long, device=tokens.device)
        self.trace = ComputeTrace(torch.zeros(B, depth, dtype=torch.long, device=tokens.device))
        # host copies read by ``keep``'s one sync: real rows per image while ``valid`` is
        # set (packed blocks split by them), and whether any token has left so far
        self.row_counts: Optional[list[int]] = None
        self.any_left = False

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    def counts(self) -> Tensor:
        """Real active tokens per image, (B,), on the tokens' device (no host sync)."""
        if self.valid is None:
            return torch.full((self.batch_size,), self.x.shape[1], dtype=torch.long, device=self.x.device)
        return self.valid.sum(1)

    def key_mask(self) -> Optional[Tensor]:
        """Boolean attention mask (B, 1, 1, P + n) that hides padded rows of ``joined()``, or None."""
        valid = self.joined_valid()
        return None if valid is None else valid[:, None, None, :]

    @property
    def num_prefix(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]

    def joined(self, x: Optional[Tensor] = None) -> Tensor:
        """What a block runs on: the prefix (class token) rows, then the active rows ``x``
        (default ``self.x``), (B, P + n, D)."""
        x = self.x if x is None else x
        return x if self.prefix is None else torch.cat([self.prefix, x], 1)

    def joined_valid(self, valid: Optional[Tensor] = None) -> Optional[Tensor]:
        """``valid`` (default ``self.valid``) with the prefix rows, always real, first."""
        valid = self.valid if valid is None else valid
        if valid is None or self.prefix is None:
            return valid
        return torch.cat([valid.new_ones(valid.shape[0], self.num_prefix), valid], 1)

    def split(self, joined: Tensor) -> Tensor:
        """A block's output on ``joined()`` rows: keeps the prefix rows, returns the others."""
        if self.prefix is None:
            return joined
        self.prefix = joined[:, : self.num_prefix]
        return joined[:, self.num_prefix :]

    def block_counts(self, counts: Optional[Tensor] = None) -> Tensor:
        """Tokens a block computes per image: the real active rows (``counts``, default
        ``counts()``) plus the prefix. What traces price blocks at."""
        counts = self.counts() if counts is None else counts
        return counts + self.num_prefix

    def keep(self, keep: Tensor, layer: int) -> None:
        """Keep rows where ``keep`` (B, n) is True; park the others' tokens as they are.

        Grid positions whose row leaves get ``left_at = layer``. Kept rows stay in order.
        """
        B, n, D = self.x.shape
        if B == 0 or n == 0:
            return  # no active row: nothing can leave
        if self.valid is not None:
            keep = keep & self.valid
        gone = ~keep.gather(1, self.source.clamp(min=0)) & (self.source >= 0)
        kept = keep.sum(1)
        # the decision's one device-to-host read: rows kept per image, and whether any left
        *row_counts, any_gone = torch.cat([kept, gone.any()[None].long()]).tolist()
        if not any_gone and max(row_counts) == n:
            return  # nothing left: the state is unchanged
        if any_gone:
            self.any_left = True
            at_grid = self.x.gather(1, self.source.clamp(min=0)[..., None].expand(B, -1, D))
            parked = torch.zeros_like(at_grid) if self.parked is None else self.parked
            self.parked = torch.where(gone[..., None], at_grid, parked)
            self.left_at.masked_fill_(gone, layer)
        n_new = max(row_counts)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n_new]
        self.x = self.x.gather(1, order[..., None].expand(-1, -1, D))
        if self.size is not None:
            self.size = self.size.gather(1, order)
        rows = torch.arange(n_new, device=self.x.device).expand(B, n_new)
        ragged = min(row_counts) != n_new
        self.valid = rows < kept[:, None] if ragged else None
        self.row_counts = row_counts if ragged else None
        # old row -> new row (or -1), then re-point every grid position
        new_row = torch.full((B, n), -1, dtype=torch.long, device=self.x.device)
        new_row.scatter_(1, order, torch.where(rows < kept[:, None], rows, -1))
        self.source = torch.where(self.source >= 0, new_row.gather(1, self.source.clamp(min=0)), -1)

    def to_grid(self) -> Tensor:
        """Every token back at its grid position: (B, N, D)."""
        B, N = self.source.shape
        D = self.x.shape[-1]
        if self.x.shape[1] == 0:
            return self.parked
        active = self.x.gather(1, self.source.clamp(min=0)[..., None].expand(B, N, D))
        if self.parked is None:
            return active
        return torch.where((self.source >= 0)[..., None], active, self.parked)


def packed_block(block, x: Tensor, valid: Tensor, segments: Optional[list[int]] = None) -> Tensor:
    """timm ``Block`` forward on the real rows of a padded batch, without computing the
    padding: linear layers and norms on the packed (T, D) rows, attention per image.
    ``valid`` marks each image's real rows, which come first (``TokenState.keep``);
    ``segments``: their host-side counts per image (``TokenState.row_counts``), read from
    the device when not given.

    Modifications vs timm's ``Block.forward``: tokens packed, attention per image
    segment (no mask needed); no gating / attention dropout (inference path).
    """
    attn = block.attn
    B, n, D = x.shape
    if segments is None:
        segments = valid.sum(1).tolist()
    T = sum(segments)
    # flat indices of the real rows, image by image, found without a host sync
    index = torch.argsort((~valid).flatten().to(torch.int8), stable=True)[:T]
    flat = x.reshape(B * n, D)
    rows = flat.index_select(0, index)  # (T, D)
    qkv = attn.qkv(block.norm1(rows)).reshape(T, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv.unbind(0)  # (heads, T, head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = torch.cat([F.scaled_dot_product_attention(qs, ks, vs)
                     for qs, ks, vs in zip(q.split(segments, 1), k.split(segments, 1), v.split(segments, 1))], 1)
    out = attn.proj(attn.norm(out.transpose(0, 1).reshape(T, attn.attn_dim)))
    rows = rows + block.drop_path1(block.ls1(out))
    rows = rows + block.drop_path2(block.ls2(block.mlp(block.norm2(rows))))
    return torch.zeros_like(flat).index_copy_(0, index, rows).reshape(B, n, D)


BATCHINGS = ("pad", "packed")


def check_batching(batching: str) -> str:
    if batching not in BATCHINGS:
        raise ValueError(f"unknown batching {batching!r}; expected 'pad' or 'packed'")
    return batching


class Policy:
    """The full model: every block processes every token. Methods override the hooks."""

    name = "baseline"
    batching = "pad"  # or "packed": how blocks run on batches with ragged token counts
    # "before": the decoder runs on the full grid (``TokenState.to_grid``); "after": on the
    # active rows, each grid position taking its row's logits (merging policies only)
    unmerge = "before"

    def start(self, model, state: TokenState) -> None:
        """Called once after the patch embedding, before block 0."""

    def run_block(self, index: int, block, state: TokenState) -> None:
        if state.valid is not None and self.batching == "packed":
            segments = None if state.row_counts is None else [c + state.num_prefix for c in state.row_counts]
            state.x = state.split(packed_block(block, state.joined(), state.joined_valid(), segments))
        else:
            state.x = state.split(block(state.joined(), attn_mask=state.key_mask()))
        state.trace.add(("block",), state.block_counts())

    def after_block(self, index: int, block, state: TokenState) -> None:
        """Called after block ``index``: select, pause, merge or exit tokens here."""

    def decodes(self, state: TokenState) -> Optional[Tensor]:
        """(B,) bool: images the decoder runs for (None: all); the others' logits reach
        ``finish`` as zeros (image early exit labels them itself)."""
        return None

    def decoded_images(self, state: TokenState, decode: Tensor) -> list[int]:
        """The images of ``decodes``' mask as a host list (what the decoder's gather
        needs). This default reads the mask (one sync); a policy that knows them from
        host counts it already read overrides it."""
        return decode.nonzero().flatten().tolist()

    def finish(self, logits: Tensor, state: TokenState) -> Tensor:
        """Last word on the decoder's logits (early exit overrides exited pixels)."""
        return logits

    def cost_probe(self, model, key: tuple, n: int):
        """(callable, inputs) whose fvcore count is the cost of ``key`` at ``n`` tokens."""
        raise KeyError(f"{type(self).__name__} has no cost probe for {key}")

    def describe(self) -> dict:
        """The policy's knobs, as stored in result records."""
        return {}


def run_encoder(blocks, tokens: Tensor, grid: tuple[int, int], policy: Policy, model=None,
                prefix: int = 0) -> TokenState:
    """Run ``blocks`` over ``tokens`` under ``policy``; returns the final state. The first
    ``prefix`` tokens (a class token) have no grid position: every block runs them."""
    state = TokenState(tokens, grid, depth=len(blocks), prefix=prefix)
    policy.start(model, state)
    for i, block in enumerate(blocks):
        state.trace.tokens[:, i] = state.counts()
        if state.x.shape[1] + state.num_prefix > 0:  # the batch's largest count (``keep`` trims to it)
            policy.run_block(i, block, state)
        policy.after_block(i, block, state)
    return state

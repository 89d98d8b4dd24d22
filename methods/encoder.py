"""The encoder loop every method plugs into.

A method is a *policy*: after each block it may take tokens out of the active set
(pause, exit) or merge them, and it may replace how a block is run (ToMe merges inside
the block). The loop keeps, for every image, where each grid position's token lives:
in the active set (a row of ``x``) or parked with the state it had when it left
(``TokenState``: pausing keeps each row's grid position, merging each position's row).
``TokenState.to_grid`` puts every token back on its grid position before the decoder.
The baseline is ``Policy`` itself: it does nothing.

Images of one batch may keep different numbers of tokens. Active rows are then padded
to the batch maximum and ``valid`` marks the real ones. How a block runs on such a
ragged batch is the policy's ``batching``: "pad" runs timm's block on the padded batch
with a key-padding mask (padded rows are computed and thrown away); "packed" runs the
block's linear layers on the real rows only, packed once per active set, and attention
per image segment (``packed_block``, ``methods.ragged``: one fused call on CUDA). A batch
where every image keeps the same number of tokens (always the case at batch 1) runs with
no mask either way: exactly the baseline's path.

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
from torch import Tensor

from methods.positions import GridPositions
from methods.ragged import segment_attention


@dataclass
class ComputeTrace:
    """What one forward computed, per image, in units a FLOP model can price.

    ``tokens`` is (B, depth): how many grid tokens each block processed for each image
    (a class token is not counted here; it is in the blocks' ``items``).
    ``items`` lists (component key, per-image token counts) for every priced component
    that ran: the loop adds one ("block", counts) per block; a method adds its own
    (heads, matching). ``bench.flops`` prices each key at each count once and caches it.

    During the forward nothing is copied or written per block: ``record_tokens`` and
    ``add`` keep references to the count tensors, which ``TokenState`` computes once per
    change of the active set and shares between blocks, and ``to_host`` moves each
    distinct tensor to the host once (one stack, one copy) and fills ``tokens``.
    """

    tokens: Tensor
    items: list[tuple[tuple, Tensor]] = field(default_factory=list)
    decoded: Optional[Tensor] = None  # (B,) bool: images the decoder ran for; None: all
    decoder_rows: Optional[Tensor] = None  # (B,) rows the decoder ran on (merged rows); None: the full grid
    blocks: list = field(default_factory=list)  # (block, (B,) grid-token counts) until ``to_host``

    @property
    def depth(self) -> int:
        return self.tokens.shape[1]

    def record_tokens(self, block: int, counts: Tensor) -> None:
        """Grid tokens block ``block`` processed per image (written into ``tokens`` by ``to_host``)."""
        self.blocks.append((block, counts if counts.dtype == torch.long else counts.long()))

    def add(self, key: tuple, counts: Tensor) -> None:
        # kept where they were computed (no host sync per block); ``to_host`` moves them
        self.items.append((key, counts if counts.dtype == torch.long else counts.long()))

    def to_host(self) -> None:
        """Every count onto the CPU in one device-to-host copy (once per forward)."""
        extras = [x if x.dtype == torch.long else x.long() for x in (self.decoded, self.decoder_rows) if x is not None]
        distinct: dict[int, Tensor] = {}  # the same tensor is recorded for many blocks
        for t in [c for _, c in self.blocks] + [c for _, c in self.items] + extras:
            distinct.setdefault(id(t), t)
        if not distinct:
            return
        host = {k: t for k, t in distinct.items() if t.device.type == "cpu"}  # made on the host: as they are
        on_device = {k: t for k, t in distinct.items() if t.device.type != "cpu"}
        if on_device:
            host.update(zip(on_device, torch.stack(list(on_device.values())).cpu().unbind(0)))
        if [block for block, _ in self.blocks] == list(range(self.depth)):  # the encoder loop's case
            self.tokens = torch.stack([host[id(c)] for _, c in self.blocks], 1)
        elif self.blocks:
            tokens = torch.zeros_like(self.tokens, device="cpu")
            for block, c in self.blocks:
                tokens[:, block] = host[id(c)]
            self.tokens = tokens
        self.blocks = []
        self.items = [(key, host[id(c)]) for key, c in self.items]
        rest = [host[id(x)] for x in extras]
        if self.decoded is not None:
            self.decoded = rest.pop(0).bool()
        if self.decoder_rows is not None:
            self.decoder_rows = rest.pop(0)


class TokenState(GridPositions):
    """Active tokens of a batch plus the map back to the full token grid
    (``methods.positions``: ``keep``, ``to_grid``, ``left_at``, ``source``).

    In "packed" batching the real rows stay packed (T, D) between blocks
    (``packed_rows``, ``set_packed``): ``x`` and ``prefix`` are unpacked only when read.
    """

    def __init__(self, tokens: Tensor, grid: tuple[int, int], depth: int, prefix: int = 0):
        """``tokens`` (B, P + N, D): ``prefix`` = P tokens with no grid position (the class
        token) first, then the N grid tokens."""
        B, M, _ = tokens.shape
        self._P, self._B, self._n = prefix, B, M - prefix
        self._prefix: Optional[Tensor] = tokens[:, :prefix] if prefix else None  # (B, P, D)
        self._x, self.grid = tokens[:, prefix:], grid
        self._init_positions(B, M - prefix, depth, tokens.device)
        self.valid: Optional[Tensor] = None  # (B, n) bool; None: every row is real
        self.size: Optional[Tensor] = None  # (B, n) tokens merged into each row (ToMe)
        self._rows: Optional[Tensor] = None  # (T, D) packed rows of ``joined()``
        self._packed_from: Optional[tuple] = None  # (padded joined rows, packed index)
        self._stale = False  # ``_rows`` hold the newest states; ``_x``, ``_prefix`` do not
        self.trace = ComputeTrace(torch.zeros(B, depth, dtype=torch.long, device=tokens.device))
        self._cache: dict = {}  # name -> (active-set key, value): ``_cached``

    # --- rows -----------------------------------------------------------------------
    @property
    def x(self) -> Tensor:
        """Active grid rows (B, n, D), padded to the batch's largest count."""
        if self._stale:
            self._unpack()
        return self._x

    @x.setter
    def x(self, value: Tensor) -> None:
        if self._stale:
            self._unpack()  # the prefix rows are packed too
        self._x, self._n, self._rows = value, value.shape[1], None

    @property
    def prefix(self) -> Optional[Tensor]:
        if self._stale:
            self._unpack()
        return self._prefix

    @prefix.setter
    def prefix(self, value: Optional[Tensor]) -> None:
        if self._stale:
            self._unpack()
        self._prefix, self._rows = value, None

    @property
    def n(self) -> int:
        """Rows of ``x`` (without unpacking packed rows)."""
        return self._n

    @property
    def batch_size(self) -> int:
        return self._B

    @property
    def num_prefix(self) -> int:
        return self._P

    def packed_rows(self, segments: list[int]) -> Tensor:
        """What a packed block runs on: each image's prefix rows then its real rows,
        (T, D), ``segments`` rows per image. Packed once per active set: blocks hand
        their output back to ``set_packed``."""
        if self._rows is None:
            joined = self.joined()
            B, m, D = joined.shape
            valid = self._cached("joined_valid", self.joined_valid)
            index = self._cached("packed_index", lambda: packed_index(valid, sum(segments)))
            self._packed_from = (joined, index)
            self._rows = joined.reshape(B * m, D).index_select(0, index)
        return self._rows

    def set_packed(self, rows: Tensor) -> None:
        self._rows, self._stale, self._x, self._prefix = rows, True, None, None

    def _unpack(self) -> None:
        joined, index = self._packed_from
        B, m, D = joined.shape  # padded rows keep what they held when packed
        out = joined.reshape(B * m, D).index_copy(0, index, self._rows).view(B, m, D)
        self._prefix = out[:, : self._P] if self._P else None
        self._x, self._stale = out[:, self._P :], False

    # --- counts and masks, once per active set ----------------------------------------
    def _key(self) -> tuple:
        return (self.valid, self._n, self._P)

    def _cached(self, name: str, make):
        """``make()``, computed once per active set: the cache holds while ``valid`` is
        the same object and the row count the same (a decision or merge replaces
        ``valid``), so blocks between two decisions dispatch no counting ops."""
        key = self._key()
        hit = self._cache.get(name)
        if hit is not None and hit[0][0] is key[0] and hit[0][1:] == key[1:]:
            return hit[1]
        value = make()
        self._cache[name] = (key, value)
        return value

    def _seed(self, **values) -> None:
        """Cache entries a decision already computed."""
        for name, value in values.items():
            self._cache[name] = (self._key(), value)

    def counts(self) -> Tensor:
        """Real active tokens per image, (B,), on the tokens' device (no host sync)."""
        if self.valid is None:
            return self._cached("counts", lambda: torch.full((self._B,), self._n, dtype=torch.long,
                                                             device=self.device))
        return self._cached("counts", lambda: self.valid.sum(1))

    def key_mask(self) -> Optional[Tensor]:
        """Boolean attention mask (B, 1, 1, P + n) that hides padded rows of ``joined()``, or None."""
        if self.valid is None:
            return None
        return self._cached("key_mask", lambda: self.joined_valid()[:, None, None, :])

    def joined(self, x: Optional[Tensor] = None) -> Tensor:
        """What a block runs on: the prefix (class token) rows, then the active rows ``x``
        (default ``self.x``), (B, P + n, D)."""
        x = self.x if x is None else x
        return x if self._P == 0 else torch.cat([self.prefix, x], 1)

    def joined_valid(self, valid: Optional[Tensor] = None) -> Optional[Tensor]:
        """``valid`` (default ``self.valid``) with the prefix rows, always real, first."""
        valid = self.valid if valid is None else valid
        if valid is None or self._P == 0:
            return valid
        return torch.cat([valid.new_ones(valid.shape[0], self._P), valid], 1)

    def split(self, joined: Tensor) -> Tensor:
        """A block's output on ``joined()`` rows: keeps the prefix rows, returns the others."""
        if self._P == 0:
            return joined
        self.prefix = joined[:, : self._P]
        return joined[:, self._P :]

    def block_counts(self, counts: Optional[Tensor] = None) -> Tensor:
        """Tokens a block computes per image: the real active rows (``counts``, default
        ``counts()``) plus the prefix. What traces price blocks at."""
        if counts is None:
            return self._cached("block_counts", lambda: self.counts() + self._P if self._P else self.counts())
        return counts + self._P if self._P else counts


def packed_index(valid: Tensor, total: int) -> Tensor:
    """Flat indices (T,) of the real rows of a padded (B, n) batch, image by image, found
    without a host sync (``total``: T, known on the host)."""
    return torch.argsort(valid.flatten(), descending=True, stable=True)[:total]


def packed_block(block, x: Tensor, valid: Tensor, segments: Optional[list[int]] = None,
                 index: Optional[Tensor] = None) -> Tensor:
    """timm ``Block`` forward on the real rows of a padded batch, without computing the
    padding: linear layers and norms on the packed (T, D) rows, attention per image.
    ``valid`` marks each image's real rows, which come first (``TokenState.keep``);
    ``segments``: their host-side counts per image (``TokenState.row_counts``), read from
    the device when not given; ``index``: ``packed_index(valid, T)``, where the caller
    keeps it between blocks. ``x`` already packed (T, D) (``TokenState.packed_rows``,
    with ``segments``): the output stays packed.

    Modifications vs timm's ``Block.forward``: tokens packed, attention per image
    segment (``segment_attention``: no mask needed); no gating / attention dropout
    (inference path).
    """
    attn = block.attn
    if segments is None:
        segments = valid.sum(1).tolist()
    T = sum(segments)
    if x.dim() == 2:
        rows = x
    else:
        B, n, D = x.shape
        if index is None:
            index = packed_index(valid, T)
        flat = x.reshape(B * n, D)
        rows = flat.index_select(0, index)  # (T, D)
    qkv = attn.qkv(block.norm1(rows)).reshape(T, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv.unbind(0)  # (heads, T, head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = segment_attention(q, k, v, segments)  # (heads, T, head_dim): one fused call on CUDA
    out = attn.proj(attn.norm(out.transpose(0, 1).reshape(T, attn.attn_dim)))
    rows = rows + block.drop_path1(block.ls1(out))
    rows = rows + block.drop_path2(block.ls2(block.mlp(block.norm2(rows))))
    if x.dim() == 2:
        return rows
    return torch.zeros_like(flat).index_copy_(0, index, rows).reshape(B, n, D)


def masked_block(block, state: TokenState, active: Tensor) -> None:
    """One block with every row where ``active`` is False hidden as a key and its state
    kept: training's simulation of tokens that left (gradients need the full batch);
    inference gathers instead. The prefix tokens always run."""
    out = state.split(block(state.joined(), attn_mask=state.joined_valid(active)[:, None, None, :]))
    state.x = torch.where(active[..., None], out, state.x)
    state.trace.add(("block",), state.block_counts(active.sum(1)))


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
    # trace keys whose cost is a quadratic polynomial of the token count (its ``cost_probe``
    # at any n): ``bench.flops`` fits it from a few counts instead of tracing every n
    quadratic_costs: tuple = ()

    def start(self, model, state: TokenState) -> None:
        """Called once after the patch embedding, before block 0."""

    def run_block(self, index: int, block, state: TokenState) -> None:
        if state.valid is not None and self.batching == "packed":
            if state.row_counts is None:  # no host counts (merged rows): packed_block reads them
                valid = state._cached("joined_valid", state.joined_valid)
                state.x = state.split(packed_block(block, state.joined(), valid))
            else:  # rows stay packed from block to block
                segments = [c + state.num_prefix for c in state.row_counts]
                state.set_packed(packed_block(block, state.packed_rows(segments), None, segments))
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
        state.trace.record_tokens(i, state.counts())
        if state.n + state.num_prefix > 0:  # the batch's largest count (``keep`` trims to it)
            policy.run_block(i, block, state)
        policy.after_block(i, block, state)
    return state


def known_counts(state: TokenState, counts: Tensor, block_counts: Tensor) -> None:
    """Hand ``state`` the real rows per image of its current active set, (B,), and the
    block counts (with the prefix), where a policy knows them already (ToMe's fixed
    merges), so that ``counts`` and ``block_counts`` dispatch no op for it."""
    state._seed(counts=counts, block_counts=block_counts)

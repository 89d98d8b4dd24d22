"""Where each grid token of a ``TokenState`` lives while pausing or exit take rows out.

Per active row, its grid position: ``pos`` (B, n) holds flat grid indices b * N + p, a
padded row the spare index B * N; None while row i is still grid position i. A decision
that takes rows out (``keep``, ``keep_first``) writes every active row's state at its
index of one flat (B * N + 1, D) buffer (``parked``: a row that stays is overwritten
when it leaves later, or by ``to_grid``), then gathers the rows that stay: a handful of
ops per decision, none per grid position. ``to_grid`` writes the active rows once more.
``left_at`` is derived from the decisions' recorded positions when read, and ``source``
(grid position -> row) from ``pos`` when asked. Merging policies set ``source``
themselves: a row then stands for several positions, and ``keep`` refuses to run.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class GridPositions:
    """The grid half of ``methods.encoder.TokenState`` (its rows, counts and caches
    are there: ``x``, ``valid``, ``size``, ``_n``, ``_B``, ``_P``, ``_seed``)."""

    def _init_positions(self, batch: int, grid_tokens: int, depth: int, device) -> None:
        self.grid_tokens, self.depth, self.device = grid_tokens, depth, device
        self.pos: Optional[Tensor] = None  # (B, n) flat grid index of each row (padded: B * N)
        self._source: Optional[Tensor] = None  # derived from ``pos``, or set by a merge
        self._merged = False
        self._base: Optional[Tensor] = None  # (B * N + 1, D): ``parked``
        self._left: list = []  # (layer, ``pos`` before) per decision that took rows out
        self._left_at: Optional[Tensor] = None
        self._left_done = 0
        self._consts: dict = {}  # per-forward constants
        # host copies read by a decision's one sync: real rows per image while ``valid``
        # is set (packed blocks split by them), and whether any token has left so far
        self.row_counts: Optional[list[int]] = None
        self.any_left = False

    def padded_last(self, scores: Tensor) -> Tensor:
        """``scores`` (B, n) with padded rows at +inf: an ascending sort puts them last."""
        if self.valid is None:
            return scores
        return torch.where(self.valid, scores, self._constant(float("inf"), scores.dtype))

    def _constant(self, value, dtype) -> Tensor:
        key = (value, dtype)
        if key not in self._consts:
            self._consts[key] = torch.full((), value, dtype=dtype, device=self.device)
        return self._consts[key]

    def _arange(self) -> Tensor:
        """One arange per forward, sliced for every use: flat grid indices (B * N, then the
        spare B * N) and row numbers of ``joined()`` (P + n)."""
        if "arange" not in self._consts:
            size = max(self._B * self.grid_tokens + 1, self._P + self.grid_tokens)
            self._consts["arange"] = torch.arange(size, device=self.device)
        return self._consts["arange"]

    # --- taking rows out ----------------------------------------------------------------
    def keep(self, keep: Tensor, layer: int) -> None:
        """Keep rows where ``keep`` (B, n) is True; park the others' tokens as they are.

        Grid positions whose row leaves get ``left_at = layer``. Kept rows stay in order.
        """
        if self._B == 0 or self._n == 0:
            return  # no active row: nothing can leave
        if self.valid is not None:
            keep = keep & self.valid
        kept = keep.sum(1)
        row_counts = self._rows_left(kept)
        if row_counts is not None:  # kept rows first, in order: a stable sort of the mask
            self._compact(torch.argsort(keep, dim=1, descending=True, stable=True), kept, row_counts, layer)

    def keep_first(self, order: Tensor, kept: Tensor, layer: int) -> None:
        """Keep the first ``kept[b]`` (B,) rows of image b in ``order`` (B, n), a permutation
        of its rows (real ones first); the others leave, as in ``keep``. The kept rows run
        on in that order."""
        if self._B == 0 or self._n == 0:
            return
        row_counts = self._rows_left(kept)
        if row_counts is not None:
            self._compact(order, kept, row_counts, layer)

    def _rows_left(self, kept: Tensor) -> Optional[list[int]]:
        """Host list of ``kept``, or None where no image keeps fewer rows than it has."""
        if self._merged:
            raise ValueError("keep after a merge: merged rows stand for several grid positions")
        # the decision's one device-to-host read: rows kept per image
        row_counts = kept.tolist()
        if self.row_counts is not None or self.valid is None:
            before = self.row_counts if self.row_counts is not None else [self._n] * self._B
            if not any(k < b for k, b in zip(row_counts, before)):
                return None  # nothing left: the state is unchanged
        return row_counts

    def _compact(self, order: Tensor, kept: Tensor, row_counts: list[int], layer: int) -> None:
        P, x = self._P, self.x
        self._base = self.at_grid(x, self._base)  # leaving rows parked (staying ones overwritten later)
        self._left.append((layer, self.pos))
        n_new = max(row_counts)
        take = order[:, :n_new]
        self.x = x.gather(1, take[..., None].expand(-1, -1, x.shape[-1]))
        if self.size is not None:
            self.size = self.size.gather(1, take)
        pos = (self._grid_index() if self.pos is None else self.pos).gather(1, take)
        blocks = kept + P if P else kept
        fits = None
        if min(row_counts) != n_new:  # ragged: padded rows point at the spare slot
            fits = self._arange()[: P + n_new] < blocks[:, None]  # (B, P + n_new): real rows of joined()
            pos = torch.where(fits[:, P:], pos, self._arange()[self._spare() : self._spare() + 1])
        self.pos, self.valid = pos, None if fits is None else fits[:, P:]
        self.row_counts = row_counts if fits is not None else None
        self.any_left, self._source = True, None
        self._seed(counts=kept, block_counts=blocks)
        if fits is not None:
            self._seed(joined_valid=fits, key_mask=fits[:, None, None, :])

    def _spare(self) -> int:
        return self._B * self.grid_tokens

    def _grid_index(self) -> Tensor:
        """(B, N) flat grid index of every position."""
        return self._arange()[: self._spare()].view(self._B, self.grid_tokens)

    # --- back to the grid ---------------------------------------------------------------
    def at_grid(self, values: Tensor, into: Optional[Tensor] = None) -> Tensor:
        """``values`` (B, n, ...) of the active rows written at their grid positions of the
        flat buffer ``into`` (B * N + 1, ...; padded rows write the last slot), a new one
        (zeros where no row is) when None. Returns the buffer."""
        if self.pos is None:  # row i is grid position i
            flat = values.reshape(self._spare(), *values.shape[2:])
            if into is None:
                return F.pad(flat, (0, 0) * (flat.dim() - 1) + (0, 1))
            into[: self._spare()] = flat
            return into
        if into is None:
            into = values.new_zeros(self._spare() + 1, *values.shape[2:])
        return into.index_put_((self.pos,), values)

    def grid_view(self, flat: Tensor) -> Tensor:
        """A flat (B * N + 1, ...) buffer of ``at_grid`` as (B, N, ...), without the spare slot."""
        return flat[: self._spare()].view(self._B, self.grid_tokens, *flat.shape[1:])

    def at_rows(self, values: Tensor) -> Tensor:
        """Per grid position ``values`` (B, N, ...) at each active row (B, n, ...; padded rows: any)."""
        if self.pos is None:
            return values
        flat = values.reshape(self._spare(), *values.shape[2:])
        return torch.cat([flat, flat[:1]])[self.pos]

    def left_mask(self) -> Tensor:
        """(B, N) bool: grid positions whose token left the active set."""
        if self._merged:
            return self.source < 0
        if self.pos is None:
            return torch.zeros(self._B, self.grid_tokens, dtype=torch.bool, device=self.device)
        mask = torch.ones(self._spare() + 1, dtype=torch.bool, device=self.device)
        return self.grid_view(mask.index_fill_(0, self.pos.flatten(), 0))  # 0, not False: jit tracing (fvcore)

    @property
    def parked(self) -> Optional[Tensor]:
        """(B, N, D): the state each token had when it left (where a token is still active:
        unspecified), None before any left."""
        return None if self._base is None else self.grid_view(self._base)

    @parked.setter
    def parked(self, value: Tensor) -> None:
        self._base = F.pad(value.reshape(self._spare(), -1), (0, 0, 0, 1))

    @property
    def left_at(self) -> Tensor:
        """(B, N): the layer after which each grid position's token left (``depth``: it
        never did), from the decisions' records, on first read."""
        if self._left_at is None:
            self._left_at = torch.full((self._spare() + 1,), self.depth, dtype=torch.long, device=self.device)
        if self._left_done < len(self._left):
            for layer, pos in self._left[self._left_done :]:  # every row active then, then those still active
                self._left_at.index_fill_(0, (self._grid_index() if pos is None else pos).flatten(), layer)
            self._left_at.index_fill_(0, self.pos.flatten(), self.depth)
            self._left_done = len(self._left)
        return self.grid_view(self._left_at)

    @property
    def source(self) -> Tensor:
        """(B, N): each grid position's row (-1: parked). Merging policies set it."""
        if self._source is None:
            B, N = self._B, self.grid_tokens
            if self.pos is None:
                self._source = torch.arange(N, device=self.device).expand(B, N)
            else:
                rows = torch.arange(self._n, device=self.device).expand(B, self._n)
                flat = torch.full((self._spare() + 1,), -1, dtype=torch.long, device=self.device)
                self._source = self.grid_view(flat.index_put_((self.pos,), rows))
        return self._source

    @source.setter
    def source(self, value: Tensor) -> None:
        self._source, self._merged = value, True

    def to_grid(self) -> Tensor:
        """Every token back at its grid position: (B, N, D)."""
        x = self.x
        B, N, D = self._B, self.grid_tokens, x.shape[-1]
        if self._merged:
            source = self.source
            if not self.any_left:
                return x.gather(1, source[..., None].expand(B, N, D))
            active = x.gather(1, source.clamp(min=0)[..., None].expand(B, N, D))
            return torch.where((source >= 0)[..., None], active, self.parked)
        if not self.any_left:
            return x  # row i is grid position i
        if self._n == 0:
            return self.parked
        return self.grid_view(self._base.index_put((self.pos,), x))

"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023).

In every block, between attention and MLP, ``r`` tokens merge into others:

1. the tokens alternate into two sets, A (even rows) and B (odd rows);
2. every A token finds its most similar B token, by cosine similarity of the block's
   attention keys averaged over heads;
3. the r A tokens with the most similar match merge into it (size-weighted average;
   a row's *size* is how many patches it stands for).

Attention is *proportional*: log(size) of each key is added to the logits, so a row of
size s weighs as s identical tokens would. ``unmerge`` says where the merged rows go
back to their grid positions: ``after`` (default) runs the decoder on the merged rows,
attention in the mask decoder proportional too, and every grid position takes its row's
logits (``Segmenter.decode_rows``, as ALGM does with Segmenter's mask decoder);
``before`` gives every grid position its row's token first (``TokenState.to_grid``
through ``source``) and decodes the full grid. A patch's copies are identical tokens and
proportional attention weighs a row as its copies, so the two give the same output (up
to float rounding) and ``after`` is cheaper: the decoder runs on the merged count.
Training-free: it runs on the baseline's weights. Every image of a batch merges the same
``r`` per block, so shapes stay fixed and no padding is needed.

A class token (``ModelConfig.class_token``) is handled as ToMe's ``protect_cls``: the
block's rows are the class token then the grid rows, so it is row 0 of set A and takes
part in attention and matching, but its scores are -inf (it never merges), at most
(n - 1) // 2 rows merge, and the unmerged A rows keep their order so it stays row 0.

The algorithm is the pure functions ``r_schedule``, ``tokens_per_block``,
``bipartite_soft_matching``, ``merge_wavg``, ``proportional_attention``; ``tome_block``
runs one timm ``Block`` with them; ``ToMePolicy`` plugs that into the encoder loop.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.encoder import Policy, TokenState, known_counts

SCHEDULES = ("constant", "decreasing")
UNMERGE = ("before", "after")


def max_r(tokens: int, depth: int, schedule: str = "constant") -> int:
    """The largest r that ``schedule`` allows on ``tokens`` tokens through ``depth`` blocks
    (no block may merge more than half of its tokens). Constant: tokens // (depth + 1),
    from the last block's r <= (tokens - (depth - 1) r) / 2."""
    if schedule == "constant":
        return tokens // (depth + 1)
    best = 0
    for r in range(1, tokens // 2 + 1):
        try:
            tokens_per_block(tokens, r_schedule(r, depth, schedule))
        except ValueError:
            break
        best = r
    return best


def default_rs(tokens: int, depth: int, schedule: str = "constant") -> list[int]:
    """The default sweep of r for ``tokens`` tokens per forward through ``depth`` blocks:
    0 up to the largest r the schedule allows, so that the FLOPs range does not depend on
    the input size (256 tokens, 6 blocks, constant: 0, 9, 18, 27, 32, 36)."""
    top = max_r(tokens, depth, schedule)
    return sorted({round(top * f) for f in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)})


def default_ops(tokens: int, depth: int) -> list[dict]:
    """ToMe's default operating points: constant r, then ToMe's decreasing schedule, which
    merges early and reaches lower FLOPs (256 tokens, 6 blocks: about 0.55 and 0.33 of
    the full model's at the largest r)."""
    return ([{"r": r} for r in default_rs(tokens, depth)]
            + [{"r": r, "schedule": "decreasing"} for r in default_rs(tokens, depth, "decreasing") if r > 0])


def r_schedule(r: Union[int, Sequence[int]], depth: int, schedule: str = "constant") -> list[int]:
    """Tokens merged in each of ``depth`` blocks.

    ``r`` is an int or a list with one value per block. ``constant``: r in every block;
    ``decreasing`` (ToMe's schedule, inflection -1): 2r in the first block, falling
    linearly to 0 in the last, about as many merges in all as ``constant``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if isinstance(r, (list, tuple)):
        if schedule != "constant":
            raise ValueError(f"a per-block r list takes no {schedule!r} schedule")
        if len(r) != depth:
            raise ValueError(f"r has {len(r)} values for {depth} blocks")
        rs = list(r)
    else:
        rs = [r]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in rs):
        raise ValueError(f"r must be a non-negative integer (or one per block), got {r!r}")
    if not isinstance(r, (list, tuple)):
        if schedule == "decreasing":  # ToMe's parse_r with inflect = -1
            step = -2 * r / max(depth - 1, 1)
            rs = [int(2 * r + step * i) for i in range(depth)]
        else:
            rs = [r] * depth
    return rs


def tokens_per_block(n: int, rs: Sequence[int]) -> list[int]:
    """Tokens entering each block when a forward starts with ``n``; a block may merge at
    most half of its tokens (|A| >= r, and ToMe's matching needs r <= n // 2)."""
    counts = []
    for i, r in enumerate(rs):
        if r > n // 2:
            raise ValueError(f"r={r} in block {i + 1} of {len(rs)} is more than half of its {n} tokens "
                             f"(at most {n // 2}); lower r or use larger images")
        counts.append(n)
        n -= r
    return counts


def bipartite_soft_matching(metric: Tensor, r: int, protect_cls: Union[bool, int] = False) -> Tensor:
    """ToMe's matching on ``metric`` (B, n, d) -> ``dest`` (B, n) long: the row, among
    the n - r merged rows, that each token goes to (rows with one dest merge).

    Merged rows are in ToMe's order: the A tokens that stay (most similar match first),
    then every B token in its order. ``r`` must be in [0, n // 2]. ``protect_cls``: row 0
    is a class token that never merges (ToMe's ``protect_cls``); the A tokens that stay
    then keep their order, so it stays row 0, and ``r`` must be in [0, (n - 1) // 2].
    ``protect_cls`` = P > 1: rows 0..P-1 are prefix tokens (class, distillation); rows
    1..P-1 are held out of the matching and keep their rows.
    """
    B, n, _ = metric.shape
    held = int(protect_cls) - 1
    if held > 0:
        dest = bipartite_soft_matching(torch.cat([metric[:, :1], metric[:, 1 + held:]], 1), r, True)
        rows = torch.arange(1, 1 + held, device=metric.device).expand(B, held)
        return torch.cat([dest[:, :1], rows, dest[:, 1:] + held], 1)
    metric = metric / metric.norm(dim=-1, keepdim=True)  # as ToMe (F.normalize's clamp: one op more)
    a, b = metric[:, ::2], metric[:, 1::2]
    best, match = (a @ b.transpose(1, 2)).max(-1)  # (B, |A|): each A token's best B token
    if protect_cls:
        best[:, 0] = float("-inf")  # ``max``'s own output: no copy needed
    order = best.argsort(-1, descending=True)  # most similar A token first
    kept = a.shape[1] - r  # A tokens that stay
    # B rows go to kept + j (a cached template), merged A rows to kept + their match, then
    # the unmerged A rows are overwritten with their rows: by similarity, or (class
    # token) in their order
    dest = constant(("tome_dest", B, n, kept), metric.device,
                    lambda: torch.zeros(B, n, dtype=torch.long, device=metric.device).index_copy_(
                        1, torch.arange(1, n, 2, device=metric.device),
                        kept + torch.arange(n // 2, device=metric.device).expand(B, -1))).clone()
    dest_a = dest[:, ::2]
    torch.add(match, kept, out=dest_a)
    stay = order[:, r:].sort(-1).values if protect_cls else order[:, r:]
    dest_a.scatter_(1, stay, arange(kept, metric.device).expand(B, -1))
    return dest


_CONSTANTS: dict = {}


def constant(key: tuple, device, make) -> Tensor:
    """``make()``, kept per (``key``, device) across forwards: index tensors that depend
    on shapes only, so that a forward dispatches no op to rebuild them. Inference-mode
    tensors are kept apart (they cannot be used outside inference mode)."""
    if torch.jit.is_tracing():  # (fvcore's pricing) shapes are traced values there
        return make()
    key = (key, str(device), torch.is_inference_mode_enabled())
    value = _CONSTANTS.get(key)
    if value is None:
        if len(_CONSTANTS) > 512:  # shapes of a long sweep: start again
            _CONSTANTS.clear()
        value = _CONSTANTS[key] = make()
    return value


def arange(n: int, device) -> Tensor:
    """``torch.arange(n)``, kept (``constant``)."""
    return constant(("arange", n), device, lambda: torch.arange(n, device=device))


def merge_wavg(x: Tensor, dest: Tensor, size: Optional[Tensor], n_out: int) -> tuple[Tensor, Tensor]:
    """Rows of ``x`` (B, n, D) with the same ``dest`` become their size-weighted average.

    ``size`` (B, n) is how many patches each row stands for (None: all 1). Returns the
    merged rows (B, n_out, D) and their sizes (B, n_out), the sums of the merged sizes.
    """
    B, n, D = x.shape
    # one scatter for the rows and their sizes: the size is an extra channel (the sums
    # are the same, in the same order, as two scatters')
    if size is None:
        ones = constant(("tome_ones", B, n, x.dtype), x.device, lambda: x.new_ones(B, n, 1))
        weighted = torch.cat([x, ones], -1)
    else:
        weighted = torch.cat([x * size[..., None], size[..., None]], -1)
    total = x.new_zeros(B, n_out, D + 1).scatter_add_(1, dest[..., None].expand(B, n, D + 1), weighted)
    new_size = total[..., D]
    return total[..., :D] / new_size[..., None], new_size


def proportional_attention(q: Tensor, k: Tensor, v: Tensor, size: Optional[Tensor],
                           dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(d) + log size) v for q, k, v (B, heads, n, d) and key sizes
    (B, n); ``size`` None: plain attention. The log size is an additive float mask."""
    mask = None if size is None else size.log().to(q.dtype)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def attention(attn: nn.Module, x: Tensor, size: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """timm ``Attention.forward`` (fused path), from its submodules.

    Modifications:
     - proportional attention: log(size) of each key is added to the logits;
     - also returns the matching metric: the keys averaged over heads, (B, n, head_dim).
    """
    B, n, _ = x.shape
    qkv = attn.qkv(x).reshape(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = proportional_attention(q, k, v, size, attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(B, n, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), k.mean(1)


def tome_block(block: nn.Module, x: Tensor, size: Optional[Tensor], r: int,
               prop_attn: bool = True, protect_cls: Union[bool, int] = False) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """timm ``Block.forward`` with ToMe's merge between attention and MLP.

    Modifications:
     - attention is proportional to the token sizes (``prop_attn``) and also gives the
       keys averaged over heads;
     - after the attention residual, ``r`` tokens merge (``bipartite_soft_matching`` on
       those keys, ``merge_wavg``), so the MLP runs on n - r tokens.

    Returns (x, size, dest): ``dest`` (B, n) maps old rows to merged rows; with r == 0
    nothing merges and ``size`` and ``dest`` come back unchanged / None. ``protect_cls``:
    row 0 is a class token, which never merges (``bipartite_soft_matching``).
    """
    y, metric = attention(block.attn, block.norm1(x), size if prop_attn else None)
    x = x + block.drop_path1(block.ls1(y))
    dest = None
    if r > 0:
        dest = bipartite_soft_matching(metric, r, protect_cls)
        x, size = merge_wavg(x, dest, size, x.shape[1] - r)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size, dest


class ToMeBlock(nn.Module):
    """One block merging ``r`` tokens of unit size: the cost probe of ("tome_block", r)."""

    def __init__(self, block: nn.Module, r: int, protect_cls: Union[bool, int] = False):
        super().__init__()
        self.block, self.r, self.protect_cls = block, r, protect_cls

    def forward(self, x: Tensor) -> Tensor:
        return tome_block(self.block, x, None, self.r, protect_cls=self.protect_cls)[0]


class ToMePolicy(Policy):
    """Merges ``r`` tokens in every block (or one r per block, or ToMe's decreasing
    schedule). ``state.size`` stays None (every row one patch) until the first merge."""

    name = "tome"

    def __init__(self, depth: int, r: Union[int, Sequence[int]] = 0, schedule: str = "constant",
                 prop_attn: bool = True, unmerge: str = "after"):
        if unmerge not in UNMERGE:
            raise ValueError(f"unknown unmerge {unmerge!r}; expected 'before' or 'after' (the decoder)")
        self.rs = r_schedule(r, depth, schedule)
        self.r, self.schedule, self.prop_attn, self.unmerge = r, schedule, prop_attn, unmerge

    def describe(self) -> dict:
        plain = {} if self.prop_attn else {"prop_attn": False}  # only when off: stored records predate it
        return {"r": self.r, "schedule": self.schedule, "r_per_block": self.rs, "unmerge": self.unmerge, **plain}

    def start(self, model, state: TokenState) -> None:
        if state.valid is not None:
            raise ValueError("tome needs every image of a batch to have the same tokens")
        B, N = state.source.shape
        counts = tokens_per_block(N, self.rs)  # refuse an r too large for this image
        P = state.num_prefix
        # every block's token counts are known here: one table, kept between forwards, whose
        # rows the trace records (no counting op per block)
        rows = [int(c) for c in counts + [counts[-1] - self.rs[-1]]]
        table = constant(("tome_counts", tuple(rows), P), state.x.device,
                         lambda: torch.tensor([rows, [c + P for c in rows]], device=state.x.device))
        # the forward's own state: the block rows with the prefix kept in them (no
        # concatenation per block), their sizes and every grid position's row, both
        # counting the prefix rows (row 0, a class token, never merges)
        state.tome = {"table": table, "joined": None, "rows": None, "size": None,
                      "source": state.source + P if P else state.source}

    def run_block(self, index: int, block, state: TokenState) -> None:
        r, own, P = self.rs[index], state.tome, state.num_prefix
        B = state.batch_size
        counts = own["table"][1, index].expand(B)  # block_counts: the class token is computed, so priced
        joined = own["joined"]
        if joined is None or state.x is not own["rows"]:  # (the rows are views of it)
            joined = state.joined()
        x, size, dest = tome_block(block, joined, own["size"], r, self.prop_attn, protect_cls=P)
        own["joined"], own["size"] = x, size
        state.x, state.prefix = x[:, P:], (x[:, :P] if P else None)
        own["rows"] = state.x
        state.size = size[:, P:] if size is not None else None
        if dest is not None:  # every grid position follows its row to the merged row
            own["source"] = dest.gather(1, own["source"])
            known_counts(state, own["table"][0, index + 1].expand(B), own["table"][1, index + 1].expand(B))
        if index == len(self.rs) - 1:
            state.source = own["source"] - P if P else own["source"]
        state.trace.add(("tome_block", r), counts)

    def cost_probe(self, model, key: tuple, n: int):
        if key[0] != "tome_block":
            return super().cost_probe(model, key, n)
        p = next(model.parameters())
        x = torch.zeros(1, n, model.config.embed_dim, dtype=p.dtype, device=p.device)
        # every block has the same shape; n counts the class token, protected as in the forward
        return ToMeBlock(model.blocks[0], key[1], protect_cls=model.num_prefix_tokens), (x,)

"""Attention on a packed ragged batch: every image's rows attend only to its own rows.

``segment_attention`` takes q, k, v of the packed rows (heads, T, head_dim), image b's
rows being the b-th of ``segments`` (host counts), and returns what one SDPA per image,
concatenated, returns. Two ways:

- per image (the default on the CPU): B ``scaled_dot_product_attention`` calls, one
  per segment: B kernel launches per block on a GPU.
- fused (the default on CUDA): one SDPA call on jagged nested tensors
  (``torch.nested.nested_tensor_from_jagged``), which dispatches to the varlen
  FlashAttention (bf16/fp16) or memory-efficient (fp32) kernel: one launch for the
  batch. Offsets and min/max lengths come from the host ``segments``, so nothing is
  read from the device (an NJT without them computes max/min with a sync). On the CPU,
  torch 2.14 runs nested SDPA by its math fallback, which copies the jagged batch into
  a strided nested tensor and back (much slower than per-image calls): tests force it
  there (``fused=True`` or the module switch ``FUSED``) only to check it.

FlexAttention with a document block mask is the alternative; it was not taken: eager
flex_attention materialises the (B, heads, n, n) scores (it is fused only compiled),
and its block mask is built per ragged batch on the device, with a recompile per
shape unless compiled dynamic.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# None: fused on CUDA, per image elsewhere; True / False: forced everywhere (tests)
FUSED: Optional[bool] = None


def use_fused(device: torch.device, fused: Optional[bool] = None, q: Optional[Tensor] = None) -> bool:
    """Whether ``segment_attention`` takes the nested path on ``device``. By default only on
    CUDA, and only where a fused varlen kernel takes ``q`` (fp32/fp16/bf16, head_dim a
    multiple of 8 up to 256): elsewhere nested SDPA falls back to its math path, which
    copies and reads the lengths on the host."""
    if fused is not None:
        return fused
    if FUSED is not None:
        return FUSED
    if device.type != "cuda":
        return False
    return q is None or (q.dtype in (torch.float32, torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
                         and q.shape[-1] <= 256)


@functools.lru_cache(maxsize=64)
def segment_offsets(segments: tuple[int, ...], device: torch.device) -> Tensor:
    """(B + 1,) start rows of each segment and the end (int64: the jagged layout's), on
    ``device``, made once per distinct ragged shape (blocks between two decisions share
    it). To CUDA from pinned memory, non-blocking: a plain copy would wait for the queue."""
    starts = [0]
    for s in segments:
        starts.append(starts[-1] + s)
    host = torch.tensor(starts, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, segments: Sequence[int], offsets: Optional[Tensor] = None,
                      fused: Optional[bool] = None) -> Tensor:
    """Attention of each segment's rows to the rows of the same segment.

    ``q, k, v``: (heads, T, head_dim) with T = sum(``segments``), segment b's rows
    contiguous and in order; ``segments``: host counts (a count may be 0); ``offsets``:
    ``segment_offsets`` of the non-empty segments, where the caller keeps it; ``fused``:
    force the nested path (True) or per-image calls (False); default: ``use_fused``.
    Returns (heads, T, head_dim)."""
    segments = [int(s) for s in segments]
    if not use_fused(q.device, fused, q):
        return torch.cat([F.scaled_dot_product_attention(qs, ks, vs)
                          for qs, ks, vs in zip(q.split(segments, 1), k.split(segments, 1), v.split(segments, 1))], 1)
    lengths = [s for s in segments if s > 0]  # an empty segment has no rows: fused kernels reject length 0
    if len(lengths) <= 1:
        return F.scaled_dot_product_attention(q, k, v)  # one image: no raggedness left
    if offsets is None:
        offsets = segment_offsets(tuple(lengths), q.device)
    cpu = q.device.type != "cuda"

    def jagged(x: Tensor) -> Tensor:  # (heads, T, d) -> (B, heads, j, d), a view where it can be
        rows = x.transpose(0, 1)  # (T, heads, d): the packed layout fused varlen kernels read
        if cpu:
            rows = rows.contiguous()  # the math fallback takes only contiguous jagged inputs
        return torch.nested.nested_tensor_from_jagged(rows, offsets, min_seqlen=min(lengths),
                                                      max_seqlen=max(lengths)).transpose(1, 2)

    with warnings.catch_warnings():
        # the CPU math fallback builds a strided ("prototype") nested tensor internally
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype")
        out = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v))
    return out.transpose(1, 2).values().transpose(0, 1)  # (heads, T, d)

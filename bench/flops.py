"""FLOP accounting: fvcore counts (one multiply-add = one flop) and a per-image FLOP
model that prices an encoder's compute trace.

Adaptive methods run different amounts of compute per image, and a batched forward
pads to the batch maximum, so counting a batch with fvcore says nothing about one
image. ``FlopModel`` instead prices what each image's trace says ran: embed + every
(component, token count) item + decode, each counted once with fvcore and cached.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Callable, Union

import torch
from torch import Tensor, nn

with warnings.catch_warnings():  # fvcore's import scripts a loss: torch.jit.script FutureWarning
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from methods.encoder import ComputeTrace, Policy


def sdpa_flop(inputs, outputs) -> int:
    """aten::scaled_dot_product_attention: Q K^T plus attn V, as multiply-adds.

    fvcore has no handle for it and would silently count timm's fused attention as 0.
    """
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])  # B x heads
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def elementwise_flop(inputs, outputs) -> int:
    """One flop per output element: used for log-softmax, so that the entropy a method
    computes to decide (PAUMER) is priced at C flops per token rather than zero."""
    return math.prod(get_shape(outputs[0]))


class _Fn(nn.Module):
    """fvcore traces modules only; this lets it trace any callable. ``owner`` is held as
    a submodule so the tracer sees its weights as parameters, not grad-requiring constants."""

    def __init__(self, fn: Callable, owner: nn.Module | None):
        super().__init__()
        self.fn = fn
        self.owner = owner

    def forward(self, *inputs):
        return self.fn(*inputs)


@contextmanager
def eval_mode(*modules: nn.Module):
    """Eval mode inside, every submodule's own train/eval flag restored after."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def count_flops(fn: Union[nn.Module, Callable], inputs: tuple, attention: bool = True,
                owner: nn.Module | None = None) -> int:
    """fvcore count of ``fn(*inputs)`` in eval mode, no grad, SDPA included
    (``attention=False``: fvcore's own figure, which skips fused attention).

    A plain function that uses a module's weights names it as ``owner`` (a bound method
    such as ``model.decode`` finds it itself); the owner runs in eval mode too.
    """
    if owner is None and isinstance(getattr(fn, "__self__", None), nn.Module):
        owner = fn.__self__
    module = fn if isinstance(fn, nn.Module) else _Fn(fn, owner)
    with eval_mode(module), torch.no_grad(), warnings.catch_warnings():
        # tracing data-dependent control flow (token selection) is expected here
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        analysis = (FlopCountAnalysis(module, inputs)
                    .set_op_handle("aten::scaled_dot_product_attention", sdpa_flop if attention else None)
                    .set_op_handle("aten::log_softmax", elementwise_flop)
                    .unsupported_ops_warnings(False)
                    .uncalled_modules_warnings(False)
                    .tracer_warnings("none"))
        return int(analysis.total())


class FlopModel:
    """Per-image FLOPs of a Segmenter forward under ``policy``, priced from its trace."""

    def __init__(self, model: nn.Module, policy: Policy | None = None):
        self.model = model
        self.policy = policy or Policy()
        self._costs: dict = {}  # (key, n) or ("embed"/"decode", image size) -> flops

    def _cached(self, key, count: Callable[[], int]) -> int:
        if key not in self._costs:
            self._costs[key] = count()
        return self._costs[key]

    def _param(self) -> Tensor:
        return next(self.model.parameters())

    def cost(self, key: tuple, n: int) -> int:
        """FLOPs of component ``key`` run on ``n`` tokens of one image."""
        n = int(n)
        if n == 0:
            return 0
        if key == ("block",):
            def count():  # every encoder block has the same shape
                p = self._param()
                x = torch.zeros(1, n, self.model.config.embed_dim, dtype=p.dtype, device=p.device)
                return count_flops(self.model.blocks[0], (x,))
        else:
            def count():
                fn, inputs = self.policy.cost_probe(self.model, key, n)
                return count_flops(fn, inputs, owner=self.model)  # probes may use its weights
        return self._cached((key, n), count)

    def embed_flops(self, image_hw: tuple[int, int]) -> int:
        """Patch embedding + position-embedding resize for one image."""
        h, w = map(int, image_hw)

        def count():
            p = self._param()
            images = torch.zeros(1, 3, h, w, dtype=p.dtype, device=p.device)
            return count_flops(lambda im: self.model.embed(im)[0], (images,), owner=self.model)
        return self._cached(("embed", h, w), count)

    def decode_flops(self, image_hw: tuple[int, int], rows: int | None = None) -> int:
        """Final norm + decoder + upsampling for one image: on the full token grid, or
        (``rows``) on that many merged rows (``Segmenter.decode_rows``)."""
        h, w = map(int, image_hw)

        def count():
            p = self._param()
            grid = self.model.grid_size(h, w)
            n = grid[0] * grid[1] if rows is None else rows
            tokens = torch.zeros(1, n, self.model.config.embed_dim, dtype=p.dtype, device=p.device)
            if rows is None:
                return count_flops(lambda t: self.model.decode(t, grid, (h, w)), (tokens,), owner=self.model)
            size = torch.ones(1, n, dtype=p.dtype, device=p.device)
            source = torch.zeros(1, grid[0] * grid[1], dtype=torch.long, device=p.device)
            return count_flops(lambda t, s: self.model.decode_rows(t, s, source, grid, (h, w)), (tokens, size),
                               owner=self.model)
        return self._cached(("decode", h, w) + (() if rows is None else (int(rows),)), count)

    def image_flops(self, trace: ComputeTrace, image_hw: tuple[int, int]) -> Tensor:
        """(B,) int64 FLOPs of each image of the forward that produced ``trace``.

        ``trace`` may also be the TokenState that holds it. Every image has size ``image_hw``.
        """
        trace = getattr(trace, "trace", trace)
        B = trace.tokens.shape[0]
        decoded = trace.decoded if trace.decoded is not None else torch.ones(B, dtype=torch.long)
        rows = trace.decoder_rows.tolist() if trace.decoder_rows is not None else [None] * B
        decode = torch.tensor([self.decode_flops(image_hw, n) for n in rows], dtype=torch.long)
        total = self.embed_flops(image_hw) + decode * decoded.long()
        for key, counts in trace.items:
            total += torch.tensor([self.cost(key, n) for n in counts.tolist()], dtype=torch.long)
        return total

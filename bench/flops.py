"""FLOP accounting: fvcore counts (one multiply-add = one flop) and a per-image FLOP
model that prices an encoder's compute trace.

Adaptive methods run different amounts of compute per image, and a batched forward
pads to the batch maximum, so counting a batch with fvcore says nothing about one
image. ``FlopModel`` instead prices what each image's trace says ran: embed + every
(component, token count) item + decode, each counted once with fvcore and cached in
the run's ``PriceCache``; a block's (and a policy's declared quadratic components')
count is an exact polynomial of the token count, fitted once from a few fvcore counts.
"""
from __future__ import annotations

import math
import time
import warnings
import weakref
from contextlib import contextmanager
from fractions import Fraction
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


# a component declared quadratic is counted at these token counts, fitted exactly on the
# first three and checked on the others (both parities); a mismatch falls back to tracing
QUADRATIC_FIT = (1, 2, 3)
QUADRATIC_CHECK = (4, 5, 8)
QUADRATIC_MODEL_KEYS = (("block",),)  # a timm block: linear layers, norms, n^2 attention


class PriceCache:
    """FLOP prices shared by every ``FlopModel`` of one run: one entry per model (held
    weakly) for its model-level components (blocks, embedding, decoder), so a sweep's
    operating points, the baseline and the control price each token count once.

    ``traces`` and ``seconds`` say how many fvcore counts ran and how long they took.
    """

    def __init__(self):
        self._models: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self.traces = 0
        self.seconds = 0.0

    def table(self, model: nn.Module) -> dict:
        return self._models.setdefault(model, {})

    def count(self, count: Callable[[], int]) -> int:
        t0 = time.perf_counter()
        try:
            return int(count())
        finally:
            self.traces += 1
            self.seconds += time.perf_counter() - t0


def fit_quadratic(values: dict) -> Union[tuple, None]:
    """(a, b, c) with a n^2 + b n + c equal to ``values`` (n -> flops) at every point,
    fitted on ``QUADRATIC_FIT`` and checked on the rest; None when they are not such a
    polynomial with integer values."""
    (n1, f1), (n2, f2), (n3, f3) = ((n, Fraction(values[n])) for n in QUADRATIC_FIT)
    a = ((f3 - f2) / (n3 - n2) - (f2 - f1) / (n2 - n1)) / (n3 - n1)
    b = (f2 - f1) / (n2 - n1) - a * (n1 + n2)
    c = f1 - a * n1 * n1 - b * n1
    if all(a * n * n + b * n + c == f for n, f in values.items()):
        return a, b, c
    return None


class FlopModel:
    """Per-image FLOPs of a Segmenter forward under ``policy``, priced from its trace.

    Each (component, token count) is counted by fvcore once, except components whose
    count is a quadratic polynomial of the token count (every encoder block; a policy's
    ``quadratic_costs``): those are counted at a few small token counts, the exact
    polynomial fitted and checked there, and evaluated for any count after that, which
    tests hold equal to fvcore. ``prices``: the run's shared ``PriceCache``.
    """

    def __init__(self, model: nn.Module, policy: Policy | None = None, prices: PriceCache | None = None):
        self.model = model
        self.policy = policy or Policy()
        self.prices = prices if prices is not None else PriceCache()
        self._shared = self.prices.table(model)  # model-level: any policy on this model
        self._costs: dict = {}  # the policy's own components: (key, n) -> flops

    def _cached(self, key, count: Callable[[], int], table: dict | None = None) -> int:
        table = self._shared if table is None else table
        if key not in table:
            table[key] = self.prices.count(count)
        return table[key]

    def _param(self) -> Tensor:
        return next(self.model.parameters())

    def _counter(self, key: tuple) -> tuple[Callable[[int], Callable[[], int]], dict]:
        """(n -> fvcore count of ``key`` at n tokens, the table its prices live in)."""
        if key == ("block",):
            def at(n):
                def count():  # every encoder block has the same shape
                    p = self._param()
                    x = torch.zeros(1, n, self.model.config.embed_dim, dtype=p.dtype, device=p.device)
                    return count_flops(self.model.blocks[0], (x,))
                return count
            return at, self._shared

        def probe(n):
            def count():
                fn, inputs = self.policy.cost_probe(self.model, key, n)
                return count_flops(fn, inputs, owner=self.model)  # probes may use its weights
            return count
        return probe, self._costs

    def _quadratic(self, key: tuple, at, table: dict):
        """The fitted polynomial of ``key`` (None: not one, priced per count)."""
        if ("quadratic", key) not in table:
            values = {n: self._cached((key, n), at(n), table) for n in QUADRATIC_FIT + QUADRATIC_CHECK}
            table[("quadratic", key)] = fit_quadratic(values)
        return table[("quadratic", key)]

    def cost(self, key: tuple, n: int) -> int:
        """FLOPs of component ``key`` run on ``n`` tokens of one image."""
        n = int(n)
        if n == 0:
            return 0
        at, table = self._counter(key)
        if (key, n) in table:
            return table[(key, n)]
        if key in QUADRATIC_MODEL_KEYS or key in tuple(getattr(self.policy, "quadratic_costs", ())):
            poly = self._quadratic(key, at, table)
            if poly is not None:
                a, b, c = poly
                return int(a * n * n + b * n + c)
        return self._cached((key, n), at(n), table)

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

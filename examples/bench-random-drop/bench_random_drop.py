"""random-drop: after block ``layer``, every image keeps a random ``1 - fraction`` of its
tokens; the dropped ones are parked as they were and skip the later blocks. The decoder
sees every token back on its grid position (the encoder loop does that).

A lower bound any token-selection method should beat: same compute saved, no criterion.
"""
from __future__ import annotations

import torch
from torch import Tensor

from methods import MethodSpec
from methods.encoder import Policy, TokenState

SELECT = ("random-drop",)  # the trace key of the selection step, priced by `cost_probe`


def draw_keep(x: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """(B, n) bool: the rows that stay, ``n - round(fraction * n)`` of them per image."""
    B, n = int(x.shape[0]), int(x.shape[1])  # ints also when fvcore traces it
    kept = n - round(fraction * n)
    scores = torch.rand(B, n, generator=generator).to(x.device)
    rank = scores.argsort(dim=1).argsort(dim=1)  # each row's place in a random order
    return rank < kept


class RandomDropPolicy(Policy):
    name = "random-drop"

    def __init__(self, depth: int, fraction: float = 0.5, layer: int = 1):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if not 1 <= layer < depth:
            raise ValueError(f"layer must be in [1, {depth - 1}] (blocks run before the drop), got {layer}")
        self.fraction, self.layer = float(fraction), int(layer)

    def describe(self) -> dict:
        return {"fraction": self.fraction, "layer": self.layer}

    def start(self, model, state: TokenState) -> None:
        # the same draws for every forward: a run is reproducible
        self.generator = torch.Generator().manual_seed(0)

    def after_block(self, index: int, block, state: TokenState) -> None:
        if index + 1 != self.layer:
            return
        keep = draw_keep(state.x, self.fraction, self.generator)
        state.trace.add(SELECT, state.counts())  # our own work, on the tokens it looked at
        state.keep(keep, layer=self.layer)  # later blocks run on the kept rows only

    def cost_probe(self, model, key: tuple, n: int):
        if key == SELECT:  # the very function that ran, on one image of n tokens
            p = next(model.parameters())
            x = torch.zeros(1, n, model.config.embed_dim, dtype=p.dtype, device=p.device)
            return (lambda t: draw_keep(t, self.fraction, torch.Generator().manual_seed(0))), (x,)
        return super().cost_probe(model, key, n)


def _make_policy(model, fraction: float = 0.5, layer: int = 1) -> Policy:
    # `model` is the baseline Segmenter (or, for a method that fine-tunes, its trained module)
    return RandomDropPolicy(getattr(model, "segmenter", model).depth, fraction=fraction, layer=layer)


def method() -> MethodSpec:
    return MethodSpec(
        name="random-drop",
        description="a random fraction of tokens leaves after one block (no criterion: a lower bound)",
        make_policy=_make_policy,
        default_ops=[{"fraction": f} for f in (0.0, 0.25, 0.5, 0.75)],
        knob_types={"fraction": float, "layer": int},
        swept="fraction",
    )

"""Method registry: each method is a policy over the shared encoder loop plus its
operating points. Adding a method = one module in ``methods/`` and one entry here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from methods.encoder import Policy


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    make_policy: Callable[..., Policy]  # (model, **knobs) -> Policy; raises ValueError on bad knobs
    default_ops: list[dict]
    knob_types: dict = field(default_factory=dict)  # knob -> type, for parsing --op
    input_scale: Callable[[dict], float] = lambda knobs: 1.0
    # fine-tuning from the baseline checkpoint, or None when the method runs on its weights
    fine_tune: Optional[object] = None


def _baseline(model=None) -> Policy:
    return Policy()


def _static(model=None, scale: float = 1.0) -> Policy:
    if not 0.0 < scale <= 4.0:
        raise ValueError(f"scale must be in (0, 4], got {scale}")
    return Policy()


METHODS: dict[str, MethodSpec] = {
    "baseline": MethodSpec("baseline", "Segmenter, every token through every block", _baseline, [{}]),
    "static": MethodSpec(
        "static", "the baseline on a downscaled input (prediction upsampled back)", _static,
        [{"scale": s} for s in (1.0, 0.875, 0.75, 0.625, 0.5)],
        knob_types={"scale": float}, input_scale=lambda knobs: float(knobs.get("scale", 1.0)),
    ),
}

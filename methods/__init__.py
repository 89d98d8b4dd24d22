"""Method registry: each method is a policy over the shared encoder loop plus its
operating points. Adding a method = one module in ``methods/`` and one entry here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from methods import early_exit, paumer, tome
from methods.encoder import BATCHINGS, Policy


@dataclass(frozen=True)
class FineTune:
    """How a method fine-tunes from the baseline checkpoint. Every method that trains
    gets the same budget: half the baseline's steps at half its learning rate."""

    build: Callable  # (baseline Segmenter, **knobs) -> trainable module holding it as `.segmenter`
    loss: Callable  # (trainable, images, labels, **knobs) -> scalar loss
    knobs: dict = field(default_factory=dict)  # training knobs (part of the checkpoint's config hash)
    steps_fraction: float = 0.5
    lr_factor: float = 0.5


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    make_policy: Callable[..., Policy]  # (model, **knobs) -> Policy; raises ValueError on bad knobs
    default_ops: list[dict]
    knob_types: dict = field(default_factory=dict)  # knob -> type ([type]: always a list), for --op
    input_scale: Callable[[dict], float] = lambda knobs: 1.0
    fine_tune: Optional[FineTune] = None  # None: the method runs on the baseline's weights
    map_ops: list = field(default_factory=list)  # operating points drawn in the compute-map figure
    swept: str = ""  # the knob a sweep varies; the others name a variant (a line of its own in plots)
    knob_choices: dict = field(default_factory=dict)  # knob -> its allowed values, where they are a list
    knob_help: dict = field(default_factory=dict)  # knob -> what it is and its range, for `bench methods`


def _baseline(model=None) -> Policy:
    return Policy()


def _static(model=None, scale: float = 1.0) -> Policy:
    if not 0.0 < scale <= 4.0:
        raise ValueError(f"scale must be in (0, 4], got {scale}")
    return Policy()


def _paumer(trained, tau=0.1, criterion="entropy", layers=None, batching="pad") -> Policy:
    if not isinstance(trained, paumer.PaumerModel):
        raise ValueError("paumer needs its fine-tuned checkpoint (PaumerModel)")
    return paumer.PaumerPolicy(trained.pausing, tau=tau, criterion=criterion, layers=layers, batching=batching)


def _tome(model, r=0, schedule="constant") -> Policy:
    return tome.ToMePolicy(getattr(model, "segmenter", model).depth, r=r, schedule=schedule)


def _early_exit(trained, threshold=0.9, mode="token", batching="pad") -> Policy:
    if not isinstance(trained, early_exit.EarlyExitModel):
        raise ValueError("early-exit needs its fine-tuned checkpoint (EarlyExitModel)")
    return early_exit.EarlyExitPolicy(trained.heads, threshold=threshold, mode=mode, batching=batching)


METHODS: dict[str, MethodSpec] = {
    "baseline": MethodSpec("baseline", "Segmenter, every token through every block", _baseline, [{}]),
    "static": MethodSpec(
        "static", "the baseline on a downscaled input (prediction upsampled back)", _static,
        [{"scale": s} for s in (1.0, 0.875, 0.75, 0.625, 0.5)],
        knob_types={"scale": float}, input_scale=lambda knobs: float(knobs.get("scale", 1.0)), swept="scale",
        knob_help={"scale": "input scale, in (0, 4]"},
    ),
    "paumer": MethodSpec(
        "paumer", "patches with a confident intermediate prediction pause (skip later blocks)", _paumer,
        [{"tau": t} for t in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)],
        knob_types={"tau": float, "criterion": str, "layers": [int], "batching": str},
        fine_tune=FineTune(
            build=lambda seg, layers=None, **_: paumer.PaumerModel(seg, layers),
            loss=lambda m, images, labels, tau_max=0.5, head_weight=0.5, **_: paumer.paumer_loss(
                m, images, labels, tau_max=tau_max, head_weight=head_weight),
            knobs={"tau_max": 0.5, "head_weight": 0.5},
        ),
        map_ops=[{"tau": 0.1}, {"tau": 0.3}], swept="tau",
        knob_choices={"criterion": paumer.CRITERIA, "batching": BATCHINGS},
        knob_help={"tau": "pause below this score, in [0, 1]; one value, or one per pausing layer",
                   "criterion": "the score a patch pauses on (default entropy)",
                   "layers": "pausing layers used, a subset of the trained ones (default all)",
                   "batching": "how a ragged batch runs (default pad)"},
    ),
    "tome": MethodSpec(
        "tome", "token merging (bipartite soft matching) in every block, unmerged before the decoder", _tome,
        # r merged per block; 36 is the largest constant r for `tiny` on 128x128 (256 tokens, 6 blocks)
        [{"r": r} for r in (0, 8, 16, 24, 32, 36)],
        knob_types={"r": int, "schedule": str}, swept="r",
        knob_choices={"schedule": tome.SCHEDULES},
        knob_help={"r": "tokens merged per block, >= 0 and at most half the block's tokens",
                   "schedule": "r in every block, or ToMe's decreasing schedule (default constant)"},
    ),
    "early-exit": MethodSpec(
        "early-exit", "confident tokens (mode=token) or images (mode=image) exit with an intermediate head's label",
        _early_exit,
        [{"mode": m, "threshold": t} for m in early_exit.MODES for t in (1.0, 0.99, 0.97, 0.95, 0.9, 0.8)],
        knob_types={"threshold": float, "mode": str, "batching": str},
        fine_tune=FineTune(
            build=lambda seg, layers=None, **_: early_exit.EarlyExitModel(seg, layers),
            loss=lambda m, images, labels, head_weight=0.5, **_: early_exit.early_exit_loss(
                m, images, labels, head_weight=head_weight),
            knobs={"head_weight": 0.5},
        ),
        map_ops=[{"mode": "token", "threshold": 0.95}, {"mode": "token", "threshold": 0.9}], swept="threshold",
        knob_choices={"mode": early_exit.MODES, "batching": BATCHINGS},
        knob_help={"threshold": "exit where the head's confidence is above this, in [0, 1]",
                   "mode": "tokens exit one by one, or whole images (default token)",
                   "batching": "how a ragged batch runs (default pad)"},
    ),
}

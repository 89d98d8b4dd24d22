"""Method registry: each method is a policy over the shared encoder loop plus its
operating points. Adding a method = one module in ``methods/`` and one entry here, or a
package of its own that registers a ``MethodSpec`` under the entry-point group
``bench.methods`` (``all_methods``; docs/add-a-method.md)."""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from methods import algm, dtop, early_exit, paumer, references, tome
from methods.encoder import BATCHINGS, Policy

CONTROL = "baseline-ft"  # the equal-budget reference every fine-tuned method is also compared with


@dataclass(frozen=True)
class FineTune:
    """How a method fine-tunes from the baseline checkpoint. Every method that trains
    gets the same budget: half the baseline's steps at half its learning rate."""

    build: Callable  # (baseline Segmenter, **knobs) -> trainable module: it, or one holding it as `.segmenter`
    loss: Callable  # (trainable, images, labels, **knobs) -> scalar loss
    knobs: dict = field(default_factory=dict)  # training knobs (part of the checkpoint's config hash)
    steps_fraction: float = 0.5
    lr_factor: float = 0.5
    # operating-point knobs that are training knobs too (shallow's depth): one checkpoint per value
    op_knobs: tuple = ()
    # (training knobs, baseline depth) -> another method whose checkpoint this one is, or None
    same_as: Optional[Callable[[dict, int], Optional[str]]] = None
    # what its training log's loss is: the plain pixel loss ("segmentation") or that plus
    # its heads' terms ("with head loss"), drawn apart in the training curves
    loss_kind: str = "segmentation"


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
    # (encoder depth, tokens per forward) -> the default sweep, for methods whose sweep depends
    # on the model or the input; `default_ops` is then its value for `tiny` on 128x128 (6, 256)
    default_ops_for: Optional[Callable[[int, int], list[dict]]] = None

    def sweep(self, depth: int, tokens: int) -> list[dict]:
        """The default operating points for a ``depth``-block model on ``tokens`` tokens."""
        return self.default_ops_for(depth, tokens) if self.default_ops_for else list(self.default_ops)
    knob_choices: dict = field(default_factory=dict)  # knob -> its allowed values, where they are a list
    knob_help: dict = field(default_factory=dict)  # knob -> what it is and its range, for `bench methods`
    per_layer_knobs: tuple = ()  # scalar knobs that also take one value per layer ("tau=0.1,0.2")


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


def _shallow(trained, depth=None) -> Policy:
    blocks = getattr(trained, "depth", None)
    if depth != blocks:
        raise ValueError(f"depth={depth!r} needs its own checkpoint (this one has {blocks} blocks)")
    return Policy()


def _tome(model, r=0, schedule="constant", unmerge="after", prop_attn=True) -> Policy:
    return tome.ToMePolicy(getattr(model, "segmenter", model).depth, r=r, schedule=schedule, unmerge=unmerge,
                           prop_attn=prop_attn)


def _algm(model, threshold=0.88, layers=None, global_threshold=None, batching="pad", unmerge="after") -> Policy:
    return algm.ALGMPolicy(getattr(model, "segmenter", model).depth, threshold=threshold, layers=layers,
                           global_threshold=global_threshold, batching=batching, unmerge=unmerge)


def _early_exit(trained, threshold=0.9, mode="token", batching="pad") -> Policy:
    if not isinstance(trained, early_exit.EarlyExitModel):
        raise ValueError("early-exit needs its fine-tuned checkpoint (EarlyExitModel)")
    return early_exit.EarlyExitPolicy(trained.heads, threshold=threshold, mode=mode, batching=batching)


def _dtop(trained, threshold=None, layers=None, top_k=dtop.TOP_K, batching="pad") -> Policy:
    if not isinstance(trained, dtop.DToPModel):
        raise ValueError("dtop needs its fine-tuned checkpoint (DToPModel)")
    return dtop.DToPPolicy(trained.heads, threshold=threshold, layers=layers, top_k=top_k, batching=batching,
                           depth=trained.segmenter.depth)


METHODS: dict[str, MethodSpec] = {
    "baseline": MethodSpec("baseline", "Segmenter, every token through every block", _baseline, [{}]),
    CONTROL: MethodSpec(
        CONTROL, "the baseline trained on for the fine-tune budget with its own loss (equal-budget control)",
        _baseline, [{}],
        fine_tune=FineTune(build=lambda seg, **_: seg, loss=references.segmentation_loss),
    ),
    "shallow": MethodSpec(
        "shallow", "the baseline's first `depth` blocks + decoder, fine-tuned with the same budget", _shallow,
        [{"depth": d} for d in references.default_depths(6)],
        knob_types={"depth": int},
        fine_tune=FineTune(
            build=lambda seg, depth=None, **_: references.truncate(seg, depth),
            loss=references.segmentation_loss, op_knobs=("depth",),
            same_as=lambda knobs, full_depth: CONTROL if knobs.get("depth") == full_depth else None,
        ),
        swept="depth", default_ops_for=lambda depth, tokens: [{"depth": d} for d in references.default_depths(depth)],
        knob_help={"depth": "encoder blocks kept, from 1 to the baseline's depth (one checkpoint each)"},
    ),
    "static": MethodSpec(
        "static", "the baseline on a downscaled input (prediction upsampled back)", _static,
        [{"scale": s} for s in (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)],
        knob_types={"scale": float}, input_scale=lambda knobs: float(knobs.get("scale", 1.0)), swept="scale",
        knob_help={"scale": "input scale, in (0, 4]"},
    ),
    "paumer": MethodSpec(
        "paumer", "patches with a confident intermediate prediction pause (skip later blocks)", _paumer,
        # up to tau = 1: every patch pauses at the first pausing layer
        [{"tau": t} for t in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)],
        knob_types={"tau": float, "criterion": str, "layers": [int], "batching": str},
        fine_tune=FineTune(
            build=lambda seg, layers=None, **_: paumer.PaumerModel(seg, layers),
            loss=lambda m, images, labels, tau_max=0.5, head_weight=0.5, **_: paumer.paumer_loss(
                m, images, labels, tau_max=tau_max, head_weight=head_weight),
            knobs={"tau_max": 0.5, "head_weight": 0.5}, loss_kind="with head loss",
        ),
        map_ops=[{"tau": 0.1}, {"tau": 0.3}], swept="tau", per_layer_knobs=("tau",),
        knob_choices={"criterion": paumer.CRITERIA, "batching": BATCHINGS},
        knob_help={"tau": "pause below this score, in [0, 1]; one value, or one per pausing layer",
                   "criterion": "the score a patch pauses on (default entropy; schedule: forced shares, for bench speed)",
                   "layers": "pausing layers used, a subset of the trained ones (default all)",
                   "batching": "how a ragged batch runs (default pad)"},
    ),
    "tome": MethodSpec(
        "tome", "token merging (bipartite soft matching) in every block, unmerged after the decoder", _tome,
        # r merged per block, up to the largest r each schedule allows for the input's token count
        tome.default_ops(256, 6),
        knob_types={"r": int, "schedule": str, "unmerge": str}, swept="r", per_layer_knobs=("r",),
        default_ops_for=lambda depth, tokens: tome.default_ops(tokens, depth),
        knob_choices={"schedule": tome.SCHEDULES, "unmerge": tome.UNMERGE},
        knob_help={"r": "tokens merged per block, >= 0 and at most half the block's tokens",
                   "schedule": "r in every block, or ToMe's decreasing schedule (default constant)",
                   "unmerge": "copy merged tokens back to their patches before or after the decoder (default after)"},
    ),
    "algm": MethodSpec(
        "algm", "adaptive local (2x2 windows) then global token merging (ALGM), unmerged after the decoder", _algm,
        # the local window threshold, from merging no window (> 1) to merging every window (-1)
        [{"threshold": t} for t in algm.DEFAULT_THRESHOLDS],
        knob_types={"threshold": float, "layers": [int], "global_threshold": float, "batching": str,
                    "unmerge": str},
        swept="threshold",
        knob_choices={"batching": algm.BATCHINGS, "unmerge": tome.UNMERGE},
        knob_help={"threshold": "a 2x2 window merges when its tokens' mean cosine similarity is at least this",
                   "layers": "the local-merge layer, then the global-merge layer(s)",
                   "global_threshold": "a fixed similarity for the global merge (default: adaptive, mean + std / layer)",
                   "batching": "how a ragged batch runs (default pad); reference: the batch's smallest merge "
                               "count and batch-averaged statistics, as ALGM's code",
                   "unmerge": "copy merged tokens back to their patches before or after the decoder (default after)"},
    ),
    "early-exit": MethodSpec(
        "early-exit", "confident tokens (mode=token) or images (mode=image) exit with an intermediate head's label",
        _early_exit,
        # down to threshold 0: every token (image) exits at the first head
        [{"mode": m, "threshold": t} for m in early_exit.MODES
         for t in (1.0, 0.99, 0.97, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3, 0.0)],
        knob_types={"threshold": float, "mode": str, "batching": str},
        fine_tune=FineTune(
            build=lambda seg, layers=None, **_: early_exit.EarlyExitModel(seg, layers),
            loss=lambda m, images, labels, head_weight=0.5, **_: early_exit.early_exit_loss(
                m, images, labels, head_weight=head_weight),
            knobs={"head_weight": 0.5}, loss_kind="with head loss",
        ),
        map_ops=[{"mode": "token", "threshold": 0.95}, {"mode": "token", "threshold": 0.9}], swept="threshold",
        knob_choices={"mode": early_exit.MODES, "batching": BATCHINGS},
        knob_help={"threshold": "exit where the head's confidence is above this, in [0, 1]",
                   "mode": "tokens exit one by one, or whole images (default token)",
                   "batching": "how a ragged batch runs (default pad)"},
    ),
    "dtop": MethodSpec(
        "dtop", "DToP: class-query heads prune confident tokens, which leave every later block and head",
        _dtop, [{"threshold": t} for t in dtop.DEFAULT_THRESHOLDS],
        knob_types={"threshold": float, "layers": [int], "top_k": int, "batching": str},
        fine_tune=FineTune(
            build=lambda seg, layers=None, **_: dtop.DToPModel(seg, layers),
            loss=lambda m, images, labels, threshold=None, top_k=dtop.TOP_K, **_: dtop.dtop_loss(
                m, images, labels, threshold=threshold, top_k=top_k),
            knobs={"threshold": None, "top_k": dtop.TOP_K}, loss_kind="with head loss",  # None: 0.9 (0.95: 24 blocks)
        ),
        map_ops=[{"threshold": 0.9}, {"threshold": 0.7}], swept="threshold",
        knob_choices={"batching": BATCHINGS},
        knob_help={"threshold": "prune where P(class) x sigmoid(mask) is above this, in [0, 1] (default 0.9; 0.95 at 24 blocks)",
                   "layers": "pruning layers used, a subset of the trained ones (default 6, 8 of 12; 8, 16 of 24; 3, 4 of 6)",
                   "top_k": "the k best tokens of each class are never pruned (default 5)",
                   "batching": "how a ragged batch runs (default pad)"},
    ),
}


def fine_tuned(spec: MethodSpec, name: str, description: str, train_knobs: dict) -> MethodSpec:
    """``spec``, a method that runs on the baseline's weights, with weights of its own:
    fine-tuned from the baseline with its policy in place at the operating point
    ``train_knobs`` (part of the checkpoint's config hash), under the ``FineTune`` budget
    and the plain segmentation loss on the policy's output. Same knobs and sweep."""
    return replace(spec, name=name, description=description, fine_tune=FineTune(
        build=lambda seg, **_: seg,
        loss=lambda seg, images, labels, **knobs: references.segmentation_loss(
            seg, images, labels, policy=spec.make_policy(seg, **knobs)),
        knobs=dict(train_knobs),
    ))


# ALGM's paper trains with merging in place: at its default operating point (layers None:
# algm.default_layers of the model's depth)
METHODS["algm-ft"] = fine_tuned(
    METHODS["algm"], "algm-ft",
    "ALGM on weights fine-tuned from the baseline with ALGM merging in place (threshold 0.88, default layers)",
    {"threshold": 0.88, "layers": None},
)


PLUGIN_GROUP = "bench.methods"


def all_methods() -> dict[str, MethodSpec]:
    """The built-in methods, then those of installed plugins (``plugin_methods``)."""
    return {**METHODS, **plugin_methods()}


@functools.lru_cache(maxsize=None)
def plugin_methods() -> dict[str, MethodSpec]:
    """Methods registered under the entry-point group ``bench.methods``: each entry point
    names a MethodSpec, or a callable taking no arguments that returns one, and its name
    is the method's. Found on the first call, then cached (``plugin_methods.cache_clear()``
    looks again). A broken plugin is skipped with one line on stderr; the others load."""
    from importlib.metadata import entry_points

    try:
        found = entry_points(group=PLUGIN_GROUP)
    except TypeError:  # Python 3.9: a dict of groups
        found = entry_points().get(PLUGIN_GROUP, [])
    plugins: dict[str, MethodSpec] = {}
    for ep in found:
        try:
            spec = _load_plugin(ep, plugins)
        except Exception as e:  # noqa: BLE001 (a plugin may fail in any way; the others still load)
            reason = (str(e).splitlines() or [""])[0]
            if not isinstance(e, PluginError):
                reason = f"{type(e).__name__}: {reason}"
            print(f"warning: skipped method plugin {ep.name!r} ({ep.value}): {reason}", file=sys.stderr)
            continue
        plugins[spec.name] = spec
    return plugins


class PluginError(Exception):
    """Why an entry point of ``bench.methods`` is not a usable method."""


def _load_plugin(ep, loaded: dict) -> MethodSpec:
    if ep.name in METHODS:
        raise PluginError("the name clashes with a built-in method (the built-in is kept)")
    if ep.name in loaded:
        raise PluginError("another plugin already registered that name")
    spec = ep.load()
    if callable(spec) and not isinstance(spec, MethodSpec):
        spec = spec()
    if not isinstance(spec, MethodSpec):
        raise PluginError(f"expected a MethodSpec or a callable returning one, got {type(spec).__name__}")
    if spec.name != ep.name:
        raise PluginError(f"the entry point's name must be the method's, got MethodSpec name {spec.name!r}")
    return spec

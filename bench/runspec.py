"""What a run is, before anything runs: its options (``RunOptions``), the training
configurations and checkpoint names they imply, the operating points and the identity
of each point's record. No training, no evaluation: ``bench.planning`` checks and plans
with these, ``bench.runner`` executes them."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from bench import datasets
from bench.errors import BenchError
from bench.protocol import EvalSettings, compile_identity
from bench.train import TrainConfig, load_checkpoint
from methods import METHODS, MethodSpec, all_methods
from methods.segmenter import build_model, model_config


@dataclass
class RunOptions:
    method: str = "baseline"
    dataset: str = "synthetic"
    ops: Optional[list] = None  # knob dicts; None = the method's default sweep
    model: Optional[str] = None  # model preset; None = the dataset's
    decoder: Optional[str] = None
    depth: Optional[int] = None  # encoder blocks; None = the preset's (the depth study cuts it)
    pretrained: bool = False
    weights: Optional[str] = None  # --weights: a trained baseline to import instead of training one
    weights_format: Optional[str] = None  # its layout (bench.weights.FORMATS); None: detected
    data_root: Optional[str] = None
    checkpoints: str = "checkpoints"
    results: str = "results"
    device: str = "cpu"
    threads: int = 2
    batch_size: int = 8  # throughput is measured at batch 1 and at this batch size
    seed: int = 0
    steps: Optional[int] = None  # training budget; None = the dataset preset's
    replace: bool = False
    limit: Optional[int] = None  # evaluate on the first N validation images only
    timing_images: int = 32
    warmup: int = 2
    repeats: int = 5
    progress: bool = True
    extra: dict = field(default_factory=dict)
    dataset_name: Optional[str] = None  # --name: what a folder dataset is called (default: its bench.json's)
    precision: str = "fp32"  # evaluation and timing: fp32, tf32, bf16, fp16
    train_precision: str = "fp32"  # training (bench.train.train_precision): fp32, tf32, bf16
    compile: bool = False  # torch.compile the blocks and decoder for evaluation and timing
    compile_mode: str = "default"  # torch.compile's mode with ``compile`` (protocol.COMPILE_MODES)
    compile_backend: Optional[object] = None  # None: $BENCH_COMPILE_BACKEND or inductor (tests: a cheap one)
    tensorboard: bool = False  # training also writes TensorBoard events beside its JSONL log
    deterministic: bool = False  # training: deterministic algorithms only (bench.train_precision)


def get_method(name: str) -> MethodSpec:
    if name in METHODS:  # a built-in: no need to look for plugins
        return METHODS[name]
    known = all_methods()
    if name not in known:
        raise BenchError(f"unknown method {name!r}; expected one of: {', '.join(known)}")
    return known[name]


def dataset_spec(opts: RunOptions) -> datasets.DatasetSpec:
    return datasets.get_spec(opts.dataset, opts.data_root, opts.dataset_name)


def parse_op(method: MethodSpec, text: str) -> dict:
    """'tau=0.2' or 'tau=0.1,0.2,0.3 layers=2,4' -> knob dict, typed by the method."""
    knobs = {}
    known = ", ".join(method.knob_types) or "none"
    if not text.replace(";", " ").split():
        raise BenchError(f"bad --op {text!r} for {method.name}: expected key=value with keys: {known} "
                         "(without --op, the method's default sweep runs)")
    for part in text.replace(";", " ").split():
        key, sep, value = part.partition("=")
        if not sep or key not in method.knob_types:
            raise BenchError(f"bad --op {text!r} for {method.name}: expected key=value with keys: {known}")
        if key in knobs:
            raise BenchError(f"bad --op {text!r}: {key} is given twice; expected each knob once")
        kind = method.knob_types[key]
        as_list = isinstance(kind, list)
        kind = kind[0] if as_list else kind
        try:
            items = [kind(v) for v in value.split(",")]
        except ValueError:
            raise BenchError(f"bad --op {text!r}: {key} expects {kind.__name__} values, got {value!r}") from None
        allowed = method.knob_choices.get(key)
        if allowed is not None and any(v not in allowed for v in items):
            raise BenchError(f"bad --op {text!r}: {key} must be one of {', '.join(map(str, allowed))}")
        if len(items) > 1 and not as_list and key not in method.per_layer_knobs:
            raise BenchError(f"bad --op {text!r}: {key} takes one value per --op; repeat --op for several "
                             f"(--op {key}={items[0]} --op {key}={items[1]})")
        if key == "layers" and len(set(items)) < len(items):
            twice = next(v for v in items if items.count(v) > 1)
            raise BenchError(f"bad --op {text!r}: layers lists {twice} twice; expected each layer once")
        knobs[key] = items if as_list or len(items) > 1 else items[0]
    return knobs


def train_config(opts: RunOptions, spec: datasets.DatasetSpec, method: str = "baseline", **over) -> TrainConfig:
    p = spec.preset
    overrides = {"decoder": opts.decoder or p.decoder}
    if opts.depth is not None:
        overrides["depth"] = opts.depth
    crop = p.crop_size
    if opts.weights is not None:  # the file's own model: trained size, tokens, numerics (bench.loading)
        from bench.loading import read_for_preset, preset_overrides

        overrides.update(preset_overrides(opts.weights, opts.weights_format, opts.model or p.model,
                                          overrides["decoder"]))
        crop = read_for_preset(opts.weights, opts.weights_format, opts.model or p.model,
                               overrides["decoder"])[1].crop or crop
    return TrainConfig(dataset=spec.name, num_classes=spec.num_classes, model=opts.model or p.model,
                       model_overrides=overrides, method=method, pretrained=opts.pretrained,
                       steps=opts.steps or p.steps, batch_size=p.batch_size, lr=p.lr,
                       crop_size=crop, scale_range=p.scale_range, seed=opts.seed,
                       optimizer=p.optimizer, weight_decay=p.weight_decay, precision=opts.train_precision, **over)


def checkpoint_path(opts: RunOptions, cfg: TrainConfig) -> Path:
    return Path(opts.checkpoints) / cfg.dataset / f"{cfg.method}-{cfg.model}-{cfg.hash()}.pt"


def new_model(cfg: TrainConfig):
    """The untrained model of ``cfg``, its initial weights a function of ``cfg.seed`` alone
    (``bench run`` and ``bench train`` start from the same weights, run after run)."""
    if cfg.model.startswith("timm:"):  # timm brings patch sizes (14) that no preset has: refused before building
        patch = _model_config(cfg).patch_size
        if cfg.crop_size % patch:
            raise BenchError(f"the training crop {cfg.crop_size} is not a multiple of {cfg.model}'s patch size "
                             f"{patch}; pick a model whose patch divides it")
    torch.manual_seed(cfg.seed)
    try:
        return build_model(cfg.num_classes, cfg.model, pretrained=cfg.pretrained, **cfg.model_overrides)
    except (ValueError, RuntimeError) as e:
        raise BenchError(str(e)) from None


def stored_checkpoint(opts: RunOptions, cfg: TrainConfig) -> Optional[dict]:
    """The payload of ``cfg``'s checkpoint when it is complete, else None."""
    path = checkpoint_path(opts, cfg)
    if path.exists():
        payload = load_checkpoint(path)
        if payload.get("done") and payload["config"].get("hash") == cfg.hash():
            return payload
    return None


def fine_tune_config(method: MethodSpec, base_cfg: TrainConfig, base_weights: str,
                     knobs: Optional[dict] = None) -> TrainConfig:
    """The configuration of ``method``'s fine-tuning from the baseline with these weights,
    for the operating point ``knobs`` where its training knobs pick the checkpoint
    (``FineTune.op_knobs``: shallow's depth)."""
    ft = method.fine_tune
    train_knobs = {k: knobs[k] for k in ft.op_knobs if k in (knobs or {})}
    other = ft.same_as(train_knobs, _model_depth(base_cfg)) if ft.same_as else None
    if other is not None:  # shallow at full depth is baseline-ft: one checkpoint
        return fine_tune_config(get_method(other), base_cfg, base_weights)
    return replace(base_cfg, method=method.name, method_knobs={**ft.knobs, **train_knobs}, init_from=base_weights,
                   steps=max(1, round(base_cfg.steps * ft.steps_fraction)), lr=base_cfg.lr * ft.lr_factor,
                   warmup_steps=min(base_cfg.warmup_steps, 50))


def _model_config(cfg: TrainConfig):
    """The model shape ``cfg`` trains; a bad preset or override is a one-line error."""
    try:
        return model_config(cfg.model, **cfg.model_overrides)
    except (TypeError, ValueError) as e:
        raise BenchError(str(e)) from None


def _model_depth(cfg: TrainConfig) -> int:
    return _model_config(cfg).depth


def eval_tokens(spec: datasets.DatasetSpec, patch_size: int, val, window: Optional[int] = None) -> int:
    """Tokens per forward at evaluation: a window's (sliding windows; ``window``, default
    the preset's), or the first validation image's after the dataset's resize (whole images)."""
    p = spec.preset
    if p.eval_mode == "slide":
        return (-(-(window or p.window) // patch_size)) ** 2
    H, W = val[0][0].shape[-2:]
    if p.resize_short:
        f = p.resize_short / min(H, W)
        H, W = max(1, round(H * f)), max(1, round(W * f))
    return -(-H // patch_size) * -(-W // patch_size)


def operating_points(opts: RunOptions, method: MethodSpec, spec: datasets.DatasetSpec, val=None) -> list[dict]:
    """``opts.ops``, or the method's default sweep for this model and input (ToMe's r
    follows the tokens per forward, shallow's depths the model's depth)."""
    if opts.ops is not None:
        return list(opts.ops)
    if method.default_ops_for is None:
        return list(method.default_ops)
    config = _model_config(train_config(opts, spec))
    val = val if val is not None else datasets.open_dataset(opts.dataset, spec.preset.val_split, opts.data_root)
    return method.sweep(config.depth, eval_tokens(spec, config.patch_size, val, _settings(spec, opts).window))


def checkpoint_groups(method: MethodSpec, ops: list[dict]) -> list[list[dict]]:
    """``ops`` grouped by the checkpoint they run on, in order: one group unless the
    method's training knobs vary between them (shallow: one per depth)."""
    keys = method.fine_tune.op_knobs if method.fine_tune is not None else ()
    groups: dict = {}
    for knobs in ops:
        groups.setdefault(repr([knobs.get(k) for k in keys]), []).append(knobs)
    return list(groups.values())


def _settings(spec: datasets.DatasetSpec, opts: RunOptions) -> EvalSettings:
    p = spec.preset
    window, stride = p.window, p.stride
    if opts.weights is not None and p.eval_mode == "slide":  # an imported model at its own grid
        from bench.loading import native_window

        window, stride = native_window(opts.weights, opts.weights_format, opts.model or p.model,
                                       opts.decoder or p.decoder, window, stride)
    return EvalSettings(p.eval_mode, window, stride, opts.batch_size, opts.device, p.resize_short,
                        precision=opts.precision, compile=opts.compile, compile_backend=opts.compile_backend,
                        compile_mode=opts.compile_mode)


def eval_images(opts: RunOptions, val) -> int:
    """How many validation images are evaluated (``--limit`` caps the split)."""
    return len(val) if opts.limit is None else min(opts.limit, len(val))


def point_identity(opts: RunOptions, spec, method: str, knobs: dict, checkpoint: Optional[str], images: int,
                   scale: float, data_fingerprint: Optional[str] = None) -> dict:
    """The fields that identify a record of this operating point (``bench.results``):
    whatever changes its numbers. The one place they are built: the record carries them,
    and the resume checks (``run``, ``pending_ops``) look them up. ``data_fingerprint``:
    the evaluated split's (``bench.datasets.fingerprint``), None for a split in memory."""
    settings = _settings(spec, opts)
    return {"method": method, "knobs": knobs, "dataset": spec.name, "split": spec.preset.val_split,
            "checkpoint": checkpoint, "images": images, "device": opts.device, "precision": opts.precision,
            "batch_sizes": sorted({1, opts.batch_size}), **compile_identity(opts),
            **({"data_fingerprint": data_fingerprint} if data_fingerprint is not None else {}),
            "eval": {"mode": settings.mode, "window": settings.window, "stride": settings.stride, "scale": scale}}


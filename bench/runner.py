"""One row of the comparison, callable from Python: ``run(RunOptions(...))``.

Obtains the checkpoints (training them if missing), evaluates the method at its
operating points and the baseline in the same process, times both the same way, and
appends one record per operating point to the results store. The CLI only parses
options and calls ``run``/``train_checkpoint``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bench import datasets, distributed
from bench.errors import BenchError
from bench.flops import FlopModel
from bench.protocol import (EvalSettings, attach_labels, check_execution, evaluate, predict, speed_entry,
                            time_methods)
from bench.results import SCHEMA_VERSION, ResultsStore, op_label
from bench.train import TrainConfig, load_checkpoint, train
from methods import CONTROL, METHODS, MethodSpec, all_methods
from methods.encoder import Policy
from methods.segmenter import build_model, model_config

REPO = Path(__file__).resolve().parent.parent
PRECISION = "float32"  # the weights' dtype; --precision (RunOptions.precision) is what forwards compute in


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
    precision: str = "fp32"  # evaluation and timing (training is fp32): fp32, tf32, bf16, fp16
    compile: bool = False  # torch.compile the blocks and decoder for evaluation and timing
    compile_backend: Optional[object] = None  # None: $BENCH_COMPILE_BACKEND or inductor (tests: a cheap one)


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
        knobs[key] = items if as_list or len(items) > 1 else items[0]
    return knobs


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The host CPU's model name ("AMD EPYC 7763 64-Core Processor"), not just "x86_64"."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass  # not Linux
    return platform.processor() or platform.machine() or "unknown"


def environment(device: str, threads: int) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    import timm
    from importlib.metadata import version

    cpu = cpu_name()
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu
    return {
        "device": device,
        "device_name": name,
        "cpu_name": cpu,  # the host matters on a GPU too (data, launch overheads)
        "dtype": PRECISION,  # the weights'; kept for readers of older records; `precision` is the field
        "threads": threads,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "fvcore": version("fvcore"),
                     "python": platform.python_version()},
        # A source copy without .git (a cluster or a device machine) names its commit in
        # BENCH_GIT_COMMIT. Dirty means uncommitted code: stored results, reports and
        # Markdown do not count.
        "git_commit": git("rev-parse", "HEAD") or os.environ.get("BENCH_GIT_COMMIT") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                              ":(exclude)results", ":(exclude)reports", ":(exclude)*.md")),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def train_config(opts: RunOptions, spec: datasets.DatasetSpec, method: str = "baseline", **over) -> TrainConfig:
    p = spec.preset
    overrides = {"decoder": opts.decoder or p.decoder}
    if opts.depth is not None:
        overrides["depth"] = opts.depth
    return TrainConfig(dataset=spec.name, num_classes=spec.num_classes, model=opts.model or p.model,
                       model_overrides=overrides, method=method, pretrained=opts.pretrained,
                       steps=opts.steps or p.steps, batch_size=p.batch_size, lr=p.lr,
                       crop_size=p.crop_size, scale_range=p.scale_range, seed=opts.seed,
                       optimizer=p.optimizer, weight_decay=p.weight_decay, **over)


def checkpoint_path(opts: RunOptions, cfg: TrainConfig) -> Path:
    return Path(opts.checkpoints) / cfg.dataset / f"{cfg.method}-{cfg.model}-{cfg.hash()}.pt"


def new_model(cfg: TrainConfig):
    """The untrained model of ``cfg``, its initial weights a function of ``cfg.seed`` alone
    (``bench run`` and ``bench train`` start from the same weights, run after run)."""
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


def train_checkpoint(opts: RunOptions, cfg: TrainConfig, model=None, **train_kwargs):
    """The trained model for ``cfg``: loaded when its checkpoint is complete, trained
    (or resumed) otherwise. Returns (model, checkpoint payload). Under torchrun every
    process calls it and trains its share of each batch (``bench.train``)."""
    device = distributed.setup(opts.device)
    model = model if model is not None else new_model(cfg)
    payload = stored_checkpoint(opts, cfg)
    if payload is not None:
        model.load_state_dict(payload["model"])
        return model.eval(), payload
    dataset = datasets.open_dataset(opts.dataset, "train", opts.data_root)
    payload = train(model, dataset, cfg, checkpoint_path(opts, cfg), device=device, progress=opts.progress,
                    **train_kwargs)
    return model.eval(), payload


def imported_baseline(opts: RunOptions, cfg: TrainConfig):
    """The baseline of ``cfg`` with the weights of ``opts.weights`` (``bench.weights``):
    (model, payload). The payload is a checkpoint's, never trained: step 0, ``weights``
    the hash of the loaded state dict, ``source`` where it came from."""
    from bench.released import find_released
    from bench.weights import load_into, read_weights

    if cfg.pretrained:
        raise BenchError("--weights and --pretrained exclude each other: the imported weights replace ImageNet's")
    stat = Path(opts.weights).stat() if Path(opts.weights).is_file() else None
    key = (str(Path(opts.weights).resolve()), stat and (stat.st_size, stat.st_mtime_ns), opts.weights_format,
           cfg.hash(), json.dumps(cfg.model_overrides, sort_keys=True))
    if _IMPORTED.get("key") != key:  # validate, plan and run ask for it in turn: read the file once
        imported = read_weights(opts.weights, opts.weights_format)
        model = new_model(cfg)
        weights = load_into(model, imported, preset=cfg.model, num_classes=cfg.num_classes, dataset=cfg.dataset)
        config = _model_config(cfg)
        released = find_released(imported.path, cfg.dataset, imported.sha256, cfg.model, config.decoder)
        source = imported.describe(released.key if released else None)
        _IMPORTED.clear()
        _IMPORTED.update(key=key, state={k: v.clone() for k, v in model.state_dict().items()}, weights=weights,
                         source=source)
    model = new_model(cfg)
    model.load_state_dict(_IMPORTED["state"])
    payload = {"model": _IMPORTED["state"], "step": 0, "done": True, "weights": _IMPORTED["weights"],
               "config": {"method": "baseline", "imported": True, "hash": None}, "source": _IMPORTED["source"]}
    return model.eval(), payload


_IMPORTED: dict = {}  # the last import (``imported_baseline``)


def baseline_checkpoint(opts: RunOptions, cfg: TrainConfig):
    """The baseline: imported (``--weights``) or trained (``train_checkpoint``)."""
    if opts.weights is not None:
        return imported_baseline(opts, cfg)
    return train_checkpoint(opts, cfg)


def stored_baseline(opts: RunOptions, cfg: TrainConfig) -> Optional[dict]:
    """The baseline's payload when there is one without training (imported or stored)."""
    if opts.weights is not None:
        return imported_baseline(opts, cfg)[1]
    return stored_checkpoint(opts, cfg)


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


def fine_tune(opts: RunOptions, method: MethodSpec, spec: datasets.DatasetSpec, base_cfg: TrainConfig,
              base_model, base_payload: dict, knobs: Optional[dict] = None):
    """The method's fine-tuned model (for the operating point ``knobs`` where its
    checkpoint depends on them), trained from the baseline weights if missing."""
    cfg = fine_tune_config(method, base_cfg, base_payload["weights"], knobs)
    ft = get_method(cfg.method).fine_tune  # the method whose checkpoint it is (same_as)
    segmenter = new_model(base_cfg)
    segmenter.load_state_dict(base_model.state_dict())
    try:
        trainable = ft.build(segmenter, **cfg.method_knobs)
    except (TypeError, ValueError) as e:
        raise BenchError(f"bad operating point {knobs or {}} for {method.name}: {e}") from None
    loss = lambda m, images, labels: ft.loss(m, images, labels, **cfg.method_knobs)  # noqa: E731
    return train_checkpoint(opts, cfg, model=trainable, loss_fn=loss)


def _model_config(cfg: TrainConfig):
    """The model shape ``cfg`` trains; a bad preset or override is a one-line error."""
    try:
        return model_config(cfg.model, **cfg.model_overrides)
    except (TypeError, ValueError) as e:
        raise BenchError(str(e)) from None


def _model_depth(cfg: TrainConfig) -> int:
    return _model_config(cfg).depth


def eval_tokens(spec: datasets.DatasetSpec, patch_size: int, val) -> int:
    """Tokens per forward at evaluation: a window's (sliding windows), or the first
    validation image's after the dataset's resize (whole images)."""
    p = spec.preset
    if p.eval_mode == "slide":
        return (-(-p.window // patch_size)) ** 2
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
    return method.sweep(config.depth, eval_tokens(spec, config.patch_size, val))


def checkpoint_groups(method: MethodSpec, ops: list[dict]) -> list[list[dict]]:
    """``ops`` grouped by the checkpoint they run on, in order: one group unless the
    method's training knobs vary between them (shallow: one per depth)."""
    keys = method.fine_tune.op_knobs if method.fine_tune is not None else ()
    groups: dict = {}
    for knobs in ops:
        groups.setdefault(repr([knobs.get(k) for k in keys]), []).append(knobs)
    return list(groups.values())


def train_method(opts: RunOptions) -> list[dict]:
    """``bench train``: the baseline checkpoint, then the method's fine-tune(s) from it
    (shallow: one per depth of ``opts.ops`` or of its default sweep). Checks everything
    it can first. Returns the payloads of the method's checkpoints."""
    method = get_method(opts.method)
    if method.fine_tune is None and method.name != "baseline":
        raise BenchError(f"{method.name} uses the baseline's weights; there is nothing of its own to train")
    spec = dataset_spec(opts)
    ops = operating_points(opts, method, spec) if method.fine_tune is not None else []
    validate(opts, spec, ops=[], results=False, train_ops=ops)
    torch.set_num_threads(opts.threads)
    base_cfg = train_config(opts, spec)
    base_model, base_payload = baseline_checkpoint(opts, base_cfg)
    if method.fine_tune is None:
        return [base_payload]
    return [fine_tune(opts, method, spec, base_cfg, base_model, base_payload, group[0])[1]
            for group in checkpoint_groups(method, ops)]


def control_reference(opts: RunOptions, spec: datasets.DatasetSpec, base_cfg: TrainConfig, base_model,
                      base_payload: dict, evaluate_it) -> dict:
    """The equal-budget control (``baseline-ft``): its checkpoint, trained if missing, and
    its mIoU (``evaluate_it(model)``: the run's evaluation, with the full model's policy)."""
    model, payload = fine_tune(opts, get_method(CONTROL), spec, base_cfg, base_model, base_payload)
    return {"checkpoint": payload.get("weights"), "miou": evaluate_it(model.to(opts.device).eval())["miou"]}


def control_fields(miou: float, control: Optional[dict]) -> dict:
    """A record's comparison with the equal-budget control (none for methods that run on
    the baseline's weights)."""
    if control is None:
        return {}
    return {"control_checkpoint": control["checkpoint"], "control_miou": control["miou"],
            "miou_delta_control": miou - control["miou"]}


# ---- what can be checked before any training ----------------------------------------

def check_device(device: str, here: bool = True) -> None:
    """``device`` names cpu, cuda or cuda:N; ``here``: and this machine has it."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda") or (d.type == "cpu" and d.index not in (None, 0)):
        raise BenchError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if here and d.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {device}: CUDA is not available on this machine")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise BenchError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def check_folder(path, what: str, need_bytes: int = 0) -> None:
    """``path`` exists as a writable folder or can be made one, with ``need_bytes`` free
    on its disk. Creates nothing (a dry run calls it too)."""
    path = Path(path)
    there = path
    while not there.exists() and there != there.parent:  # the ancestor it would be made in
        there = there.parent
    if not there.is_dir():
        raise BenchError(f"{what} {path}: {there} is not a folder")
    if not os.access(there, os.W_OK | os.X_OK):
        raise BenchError(f"{what} {path}: {there} is not writable")
    free = shutil.disk_usage(there).free
    if free < need_bytes:
        raise BenchError(f"{what} {path}: {free / 2**20:.0f} MiB free on its disk; the checkpoints to train "
                         f"need about {need_bytes / 2**20:.0f} MiB")


def _checkpoint_bytes(model: torch.nn.Module, optimizer: str) -> int:
    """About what a checkpoint of ``model`` takes: its weights plus the optimizer's state
    (AdamW: two moments per trained parameter; SGD: one momentum)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + trained * (2 if optimizer == "adamw" else 1) + 2**20


def _probe_image(spec: datasets.DatasetSpec, val) -> torch.Tensor:
    """A zero uint8 image of the evaluation size: one window, or the first validation image's size."""
    p = spec.preset
    if p.eval_mode == "slide":
        return torch.zeros(1, 3, p.window, p.window, dtype=torch.uint8)
    return torch.zeros(1, *val[0][0].shape, dtype=torch.uint8)


def _untrained(opts: RunOptions, spec: datasets.DatasetSpec, method: MethodSpec, knobs: Optional[dict] = None):
    """(segmenter, trainable) of the configured shape, untrained: the method's trainable
    module for the operating point ``knobs`` (shallow: cut to its depth)."""
    cfg = replace(train_config(opts, spec), pretrained=False)  # same shapes, no download
    segmenter = new_model(cfg)
    if method.fine_tune is None:
        return segmenter, segmenter
    ft = method.fine_tune
    train_knobs = {k: (knobs or {})[k] for k in ft.op_knobs if k in (knobs or {})}
    try:
        return segmenter, ft.build(new_model(cfg), **ft.knobs, **train_knobs)
    except (TypeError, ValueError, RuntimeError) as e:
        which = f"{method.name} {op_label(train_knobs)}" if train_knobs else method.name
        raise BenchError(f"{which} cannot be built on {cfg.model} with {segmenter.depth} blocks: "
                         f"{_first_line(e)}") from None


def check_ops(opts: RunOptions, spec: datasets.DatasetSpec, method: MethodSpec, ops: list, val=None):
    """Builds an untrained model of the configured shape (and the method's trainable
    module), makes every operating point's policy and runs one forward under each on a
    zero image of the evaluation size (static's scale included): a knob that does not fit
    the model or the input fails here, in seconds, not after the training. Returns
    (segmenter, trainable) for the caller's size estimates."""
    segmenter, trained = _untrained(opts, spec, method, ops[0] if ops else None) if (
        ops or not (method.fine_tune and method.fine_tune.op_knobs)) else (None, None)
    if segmenter is None:  # a checkpoint per operating point, none given: size it as the full model
        segmenter = trained = new_model(replace(train_config(opts, spec), pretrained=False))
    settings = replace(_settings(spec, opts), device="cpu", batch_size=1, precision="fp32", compile=False)
    image = _probe_image(spec, val) if ops else None
    for knobs in ops:
        if method.fine_tune is not None and method.fine_tune.op_knobs:
            _, trained = _untrained(opts, spec, method, knobs)  # its own checkpoint's shape
        model = getattr(trained, "segmenter", trained).eval()
        try:
            policy = method.make_policy(trained, **knobs)
            scale = method.input_scale(knobs)
            attach_labels(policy, torch.zeros(image.shape[0], *image.shape[2:], dtype=torch.long), settings, scale)
            with torch.inference_mode():
                predict(model, policy, image, settings, scale=scale)
        except (TypeError, ValueError, RuntimeError, BenchError) as e:
            raise BenchError(f"bad operating point {op_label(knobs)} for {method.name} on {spec.name} "
                             f"({train_config(opts, spec).model}, {model.depth} blocks, {image.shape[-2]}x{image.shape[-1]} input): "
                             f"{_first_line(e)}") from None
    return segmenter, trained


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def validate(opts: RunOptions, spec: Optional[datasets.DatasetSpec] = None, ops: Optional[list] = None, val=None,
             *, device_here: bool = True, results: bool = True, train_ops: Optional[list] = None) -> list[dict]:
    """Everything about a run that can be checked before training, in seconds: the
    device, threads and batch size, the operating points (none repeated; each one made
    and run once on an untrained model, ``check_ops``), and that the checkpoint folder
    (with room for what must be trained) and the results folder can be written.
    ``ops``: None for the method's default sweep; ``val``: the validation split (for the
    image size of whole-image evaluation; opened when needed); ``train_ops``: the points
    whose checkpoints must be trained (default: ``ops``). Returns the ``training_plan``."""
    check_device(opts.device, here=device_here)
    if opts.threads < 1 or opts.batch_size < 1:
        raise BenchError("--threads and --batch-size must be at least 1")
    check_execution(opts.precision, opts.device, opts.compile, opts.compile_backend, probe=device_here)
    method = get_method(opts.method)
    spec = spec or dataset_spec(opts)
    if ops is None:
        val = val if val is not None else datasets.open_dataset(opts.dataset, spec.preset.val_split, opts.data_root)
        ops = operating_points(opts, method, spec, val)
    seen = set()
    for knobs in ops:
        key = json.dumps(knobs, sort_keys=True)
        if key in seen:
            raise BenchError(f"operating point {op_label(knobs)} of {method.name} is given twice; expected each once")
        seen.add(key)
    if ops and val is None and spec.preset.eval_mode == "whole":
        val = datasets.open_dataset(opts.dataset, spec.preset.val_split, opts.data_root)
    segmenter, trained = check_ops(opts, spec, method, ops, val)
    base_cfg = train_config(opts, spec)
    steps = training_plan(opts, method, base_cfg, ops if train_ops is None else train_ops)
    need = sum(_checkpoint_bytes(segmenter if t["method"] == "baseline" else trained, base_cfg.optimizer)
               for t in steps if t["state"] not in ("stored", "imported"))
    check_folder(opts.checkpoints, "checkpoint folder", need)
    if results:
        check_folder(opts.results, "results folder")
    return steps


# ---- what a run would do ------------------------------------------------------------

def training_plan(opts: RunOptions, method: MethodSpec, base_cfg: TrainConfig, ops: list) -> list[dict]:
    """The checkpoints a run of ``method`` at ``ops`` needs, in order: the baseline, the
    method's own (shallow: one per depth) and the equal-budget control it is compared
    with. Each: method, path (None while it depends on weights not trained yet), steps,
    step reached, state ("stored", "resume" or "train")."""
    plan = []

    def add(name, cfg, path) -> Optional[dict]:
        payload = load_checkpoint(path) if path is not None and path.exists() else None
        done = payload is not None and payload.get("done") and payload["config"].get("hash") == cfg.hash()
        step = payload["step"] if payload is not None else 0
        plan.append({"method": name, "path": None if path is None else str(path), "steps": cfg.steps, "step": step,
                     "state": "stored" if done else ("resume" if step else "train")})
        return payload if done else None

    if opts.weights is not None:  # imported: nothing to train
        base = stored_baseline(opts, base_cfg)
        plan.append({"method": "baseline", "path": str(opts.weights), "steps": 0, "step": 0, "state": "imported"})
    else:
        base = add("baseline", base_cfg, checkpoint_path(opts, base_cfg))
    if method.fine_tune is None:
        return plan
    wanted = [(method, group[0]) for group in checkpoint_groups(method, ops)] or [(method, None)]
    if method.name != CONTROL:  # a fine-tuned method's rows are compared with the control
        wanted.append((get_method(CONTROL), None))
    seen = set()
    for m, knobs in wanted:
        # before the baseline exists its weights are unknown: the fine-tune's name is not
        cfg = fine_tune_config(m, base_cfg, base["weights"] if base is not None else "", knobs)
        if cfg.hash() in seen:  # shallow at full depth is the control
            continue
        seen.add(cfg.hash())
        label = f"{cfg.method} {op_label(cfg.method_knobs)}" if cfg.method_knobs.get("depth") else cfg.method
        add(label, cfg, checkpoint_path(opts, cfg) if base is not None else None)
    return plan


def plan(opts: RunOptions, *, device_here: bool = True) -> dict:
    """What ``run(opts)`` would do, doing nothing (``--dry-run``): the checkpoints it would
    train (``training_plan``), the operating points and those not yet stored. Checks
    what ``validate`` checks."""
    method = get_method(opts.method)
    spec = dataset_spec(opts)
    ops = operating_points(opts, method, spec)
    steps = validate(opts, spec, ops, device_here=device_here)
    pending = pending_ops(opts)
    return {"method": method.name, "dataset": spec.name, "train": steps, "ops": ops,
            "pending": ops if pending is None else pending}


def describe_plan(p: dict) -> list[str]:
    """``plan``'s answer as lines of text."""
    lines = [f"{p['dataset']} / {p['method']}:"]
    for t in p["train"]:
        where = f" ({t['path']})" if t["path"] else " (named after the baseline's weights once it is trained)"
        what = {"stored": f"stored, {t['steps']} steps", "imported": "imported (--weights), not trained", "resume": f"would resume at step {t['step']} of {t['steps']}",
                "train": f"would train {t['steps']} steps"}[t["state"]]
        lines.append(f"  {t['method']} checkpoint: {what}{where}")
    pending = ", ".join(op_label(k) for k in p["pending"]) if p["pending"] else "none (every point is stored)"
    lines.append(f"  operating points: {len(p['ops'])}, pending {len(p['pending'])}: {pending}")
    return lines


def _settings(spec: datasets.DatasetSpec, opts: RunOptions) -> EvalSettings:
    p = spec.preset
    return EvalSettings(p.eval_mode, p.window, p.stride, opts.batch_size, opts.device, p.resize_short,
                        precision=opts.precision, compile=opts.compile, compile_backend=opts.compile_backend)


def pending_ops(opts: RunOptions) -> Optional[list]:
    """Operating points of ``opts`` not yet stored for its checkpoint and settings; None
    while a checkpoint it needs is not trained or the validation split cannot be opened
    (then nothing can be known). Cheap: no training, no evaluation."""
    method = get_method(opts.method)
    spec = dataset_spec(opts)
    base_cfg = train_config(opts, spec)
    base = stored_baseline(opts, base_cfg)
    if base is None:
        return None
    try:
        val = datasets.open_dataset(opts.dataset, spec.preset.val_split, opts.data_root)
    except BenchError:  # the data is not here (a launcher without it): the job will see
        return None
    ops = operating_points(opts, method, spec, val)
    checkpoints = []
    for knobs in ops:  # each operating point's checkpoint (shallow: one per depth)
        payload = base if method.fine_tune is None else stored_checkpoint(
            opts, fine_tune_config(method, base_cfg, base["weights"], knobs))
        if payload is None:
            return None
        checkpoints.append(payload["weights"])
    if opts.replace:
        return list(ops)
    store = ResultsStore(opts.results)
    images = eval_images(opts, val)
    return [k for k, weights in zip(ops, checkpoints) if not store.exists(
        point_identity(opts, spec, method.name, k, weights, images, method.input_scale(k)))]


def run(opts: RunOptions) -> list[dict]:
    """Evaluate one method on one dataset at its operating points; returns the records.

    Under torchrun every process trains and evaluates its share; rank 0 alone times
    throughput (the protocol is one process), writes the records and returns them, the
    others return [].
    """
    check_device(opts.device)
    check_execution(opts.precision, opts.device, probe=False)  # the compiler is probed in validate
    opts = replace(opts, device=distributed.setup(opts.device))
    method = get_method(opts.method)
    spec = dataset_spec(opts)
    if opts.threads < 1 or opts.batch_size < 1:
        raise BenchError("--threads and --batch-size must be at least 1")
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    env = environment(opts.device, opts.threads)  # the code as it is when the run starts
    val = datasets.open_dataset(opts.dataset, spec.preset.val_split, opts.data_root)
    ops = operating_points(opts, method, spec, val)
    validate(opts, spec, ops, val)  # before any training
    store = ResultsStore(opts.results)
    store.check_writable()
    groups = checkpoint_groups(method, ops)
    if len(groups) > 1:  # one checkpoint per group (shallow's depths): a run each, the baseline alongside
        return [record for group in groups for record in run(replace(opts, ops=group))]

    base_cfg = train_config(opts, spec)
    base_model, base_payload = baseline_checkpoint(opts, base_cfg)
    if method.fine_tune is not None:
        trained, payload = fine_tune(opts, method, spec, base_cfg, base_model, base_payload, ops[0] if ops else None)
    else:
        trained, payload = base_model, base_payload
    model = getattr(trained, "segmenter", trained)  # what the protocol runs
    policies = []
    for knobs in ops:
        try:
            policies.append((knobs, method.make_policy(trained, **knobs), method.input_scale(knobs)))
        except (TypeError, ValueError) as e:
            raise BenchError(f"bad operating point {knobs} for {method.name}: {e}") from None
    checkpoint = payload.get("weights")
    n_images = eval_images(opts, val)
    points = [point_identity(opts, spec, method.name, knobs, checkpoint, n_images, scale)
              for knobs, _, scale in policies]
    if not opts.replace:  # resume: operating points already stored are not measured again
        todo = [i for i, point in enumerate(points) if not store.exists(point)]
        todo = distributed.broadcast_object(todo)  # rank 0 decides for all
        policies, points = [policies[i] for i in todo], [points[i] for i in todo]
    if not policies:
        return []

    trained.to(opts.device).eval()  # the segmenter and the method's heads
    base_model.to(opts.device).eval()
    settings = _settings(spec, opts)
    common = dict(num_classes=spec.num_classes, limit=opts.limit, progress=opts.progress)

    base_policy = Policy()
    base_eval = evaluate(base_model, base_policy, val, settings, FlopModel(base_model, base_policy), **common)
    evals = [evaluate(model, policy, val, settings, FlopModel(model, policy), scale=scale, **common)
             for _, policy, scale in policies]
    control = None  # fine-tuned methods are also compared with the equal-budget control
    if method.name == CONTROL:
        control = {"checkpoint": checkpoint, "miou": evals[0]["miou"]}
    elif method.fine_tune is not None:
        control = control_reference(opts, spec, base_cfg, base_model, base_payload, lambda m: evaluate(
            m, base_policy, val, settings, FlopModel(m, base_policy), **common))
    if not distributed.is_main():  # timing is one process's job: wait for rank 0 to time and write
        distributed.barrier()
        return []

    items = [val[i] for i in range(min(opts.timing_images, len(val)))]
    timing, timing_labels = [image for image, _ in items], [label for _, label in items]
    if len({t.shape for t in timing}) == 1:  # else a list: images of different sizes (ADE20K)
        timing, timing_labels = torch.stack(timing), torch.stack(timing_labels)
    runs = {"baseline": (base_model, base_policy, 1.0)}
    runs.update({f"op{i}": (model, policy, scale) for i, (_, policy, scale) in enumerate(policies)})
    speeds = {}
    for bs in sorted({1, opts.batch_size}):
        speeds[bs] = time_methods(runs, timing, settings, batch_size=bs, warmup=opts.warmup, repeats=opts.repeats,
                                  labels=timing_labels)

    records = []
    for i, ((knobs, policy, scale), point, result) in enumerate(zip(policies, points, evals)):
        speed = {str(bs): speed_entry(timed, f"op{i}") for bs, timed in speeds.items()}
        record = {
            "schema_version": SCHEMA_VERSION,
            **point,  # identity: method, knobs, dataset, split, checkpoint and the settings
            "compile": opts.compile,
            "baseline_checkpoint": base_payload.get("weights"),
            **({"baseline_source": base_payload["source"]} if "source" in base_payload else {}),
            "model": base_cfg.model,
            "decoder": base_cfg.model_overrides["decoder"],
            "miou": result["miou"],
            "miou_delta": result["miou"] - base_eval["miou"],
            "baseline_miou": base_eval["miou"],
            **control_fields(result["miou"], control),
            "per_class_iou": dict(zip(spec.classes, result["per_class_iou"])),
            "gflops": result["gflops"],
            "gflops_ratio": result["gflops"]["mean"] / base_eval["gflops"]["mean"],
            "baseline_gflops": base_eval["gflops"]["mean"],
            "flops_unit": "GFLOPs (fvcore, MAC)",
            "tokens_per_block": result["tokens_per_block"],
            "speed": speed,
            "timing_images": len(timing),
            "seed": opts.seed,
            "train": {"steps": base_cfg.steps, "config_hash": payload["config"].get("hash")},
            **({"eval_processes": distributed.world_size()} if distributed.is_distributed() else {}),
            **env,
        }
        records.append(record)
    for record in records:
        store.append(record, replace=opts.replace)
    if method.map_ops:
        write_maps(opts, method, spec, trained, model, val)
    distributed.barrier()
    return records


def write_maps(opts: RunOptions, method: MethodSpec, spec, trained, model, val, count: int = 4) -> Path:
    """Where the method spent compute on a few validation images spread over the whole
    split (consecutive frames of a video would be near-duplicates), next to the results."""
    from bench.figures import pause_maps, spread_indices

    runs = [(" ".join([method.name] + [f"{k}={v}" for k, v in knobs.items()]), method.make_policy(trained, **knobs))
            for knobs in method.map_ops]
    indices = spread_indices(len(val), count)
    palette = getattr(val, "palette", None) or [tuple(np.random.default_rng(c).integers(0, 255, 3))
                                                 for c in range(spec.num_classes)]
    path = Path(opts.results) / "figures" / f"{spec.name}-{method.name}-compute-maps"
    return pause_maps(model, runs, val, indices, path, palette=palette, depth=model.depth, classes=spec.classes)


def eval_images(opts: RunOptions, val) -> int:
    """How many validation images are evaluated (``--limit`` caps the split)."""
    return len(val) if opts.limit is None else min(opts.limit, len(val))


def point_identity(opts: RunOptions, spec, method: str, knobs: dict, checkpoint: Optional[str], images: int,
                   scale: float) -> dict:
    """The fields that identify a record of this operating point (``bench.results``):
    whatever changes its numbers. The one place they are built: the record carries them,
    and the resume checks (``run``, ``pending_ops``) look them up."""
    settings = _settings(spec, opts)
    return {"method": method, "knobs": knobs, "dataset": spec.name, "split": spec.preset.val_split,
            "checkpoint": checkpoint, "images": images, "device": opts.device, "precision": opts.precision,
            "batch_sizes": sorted({1, opts.batch_size}), **({"compile": True} if opts.compile else {}),
            "eval": {"mode": settings.mode, "window": settings.window, "stride": settings.stride, "scale": scale}}

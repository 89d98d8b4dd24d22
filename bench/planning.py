"""What can be known before a run trains anything: the checks (``validate``: device,
operating points, folders and room), the checkpoints it needs (``training_plan``), the
dry run (``plan``) and the operating points not yet stored (``pending_ops``)."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from bench import datasets
from bench.errors import BenchError
from bench.imported import stored_baseline
from bench.train import check_train_precision
from bench.protocol import attach_labels, check_execution, predict
from bench.results import ResultsStore, op_label
from bench.runspec import (RunOptions, _model_config, _settings, checkpoint_groups, checkpoint_path, dataset_spec, eval_images,
                           fine_tune_config, get_method, new_model, operating_points, point_identity,
                           stored_checkpoint, train_config)
from bench.train import TrainConfig, load_checkpoint, log_path
from methods import CONTROL, MethodSpec


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


def check_folder(path, what: str, need_bytes: int = 0, needs: str = "the checkpoints to train") -> None:
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
        raise BenchError(f"{what} {path}: {free / 2**20:.0f} MiB free on its disk; {needs} "
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
            side = settings.resize_short or min(image.shape[-2:])
            if 0 < scale * side < model.patch_size:
                raise ValueError(f"scale {scale:g} shrinks the {side}-pixel side under one patch "
                                 f"({model.patch_size} px); the smallest scale that gives one patch is "
                                 f"{model.patch_size / side:.3g}")
            attach_labels(policy, torch.zeros(image.shape[0], *image.shape[2:], dtype=torch.long), settings, scale)
            with torch.inference_mode():
                predict(model, policy, image, settings, scale=scale)
        except (TypeError, ValueError, RuntimeError, BenchError) as e:
            listed = [k for k, v in knobs.items() if isinstance(v, list) and not isinstance(method.knob_types.get(k), list)
                      and k not in method.per_layer_knobs]
            if listed:  # a knob given several values: say how to ask for several points
                raise BenchError(f"bad operating point {op_label(knobs)} for {method.name}: {listed[0]} takes one "
                                 f"value per --op; repeat --op for several") from None
            raise BenchError(f"bad operating point {op_label(knobs)} for {method.name} on {spec.name} "
                             f"({train_config(opts, spec).model}, {model.depth} blocks, {image.shape[-2]}x{image.shape[-1]} input): "
                             f"{_first_line(e)}") from None
    return segmenter, trained


SEEDS = (-2**63, 2**64 - 1)  # what torch.manual_seed accepts


def check_seed(seed: int) -> None:
    """``--seed`` within the range torch's generators take."""
    if not SEEDS[0] <= seed <= SEEDS[1]:
        raise BenchError(f"--seed {seed}: expected a whole number from {SEEDS[0]} to {SEEDS[1]}")


def check_training_data(opts: RunOptions, spec: datasets.DatasetSpec, base_cfg: TrainConfig) -> None:
    """What training needs of the data, before its first step: crops a whole number of
    patches, a rescale that leaves crops with labelled pixels (the first image's size),
    and every training label a value its class table knows."""
    from bench.datasets.fingerprint import check_labels

    patch = _model_config(base_cfg).patch_size
    crop = base_cfg.crop_size
    if crop < patch or crop % patch:
        raise BenchError(f"{spec.name}: crop_size {crop} must be a multiple of the model's patch size {patch} "
                         f"(e.g. {max(patch, crop - crop % patch)})")
    train = datasets.open_dataset(opts.dataset, "train", opts.data_root)
    H, W = train[0][1].shape[-2:]
    short = getattr(train, "train_short_side", None) or min(H, W)
    hi = max(base_cfg.scale_range)
    if hi * short < patch:
        raise BenchError(f"{spec.name}: scale_range {list(base_cfg.scale_range)} shrinks the training images "
                         f"(short side {short}) under one patch ({patch} px), so crops hold almost no labelled "
                         f"pixels; expected a high end of at least {patch / short:.3g}")
    check_labels(train)


def check_outputs(opts: RunOptions, spec: datasets.DatasetSpec, method: MethodSpec, steps: list[dict],
                  need: int, results: bool) -> None:
    """Every path a run writes, before it writes any: the checkpoint subfolder of the
    dataset (room for the checkpoints plus the temporary copy a save makes), each
    checkpoint and training log to train (not a folder), the results folder and file
    (room for the new records) and the compute maps' folder."""
    folder = Path(opts.checkpoints) / spec.name
    check_folder(folder, "checkpoint folder", need)
    for t in steps:
        if t["state"] in ("train", "resume") and t["path"]:
            for path, what in ((Path(t["path"]), "checkpoint"), (log_path(Path(t["path"])), "training log")):
                if path.is_dir():
                    raise BenchError(f"{what} {path} is a folder; expected a file (or nothing) there")
    if not results:
        return
    store = ResultsStore(opts.results)
    file = store.path_for(spec.name)
    size = file.stat().st_size if file.is_file() else 0
    check_folder(opts.results, "results folder", 2 * size + 2**20, "the results file, its rewritten copy and the new records")
    if file.exists() and not file.is_file():
        raise BenchError(f"results file {file} is not a file; expected a JSON-lines file (or nothing) there")
    if file.is_file() and not os.access(file, os.W_OK):
        raise BenchError(f"results file {file} is not writable")
    if method.map_ops:
        check_folder(Path(opts.results) / "figures", "compute-map folder")


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
    check_seed(opts.seed)
    if opts.threads < 1 or opts.batch_size < 1:
        raise BenchError("--threads and --batch-size must be at least 1")
    check_execution(opts.precision, opts.device, opts.compile, opts.compile_backend, probe=device_here,
                    compile_mode=opts.compile_mode)
    check_train_precision(opts.train_precision, opts.device)
    if opts.tensorboard:
        from bench.provenance import check_tensorboard

        check_tensorboard()
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
    sizes = [_checkpoint_bytes(segmenter if t["method"] == "baseline" else trained, base_cfg.optimizer)
             for t in steps if t["state"] not in ("stored", "imported")]
    check_outputs(opts, spec, method, steps, sum(sizes) + max(sizes, default=0), results)  # + a save's temp copy
    if sizes:
        check_training_data(opts, spec, base_cfg)
    if results and ops:
        from bench.datasets.fingerprint import check_labels

        check_labels(val if val is not None else datasets.open_dataset(opts.dataset, spec.preset.val_split,
                                                                        opts.data_root), opts.limit)
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
    from bench.datasets.fingerprint import fingerprint

    data = fingerprint(val, opts.limit)
    return [k for k, weights in zip(ops, checkpoints) if not store.exists(
        point_identity(opts, spec, method.name, k, weights, images, method.input_scale(k), data))]


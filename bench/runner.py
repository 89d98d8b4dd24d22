"""One row of the comparison, callable from Python: ``run(RunOptions(...))``.

Obtains the checkpoints (training them if missing), evaluates the method at its
operating points and the baseline in the same process, times both the same way, and
appends one record per operating point to the results store. The CLI only parses
options and calls ``run``/``train_checkpoint``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bench import datasets, distributed, per_image
from bench.datasets.fingerprint import fingerprint
from bench.errors import BenchError
from bench.flops import FlopModel, PriceCache
from bench.imported import imported_baseline, stored_baseline  # noqa: F401 (part of the runner's API)
from bench.opcount import parameter_count
from bench.planning import (check_device, check_folder, check_seed, check_ops, describe_plan, pending_ops, plan,  # noqa: F401
                            training_plan, validate)
from bench.protocol import check_execution, evaluate
from bench.provenance import full_config, write_config
from bench.results import SCHEMA_VERSION, ResultsStore
from bench.runspec import (RunOptions, _model_config, _model_depth, _settings, checkpoint_groups,  # noqa: F401
                           checkpoint_path, dataset_spec, eval_images, eval_tokens, fine_tune_config, get_method,
                           new_model, operating_points, parse_op, point_identity, stored_checkpoint, train_config)
from bench.timing import speed_entry, time_methods
from bench.train import TrainConfig, load_checkpoint, train
from methods import CONTROL, MethodSpec
from methods.encoder import Policy
from methods.segmenter import model_numerics

REPO = Path(__file__).resolve().parent.parent
PRECISION = "float32"  # the weights' dtype; --precision (RunOptions.precision) is what forwards compute in


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

    def installed(package):  # a pure-Python copy on PYTHONPATH has no metadata: its __version__
        try:
            return version(package)
        except Exception:  # noqa: BLE001 - PackageNotFoundError, or a broken install
            return getattr(__import__(package), "__version__", "unknown")

    cpu = cpu_name()
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(device) if cuda else cpu
    gpu = {"cuda_version": torch.version.cuda, "cudnn_version": torch.backends.cudnn.version()} if cuda else {}
    return {
        "device": device,
        "device_name": name,
        "cpu_name": cpu,  # the host matters on a GPU too (data, launch overheads)
        "dtype": PRECISION,  # the weights'; kept for readers of older records; `precision` is the field
        "threads": threads,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "fvcore": installed("fvcore"),
                     "python": platform.python_version(), **gpu},
        # A source copy without .git (a cluster or a device machine) names its commit in
        # BENCH_GIT_COMMIT. Dirty means uncommitted code: stored results, reports and
        # Markdown do not count.
        "git_commit": git("rev-parse", "HEAD") or os.environ.get("BENCH_GIT_COMMIT") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                              ":(exclude)results", ":(exclude)reports", ":(exclude)*.md")),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def train_checkpoint(opts: RunOptions, cfg: TrainConfig, model=None, **train_kwargs):
    """The trained model for ``cfg``: loaded when its checkpoint is complete, trained
    (or resumed) otherwise. Returns (model, checkpoint payload). Under torchrun every
    process calls it and trains its share of each batch (``bench.train``)."""
    device = distributed.setup(opts.device)
    model = model if model is not None else new_model(cfg)
    dataset = datasets.open_dataset(opts.dataset, "train", opts.data_root)
    provenance = {"train_fingerprint": fingerprint(dataset), "threads": torch.get_num_threads()}
    path = checkpoint_path(opts, cfg)
    with training_lock(opts, path):  # a second process waits, then finds the checkpoint done
        payload = stored_checkpoint(opts, cfg)
        if payload is None and path.exists():  # a partial one, resumed below: same data only
            check_same_data(path, load_checkpoint(path), provenance["train_fingerprint"])
        if payload is not None:
            check_same_data(path, payload, provenance["train_fingerprint"])
            if payload.get("threads") not in (None, provenance["threads"]) and distributed.is_main():
                print(f"note: reusing {path.name}, trained with {payload['threads']} thread(s); this run uses "
                      f"{provenance['threads']} (CPU training rounds differently per thread count)")
            model.load_state_dict(payload["model"])
            payload.setdefault("train_config", full_config(cfg))  # stored before checkpoints held it
            if distributed.is_main():
                write_config(path, cfg)
            return model.eval(), payload
        payload = train(model, dataset, cfg, path, device=device, progress=opts.progress,
                        provenance={k: v for k, v in provenance.items() if v is not None},
                        tensorboard=opts.tensorboard, deterministic=opts.deterministic, **train_kwargs)
    return model.eval(), payload


def check_same_data(path: Path, payload: dict, current: Optional[str]) -> None:
    """A checkpoint trained on other training data is refused (never overwritten); one
    stored before fingerprints were (none stored) is taken as it is."""
    stored = payload.get("train_fingerprint")
    if stored is not None and current is not None and stored != current:
        raise BenchError(f"checkpoint {path} was trained on a training split with fingerprint {stored}; the split "
                         f"now has {current} (its files changed): move the checkpoint away or use another "
                         "--checkpoints folder to train on the new data")


@contextlib.contextmanager
def training_lock(opts: RunOptions, path: Path):
    """One process trains a checkpoint at a time (``<checkpoints>/.locks/``); under
    torchrun the ranks train it together, so no lock."""
    if distributed.is_distributed():
        yield
        return
    from filelock import FileLock, Timeout

    where = Path(opts.checkpoints) / ".locks" / f"{path.parent.name}-{path.name}.lock"
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot write the training lock {where}: {e.strerror or e}") from None
    lock = FileLock(str(where))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process training {path.name} to finish ({where})", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def baseline_checkpoint(opts: RunOptions, cfg: TrainConfig):
    """The baseline: imported (``--weights``) or trained (``train_checkpoint``)."""
    if opts.weights is not None:
        return imported_baseline(opts, cfg)
    return train_checkpoint(opts, cfg)


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
    result = evaluate_it(model.to(opts.device).eval())
    return {"checkpoint": payload.get("weights"), "miou": result["miou"], "per_image": result.get("per_image")}


def control_fields(miou: float, control: Optional[dict]) -> dict:
    """A record's comparison with the equal-budget control (none for methods that run on
    the baseline's weights)."""
    if control is None:
        return {}
    return {"control_checkpoint": control["checkpoint"], "control_miou": control["miou"],
            "miou_delta_control": miou - control["miou"]}


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
    check_seed(opts.seed)
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
    data_fingerprint = fingerprint(val, opts.limit)
    points = [point_identity(opts, spec, method.name, knobs, checkpoint, n_images, scale, data_fingerprint)
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
    prices = PriceCache()  # one per run: every operating point prices a token count once
    base_eval = evaluate(base_model, base_policy, val, settings, FlopModel(base_model, base_policy, prices), **common)
    evals = [evaluate(model, policy, val, settings, FlopModel(model, policy, prices), scale=scale, **common)
             for _, policy, scale in policies]
    control = None  # fine-tuned methods are also compared with the equal-budget control
    if method.name == CONTROL:
        control = {"checkpoint": checkpoint, "miou": evals[0]["miou"], "per_image": evals[0]["per_image"]}
    elif method.fine_tune is not None:
        control = control_reference(opts, spec, base_cfg, base_model, base_payload, lambda m: evaluate(
            m, base_policy, val, settings, FlopModel(m, base_policy, prices), **common))
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
            **({"compile_mode": opts.compile_mode} if opts.compile else {}),
            "baseline_checkpoint": base_payload.get("weights"),
            **({"baseline_source": base_payload["source"]} if "source" in base_payload else {}),
            "model": base_cfg.model,
            "decoder": base_cfg.model_overrides["decoder"],
            **({"model_numerics": model_numerics(_model_config(base_cfg))} if opts.weights is not None else {}),
            "miou": result["miou"],
            "miou_delta": result["miou"] - base_eval["miou"],
            "baseline_miou": base_eval["miou"],
            **control_fields(result["miou"], control),
            **per_image.intervals(result["per_image"], base_eval["per_image"], (control or {}).get("per_image")),
            "per_class_iou": dict(zip(spec.classes, result["per_class_iou"])),
            "gflops": result["gflops"],
            "gflops_ratio": result["gflops"]["mean"] / base_eval["gflops"]["mean"],
            "baseline_gflops": base_eval["gflops"]["mean"],
            "flops_unit": "GFLOPs (fvcore, MAC)",
            "tokens_per_block": result["tokens_per_block"],
            # sliding windows: windows per forward in evaluation (speed: per batch size)
            **({"forward_batch": result["forward_batch"]} if settings.mode != "whole" else {}),
            "speed": speed,
            "parameters": parameter_count(trained),
            # CUDA training is not bit-identical (atomic adds in merges and upsampling's backward)
            # unless every checkpoint behind the record was trained with --deterministic
            **({"deterministic": all(p.get("deterministic") is True for p in (payload, base_payload))}
               if opts.device.startswith("cuda") else {}),
            "timing_images": len(timing),
            "seed": opts.seed,
            "train": {"steps": base_cfg.steps, "config_hash": payload["config"].get("hash"),
                      **({"config": payload["train_config"]} if payload.get("train_config") else {}),
                      **({"precision": base_cfg.precision} if base_cfg.precision != "fp32" else {})},
            **{k: v for k, v in (("train_fingerprint", payload.get("train_fingerprint")),
                                 ("train_threads", payload.get("threads"))) if v is not None},
            **({"eval_processes": distributed.world_size()} if distributed.is_distributed() else {}),
            **env,
        }
        records.append(record)
    if records:  # the baseline's and the control's too, so `bench report` can recompute the deltas' intervals
        per_image.write_counts(opts.results, per_image.companion(records[0], "baseline", base_payload.get("weights")),
                               *base_eval["per_image"])
        if control is not None:
            per_image.write_counts(opts.results, per_image.companion(records[0], CONTROL, control["checkpoint"]),
                                   *control["per_image"])
    for record, result in zip(records, evals):
        per_image.write_counts(opts.results, record, *result["per_image"])  # before its record: never one without
        store.append(record, replace=opts.replace)
    if method.map_ops:
        write_maps(opts, method, spec, trained, model, val)
    distributed.barrier()
    return records


def parse_seeds(text: Optional[str], seed: int = 0) -> list[int]:
    """``--seeds 0,1,2`` as a list, checked before any work; without it, ``[seed]``."""
    if text is None:
        return [seed]
    if seed != 0:
        raise BenchError("give --seed or --seeds, not both")
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        raise BenchError(f"--seeds takes comma-separated int values, e.g. 0,1,2; got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise BenchError(f"--seeds {text!r}: each seed once, e.g. 0,1,2")
    return seeds


def run_seeds(opts: RunOptions, seeds: Optional[list] = None) -> list[dict]:
    """``run`` once per training seed (``--seeds 0,1,2``): each seed trains its own
    baseline and checkpoints (the seed is part of their configuration, so of the records'
    identity) and stores its own records. Every seed's options are checked first."""
    seeds = [opts.seed] if seeds is None else list(seeds)
    if not seeds:
        raise BenchError("--seeds: expected one or more seeds, e.g. 0,1,2")
    for seed in seeds[1:]:
        validate(replace(opts, seed=seed))
    return [record for seed in seeds for record in run(replace(opts, seed=seed))]


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
    title = f"{spec.name} · {model.depth} blocks, width {model.config.embed_dim}"  # what the maps are of
    return pause_maps(model, runs, val, indices, path, palette=palette, depth=model.depth, classes=spec.classes,
                      title=title)


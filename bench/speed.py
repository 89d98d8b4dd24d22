"""``bench speed``: time methods at any model and input size, without a dataset or a
trained checkpoint.

A randomly initialised model of the preset runs on random images of one size. Decisions
that need trained heads are forced by a declared token schedule instead: per pausing
(exit) layer, the share of the token grid that stays active, spread image to image so
that batches are ragged (PAUMER's ``schedule`` criterion, early exit's ``stay``: the
same policy code, gathers, batching and decoder as ``bench run``). ToMe takes its ``r``,
static its scale; every other registered method (ALGM, plugins) runs its own policy on
the random weights (its heads random too) at its default sweep or the given ``ops``. The baseline is timed in the same process, interleaved
(``timing.time_methods``), FLOPs per image come from ``FlopModel``, and one record per
method goes to ``<results>/speed.jsonl`` (dataset ``speed``). Accuracy is not measured.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from bench.errors import BenchError
from bench.flops import FlopModel, PriceCache
from bench.opcount import parameter_count
from bench.protocol import EvalSettings, check_execution, compile_identity, predict
from bench.results import SCHEMA_VERSION, ResultsStore, op_label
from bench.timing import speed_entry, time_methods
from methods import dtop, early_exit, paumer, tome
from methods.encoder import Policy
from methods.segmenter import build_model

DATASET = "speed"
FORCED = ("paumer", "early-exit", "dtop", "tome", "static")  # operating points from the options below, not --op


@dataclass
class SpeedOptions:
    model: str = "vit_small"
    decoder: Optional[str] = None  # None: the preset's
    size: int = 768  # square input, pixels
    batch_sizes: list = field(default_factory=lambda: [1, 8])
    methods: list = field(default_factory=lambda: ["paumer", "tome", "early-exit", "static"])
    ops: dict = field(default_factory=dict)  # method -> [knobs, ...] for a method not in FORCED (default: its sweep)
    # Operating points; each option takes one value or a list (every one is timed):
    stay: Optional[list] = None  # share of the grid active after each pausing layer (a schedule,
    #                              or a list of schedules); None: default_stay
    spread: float = 0.1  # image-to-image spread of the schedule
    batching: str | list = "pad"
    tome_r: Optional[int | list] = None  # None: half the largest constant r for this input
    scale: float | list = 0.75  # static's input scale
    num_classes: Optional[int] = None  # None: 19 (Cityscapes'), or --weights' (the class count changes the decoder's cost)
    weights: Optional[str] = None  # trained weights to time (``bench.weights``); None: random ones
    weights_format: Optional[str] = None
    device: str = "cpu"
    threads: int = 2
    timing_images: int = 16
    warmup: int = 2
    repeats: int = 5
    seed: int = 0
    results: str = "results"
    precision: str = "fp32"  # fp32, tf32, bf16, fp16 (protocol.execution)
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode with ``compile`` (protocol.COMPILE_MODES)
    compile_backend: Optional[object] = None  # None: $BENCH_COMPILE_BACKEND or inductor


def _values(value) -> list:
    """An option that takes one value or a list of them, as a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def build_runs(opts: SpeedOptions, model) -> dict:
    """label -> (method, model, policy, scale, knobs) for the baseline and every asked
    method at each of its operating points (every ``stay`` schedule x ``batching`` for
    PAUMER and early exit, every ``tome_r``, every ``scale``), all timed against one
    interleaved baseline."""
    depth = model.depth
    layers = paumer.default_layers(depth)
    schedules = opts.stay if opts.stay else [paumer.default_stay(len(layers))]
    if not isinstance(schedules[0], (list, tuple)):
        schedules = [schedules]  # one schedule
    tokens = model.grid_size(opts.size, opts.size)
    tokens = tokens[0] * tokens[1]
    runs = {"baseline": ("baseline", model, Policy(), 1.0, {})}

    def add(name, policy, scale, knobs):
        runs[f"{name} {op_label(knobs)}"] = (name, model, policy, scale, knobs)

    from methods import all_methods

    registered = all_methods()
    for name in opts.methods:
        if name not in registered:
            raise BenchError(f"bench speed times a registered method ({', '.join(registered)}); got {name!r}")
        if name in FORCED and opts.ops.get(name):
            raise BenchError(f"bench speed {name}: its operating points come from its own options, not --op")
        try:
            if name == "baseline":
                continue  # always timed
            if name in ("paumer", "early-exit"):
                for stay in schedules:
                    for batching in _values(opts.batching):
                        heads = paumer.PausingHeads(model.config.embed_dim, model.num_classes, layers)
                        heads = heads.to(opts.device).eval()
                        if name == "paumer":
                            policy = paumer.PaumerPolicy(heads, criterion="schedule", stay=list(stay),
                                                         spread=opts.spread, batching=batching)
                        else:
                            policy = early_exit.EarlyExitPolicy(heads, stay=list(stay), spread=opts.spread,
                                                                batching=batching)
                        add(name, policy, 1.0, {"stay": policy.stay, "spread": opts.spread, "batching": batching})
            elif name == "dtop":  # its own layers (2 of 12): the --stay schedules of that length, else its own
                dtop_layers = dtop.default_layers(depth)
                for stay in dtop_schedules(schedules if opts.stay else [], len(dtop_layers)):
                    for batching in _values(opts.batching):
                        heads = dtop.DToPHeads(model.config.embed_dim, model.num_classes, dtop_layers)
                        policy = dtop.DToPPolicy(heads.to(opts.device).eval(), stay=list(stay), spread=opts.spread,
                                                 batching=batching, depth=depth)
                        add(name, policy, 1.0, {"stay": policy.stay, "spread": opts.spread, "batching": batching})
            elif name == "tome":
                for r in _values(opts.tome_r):
                    r = r if r is not None else tome.max_r(tokens, depth) // 2
                    policy = tome.ToMePolicy(depth, r=r)
                    tome.tokens_per_block(tokens, policy.rs)  # an r too large for this input: refused here
                    add(name, policy, 1.0, {"r": r})
            elif name == "static":
                for scale in _values(opts.scale):
                    if not 0.0 < scale <= 1.0:
                        raise ValueError(f"scale must be in (0, 1], got {scale}")
                    add(name, Policy(), scale, {"scale": scale})
            else:
                _add_registered(registered[name], model, opts.ops.get(name) or registered[name].sweep(depth, tokens),
                                opts.device, runs)
        except (TypeError, ValueError) as e:
            raise BenchError(f"bench speed {name}: {e}") from None
    return runs


def dtop_schedules(schedules: list, layers: int) -> list:
    """DToP's schedules: those of ``schedules`` with one value per pruning layer, else its
    default (PAUMER's schedules have three values, DToP prunes after two layers, so one
    ``bench speed`` command can time both against one baseline)."""
    return [s for s in schedules if len(s) == layers] or [paumer.default_stay(layers)]


def _add_registered(spec, model, ops: list, device: str, runs: dict) -> None:
    """A registered method's operating points as runs: its trainable built on the random
    model (``FineTune.build``: heads random, shallow truncated), its own ``make_policy``,
    the module the protocol runs, as ``bench run`` does."""
    ft = spec.fine_tune
    for knobs in ops:
        trained = model
        if ft is not None:
            train_knobs = {k: knobs[k] for k in ft.op_knobs if k in knobs}
            # on a copy: a build may change the model in place (shallow cuts its blocks)
            trained = ft.build(copy.deepcopy(model), **ft.knobs, **train_knobs).to(device).eval()
        policy = spec.make_policy(trained, **knobs)
        runs[f"{spec.name} {op_label(knobs)}"] = (spec.name, getattr(trained, "segmenter", trained), policy,
                                                  spec.input_scale(knobs), dict(knobs))


def identity(opts: SpeedOptions, name: str, knobs: dict, decoder: str, checkpoint: Optional[str] = None) -> dict:
    """A speed record's identity: what changes its numbers (``bench.results``)."""
    return {"method": name, "knobs": knobs, "dataset": DATASET, "split": "random", "checkpoint": checkpoint,
            "images": opts.timing_images, "device": opts.device, "precision": opts.precision,
            "batch_sizes": sorted(opts.batch_sizes),
            **compile_identity(opts),
            "eval": {"mode": "whole", "model": opts.model, "decoder": decoder, "size": opts.size,
                     "num_classes": opts.num_classes}}


def available_memory(device: str) -> int:
    """Bytes free for tensors: the GPU's free memory, or the host's available memory."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_estimate(opts: SpeedOptions, model) -> int:
    """A lower bound of the bytes ``bench speed`` allocates: the uint8 images (on the
    host) and, at the largest batch, the token activations of one block (input, QKV,
    MLP hidden: about 8 x tokens x width floats per image)."""
    images = opts.timing_images * 3 * opts.size * opts.size
    tokens = model.grid_size(opts.size, opts.size)
    tokens = tokens[0] * tokens[1] if isinstance(tokens, tuple) else int(tokens)
    activations = max(opts.batch_sizes) * tokens * model.config.embed_dim * 4 * 8
    return images + activations


def check_memory(opts: SpeedOptions, model) -> None:
    """Refuses, in one line, a size whose images and activations cannot fit."""
    need, free = memory_estimate(opts, model), available_memory(opts.device)
    if need > free:
        raise BenchError(f"--size {opts.size} with --timing-images {opts.timing_images} and batch "
                         f"{max(opts.batch_sizes)} needs at least {need / 2**30:.1f} GiB; {opts.device} has "
                         f"{free / 2**30:.1f} GiB free: use a smaller --size, batch or --timing-images")


def run_speed(opts: SpeedOptions) -> list[dict]:
    from bench.runner import environment

    if opts.size < 1 or not opts.batch_sizes or min(opts.batch_sizes) < 1:
        raise BenchError("--size and --batch-size values must be at least 1")
    check_execution(opts.precision, opts.device, opts.compile, opts.compile_backend, compile_mode=opts.compile_mode)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    store = ResultsStore(opts.results)
    store.check_writable()
    env = environment(opts.device, opts.threads)
    imported = checkpoint = None
    if opts.weights is not None:
        from bench.loading import preset_overrides, read_for_preset

        imported = read_for_preset(opts.weights, opts.weights_format, opts.model, opts.decoder)[0]
    num_classes = opts.num_classes or (imported.shape["num_classes"] if imported else 19)
    try:  # an imported model is built as the file's: trained size, tokens, numerics (bench.loading)
        own = preset_overrides(opts.weights, opts.weights_format, opts.model, opts.decoder) if imported else {}
        model = build_model(num_classes, opts.model, **({"decoder": opts.decoder} if opts.decoder else {}), **own)
    except (TypeError, ValueError) as e:
        raise BenchError(str(e)) from None
    if imported is not None:
        from bench.weights import load_into

        checkpoint = load_into(model, imported, preset=opts.model, num_classes=num_classes,
                               dataset="--num-classes")
    opts = replace(opts, num_classes=num_classes)
    if opts.size % model.patch_size:
        raise BenchError(f"--size {opts.size} is not a multiple of the patch size {model.patch_size}")
    check_memory(opts, model)
    model = model.to(opts.device).eval()
    decoder = model.config.decoder
    runs = build_runs(opts, model)
    g = torch.Generator().manual_seed(opts.seed)
    images = torch.randint(0, 256, (opts.timing_images, 3, opts.size, opts.size), generator=g, dtype=torch.uint8)
    settings = EvalSettings("whole", batch_size=max(opts.batch_sizes), device=opts.device, precision=opts.precision,
                            compile=opts.compile, compile_backend=opts.compile_backend,
                            compile_mode=opts.compile_mode)

    flops = {}  # name -> (B,) per image, from one untimed pass at the largest batch
    tokens = {}
    prices = PriceCache()  # every run's blocks on this model priced once
    with torch.inference_mode():
        for name, (_, m, policy, scale, _) in runs.items():
            flop_model = FlopModel(m, policy, prices)
            parts = [predict(m, policy, chunk, settings, scale=scale, flop_model=flop_model)
                     for chunk in images.split(settings.batch_size)]
            flops[name] = torch.cat([p.flops for p in parts]).double() / 1e9
            t = sum(p.tokens.sum(0) for p in parts)
            tokens[name] = (t.double() / float(sum(p.full_tokens.sum() for p in parts))).tolist()
    timed = {name: (m, policy, scale) for name, (_, m, policy, scale, _) in runs.items()}
    speeds = {bs: time_methods(timed, images, settings, batch_size=bs, warmup=opts.warmup, repeats=opts.repeats)
              for bs in sorted(set(opts.batch_sizes))}
    base = flops["baseline"].mean().item()
    records = []
    for label, (name, _, policy, _, knobs) in runs.items():
        g = flops[label]
        records.append({
            "schema_version": SCHEMA_VERSION,
            **identity(opts, name, knobs, decoder, checkpoint),
            "model": opts.model, "decoder": decoder, "size": opts.size,
            "schedule": policy.describe() if name in ("paumer", "early-exit", "dtop") else None,
            "compile": opts.compile,
            **({"compile_mode": opts.compile_mode} if opts.compile else {}),
            "gflops": {"mean": g.mean().item(), "std": g.std(unbiased=False).item(),
                       "min": g.min().item(), "max": g.max().item()},
            "gflops_ratio": g.mean().item() / base, "baseline_gflops": base,
            "flops_unit": "GFLOPs (fvcore, MAC)",
            "tokens_per_block": tokens[label],
            "speed": {str(bs): speed_entry(t, label) for bs, t in speeds.items()},
            "parameters": parameter_count(model, getattr(policy, "heads", None)),
            "timing_images": opts.timing_images,
            "seed": opts.seed,
            **env,
            "precision": opts.precision,
        })
    for record in records:
        store.append(record, replace=True)  # a re-timing replaces the old one of the same identity
    return records

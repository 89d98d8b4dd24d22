"""Throughput and latency, timed the same way for every method: pre-loaded inputs,
inference mode, warm-up passes, repeats interleaved across methods (so drift in the
machine's load hits all of them alike), the median of the repeats and the spread of
same-repeat speedups, plus the kernel budget of one untimed forward (``bench.opcount``)."""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch
from torch import Tensor

from bench.errors import BenchError
from bench.opcount import forward_counts
from bench.protocol import EvalSettings, forward_batch, image_batches, predict, predict_windows


def _stack_runs(images: list, device):
    """Images of any sizes -> one (B, 3, H, W) tensor when all agree, else a list of
    such tensors, one per run of equal sizes (``predict_windows`` takes either)."""
    runs = [[image for image, _ in run] for run in image_batches([(im, None) for im in images], len(images))]
    if len(runs) == 1:
        return torch.stack(runs[0]).to(device)
    return [torch.stack(run).to(device) for run in runs]


def _sync(device) -> None:
    """Wait for ``device``'s queued work: that device's, not the current one (``cuda:1``
    timed without torchrun would otherwise stop the clock before its kernels ran)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(values) -> dict:
    """Interquartile range [p25, p75] and range [min, max] of repeated measurements."""
    q = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.25, 0.75], dtype=torch.float64))
    return {"iqr": q.tolist(), "range": [min(values), max(values)]}


def speed_entry(timed: dict, name: str, baseline: str = "baseline") -> dict:
    """One batch size's speed of run ``name`` as stored in a record: its throughput
    (median, IQR, range), latency, and its speedup over ``baseline`` timed alongside:
    ratio of the medians, IQR and range of the per-repeat ratios (the two ran in the
    same interleaved repeat, so each ratio sees the same machine state)."""
    run, base = timed[name], timed[baseline]
    entry = {k: v for k, v in run.items() if k != "repeats"}
    entry["speedup"] = run["throughput"] / base["throughput"]
    ratios = [a / b for a, b in zip(run["repeats"], base["repeats"])]
    s = spread(ratios)
    entry["speedup_iqr"], entry["speedup_range"] = s["iqr"], s["range"]
    entry["baseline_throughput"] = base["throughput"]
    return entry


def _forward_chunk(model, policy, chunk, settings: EvalSettings, scale: float) -> list:
    """One timed pass over a chunk (a batch tensor, or a list of batches of several sizes
    for sliding windows); the rows of each forward that ran."""
    if isinstance(chunk, Tensor):
        return predict(model, policy, chunk, settings, scale=scale).forwards
    return predict_windows(model, policy, chunk, settings, scale=scale)[1]


def interleave(steps: dict, chunks: list, images: int, device, *, warmup: int, repeats: int,
               latency: bool) -> tuple[dict, dict, dict]:
    """The timing loop every timed number comes from: each repeat runs every named
    ``step(k, chunk)`` over all ``chunks`` in turn (interleaved, so drift in the
    machine's speed hits all alike), the device synchronised before each clock read.
    Returns name -> throughput (``images`` per pass / seconds) of each timed repeat,
    name -> per-chunk latencies in ms (``latency``), name -> what its steps returned in
    the first pass."""
    device = torch.device(device)
    rates = {name: [] for name in steps}
    latencies = {name: [] for name in steps}
    first = {name: [] for name in steps}
    for r in range(warmup + repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for k, chunk in enumerate(chunks):
                t0 = time.perf_counter()
                out = step(k, chunk)
                _sync(device)
                if r == 0:
                    first[name].append(out)
                if r >= warmup and latency:
                    latencies[name].append((time.perf_counter() - t0) * 1e3)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                rates[name].append(images / elapsed)
    return rates, latencies, first


@torch.inference_mode()
def time_methods(runs: dict, images, settings: EvalSettings, *, batch_size: int,
                 warmup: int = 2, repeats: int = 5, labels=None) -> dict:
    """Throughput (images/s) and batch-1 latency of several methods on the same
    pre-loaded uint8 images, interleaved repeat by repeat so that drift in the machine's
    speed hits every method alike. ``runs`` maps name -> (model, policy, scale).

    Each timed pass segments every image in ``images`` at ``batch_size`` with the full
    ``predict`` path (resize, pad, windows, gathers and scatters included; data loading
    excluded). Throughput is the median over repeats (``throughput_iqr``, ``throughput_range``:
    its spread; ``repeats``: each repeat's); latency p50/p90 is over every image of every
    repeat when ``batch_size`` is 1. ``images``: a (N, 3, H, W) tensor, or a list
    of (3, H, W) images of different sizes (ADE20K), batched where consecutive sizes agree.
    ``labels``: the images' pixel labels, in the same form, for a policy that needs them
    to run (``needs_labels``: the oracle criterion): each forward gets its own images'.
    Each entry also holds the kernel budget of one untimed eager forward of the first
    batch (``bench.opcount``: ``ops_per_forward``, ``host_syncs_per_forward``, and on
    CUDA ``peak_memory_mb``).
    """
    unlabelled = [name for name, (_, policy, _) in runs.items() if getattr(policy, "needs_labels", False)]
    if unlabelled and labels is None:
        raise BenchError(f"timing {', '.join(unlabelled)} needs the timing images' labels")
    # whole images: `batch_size` images per forward; windows: `batch_size` images a pass,
    # their windows `batch_size` per forward across images (``predict_windows``)
    per_pass = batch_size
    if isinstance(images, Tensor):
        images = images.to(settings.device)
        chunks = images.split(per_pass)
        label_chunks = labels.split(per_pass) if labels is not None else None
    else:
        pairs = list(zip(images, labels if labels is not None else [None] * len(images)))
        batches = list(image_batches(pairs, per_pass, same_size=settings.mode == "whole"))
        chunks = [_stack_runs([image for image, _ in batch], settings.device) for batch in batches]
        # labels serve the oracle, which is whole-image only (windows mix label sizes)
        label_chunks = ([torch.stack([label for _, label in batch]) for batch in batches]
                        if labels is not None and settings.mode == "whole" else None)
    run_settings = replace(settings, batch_size=batch_size)
    budget = {}  # name -> ops and host reads of one untimed eager forward (bench.opcount)
    for name, (model, policy, scale) in runs.items():
        model.eval()
        if label_chunks is not None and getattr(policy, "needs_labels", False):
            policy.pixel_labels = label_chunks[0].to(settings.device)
        budget[name] = forward_counts(lambda: _forward_chunk(model, policy, chunks[0],
                                                             replace(run_settings, compile=False), scale),
                                      settings.device)
    if label_chunks is not None:  # on the device before timing: a pass copies no labels
        label_chunks = [chunk.to(settings.device) for chunk in label_chunks]

    def step_of(model, policy, scale):
        def step(k, chunk):
            if label_chunks is not None and getattr(policy, "needs_labels", False):
                policy.pixel_labels = label_chunks[k]  # this chunk's, as evaluated
            return _forward_chunk(model, policy, chunk, run_settings, scale)
        return step

    steps = {name: step_of(model, policy, scale) for name, (model, policy, scale) in runs.items()}
    rates, latencies, first = interleave(steps, chunks, len(images), settings.device, warmup=warmup,
                                         repeats=repeats, latency=batch_size == 1)
    ran = {name: [n for forwards in first[name] for n in forwards] for name in runs}  # rows of each forward
    out = {}
    for name in runs:
        s = spread(rates[name])
        entry = {"throughput": statistics.median(rates[name]), "throughput_iqr": s["iqr"],
                 "throughput_range": s["range"], "repeats": rates[name], **budget[name]}
        if settings.mode != "whole":  # whole: the batch size itself
            entry["forward_batch"] = forward_batch(ran[name])
        if latencies[name]:
            q = torch.tensor(latencies[name]).quantile(torch.tensor([0.5, 0.9])).tolist()
            entry["latency_ms"] = {"p50": q[0], "p90": q[1]}
        out[name] = entry
    return out


"""The evaluation protocol every method shares: inference (whole image or sliding
windows, each window its own image), mIoU over the split, per-image FLOPs from the
compute trace, and throughput/latency timed the same way for every method.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
import weakref
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from bench import distributed
from bench.errors import BenchError
from bench.metrics import ConfusionMatrix, iou_scores
from bench.opcount import forward_counts
from bench.train import normalize


@dataclass(frozen=True)
class EvalSettings:
    mode: str = "whole"  # "whole" or "slide"
    window: Optional[int] = None
    stride: Optional[int] = None
    batch_size: int = 8  # images (whole) or windows (slide) per forward
    device: str = "cpu"
    resize_short: Optional[int] = None  # resize the image to this short side first (ADE20K: 512)
    precision: str = "fp32"  # what the model's forwards compute in (``execution``)
    compile: bool = False  # torch.compile the blocks, their MLPs and the decoder (``execution``)
    compile_backend: Any = None  # None: $BENCH_COMPILE_BACKEND or "inductor"; tests pass a cheap one


PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_BACKEND_ENV = "BENCH_COMPILE_BACKEND"


def compile_backend(backend=None):
    """The torch.compile backend: ``backend``, else $BENCH_COMPILE_BACKEND, else inductor."""
    return backend if backend is not None else os.environ.get(COMPILE_BACKEND_ENV) or "inductor"


def _compile_failure(e: Exception, backend) -> BenchError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))
    return BenchError(f"--compile: torch.compile (backend {name}) does not work here: {first}; "
                      "run without --compile")


def check_execution(precision: str, device: str, compile: bool = False, backend=None, probe: bool = True) -> None:
    """The precision is known and supported on ``device``'s kind; with ``compile`` (and
    ``probe``) the compiler works here: a one-line error before any work otherwise."""
    if precision not in PRECISIONS:
        raise BenchError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if kind != "cuda" and precision in ("tf32", "fp16"):
        raise BenchError(f"--precision {precision} needs a CUDA device; on {kind} use fp32 or bf16")
    if compile and probe:  # inductor on CPU needs a working C++ compiler: find out in seconds
        backend = compile_backend(backend)
        try:
            torch.compile(lambda x: x * 2 + 1, backend=backend)(torch.ones(4, device=device))
        except Exception as e:  # noqa: BLE001 - any compiler failure ends here, as one line
            raise _compile_failure(e, backend) from None


# module -> {backend: its compiled forward}, made once so each graph compiles once
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _hot_modules(model) -> list:
    """What ``--compile`` compiles: each encoder block, each block's MLP on its own (the
    policies that run a block their own way, ToMe, ALGM and packed batching, call it
    directly) and the decoder. The encoder loop between them (policies' decisions,
    gathers, host reads) and those policies' own attention code stay eager."""
    blocks = list(getattr(model, "blocks", []))
    mlps = [b.mlp for b in blocks if isinstance(getattr(b, "mlp", None), torch.nn.Module)]
    return blocks + mlps + ([model.decoder] if hasattr(model, "decoder") else [])


def _compiled_forward(module, backend):
    table = _COMPILED.setdefault(module, {})
    if backend not in table:
        # dynamic=True: token counts (and batch sizes) are symbolic from the first
        # compilation, so a ragged batch with new row counts reuses the graph instead of
        # recompiling per batch (only 0/1-sized dims and mask/no-mask paths specialise)
        table[backend] = torch.compile(module.forward, dynamic=True, backend=backend)
    return table[backend]


@contextlib.contextmanager
def execution(model, settings: EvalSettings):
    """The one place precision and compilation apply, around a model's forward
    (``predict``: evaluation and timing alike). fp32: as is; tf32: TF32 matmuls and
    convolutions on CUDA, the flags restored after; bf16/fp16: ``torch.autocast``
    (weights stay fp32); ``compile``: the hot modules (``_hot_modules``) run compiled."""
    p = settings.precision
    with contextlib.ExitStack() as stack:
        if p in AUTOCAST:
            stack.enter_context(torch.autocast(torch.device(settings.device).type, dtype=AUTOCAST[p]))
        elif p == "tf32":
            saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

            def restore():
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

            stack.callback(restore)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if not settings.compile:
            yield
            return
        import torch._dynamo as dynamo

        backend = compile_backend(settings.compile_backend)
        # a guard failure past the limit would silently run eager: fail instead
        stack.enter_context(dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True))
        for module in _hot_modules(model):
            previous = module._compiled_call_impl  # what nn.Module.compile() sets; restored after
            module._compiled_call_impl = _compiled_forward(module, backend)
            stack.callback(setattr, module, "_compiled_call_impl", previous)
        try:
            yield
        except dynamo.exc.TorchDynamoException as e:
            raise _compile_failure(e, backend) from None


@dataclass
class Prediction:
    logits: Tensor  # (B, C, H, W) at label resolution
    flops: Optional[Tensor] = None  # (B,) per image, windows summed
    tokens: Optional[Tensor] = None  # (B, depth) tokens each block processed, windows summed
    full_tokens: Optional[Tensor] = None  # (B,) tokens per block of the full model
    left_at: Optional[list] = None  # per image: (grid_h, grid_w) layer each patch left at


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis; the last window is aligned to the border."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return starts + [size - window]


def _pad_to(x: Tensor, h: int, w: int) -> Tensor:
    return F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))


def _forward(model, policy, x: Tensor, flop_model, keep_maps: bool, settings: EvalSettings):
    """Forward a batch whose H, W are multiples of the patch size, at the settings'
    precision (logits back in fp32) and compiled or not; FLOPs are priced outside."""
    with execution(model, settings):
        logits, state = model.forward_state(x, policy)
    logits = logits.float()
    flops = flop_model.image_flops(state.trace, tuple(x.shape[-2:])) if flop_model is not None else None
    tokens = state.trace.tokens
    full = torch.full((x.shape[0],), state.source.shape[1], dtype=torch.long)
    maps = state.left_at.reshape(x.shape[0], *state.grid).cpu() if keep_maps else None
    return logits, flops, tokens, full, maps


def predict(model, policy, images: Tensor, settings: EvalSettings, *, scale: float = 1.0,
            flop_model=None, keep_maps: bool = False) -> Prediction:
    """Segment uint8 images (B, 3, H, W) of one size; logits come back at (H, W).

    ``scale`` resizes the input first (static references); the image is padded to a
    multiple of the patch size (and to the window where smaller) and logits cropped back.
    """
    B, _, H, W = images.shape
    x = normalize(images.to(settings.device))
    if settings.resize_short:  # the dataset's resize rule, then the static scale, in one resampling
        f = scale * settings.resize_short / min(H, W)
        size = (max(1, round(H * f)), max(1, round(W * f)))
        if size != (H, W):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    elif scale != 1.0:
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=False)
    h, w = x.shape[-2:]
    p = model.patch_size
    if settings.mode == "whole":
        x = _pad_to(x, -(-h // p) * p, -(-w // p) * p)
        logits, flops, tokens, full, maps = _forward(model, policy, x, flop_model, keep_maps, settings)
        logits = logits[..., :h, :w]
        left_at = list(maps) if maps is not None else None
    else:
        win, stride = settings.window, settings.stride
        x = _pad_to(x, max(h, win), max(w, win))
        ph, pw = x.shape[-2:]
        boxes = [(t, l) for t in window_starts(ph, win, stride) for l in window_starts(pw, win, stride)]
        logits = x.new_zeros(B, model.num_classes, ph, pw)
        hits = x.new_zeros(1, 1, ph, pw)
        flops, left_at = None, None
        crops = torch.stack([x[:, :, t : t + win, l : l + win] for t, l in boxes], 1).flatten(0, 1)
        outs = []
        for chunk in crops.split(max(1, settings.batch_size)):
            out, f, tk, fu, _ = _forward(model, policy, chunk, flop_model, False, settings)
            outs.append((out, f, tk, fu))
        out = torch.cat([o[0] for o in outs]).unflatten(0, (B, len(boxes)))
        for k, (t, l) in enumerate(boxes):
            logits[:, :, t : t + win, l : l + win] += out[:, k]
            hits[:, :, t : t + win, l : l + win] += 1
        logits = (logits / hits)[..., :h, :w]
        tokens = torch.cat([o[2] for o in outs]).unflatten(0, (B, len(boxes))).sum(1)
        full = torch.cat([o[3] for o in outs]).unflatten(0, (B, len(boxes))).sum(1)
        if flop_model is not None:
            flops = torch.cat([o[1] for o in outs]).unflatten(0, (B, len(boxes))).sum(1)
    if (h, w) != (H, W):
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    return Prediction(logits, flops, tokens, full, left_at)


def _items(dataset, indices):
    """Items at ``indices``, in order; a file dataset (``loader_workers``) is decoded ahead
    in DataLoader workers."""
    workers = min(getattr(dataset, "loader_workers", 0), len(indices))
    if workers <= 0:
        return (dataset[i] for i in indices)
    subset = torch.utils.data.Subset(dataset, indices)
    return iter(torch.utils.data.DataLoader(subset, batch_size=None, num_workers=workers))


def image_batches(dataset, batch_size: int, limit: Optional[int] = None, indices=None):
    """Consecutive images of equal size, at most ``batch_size`` at a time: the first
    ``limit`` images, or those at ``indices`` (in that order)."""
    if indices is None:
        indices = range(len(dataset) if limit is None else min(limit, len(dataset)))
    batch: list = []
    for image, label in _items(dataset, indices):
        if batch and (len(batch) == batch_size or batch[0][0].shape != image.shape):
            yield batch
            batch = []
        batch.append((image, label))
    if batch:
        yield batch


def attach_labels(policy, labels: Tensor, settings: EvalSettings, scale: float) -> None:
    """A policy that decides with the labels (the oracle criterion: evaluation only) gets
    them; it supports whole-image evaluation at scale 1 only."""
    if getattr(policy, "needs_labels", False):
        if settings.mode != "whole" or scale != 1.0:
            raise BenchError("the oracle criterion supports whole-image evaluation at scale 1 only")
        policy.pixel_labels = labels.to(settings.device)


@torch.inference_mode()
def evaluate(model, policy, dataset, settings: EvalSettings, flop_model, *, num_classes: int,
             scale: float = 1.0, limit: Optional[int] = None, progress: bool = False,
             ignore_index: int = 255) -> dict:
    """mIoU over the split, per-image GFLOPs and the fraction of tokens each block computed.

    Under torchrun each process evaluates its strided shard of the split (images rank,
    rank + W, ...: each image exactly once); confusion matrices, per-image FLOPs and token
    counts are gathered, so every process returns what one process would have.
    """
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    flops, tokens, full = [], 0, 0
    n = len(dataset) if limit is None else min(limit, len(dataset))
    mine = distributed.shard(n)
    per_forward = settings.batch_size if settings.mode == "whole" else 1
    bar = tqdm(total=len(mine), desc=f"eval {getattr(policy, 'name', '')}", unit="img",
               disable=not progress or not distributed.is_main(), leave=False)
    for batch in image_batches(dataset, per_forward, indices=mine):
        images = torch.stack([b[0] for b in batch])
        labels = torch.stack([b[1] for b in batch])
        attach_labels(policy, labels, settings, scale)
        pred = predict(model, policy, images, settings, scale=scale, flop_model=flop_model)
        cm.update(pred.logits.argmax(1).cpu(), labels)
        flops.append(pred.flops)
        tokens = tokens + pred.tokens.sum(0)
        full = full + pred.full_tokens.sum()
        bar.update(len(batch))
    bar.close()
    flops = torch.cat(flops) if flops else torch.zeros(0, dtype=torch.long)
    if distributed.is_distributed():
        distributed.all_reduce_sum(cm.matrix)
        parts = distributed.all_gather_object((list(mine), flops, tokens, full))
        flops = torch.zeros(n, dtype=parts[0][1].dtype)
        for indices, part, _, _ in parts:
            flops[indices] = part  # back in split order: the same numbers as one process
        tokens, full = sum(p[2] for p in parts), sum(p[3] for p in parts)
    per_class, miou = iou_scores(cm.matrix)
    gflops = flops.double() / 1e9
    return {
        "miou": miou,
        "per_class_iou": per_class,
        "gflops": {"mean": gflops.mean().item(), "std": gflops.std(unbiased=False).item(),
                   "min": gflops.min().item(), "max": gflops.max().item()},
        "tokens_per_block": (tokens.double() / float(full)).tolist(),
        "images": n,
    }


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
    # whole images: `batch_size` images per forward; windows: one image at a time, its
    # windows `batch_size` per forward
    per_pass = batch_size if settings.mode == "whole" else 1
    if isinstance(images, Tensor):
        images = images.to(settings.device)
        chunks = images.split(per_pass)
        label_chunks = labels.split(per_pass) if labels is not None else None
    else:
        pairs = list(zip(images, labels if labels is not None else [None] * len(images)))
        batches = list(image_batches(pairs, per_pass))
        chunks = [torch.stack([image for image, _ in batch]).to(settings.device) for batch in batches]
        label_chunks = [torch.stack([label for _, label in batch]) for batch in batches] if labels is not None else None
    run_settings = replace(settings, batch_size=batch_size)
    budget = {}  # name -> ops and host reads of one untimed eager forward (bench.opcount)
    for name, (model, policy, scale) in runs.items():
        model.eval()
        if label_chunks is not None and getattr(policy, "needs_labels", False):
            policy.pixel_labels = label_chunks[0].to(settings.device)
        budget[name] = forward_counts(lambda: predict(model, policy, chunks[0], replace(run_settings, compile=False),
                                                      scale=scale), settings.device)
    rates = {name: [] for name in runs}
    latencies = {name: [] for name in runs}
    device = torch.device(settings.device)  # where the models and the images are
    for r in range(warmup + repeats):
        for name, (model, policy, scale) in runs.items():
            model.eval()
            _sync(device)
            start = time.perf_counter()
            for k, chunk in enumerate(chunks):
                if label_chunks is not None and getattr(policy, "needs_labels", False):
                    policy.pixel_labels = label_chunks[k].to(settings.device)  # this chunk's, as evaluated
                t0 = time.perf_counter()
                predict(model, policy, chunk, run_settings, scale=scale)
                _sync(device)
                if r >= warmup and batch_size == 1:
                    latencies[name].append((time.perf_counter() - t0) * 1e3)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                rates[name].append(len(images) / elapsed)
    out = {}
    for name in runs:
        s = spread(rates[name])
        entry = {"throughput": statistics.median(rates[name]), "throughput_iqr": s["iqr"],
                 "throughput_range": s["range"], "repeats": rates[name], **budget[name]}
        if latencies[name]:
            q = torch.tensor(latencies[name]).quantile(torch.tensor([0.5, 0.9])).tolist()
            entry["latency_ms"] = {"p50": q[0], "p90": q[1]}
        out[name] = entry
    return out

"""The evaluation protocol every method shares: inference (whole image or sliding
windows, each window its own image), mIoU over the split, per-image FLOPs from the
compute trace, and throughput/latency timed the same way for every method.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from bench import distributed
from bench.errors import BenchError
from bench.metrics import ConfusionMatrix, iou_scores
from bench.stats import per_image_counts
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
    compile_mode: str = "default"  # torch.compile's mode with ``compile`` (COMPILE_MODES)
    compile_backend: Any = None  # None: $BENCH_COMPILE_BACKEND or "inductor"; tests pass a cheap one


PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_BACKEND_ENV = "BENCH_COMPILE_BACKEND"
# torch.compile's modes (as timm's --torchcompile-mode): reduce-overhead adds CUDA graphs,
# max-autotune also benchmarks kernel choices while compiling
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def compile_backend(backend=None):
    """The torch.compile backend: ``backend``, else $BENCH_COMPILE_BACKEND, else inductor."""
    return backend if backend is not None else os.environ.get(COMPILE_BACKEND_ENV) or "inductor"


def _compile_failure(e: Exception, backend) -> BenchError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))
    return BenchError(f"--compile: torch.compile (backend {name}) does not work here: {first}; "
                      "run without --compile")


def check_execution(precision: str, device: str, compile: bool = False, backend=None, probe: bool = True,
                    compile_mode: str = "default") -> None:
    """The precision is known and supported on ``device``'s kind; a compile mode only with
    ``compile``; with ``compile`` (and ``probe``) the compiler works here: a one-line error
    before any work otherwise."""
    if compile_mode not in COMPILE_MODES:
        raise BenchError(f"--compile-mode {compile_mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if compile_mode != "default" and not compile:
        raise BenchError(f"--compile-mode {compile_mode} needs --compile (it is torch.compile's mode)")
    if precision not in PRECISIONS:
        raise BenchError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if kind != "cuda" and precision in ("tf32", "fp16"):
        raise BenchError(f"--precision {precision} needs a CUDA device; on {kind} use fp32 or bf16")
    if compile and probe:  # inductor on CPU needs a working C++ compiler: find out in seconds
        backend = compile_backend(backend)
        try:
            torch.compile(lambda x: x * 2 + 1, backend=backend, mode=_mode(compile_mode))(torch.ones(4, device=device))
        except Exception as e:  # noqa: BLE001 - any compiler failure ends here, as one line
            raise _compile_failure(e, backend) from None


def compile_identity(opts) -> dict:
    """``compile`` and ``compile_mode`` as a record's identity holds them: nothing when not
    compiled, the mode only when it is not the default (so stored identities still match)."""
    if not opts.compile:
        return {}
    mode = getattr(opts, "compile_mode", "default")
    return {"compile": True, **({"compile_mode": mode} if mode != "default" else {})}


# module -> {(backend, mode): its compiled forward}, made once so each graph compiles once
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _hot_modules(model) -> list:
    """What ``--compile`` compiles: each encoder block, each block's MLP on its own (the
    policies that run a block their own way, ToMe, ALGM and packed batching, call it
    directly) and the decoder. The encoder loop between them (policies' decisions,
    gathers, host reads) and those policies' own attention code stay eager."""
    blocks = list(getattr(model, "blocks", []))
    mlps = [b.mlp for b in blocks if isinstance(getattr(b, "mlp", None), torch.nn.Module)]
    return blocks + mlps + ([model.decoder] if hasattr(model, "decoder") else [])


def _mode(compile_mode: str):
    return None if compile_mode == "default" else compile_mode  # None: torch.compile's default


def _compiled_forward(module, backend, compile_mode: str = "default"):
    table = _COMPILED.setdefault(module, {})
    key = (backend, compile_mode)
    if key not in table:
        # dynamic=True: token counts (and batch sizes) are symbolic from the first
        # compilation, so a ragged batch with new row counts reuses the graph instead of
        # recompiling per batch (only 0/1-sized dims and mask/no-mask paths specialise)
        table[key] = torch.compile(module.forward, dynamic=True, backend=backend, mode=_mode(compile_mode))
    return table[key]


@contextlib.contextmanager
def execution(model, settings: EvalSettings):
    """The one place precision and compilation apply, around a model's forward
    (``predict``: evaluation and timing alike). fp32: as is; tf32: TF32 matmuls and
    convolutions on CUDA, the flags restored after; bf16/fp16: ``torch.autocast``
    (weights stay fp32); ``compile``: the hot modules (``_hot_modules``) run compiled, in
    torch.compile's ``compile_mode``."""
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
            module._compiled_call_impl = _compiled_forward(module, backend, settings.compile_mode)
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
    forwards: Optional[list] = None  # rows of each model forward that ran: images (whole) or windows (slide)


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
    full = torch.full((x.shape[0],), state.grid_tokens, dtype=torch.long)
    maps = state.left_at.reshape(x.shape[0], *state.grid).cpu() if keep_maps else None
    return logits, flops, tokens, full, maps


def _prepare(model, images: Tensor, settings: EvalSettings, scale: float) -> Tensor:
    """uint8 images -> normalised float on the device (the model's own input statistics:
    imported ones differ), with the dataset's resize rule and the static scale applied in
    one resampling."""
    H, W = images.shape[-2:]
    config = getattr(model, "config", None)
    x = normalize(images.to(settings.device), getattr(config, "mean", None), getattr(config, "std", None))
    if settings.resize_short:
        f = scale * settings.resize_short / min(H, W)
        size = (max(1, round(H * f)), max(1, round(W * f)))
        if size != (H, W):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    elif scale != 1.0:
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=False)
    return x


def predict(model, policy, images: Tensor, settings: EvalSettings, *, scale: float = 1.0,
            flop_model=None, keep_maps: bool = False) -> Prediction:
    """Segment uint8 images (B, 3, H, W) of one size; logits come back at (H, W).

    ``scale`` resizes the input first (static references); the image is padded to a
    multiple of the patch size (and to the window where smaller) and logits cropped back.
    Sliding windows: ``predict_windows`` (this batch's windows, ``batch_size`` a forward).
    """
    if settings.mode != "whole":
        (pred,), forwards = predict_windows(model, policy, [images], settings, scale=scale, flop_model=flop_model)
        pred.forwards = forwards
        return pred
    B, _, H, W = images.shape
    x = _prepare(model, images, settings, scale)
    h, w = x.shape[-2:]
    p = model.patch_size
    x = _pad_to(x, -(-h // p) * p, -(-w // p) * p)
    logits, flops, tokens, full, maps = _forward(model, policy, x, flop_model, keep_maps, settings)
    logits = logits[..., :h, :w]
    if (h, w) != (H, W):
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    return Prediction(logits, flops, tokens, full, list(maps) if maps is not None else None, forwards=[B])


def predict_windows(model, policy, batches: list, settings: EvalSettings, *, scale: float = 1.0,
                    flop_model=None) -> tuple[list, list]:
    """Sliding-window inference on several batches of uint8 images ((B_i, 3, H_i, W_i),
    sizes may differ between batches): every window is its own image, and the windows of
    all of them, in order, run ``settings.batch_size`` per forward across image
    boundaries, so batch b means b windows a forward (only the call's last may have
    fewer). Returns (one ``Prediction`` per batch, windows of each forward that ran);
    a window's logits are averaged where windows overlap, as one image at a time gives."""
    win, stride = settings.window, settings.stride
    layouts, crops, places = [], [], []  # places: (batch, image, top, left) of every window, in order
    for i, images in enumerate(batches):
        x = _prepare(model, images, settings, scale)
        h, w = x.shape[-2:]
        x = _pad_to(x, max(h, win), max(w, win))
        ph, pw = x.shape[-2:]
        boxes = [(t, l) for t in window_starts(ph, win, stride) for l in window_starts(pw, win, stride)]
        crops.append(torch.stack([x[:, :, t : t + win, l : l + win] for t, l in boxes], 1).flatten(0, 1))
        places += [(i, b, t, l) for b in range(images.shape[0]) for t, l in boxes]
        layouts.append((images.shape, (h, w), x.new_zeros(images.shape[0], model.num_classes, ph, pw),
                        x.new_zeros(1, 1, ph, pw), boxes))
    chunks = torch.cat(crops).split(max(1, settings.batch_size))
    stats, done = [], 0
    for chunk in chunks:  # each forward's logits go onto their images at once: one chunk held at a time
        logits, flops, tokens, full, _ = _forward(model, policy, chunk, flop_model, False, settings)
        for row, (i, b, t, l) in enumerate(places[done : done + len(chunk)]):
            layouts[i][2][b, :, t : t + win, l : l + win] += logits[row]
        done += len(chunk)
        stats.append((flops, tokens, full))
    tokens_all, full_all = torch.cat([s[1] for s in stats]), torch.cat([s[2] for s in stats])
    flops_all = torch.cat([s[0] for s in stats]) if flop_model is not None else None
    preds, start = [], 0
    for (B, _, H, W), (h, w), logits, hits, boxes in layouts:
        k = len(boxes)
        rows = slice(start, start + B * k)
        start += B * k
        for t, l in boxes:
            hits[:, :, t : t + win, l : l + win] += 1
        logits = (logits / hits)[..., :h, :w]
        if (h, w) != (H, W):
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        flops = flops_all[rows].unflatten(0, (B, k)).sum(1) if flops_all is not None else None
        preds.append(Prediction(logits, flops, tokens_all[rows].unflatten(0, (B, k)).sum(1),
                                full_all[rows].unflatten(0, (B, k)).sum(1)))
    return preds, [len(chunk) for chunk in chunks]


def predict_group(model, policy, group: list, settings: EvalSettings, *, scale: float = 1.0,
                  flop_model=None) -> tuple[list, list]:
    """(image, label) pairs -> ([(labels, Prediction) per run of equal-size images],
    rows of each forward). Whole images: ``group`` is one equal-size batch, one forward;
    sliding windows: the windows of the whole group share forwards (``predict_windows``)."""
    runs = [list(run) for run in image_batches(group, len(group))]  # consecutive equal sizes
    images = [torch.stack([image for image, _ in run]) for run in runs]
    labels = [torch.stack([label for _, label in run]) for run in runs]
    if settings.mode == "whole":
        preds = []
        for imgs, labs in zip(images, labels):
            attach_labels(policy, labs, settings, scale)
            preds.append(predict(model, policy, imgs, settings, scale=scale, flop_model=flop_model))
        return list(zip(labels, preds)), [n for p in preds for n in p.forwards]
    if getattr(policy, "needs_labels", False):
        attach_labels(policy, labels[0], settings, scale)  # refuses: the oracle is whole-image only
    preds, forwards = predict_windows(model, policy, images, settings, scale=scale, flop_model=flop_model)
    return list(zip(labels, preds)), forwards


def _items(dataset, indices):
    """Items at ``indices``, in order; a file dataset (``loader_workers``) is decoded ahead
    in DataLoader workers."""
    workers = min(getattr(dataset, "loader_workers", 0), len(indices))
    if workers <= 0:
        return (dataset[i] for i in indices)
    subset = torch.utils.data.Subset(dataset, indices)
    return iter(torch.utils.data.DataLoader(subset, batch_size=None, num_workers=workers))


def image_batches(dataset, batch_size: int, limit: Optional[int] = None, indices=None, same_size: bool = True):
    """Consecutive images of equal size (``same_size``; else of any sizes), at most
    ``batch_size`` at a time: the first ``limit`` images, or those at ``indices`` (in
    that order)."""
    if indices is None:
        indices = range(len(dataset) if limit is None else min(limit, len(dataset)))
    batch: list = []
    for image, label in _items(dataset, indices):
        if batch and (len(batch) == batch_size or (same_size and batch[0][0].shape != image.shape)):
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
    inters, unions = [], []  # per image and class, for the bootstrap intervals (bench.stats)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    mine = distributed.shard(n)
    bar = tqdm(total=len(mine), desc=f"eval {getattr(policy, 'name', '')}", unit="img",
               disable=not progress or not distributed.is_main(), leave=False)
    forwards = []  # rows of each forward: images (whole) or windows (slide, across images)
    whole = settings.mode == "whole"
    for group in image_batches(dataset, settings.batch_size, indices=mine, same_size=whole):
        runs, ran = predict_group(model, policy, group, settings, scale=scale, flop_model=flop_model)
        forwards += ran
        for labels, pred in runs:
            classes = pred.logits.argmax(1).cpu()
            cm.update(classes, labels)
            inter, union = per_image_counts(classes, labels, num_classes, ignore_index)
            inters.append(inter)
            unions.append(union)
            flops.append(pred.flops)
            tokens = tokens + pred.tokens.sum(0)
            full = full + pred.full_tokens.sum()
        bar.update(len(group))
    bar.close()
    flops = torch.cat(flops) if flops else torch.zeros(0, dtype=torch.long)
    empty = torch.zeros(0, num_classes, dtype=torch.long)
    inters, unions = (torch.cat(inters) if inters else empty), (torch.cat(unions) if unions else empty)
    if distributed.is_distributed():
        distributed.all_reduce_sum(cm.matrix)
        parts = distributed.all_gather_object((list(mine), flops, tokens, full, inters, unions))
        flops = torch.zeros(n, dtype=parts[0][1].dtype)
        inters, unions = torch.zeros(n, num_classes, dtype=torch.long), torch.zeros(n, num_classes, dtype=torch.long)
        for indices, part, _, _, inter, union in parts:
            flops[indices] = part  # back in split order: the same numbers as one process
            inters[indices], unions[indices] = inter, union
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
        "per_image": (inters.numpy(), unions.numpy()),  # (n, C) intersections and unions, split order
        "forward_batch": forward_batch(forwards),  # this process's forwards
    }


def forward_batch(forwards: list) -> dict:
    """What "batch" meant in the forwards that ran: their mean and largest number of
    rows (images, or windows under sliding windows) and how many forwards ran."""
    return {"mean": sum(forwards) / len(forwards) if forwards else 0.0, "max": max(forwards, default=0),
            "forwards": len(forwards)}

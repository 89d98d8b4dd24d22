"""``bench.flops`` and ``bench.time``: the records' FLOP counter and timing loop, for
any model a notebook holds (patched or not)."""
from __future__ import annotations

import statistics
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from bench.errors import BenchError
from bench.flops import FlopModel, count_flops, eval_mode
from bench.timing import interleave, spread
from methods.encoder import Policy
from methods.segmenter import Segmenter
from methods.timm_patch import PatchedSegmenter, PatchedViT, _scaled, is_timm_vit


def _check_images(images) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise BenchError(f"images must be a float tensor (B, C, H, W), the model's input; got {shape}")
    if images.shape[0] == 0:
        raise BenchError("images is an empty batch; expected at least one image")
    return images


def image_flops(model: nn.Module, images: Tensor) -> Tensor:
    """(B,) int64 FLOPs (fvcore's: one multiply-add = one flop) of each image's forward.

    bench's models and patched models are priced from their compute trace, as records
    are (``FlopModel``: per-image, so a dynamic method's images differ); any other module
    is counted whole with fvcore and the batch's count shared equally."""
    images = _check_images(images)
    if is_timm_vit(model):
        from methods import METHODS
        from methods.timm_patch import patch_model

        model = patch_model(model, METHODS["baseline"], {})
    try:
        with eval_mode(model), torch.inference_mode():
            if isinstance(model, (PatchedViT, PatchedSegmenter)):
                _, state = model.forward_state(images)
                encoder, policy = model.encoder, model.policy
                hw = _scaled(images[:1], model.scale).shape[-2:]
            elif isinstance(model, Segmenter):
                _, state = model.forward_state(images)
                encoder, policy, hw = model, Policy(), images.shape[-2:]
            else:
                total = count_flops(model, (images,))
                B = images.shape[0]
                return torch.full((B,), total // B, dtype=torch.long)
            return FlopModel(encoder, policy).image_flops(state.trace, tuple(hw))
    except ValueError as e:  # a shape the model cannot take, said in one line
        raise BenchError(str(e).splitlines()[0]) from None


def flops(model: nn.Module, images: Tensor, per_image: bool = False) -> Union[float, list[float]]:
    """GFLOPs per image of ``model(images)``, mean over the batch (``per_image``: one value
    per image), from the same counter as the result records (``image_flops``).
    ``images``: the model's float input (B, C, H, W)."""
    counts = image_flops(model, images).double() / 1e9
    return counts.tolist() if per_image else float(counts.mean())


def _named(models) -> dict:
    if isinstance(models, nn.Module):
        models = [models]
    if isinstance(models, dict):
        named = dict(models)
    else:
        named, seen = {}, {}
        for m in models:
            base = getattr(m, "method", None) or type(m).__name__
            seen[base] = seen.get(base, 0) + 1
            named[base if seen[base] == 1 else f"{base}-{seen[base]}"] = m
    if not named or not all(isinstance(m, nn.Module) for m in named.values()):
        raise BenchError("models must be a module, a list of modules or a dict name -> module")
    return named


def time(models, images: Tensor, batch_sizes: Sequence[int] = (1, 8), *, warmup: int = 2, repeats: int = 5,
         device: str | None = None):
    """Throughput, latency and speedup of several models on the same images, with the
    loop of ``bench run`` (``timing.time_methods``): pre-loaded inputs, inference mode,
    the models interleaved repeat by repeat so that drift in the machine's speed hits all
    alike, median over ``repeats`` after ``warmup`` passes, the device synchronised.

    ``models``: a module, a list (named by their method or class) or a dict name -> module;
    the first is the reference of every speedup (the ratio of median throughputs). Returns
    a pandas DataFrame, one row per (model, batch size): ``throughput`` (images/s),
    ``throughput_iqr``, ``speedup``, and at batch 1 ``latency_p50_ms`` / ``latency_p90_ms``.
    """
    import pandas as pd

    named = _named(models)
    images = _check_images(images)
    if warmup < 0 or repeats < 1 or not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise BenchError("expected warmup >= 0, repeats >= 1 and batch sizes >= 1")
    if device is None:
        first = next(next(iter(named.values())).parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    images = images.to(device)
    for model in named.values():
        model.eval()
    rows = []
    for bs in batch_sizes:
        steps = {name: (lambda k, chunk, model=model: model(chunk)) for name, model in named.items()}
        with torch.inference_mode():
            rates, latencies, _ = interleave(steps, list(images.split(int(bs))), len(images), device,
                                             warmup=warmup, repeats=repeats, latency=int(bs) == 1)
        first = statistics.median(next(iter(rates.values())))
        for name in named:
            row = {"model": name, "batch_size": int(bs), "throughput": statistics.median(rates[name]),
                   "throughput_iqr": spread(rates[name])["iqr"]}
            row["speedup"] = row["throughput"] / first
            if latencies[name]:
                q = torch.tensor(latencies[name]).quantile(torch.tensor([0.5, 0.9])).tolist()
                row["latency_p50_ms"], row["latency_p90_ms"] = q
            rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["flops", "image_flops", "time"]

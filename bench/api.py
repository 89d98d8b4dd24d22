"""The Python door: what ``bench``'s commands do, as functions a notebook calls.

``patch`` / ``unpatch`` apply a method to a timm ViT or bench's Segmenter
(``methods.timm_patch``); ``segmenter`` builds bench's model (a preset or any timm ViT
by name); ``fine_tune`` trains a patched Segmenter's heads or weights with the method's
loss and budget rules; ``run`` and ``report`` are ``bench run`` and ``bench report``;
``load_records`` reads stored results into pandas. ``flops`` and ``time`` live in
``bench.measure``. Bad input is a one-line ``BenchError``, raised before any work.
"""
from __future__ import annotations

import tempfile
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional, Union

from torch import nn

from bench.errors import BenchError


def _method(name: str):
    from bench.runspec import get_method

    if not isinstance(name, str):
        raise BenchError(f"method must be a method's name (see `bench methods`), got {type(name).__name__}")
    return get_method(name)


def patch(model: nn.Module, method: str, *, output: str = "grid", num_classes: Optional[int] = None, **knobs):
    """``model`` running ``method`` at ``knobs``, as a wrapper (the model is not changed;
    the wrapper shares its weights; ``.model`` or ``unpatch`` gives it back).

    ``model``: a timm ``VisionTransformer`` (any width, depth, patch and image size; class
    token on or off; a distillation token) -> a ``PatchedViT`` whose ``forward_features``,
    ``forward_head`` and ``forward`` are timm's; or bench's ``Segmenter`` -> a
    ``PatchedSegmenter`` whose ``forward(images)`` gives logits. ``method``: any method of
    the registry (``bench methods``), plugins included; ``knobs``: its operating point
    (e.g. ``r=8`` for tome). Training-free methods work at once; methods with heads add
    them untrained (``fine_tune``). timm only: ``output="rows"`` returns merged rows as
    ``tome.patch.timm`` does ("grid", default: one token per patch, the unpatched shape);
    ``num_classes``: the classes of a method's per-patch heads (default: the model's).
    """
    from methods.timm_patch import patch_model

    spec = _method(method)
    try:
        return patch_model(model, spec, knobs, output=output, num_classes=num_classes)
    except (TypeError, ValueError) as e:
        raise BenchError(f"cannot patch with {spec.name}: {str(e).splitlines()[0]}") from None


def unpatch(model: nn.Module) -> nn.Module:
    """The model ``patch`` was given (unchanged; a model that is not patched comes back as it is)."""
    from methods.timm_patch import _Patched

    return model.model if isinstance(model, _Patched) else model


def segmenter(model: str = "tiny", dataset: str = "synthetic", *, pretrained: bool = False,
              data_root: Optional[str] = None, seed: int = 0, **overrides):
    """bench's Segmenter for ``dataset`` (its classes and default decoder), untrained:
    ``model`` a preset (``tiny``, ``vit_small``, ...) or ``timm:<name>``, any plain timm ViT
    by architecture name; ``pretrained`` loads timm's ImageNet weights into the encoder.
    ``overrides``: ModelConfig fields (``depth=2``, ``decoder="linear"``, ``img_size=...``).
    The weights are a function of ``seed`` alone, as ``bench run``'s."""
    import torch

    from bench import datasets
    from methods.segmenter import build_model

    spec = datasets.get_spec(dataset, data_root)
    overrides.setdefault("decoder", spec.preset.decoder)
    torch.manual_seed(seed)
    try:
        return build_model(spec.num_classes, model, pretrained=pretrained, **overrides)
    except (TypeError, ValueError, RuntimeError) as e:
        raise BenchError(str(e).splitlines()[0]) from None


def fine_tune(patched: nn.Module, dataset: str = "synthetic", *, steps: Optional[int] = None,
              data_root: Optional[str] = None, device: str = "cpu", seed: int = 0, progress: bool = False,
              checkpoint: Optional[Union[str, Path]] = None):
    """Train a patched Segmenter with its method's fine-tuning loss (PAUMER's and early
    exit's heads, ``baseline-ft``, ``algm-ft``) on ``dataset``'s training split, with
    ``bench run``'s recipe: the dataset's optimiser, crops and batch size, the method's
    share of its learning rate, and ``steps`` (default: the method's share of the
    dataset's budget). Trains in place (the weights are the patched model's) and returns
    it in eval mode. ``checkpoint``: where to keep the resumable checkpoint (default: a
    temporary file, deleted after)."""
    from bench import datasets
    from bench.runspec import RunOptions, train_config
    from bench.train import train
    from methods.timm_patch import PatchedSegmenter, PatchedViT

    if isinstance(patched, PatchedViT):
        raise BenchError("fine_tune trains segmentation heads on bench's Segmenter; build one on this "
                         "architecture with bench.segmenter('timm:<name>') (or --model timm:<name>), then patch it")
    if not isinstance(patched, PatchedSegmenter):
        raise BenchError(f"fine_tune takes a model from bench.patch(segmenter, method), got {type(patched).__name__}")
    spec = _method(patched.method)
    ft = spec.fine_tune
    if ft is None:
        raise BenchError(f"{spec.name} is training-free: it runs on the model's own weights, nothing to fine-tune")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise BenchError(f"steps must be a positive integer, got {steps!r}")
    data = datasets.get_spec(dataset, data_root)
    base = train_config(RunOptions(dataset=dataset, data_root=data_root, seed=seed), data)
    knobs = {**ft.knobs, **{k: v for k, v in patched.knobs.items() if k in ft.knobs}}
    cfg = replace(base, method=spec.name, method_knobs=knobs, lr=base.lr * ft.lr_factor,
                  steps=steps or max(1, round(base.steps * ft.steps_fraction)), warmup_steps=min(base.warmup_steps, 50))
    train_set = datasets.open_dataset(dataset, "train", data_root)
    loss = lambda m, images, labels: ft.loss(m, images, labels, **knobs)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(checkpoint) if checkpoint is not None else Path(tmp) / "fine-tune.pt"
        train(patched.trainable, train_set, cfg, path, loss_fn=loss, device=device, progress=progress)
    return patched.eval()


def run(method: str = "baseline", dataset: str = "synthetic", *, ops=None, **options) -> list[dict]:
    """``bench run`` from Python: trains (or reuses) the checkpoints, evaluates, counts
    and times ``method`` at its operating points against the baseline, appends the
    records to ``results`` and returns them. ``ops``: a list of knob dicts or ``--op``
    strings ("r=8"); None: the method's default sweep. ``options``: any field of
    ``bench.runspec.RunOptions`` (``model="timm:deit_small_patch16_224"``, ``steps``,
    ``limit``, ``results``, ``checkpoints``, ``device``, ``timing_images``, ``repeats``...)."""
    from bench.runner import run as run_options
    from bench.runspec import RunOptions, parse_op

    known = {f.name for f in fields(RunOptions)} - {"method", "dataset", "ops"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BenchError(f"bench.run has no option {', '.join(unknown)}; expected some of: {', '.join(sorted(known))}")
    spec = _method(method)
    if ops is not None:
        if isinstance(ops, (str, dict)):
            ops = [ops]
        ops = [parse_op(spec, op) if isinstance(op, str) else dict(op) for op in ops]
    options.setdefault("progress", False)
    return run_options(RunOptions(method=method, dataset=dataset, ops=ops, **options))


def report(results: str = "results", out: str = "reports", **options) -> list[Path]:
    """``bench report``: tables, CSV and figures under ``out`` from every record under
    ``results``; returns the files written (options: ``width``, ``checkpoints``)."""
    from bench.report.build import report as build

    return build(results, out, **options)


def load_records(path_or_dataset: Union[str, Path] = "synthetic", results: str = "results"):
    """Stored records as a pandas DataFrame, one row per record: every record field, each
    knob a column of its own (``knob_<name>`` where a record field has the knob's name),
    ``op`` the operating point as reports write it, and flat ``gflops_mean``,
    ``throughput_b<B>`` / ``speedup_b<B>`` per batch size, ``latency_p50_ms`` / ``_p90_ms``. ``path_or_dataset``: a ``.jsonl`` file, a results folder
    (every dataset in it), or a dataset name (``<results>/<name>.jsonl``)."""
    import pandas as pd

    from bench.results import ResultsStore, op_label

    path = Path(path_or_dataset)
    if path.suffix == ".jsonl" or path.is_file():
        if not path.is_file():
            raise BenchError(f"no results file {path}; expected a .jsonl written by bench run")
        records = ResultsStore(path.parent).load(path.stem)
    elif path.is_dir():
        records = ResultsStore(path).load()
    else:
        store = ResultsStore(results)
        if not store.path_for(str(path_or_dataset)).exists():
            raise BenchError(f"no records for {path_or_dataset!r} under {results}/; expected a dataset with "
                             "stored results, a .jsonl file or a results folder")
        records = store.load(str(path_or_dataset))
    rows = []
    for rec in records:
        row = dict(rec)
        knobs = rec.get("knobs") or {}
        row["op"] = op_label(knobs)
        for k, v in knobs.items():
            row[f"knob_{k}" if k in rec else k] = tuple(v) if isinstance(v, list) else v
        if isinstance(rec.get("gflops"), dict):
            row["gflops_mean"] = rec["gflops"].get("mean")
        for bs, entry in (rec.get("speed") or {}).items():  # batch size -> its speed entry
            if isinstance(entry, dict):
                row[f"throughput_b{bs}"], row[f"speedup_b{bs}"] = entry.get("throughput"), entry.get("speedup")
                latency = entry.get("latency_ms")
                if isinstance(latency, dict):
                    row["latency_p50_ms"], row["latency_p90_ms"] = latency.get("p50"), latency.get("p90")
        rows.append(row)
    return pd.DataFrame(rows)

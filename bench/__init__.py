"""bench: adaptive-compute methods for segmentation transformers under one protocol.

The Python API (docs/python-api.md), imported on first use so that ``import bench`` and
the CLI stay light:

- ``bench.patch(model, method, **knobs)`` / ``bench.unpatch(patched)``: a method on a timm
  ViT or bench's Segmenter; ``bench.segmenter(model, dataset)``: bench's model, a preset or
  ``timm:<name>``; ``bench.fine_tune(patched, dataset, steps=...)``: train its heads;
- ``bench.flops(model, images)``: GFLOPs per image, the records' counter;
  ``bench.time(models, images, batch_sizes=...)``: the interleaved timing loop of ``bench run``;
- ``bench.run(method, dataset, ...)``, ``bench.report(...)``: ``bench run`` / ``bench report``;
  ``bench.load_records(path_or_dataset)``: stored records as a pandas DataFrame;
- ``bench.load_segmenter(path, format=None, **overrides)``: a released or bench checkpoint
  as a Segmenter (``bench.loading``).
"""
from __future__ import annotations

import importlib
import sys
import types

_API = {
    "patch": "bench.api", "unpatch": "bench.api", "segmenter": "bench.api", "fine_tune": "bench.api",
    "run": "bench.api", "report": "bench.api", "load_records": "bench.api",
    "flops": "bench.measure", "time": "bench.measure",
    "load_segmenter": "bench.loading",
    "BenchError": "bench.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    # a submodule of the same name (bench.report, ...) is found by the import system first,
    # so only the API's functions come through here
    if name not in _API:
        raise AttributeError(f"module 'bench' has no attribute {name!r}")
    try:
        module = importlib.import_module(_API[name])
    except ModuleNotFoundError as e:
        if e.name != _API[name]:
            raise
        raise AttributeError(f"bench.{name} needs {_API[name]}, which this checkout does not have") from None
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))


class _Package(types.ModuleType):
    """``bench.flops`` and ``bench.report`` are API functions and also submodules
    (``bench/flops.py``, ``bench/report/``). Importing a submodule binds it on its
    package, which would hide the function; the binding is refused here, so the names
    stay the functions and the modules stay importable (``from bench.flops import ...``)."""

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package  # a ModuleType subclass, as the import system allows

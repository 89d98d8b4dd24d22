"""A baseline imported with ``--weights`` instead of trained (``bench.weights``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from bench.errors import BenchError
from bench.runspec import RunOptions, _model_config, new_model, stored_checkpoint
from bench.train import TrainConfig


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


def stored_baseline(opts: RunOptions, cfg: TrainConfig) -> Optional[dict]:
    """The baseline's payload when there is one without training (imported or stored)."""
    if opts.weights is not None:
        return imported_baseline(opts, cfg)[1]
    return stored_checkpoint(opts, cfg)


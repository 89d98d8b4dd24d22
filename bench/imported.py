"""A baseline imported with ``--weights`` instead of trained (``bench.weights``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from bench.errors import BenchError
from bench.runspec import RunOptions, _model_config, new_model, stored_checkpoint
from bench.train import TrainConfig


def imported_baseline(opts: RunOptions, cfg: TrainConfig):
    """The baseline of ``cfg`` with the weights of ``opts.weights`` (``bench.weights``):
    (model, payload). The payload is a checkpoint's, never trained: step 0, ``weights``
    the hash of the loaded state dict, ``source`` where it came from."""
    from bench.loading import read_for_preset
    from bench.released import find_released
    from bench.weights import load_into

    if cfg.pretrained:
        raise BenchError("--weights and --pretrained exclude each other: the imported weights replace ImageNet's")
    stat = Path(opts.weights).stat() if Path(opts.weights).is_file() else None
    key = (str(Path(opts.weights).resolve()), stat and (stat.st_size, stat.st_mtime_ns), opts.weights_format,
           cfg.hash(), json.dumps(cfg.model_overrides, sort_keys=True))
    if _IMPORTED.get("key") != key:  # validate, plan and run ask for it in turn: read the file once
        imported, ref = read_for_preset(opts.weights, opts.weights_format, cfg.model, cfg.model_overrides["decoder"])
        model = new_model(cfg)
        weights = load_into(model, imported, preset=cfg.model, num_classes=cfg.num_classes, dataset=cfg.dataset)
        print(f"--weights {ref.line(imported)}", file=sys.stderr)  # after every check: errors stay one line
        _say_grid(opts, cfg, ref)
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


def _say_grid(opts: RunOptions, cfg: TrainConfig, ref) -> None:
    """One line where the file's grid or window is not the dataset preset's."""
    from bench import datasets
    from bench.runspec import _settings

    spec = datasets.get_spec(opts.dataset, opts.data_root, opts.dataset_name)
    p, settings = spec.preset, _settings(spec, opts)
    if p.eval_mode == "slide" and (settings.window, settings.stride) != (p.window, p.stride):
        print(f"--weights {opts.weights}: evaluated at its own grid: trained at {ref.config.img_size}, window "
              f"{settings.window} stride {settings.stride} (the {spec.name} preset: {p.window} / {p.stride})",
              file=sys.stderr)
    elif ref.config.img_size != (p.window or ref.config.img_size):
        print(f"--weights {opts.weights}: trained at {ref.config.img_size}; its position embedding is resized "
              f"once, to each input's grid", file=sys.stderr)


def stored_baseline(opts: RunOptions, cfg: TrainConfig) -> Optional[dict]:
    """The baseline's payload when there is one without training (imported or stored)."""
    if opts.weights is not None:
        return imported_baseline(opts, cfg)[1]
    return stored_checkpoint(opts, cfg)


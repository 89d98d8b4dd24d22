"""What a checkpoint was trained with, stored where a reader finds it: the full training
configuration (``full_config``) in the checkpoint payload, in each record and in a
``config.json`` beside the checkpoint; and, with ``--tensorboard``, the training log's
losses as TensorBoard events beside the JSONL log.

None of it enters a hash: the config hash (``TrainConfig.hash``) stays that of its
canonical form, which leaves out fields at their old defaults."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from bench.errors import BenchError
from bench.fileio import atomic_write

TENSORBOARD_HINT = "pip install tensorboard (or bench[tensorboard])"


def full_config(cfg) -> dict:
    """Every field of a ``TrainConfig``, defaults included, as JSON types, and its hash."""
    d = asdict(cfg)
    d["scale_range"] = list(cfg.scale_range)
    return {**d, "hash": cfg.hash()}


def config_path(checkpoint: Path) -> Path:
    """``x.pt`` -> ``x.config.json``: the checkpoint's training configuration."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".config.json")


def write_config(checkpoint: Path, cfg) -> Path:
    """Writes ``full_config(cfg)`` beside ``checkpoint`` (atomically; sorted keys, so the
    same configuration gives the same bytes). Returns its path."""
    path = config_path(checkpoint)
    data = (json.dumps(full_config(cfg), indent=2, sort_keys=True) + "\n").encode()
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write(path, lambda f: f.write(data))
    return path


def tensorboard_dir(checkpoint: Path) -> Path:
    """``x.pt`` -> ``x.tb/``: TensorBoard events of the checkpoint's training."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".tb")


def check_tensorboard() -> None:
    """A BenchError, one line, when ``--tensorboard`` cannot write events here."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise BenchError(f"--tensorboard needs the tensorboard package, which is not installed: "
                         f"{TENSORBOARD_HINT}; or leave --tensorboard out (the JSONL log is written anyway)") from None


class TensorBoardLog:
    """The training log's lines as scalars (``train/loss``, ``train/lr``,
    ``train/step_time_s``) at their step, written to ``tensorboard_dir(checkpoint)``."""

    def __init__(self, checkpoint: Path):
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer: Optional[SummaryWriter] = SummaryWriter(log_dir=str(tensorboard_dir(checkpoint)))

    def write(self, entry: dict) -> None:
        for key in ("loss", "lr", "step_time_s"):
            if key in entry:
                self.writer.add_scalar(f"train/{key}", entry[key], entry["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

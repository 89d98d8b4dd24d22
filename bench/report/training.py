"""Training curves of the checkpoints behind a dataset's rows, read from the logs beside them."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import pandas as pd

from bench.report.figures import WIDTHS
from bench.report.records import _is_number, plain_name
from bench.report.tables import _short, group_key
from bench.results import op_label


def training_logs(records: list[dict], checkpoints: Path, labels: dict[str, str]) -> list[tuple[str, Path]]:
    """(label, path) of the training log of every checkpoint behind the rows that has
    one: ``<checkpoints>/<dataset>/<method>-<model>-<config_hash>.log.jsonl``, where
    the method is the row's for a fine-tuned row and ``baseline`` otherwise."""
    found: dict[Path, str] = {}
    several = len(set(labels.values())) > 1
    for r in records:
        config_hash, model = r.get("train", {}).get("config_hash"), r.get("model")
        if not plain_name(config_hash) or not plain_name(model):  # parts of a path: never "../x"
            continue
        own = r.get("checkpoint") != r.get("baseline_checkpoint")  # fine-tuned: its own checkpoint
        trained = [r["method"]] if own else ["baseline"] if "baseline_checkpoint" in r else [r["method"], "baseline"]
        for method in trained:
            if not plain_name(method):
                continue
            path = checkpoints / r["dataset"] / f"{method}-{model}-{config_hash}.log.jsonl"
            # the same configuration trained elsewhere (another machine's rounding) has other
            # weights: draw a log only next to the checkpoint whose weights the row names
            weights = r.get("baseline_checkpoint", r.get("checkpoint")) if method == "baseline" else r.get("checkpoint")
            if path.is_file() and path not in found and _checkpoint_weights(path) == weights:
                name = f"{method} {op_label(_training_knobs(method, r['knobs']))}".rstrip(" -")  # shallow depth=2
                found[path] = f"{name} ({_short(labels[group_key(r)])})" if several else name
    return sorted(((label, path) for path, label in found.items()), key=lambda item: (item[0], str(item[1])))


def _checkpoint_weights(log: Path) -> Optional[str]:
    """The weights hash stored in the checkpoint next to a training log (None: none there)."""
    import torch

    path = log.with_name(log.name[: -len(".log.jsonl")] + ".pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("weights")
    except Exception:  # noqa: BLE001 (missing or unreadable: the log cannot be matched to the row)
        return None


def _training_knobs(method: str, knobs: dict) -> dict:
    """The knobs of an operating point that pick its checkpoint (shallow's depth)."""
    from methods import all_methods

    ft = getattr(all_methods().get(method), "fine_tune", None)
    return {k: knobs[k] for k in (ft.op_knobs if ft else ()) if k in knobs}


def read_training_log(path: Path) -> pd.DataFrame:
    """Steps and losses of a training log; a resumed run re-logs steps, the last entry
    of a step wins. Lines that are not a step entry are left out."""
    entries = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and _is_number(e.get("step")) and _is_number(e.get("loss")):
            entries[e["step"]] = e["loss"]
    return pd.DataFrame(sorted(entries.items()), columns=["step", "loss"])


def training_figure(logs: list[tuple[str, Path]], width: str = "text"):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    w = WIDTHS[width]
    rows = math.ceil(len(logs) / (1 if width == "column" else 2))
    fig, ax = plt.subplots(figsize=(w, (0.3 * w if width == "text" else 0.65 * w) + 0.5 + 0.14 * rows),
                           layout="constrained")
    for i, (label, path) in enumerate(logs):
        curve = read_training_log(path)
        if len(curve):
            ax.plot(curve["step"], curve["loss"], label=label, linewidth=0.8, color=f"C{i % 10}")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, not 5x10^-1
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training step (of that checkpoint)")
    ax.set_ylabel("training loss")
    fig.legend(loc="outside lower center", ncol=1 if width == "column" else 2, frameon=False)
    return fig

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


def _loss_kind(method: str) -> str:
    """"segmentation": the plain pixel loss; "with head loss": plus its heads' terms
    (``FineTune.loss_kind``: PAUMER, early exit, DToP)."""
    from methods import all_methods

    ft = getattr(all_methods().get(method), "fine_tune", None)
    return ft.loss_kind if ft is not None else "segmentation"


def _group_of(label: str) -> str:
    """The "(group)" suffix of a label when a dataset has several baseline groups."""
    return label[label.rfind(" ("):] if label.endswith(")") and " (" in label else ""


def training_curves(logs: list[tuple[str, Path]]) -> list[dict]:
    """Each log as a curve: label, method, loss kind, steps on one axis (a fine-tune's
    continue after its baseline's last logged step, as its training did), losses, and
    the first logged step of the checkpoint's own count."""
    curves = []
    for label, path in logs:
        curve = read_training_log(path)
        if len(curve):
            method = label.split(" ")[0]
            curves.append({"label": label, "method": method, "kind": _loss_kind(method), "group": _group_of(label),
                           "step": curve["step"].astype(float), "loss": curve["loss"], "first": int(curve["step"].iloc[0])})
    ends = {c["group"]: float(c["step"].iloc[-1]) for c in curves if c["method"] == "baseline"}
    for c in curves:
        c["offset"] = ends.get(c["group"], 0.0) if c["method"] != "baseline" else 0.0
    return curves


def training_figure(logs: list[tuple[str, Path]], width: str = "text", caption: str = ""):
    """Training loss against step: one panel per kind of loss (the plain segmentation
    loss, and losses with a head term, which are not comparable with it); fine-tunes
    drawn from the baseline's last step on; colour the method's (``bench.report.style``);
    a curve whose log starts late says so in its label."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from bench.report.figures import _caption
    from bench.report.style import method_color

    curves = training_curves(logs)
    kinds = [k for k in ("segmentation", "with head loss") if any(c["kind"] == k for c in curves)] or ["segmentation"]
    w = WIDTHS[width]
    cols = 1 if width == "column" else len(kinds)
    rows = math.ceil(len(kinds) / cols)
    panel_h = 0.3 * w if width == "text" else 0.6 * w
    fig, axes = plt.subplots(rows, cols, figsize=(w, rows * panel_h + 0.6 + 0.13 * len(curves) / (3 if cols > 1 else 2)),
                             squeeze=False, layout="constrained")
    dashes = ["-", (0, (4, 1.5)), (0, (1.5, 1)), (0, (6, 1.5, 1.5, 1.5))]
    seen: dict[str, int] = {}
    for ax, kind in zip(axes.flat, kinds):
        mine = [c for c in curves if c["kind"] == kind]
        for c in mine:
            color = method_color(c["method"])  # the baseline and its control share black: dashes apart
            n = seen.setdefault(c["label"], sum(1 for x in seen if method_color(x.split(" ")[0]) == color))
            late = f" (logged from step {c['first']:,})" if c["first"] > 20 else ""
            ax.plot(c["step"] + c["offset"], c["loss"], label=c["label"] + late, linewidth=0.8,
                    color=method_color(c["method"]), linestyle=dashes[n % len(dashes)])
        ax.set_yscale("log")
        losses = pd.concat([c["loss"] for c in mine]) if mine else pd.Series([1.0])
        decades = math.log10(max(losses.max(), 1e-12) / max(losses.min(), 1e-12))
        subs = (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9) if decades < 1 else (1, 2, 3, 5, 7) if decades < 2 else (1, 2, 5)
        ax.yaxis.set_major_locator(LogLocator(subs=subs))  # at least 4 labels, however narrow the range
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, not 5x10^-1
        ax.yaxis.set_minor_formatter(NullFormatter())
        offsets = sorted({c["offset"] for c in mine if c["offset"]})
        for x in offsets:
            ax.axvline(x, color="grey", linewidth=0.6, linestyle=":", zorder=0)
        ax.set_title("segmentation loss" if kind == "segmentation" else "segmentation + head losses")
        ax.set_xlabel("training step (fine-tunes after the baseline's)" if offsets else "training step")
        ax.set_ylabel("training loss")
        if len(mine) > 8:  # seeds multiply the curves: a legend inside would cover them
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="small", frameon=False)
        else:
            ax.legend(loc="best", frameon=True, framealpha=0.85, edgecolor="none")
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    _caption(fig, caption, width)
    return fig

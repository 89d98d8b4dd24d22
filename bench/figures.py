"""Qualitative figures: where an adaptive method spent its compute."""
from __future__ import annotations

from pathlib import Path
from collections import Counter
from typing import Sequence

import numpy as np
import torch

from bench.protocol import EvalSettings, predict

FONT_PT = 7  # smallest text at the printed size (the figure is drawn at its print width)
MAX_LEGEND_CLASSES = 30


def _colorize(label: np.ndarray, palette) -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    return lut[label.astype(np.uint8)]


def spread_indices(n: int, count: int) -> list[int]:
    """``count`` indices evenly spaced over a split of ``n`` images, first and last
    included: images of consecutive video frames sit far apart, not side by side."""
    if n <= 0 or count <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n - 1, min(count, n)).round()})


def exit_levels(policies: Sequence, depth: int, maps: Sequence[np.ndarray] = ()) -> list[int]:
    """The blocks a token can leave after: the policies' pausing or exit layers (their
    ``describe()["layers"]``), plus ``depth`` (never left). A policy that does not name
    its layers contributes the values its maps hold."""
    levels = {depth}
    for policy in policies:
        layers = policy.describe().get("layers") if hasattr(policy, "describe") else None
        if layers:
            levels.update(int(l) for l in layers)
        else:
            levels.update(int(v) for m in maps for v in np.unique(m))
    return sorted(levels)


def _common_knobs(names: Sequence[str]) -> str:
    """The method and the knobs every run shares ("early-exit mode=token"), said once."""
    parts = [n.split() for n in names]
    return " ".join(p for p in parts[0] if all(p in other for other in parts)) if parts else ""


def _short_names(names: Sequence[str]) -> dict:
    """Each run's name without what every run shares: "threshold=0.95" for
    "early-exit mode=token threshold=0.95", so column titles fit their column."""
    shared = set(_common_knobs(names).split())
    return {n: " ".join(p for p in n.split() if p not in shared) or n for n in names}


def level_labels(levels: Sequence[int], depth: int) -> list[str]:
    return [f"full depth ({depth})" if l == depth else f"after block {l}" for l in levels]


@torch.inference_mode()
def pause_maps(model, runs: list, dataset, indices: list[int], path: Path, *, palette, depth: int,
               classes: Sequence[str] = (), title: str = "", width: float = 7.0) -> Path:
    """One row per image: image, label, then for each (name, policy) in ``runs`` the
    prediction and the block after which each patch left the encoder. Below, a legend
    of the classes shown; at the side, a colour bar of the blocks a patch can leave
    after (the policies' layers, and full depth). Drawn ``width`` inches wide, written
    as PNG, SVG and PDF next to ``path``, each atomically; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from bench.fileio import atomic_write

    settings = EvalSettings("whole", device=str(next(model.parameters()).device))  # where the model is
    rows, left_maps, shown = [], [], Counter()  # class -> pixels drawn
    for i in indices:
        image, label = dataset[i]
        label = label.numpy()
        row = [(image.permute(1, 2, 0).numpy(), "image"), (_colorize(label, palette), "label")]
        shown.update(dict(zip(*np.unique(label, return_counts=True))))
        for name, policy in runs:
            short = _short_names([n for n, _ in runs])[name]
            pred = predict(model, policy, image[None], settings, keep_maps=True)
            argmax = pred.logits.argmax(1)[0].cpu().numpy()
            shown.update(dict(zip(*np.unique(argmax, return_counts=True))))
            left = pred.left_at[0].cpu().numpy()
            left_maps.append(left)
            row += [(_colorize(argmax, palette), f"{short}\nprediction"), (left, f"{short}\nleft after")]
        rows.append(row)
    levels = exit_levels([policy for _, policy in runs], depth, left_maps)
    from matplotlib.colors import ListedColormap

    from bench.report.style import full_depth_color

    # exit blocks dark to light; "full depth" a colour no class is near, so it reads apart
    early = [plt.get_cmap("viridis")(0.75 * i / max(1, len(levels) - 2)) for i in range(len(levels) - 1)]
    cmap = ListedColormap(early + [full_depth_color(palette)])
    rc = {"font.size": FONT_PT, "axes.titlesize": FONT_PT, "legend.fontsize": FONT_PT, "xtick.labelsize": FONT_PT,
          "ytick.labelsize": FONT_PT, "axes.labelsize": FONT_PT, "pdf.fonttype": 42, "svg.hashsalt": "bench"}
    with plt.rc_context(rc):
        cols = len(rows[0])
        cell = (width - 1.0) / cols  # an inch for the colour bar and its labels
        aspect = rows[0][0][0].shape[0] / rows[0][0][0].shape[1]  # image height / width: rows as tall as that
        fig, axes = plt.subplots(len(rows), cols, figsize=(width, cell * aspect * len(rows) + 0.75 + 0.25 * bool(title)),
                                 squeeze=False, layout="constrained")
        fig.get_layout_engine().set(h_pad=0.01, w_pad=0.01, hspace=0.01, wspace=0.02)
        for r, row in enumerate(rows):
            for ax, (data, name) in zip(axes[r], row):
                if data.ndim == 2:  # a map of exit blocks, drawn as the index of its level
                    im = ax.imshow(np.searchsorted(levels, data), cmap=cmap, vmin=-0.5, vmax=len(levels) - 0.5,
                                   interpolation="nearest")
                else:
                    ax.imshow(data, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(name)
        bar = fig.colorbar(im, ax=axes[:, -1].tolist(), ticks=range(len(levels)), shrink=0.9, aspect=30)
        bar.ax.set_yticklabels(level_labels(levels, depth))
        bar.set_label("patch left the encoder")
        drawn = [c for c, _ in shown.most_common() if c < len(palette) and (not classes or c < len(classes))]
        present = sorted(drawn[:MAX_LEGEND_CLASSES])  # a 150-class dataset: the classes that cover most
        handles = [Patch(facecolor=np.asarray(palette[c]) / 255, edgecolor="none",
                         label=classes[c] if classes else str(c)) for c in map(int, present)]
        if 255 in shown:
            handles.append(Patch(facecolor="black", edgecolor="none", label="ignored"))
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), frameon=False,
                   handlelength=1.0, handleheight=1.0, columnspacing=1.0)
        common = _common_knobs([n for n, _ in runs])
        heading = " · ".join(t for t in (title, common) if t)
        if heading:
            fig.suptitle(heading)
        path.parent.mkdir(parents=True, exist_ok=True)
        formats = [("png", {"dpi": 300}), ("svg", {"metadata": {"Date": None}}),
                   ("pdf", {"metadata": {"CreationDate": None, "ModDate": None}})]
        for fmt, kwargs in formats:  # no dates: the same maps give the same bytes
            atomic_write(path.with_name(f"{path.name}.{fmt}"),
                         lambda f, fmt=fmt, kwargs=kwargs: fig.savefig(f, format=fmt, **kwargs))
    plt.close(fig)
    return path.with_name(f"{path.name}.png")

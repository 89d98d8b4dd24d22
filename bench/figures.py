"""Qualitative figures: where an adaptive method spent its compute."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.fileio import atomic_write
from bench.protocol import EvalSettings, predict


def _colorize(label: np.ndarray, palette) -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    return lut[label.astype(np.uint8)]


@torch.inference_mode()
def pause_maps(model, runs: list, dataset, indices: list[int], path: Path, *, palette, depth: int,
               title: str = "") -> Path:
    """One row per image: image, label, then for each (name, policy) in ``runs`` the
    prediction and the layer at which each patch left the encoder (``depth`` = never).
    Written as PNG and SVG next to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 + 2 * len(runs)
    fig, axes = plt.subplots(len(indices), cols, figsize=(2.1 * cols, 2.1 * len(indices)), squeeze=False)
    cmap = plt.get_cmap("viridis", depth)
    settings = EvalSettings("whole", device=str(next(model.parameters()).device))  # where the model is
    for row, i in enumerate(indices):
        image, label = dataset[i]
        panels = [(image.permute(1, 2, 0).numpy(), "image", {}), (_colorize(label.numpy(), palette), "label", {})]
        for name, policy in runs:
            pred = predict(model, policy, image[None], settings, keep_maps=True)
            panels.append((_colorize(pred.logits.argmax(1)[0].cpu().numpy(), palette), f"{name}: prediction", {}))
            panels.append((pred.left_at[0].cpu().numpy(), f"{name}: layer left",
                           {"cmap": cmap, "vmin": 0.5, "vmax": depth + 0.5, "interpolation": "nearest"}))
        for ax, (data, name, kw) in zip(axes[row], panels):
            im = ax.imshow(data, **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
    cbar = fig.colorbar(im, ax=axes.ravel().tolist(), ticks=range(1, depth + 1), shrink=0.6)
    cbar.set_label(f"block after which the patch left ({depth} = computed by every block)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".png", ".svg"):
        # fixed ids and no date: the same maps give the same SVG bytes
        with plt.rc_context({"svg.hashsalt": "bench"}):
            atomic_write(path.with_suffix(suffix), lambda f: fig.savefig(
                f, format=suffix[1:], dpi=150, bbox_inches="tight", metadata={"Date": None} if suffix == ".svg" else None))
    plt.close(fig)
    return path.with_suffix(".png")

"""Does depth matter on `synthetic`? Trains `tiny` at several depths with bench's own
training loop and evaluates it with bench's protocol; prints one JSON line per run.

Usage: python scripts/depth_study.py [--depth 6 --depth 2] [--steps 1600] [--lr 1e-3]
           [--drop-path 0.1] [--window R] [--device cuda]

``--window R`` restricts attention to tokens within R grid steps (a (2R+1)^2 window,
through timm's ``attn_mask``), so the receptive field grows with depth as in a CNN: a
probe of how much the model uses long-range context. It is an experiment, not a model
preset: no method supports it. Checkpoints go to ``checkpoints/depth-study/`` (named
by the configuration hash, so re-running reuses them)."""
import argparse
import copy
import json
import time
from dataclasses import replace

import torch
from timm.models.vision_transformer import Block

from bench import datasets
from bench.flops import FlopModel
from bench.protocol import evaluate
from bench.runner import RunOptions, _settings, new_model, train_checkpoint, train_config
from methods.encoder import Policy


class WindowedBlock(torch.nn.Module):
    """A timm Block whose tokens attend only within `radius` grid steps (square grids)."""

    def __init__(self, block: Block, radius: int):
        super().__init__()
        self.block, self.radius, self.masks = block, radius, {}

    def forward(self, x, attn_mask=None):
        assert attn_mask is None, "the window study runs the baseline policy only"
        n = int(x.shape[1])
        key = (n, x.device)
        if key not in self.masks:
            side = int(round(n ** 0.5))
            rows, cols = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
            near = ((rows[:, None] - rows[None]).abs() <= self.radius) & \
                   ((cols[:, None] - cols[None]).abs() <= self.radius)
            self.masks[key] = torch.zeros(n, n).masked_fill(~near, float("-inf")).to(x.device)
        return self.block(x, attn_mask=self.masks[key])


def windowed(model, radius: int):
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, Block)]
    for parent, name, child in targets:
        setattr(parent, name, WindowedBlock(child, radius))
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, action="append", help="encoder blocks (repeatable; default 6 and 2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's 1,600)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--drop-path", type=float, default=None)
    ap.add_argument("--window", type=int, default=0, help="attention radius in tokens (0: global)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    spec = datasets.get_spec("synthetic")
    opts = RunOptions(checkpoints="checkpoints/depth-study", progress=False, steps=args.steps, device=args.device)
    val = datasets.open_dataset("synthetic", "val")
    for depth in args.depth or [6, 2]:
        cfg = train_config(opts, spec)
        over = {"depth": depth, **({"drop_path": args.drop_path} if args.drop_path is not None else {})}
        cfg = replace(cfg, lr=args.lr or cfg.lr, model_overrides={**cfg.model_overrides, **over},
                      method_knobs={"window": args.window} if args.window else {})
        model = windowed(new_model(cfg), args.window) if args.window else None
        start = time.time()
        model, _ = train_checkpoint(opts, cfg, model=model)
        train_s = time.time() - start
        model.to(args.device).eval()
        flops = FlopModel(copy.deepcopy(model).cpu(), Policy())
        res = evaluate(model, Policy(), val, _settings(spec, opts), flops, num_classes=spec.num_classes)
        print(json.dumps({"depth": depth, "steps": cfg.steps, "lr": cfg.lr, **over, "window": args.window,
                          "device": args.device, "train_s": round(train_s), "miou": round(100 * res["miou"], 2),
                          "per_class_iou": dict(zip(spec.classes, (round(100 * v, 1) for v in res["per_class_iou"])))}),
              flush=True)


if __name__ == "__main__":
    main()

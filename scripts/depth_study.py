"""Does depth matter? Trains `tiny` at several depths and budgets with bench's own
training loop on one dataset and evaluates it with bench's protocol; prints one JSON
line per run and, with ``--out``, stores it as a record.

Usage: python scripts/depth_study.py [--dataset synthetic] [--data-root DIR]
           [--depth 6 --depth 2] [--steps 1600 --steps 6400] [--lr 1e-3]
           [--drop-path 0.1] [--embed-dim 384 --heads 6] [--window R] [--device cuda] [--out results/depth-study]

Every (steps, depth) pair is one run, all runs of the first budget first. ``--window R``
restricts attention to tokens within R grid steps (a (2R+1)^2 window, through timm's
``attn_mask``), so the receptive field grows with depth as in a CNN: a probe of how much
the model uses long-range context. It is an experiment, not a model preset: no method
supports it. Checkpoints go to ``checkpoints/depth-study/<dataset>/`` (named by the
configuration hash, so re-running reuses them, and a killed run resumes).

``--out DIR`` appends each run to ``DIR/<dataset>.jsonl`` as an ordinary record of the
results store (method ``baseline`` of that checkpoint, no timing) with the run's
settings under ``"study"``; a run whose configuration is stored there already is
skipped, so the same command can simply be started again."""
import argparse
import copy
import json
import sys
import time
from dataclasses import replace

import torch
from timm.models.vision_transformer import Block

from bench import datasets
from bench.errors import BenchError
from bench.flops import FlopModel
from bench.protocol import evaluate
from bench.results import SCHEMA_VERSION, ResultsStore
from bench.runner import RunOptions, _settings, environment, new_model, train_checkpoint, train_config
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


def stored_configs(store: ResultsStore, dataset: str) -> set:
    """Training-configuration hashes of the study records already in ``store``."""
    return {r["train"]["config_hash"] for r in store.load(dataset) if "study" in r and "train" in r}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="synthetic", help="a dataset of `bench datasets` (default synthetic)")
    ap.add_argument("--data-root", default=None, help="its root (default: its environment variable or ./data)")
    ap.add_argument("--depth", type=int, action="append", help="encoder blocks (repeatable; default 6 and 2)")
    ap.add_argument("--steps", type=int, action="append",
                    help="training steps (repeatable; default: the preset's budget)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--drop-path", type=float, default=None)
    ap.add_argument("--embed-dim", type=int, default=None, help="token width (default: the preset's; a model-size axis)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default: the preset's)")
    ap.add_argument("--window", type=int, default=0, help="attention radius in tokens (0: global)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoints", default="checkpoints/depth-study")
    ap.add_argument("--out", default=None, help="results folder to store each run in (e.g. results/depth-study)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    try:
        study(args)
    except BenchError as e:  # one line, exit code 2, as bench's CLI
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def study(args):
    spec = datasets.get_spec(args.dataset, args.data_root)
    val = datasets.open_dataset(args.dataset, spec.preset.val_split, args.data_root)
    if args.window and spec.preset.eval_mode == "whole" and val[0][1].shape[0] != val[0][1].shape[1]:
        raise BenchError(f"--window needs square images (a square token grid); {spec.name}'s are "
                         f"{val[0][1].shape[1]}x{val[0][1].shape[0]}")
    store = ResultsStore(args.out) if args.out else None
    if store is not None:
        store.check_writable()  # before hours of training
        done = stored_configs(store, spec.name)
    env = environment(args.device, args.threads)  # the code as it is when the study starts
    for steps in args.steps or [None]:
        for depth in args.depth or [6, 2]:
            opts = RunOptions(dataset=args.dataset, data_root=args.data_root, checkpoints=args.checkpoints,
                              progress=False, steps=steps, device=args.device, threads=args.threads)
            cfg = train_config(opts, spec)
            over = {"depth": depth, **({"drop_path": args.drop_path} if args.drop_path is not None else {}),
                    **({"embed_dim": args.embed_dim} if args.embed_dim else {}),
                    **({"num_heads": args.heads} if args.heads else {})}
            cfg = replace(cfg, lr=args.lr or cfg.lr, model_overrides={**cfg.model_overrides, **over},
                          method_knobs={"window": args.window} if args.window else {})
            settings = {"depth": depth, "steps": cfg.steps, "lr": cfg.lr, **over, "window": args.window}
            if store is not None and cfg.hash() in done:
                print(f"stored already in {store.path_for(spec.name)}: {json.dumps(settings)}", file=sys.stderr)
                continue
            model = windowed(new_model(cfg), args.window) if args.window else None
            start = time.time()
            model, payload = train_checkpoint(opts, cfg, model=model)
            train_s = time.time() - start
            model.to(args.device).eval()
            flops = FlopModel(copy.deepcopy(model).cpu(), Policy())
            eval_settings = _settings(spec, opts)
            res = evaluate(model, Policy(), val, eval_settings, flops, num_classes=spec.num_classes)
            print(json.dumps({**settings, "dataset": spec.name, "device": args.device, "train_s": round(train_s),
                              "miou": round(100 * res["miou"], 2),
                              "per_class_iou": dict(zip(spec.classes,
                                                        (round(100 * v, 1) for v in res["per_class_iou"])))}),
                  flush=True)
            if store is not None:
                store.append(study_record(spec, cfg, payload, res, settings, train_s, eval_settings, env))


def study_record(spec, cfg, payload: dict, res: dict, settings: dict, train_s: float, eval_settings,
                 env: dict) -> dict:
    """One run as a results-store record: the baseline of its own checkpoint, the run's
    settings under ``"study"``."""
    eval_fields = {"mode": eval_settings.mode, "window": eval_settings.window, "stride": eval_settings.stride,
                   "scale": 1.0}
    return {
        "schema_version": SCHEMA_VERSION, "method": "baseline", "knobs": {}, "dataset": spec.name,
        "split": spec.preset.val_split, "checkpoint": payload.get("weights"),
        "baseline_checkpoint": payload.get("weights"), "model": cfg.model,
        "decoder": cfg.model_overrides.get("decoder"), "miou": res["miou"], "miou_delta": 0.0,
        "baseline_miou": res["miou"], "per_class_iou": dict(zip(spec.classes, res["per_class_iou"])),
        "gflops": res["gflops"], "gflops_ratio": 1.0, "baseline_gflops": res["gflops"]["mean"],
        "flops_unit": "GFLOPs (fvcore, MAC)", "tokens_per_block": res["tokens_per_block"],
        "images": res["images"], "eval": eval_fields, "seed": cfg.seed,
        "train": {"steps": cfg.steps, "config_hash": cfg.hash(), "seconds": round(train_s)},
        "study": settings, **env,
    }


if __name__ == "__main__":
    main()

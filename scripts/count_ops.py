"""Aten ops and host reads of one eager forward per method, as `bench speed` builds them
(forced schedules, random weights), without timing or FLOP pricing: a quick look at the
kernel budget (``bench.opcount``).

    python scripts/count_ops.py --size 256 --batch-size 8 [--model vit_small] [--top 15]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.opcount import OpCounter, forward_counts  # noqa: E402
from bench.protocol import EvalSettings, predict  # noqa: E402
from bench.speed import SpeedOptions, build_runs  # noqa: E402
from methods.segmenter import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--methods", default="paumer,early-exit,tome,static")
    p.add_argument("--batching", default="pad,packed")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--top", type=int, default=0, help="also list each method's most frequent ops")
    args = p.parse_args()
    torch.manual_seed(0)
    model = build_model(args.num_classes, args.model).eval()
    opts = SpeedOptions(model=args.model, size=args.size, methods=args.methods.split(","),
                        batching=args.batching.split(","))
    runs = build_runs(opts, model)
    for label, (name, m, policy, scale, knobs) in list(runs.items()):  # ALGM's sweep runs "pad": the others too
        if name == "algm":
            for batching in opts.batching:
                if batching != policy.batching:
                    other = copy.copy(policy)
                    other.batching = batching
                    runs[f"{label} batching={batching}"] = (name, m, other, scale, {**knobs, "batching": batching})
    x = torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    settings = EvalSettings(batch_size=args.batch_size, precision=args.precision)
    base = None
    with torch.inference_mode():
        for label, (_, m, policy, scale, _) in runs.items():
            predict(m, policy, x, settings, scale=scale)  # warm, as `bench speed`'s FLOP pass leaves it
            counts = forward_counts(lambda: predict(m, policy, x, settings, scale=scale), "cpu")
            base = base or counts["ops_per_forward"]
            print(f"{label:70s} ops {counts['ops_per_forward']:5d} (dispatched {counts['dispatched_ops_per_forward']:5d}) (x{counts['ops_per_forward'] / base:.2f})  "
                  f"host reads {counts['host_syncs_per_forward']}")
            if args.top:
                counter = OpCounter()
                with counter:
                    predict(m, policy, x, settings, scale=scale)
                top = sorted(counter.by_name.items(), key=lambda kv: -kv[1])[: args.top]
                print("    " + ", ".join(f"{k} {v}" for k, v in top))


if __name__ == "__main__":
    main()

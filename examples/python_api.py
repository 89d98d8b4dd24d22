"""The notebook path, end to end on `synthetic`, in well under a minute on a CPU.

Build a model, apply methods to it (bench's Segmenter and a timm ViT), count FLOPs,
time them against each other, fine-tune PAUMER's heads a few steps, run one method
through the whole protocol and read the stored records back as a DataFrame.

    python examples/python_api.py [--out DIR]

Everything it writes goes under DIR (default: a temporary folder); the numbers are
those of a model trained a few steps: they show the API, not the methods' merit.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch

import bench
from bench.datasets import open_dataset
from bench.train import normalize


def main(out: Path) -> None:
    torch.manual_seed(0)
    # 1. build: bench's Segmenter for synthetic (a preset or "timm:<name>"), 2 blocks to be quick
    seg = bench.segmenter("tiny", "synthetic", depth=2).eval()
    val = open_dataset("synthetic", "val")
    images = normalize(torch.stack([val[i][0] for i in range(2)]))  # the model's float input

    # 2. patch: training-free methods work at once; the model itself is not changed
    tome = bench.patch(seg, "tome", r=24)
    static = bench.patch(seg, "static", scale=0.5)
    vit = timm.create_model("vit_tiny_patch16_224", embed_dim=64, depth=2, num_heads=2, img_size=64,
                            num_classes=0).eval()
    vit_tome = bench.patch(vit, "tome", r=4)
    with torch.inference_mode():
        print("segmenter logits", tuple(tome(images).shape), "| timm features",
              tuple(vit_tome.forward_features(torch.randn(2, 3, 64, 64)).shape))
    assert bench.unpatch(tome) is seg

    # 3. FLOPs per image, the records' counter (fvcore, one multiply-add = one flop)
    for name, model in [("baseline", seg), ("tome r=24", tome), ("static 0.5", static)]:
        print(f"{name:>11}: {bench.flops(model, images):.3f} GFLOPs per image")

    # 4. timing: interleaved, same run, speedups against the first model
    speed = bench.time({"baseline": seg, "tome": tome, "static": static}, images, batch_sizes=(1, 2),
                       warmup=1, repeats=2)
    print(speed[["model", "batch_size", "throughput", "speedup"]].to_string(index=False))

    # 5. a method with heads: patch adds them untrained, fine_tune trains them (2 steps here)
    paumer = bench.fine_tune(bench.patch(seg, "paumer", tau=0.3), "synthetic", steps=2)
    print(f"paumer tau=0.3 after 2 steps: {bench.flops(paumer, images):.3f} GFLOPs per image")

    # 6. one method through the whole protocol (trains a 2-step baseline first), then its records
    bench.run("tome", "synthetic", ops=["r=24"], depth=2, steps=2, limit=4, timing_images=2, repeats=1,
              batch_size=2, results=str(out / "results"), checkpoints=str(out / "checkpoints"))
    records = bench.load_records("synthetic", results=str(out / "results"))
    print(records[["method", "op", "r", "miou", "gflops_mean", "speedup_b1"]].to_string(index=False))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where results and checkpoints go (default: a temp dir)")
    args = parser.parse_args()
    if args.out is not None:
        main(args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))

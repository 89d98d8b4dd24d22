"""The option groups `bench` commands share (click decorators): training, evaluation,
measurement and execution options, defined once so every command spells them alike."""
from __future__ import annotations

import click


def train_options(f):
    """Options every command that trains shares."""
    options = [
        click.option("--dataset", default="synthetic", show_default=True, help="dataset name (see `bench datasets`)"),
        click.option("--data-root", default=None, help="dataset root (default: the dataset's environment variable or ./data)"),
        click.option("--name", "dataset_name", default=None,
                     help="folder datasets: the name its records, checkpoints and reports use (default: bench.json's)"),
        click.option("--model", default=None, help="model preset: tiny, vit_tiny, vit_small, vit_base, vit_large, or timm:<name> (any plain timm ViT, e.g. timm:deit_small_patch16_224; default: the dataset's)"),
        click.option("--decoder", type=click.Choice(["linear", "mask"]), default=None, help="decoder (default: the dataset's)"),
        click.option("--depth", type=click.IntRange(min=1), default=None, help="encoder blocks (default: the preset's)"),
        click.option("--pretrained", is_flag=True, help="start from timm's ImageNet weights (needs the network or a warm cache)"),
        click.option("--weights", default=None,
                     help="import a trained baseline instead of training one: a bench checkpoint, "
                          "rstrudel/segmenter's checkpoint.pth or mmsegmentation's Segmenter .pth"),
        click.option("--weights-format", type=click.Choice(["bench", "segmenter", "mmseg"]), default=None,
                     help="the layout of --weights (default: detected from its key names)"),
        click.option("--steps", type=click.IntRange(min=1), default=None, help="training budget in steps (default: the dataset's)"),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N"),
        click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch CPU threads"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--train-precision", type=click.Choice(["fp32", "tf32", "bf16"]), default="fp32", show_default=True,
                     help="training: bf16 autocast (TF32 on CUDA) or tf32 (CUDA); part of a checkpoint's identity"),
        click.option("--deterministic", is_flag=True,
                     help="training uses deterministic algorithms only (CUDA: stops with a one-line error at an op "
                          "that has none); recorded, outside a checkpoint's identity"),
        click.option("--checkpoints", default="checkpoints", show_default=True, help="checkpoint folder"),
        click.option("--quiet", is_flag=True, help="no progress bars"),
        click.option("--tensorboard", is_flag=True,
                     help="training also writes TensorBoard events beside its JSONL log (needs tensorboard installed)"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def common_options(f):
    """Options every command that trains and evaluates shares."""
    options = [
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                     help="batch for throughput (batch 1 is always measured too)"),
        click.option("--results", default="results", show_default=True, help="results folder"),
        click.option("--dry-run", is_flag=True,
                     help="say what would be trained (steps) and which operating points are pending; do nothing"),
    ]
    for option in reversed(options):
        f = option(f)
    return train_options(f)


def measure_options(f):
    """Options of what `bench run` measures (shared with `bench sweep`)."""
    options = [
        click.option("--limit", type=click.IntRange(min=1), default=None,
                     help="evaluate on the first N validation images"),
        click.option("--replace", is_flag=True, help="re-measure operating points already stored"),
        click.option("--timing-images", type=click.IntRange(min=1), default=32, show_default=True,
                     help="pre-loaded validation images that throughput is timed on"),
        click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
                     help="timed repeats (median reported), after 2 warm-up passes"),
        click.option("--seeds", default=None,
                     help="comma-separated training seeds, e.g. 0,1,2: each trained and evaluated as its own "
                          "checkpoints and records (instead of --seed)"),
    ]
    for option in reversed(options):
        f = option(f)
    return execution_options(f)


def execution_options(f):
    """What evaluation and timing forwards run in (`bench run`, `bench sweep`, `bench speed`)."""
    f = click.option("--compile", is_flag=True,
                     help="torch.compile the blocks and decoder for evaluation and timing")(f)
    f = click.option("--compile-mode", type=click.Choice(["default", "reduce-overhead", "max-autotune"]),
                     default="default", show_default=True,
                     help="torch.compile's mode with --compile (timm's --torchcompile-mode); part of a record's "
                          "identity unless default")(f)
    return click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16", "fp16"]), default="fp32",
                        show_default=True, help="evaluation and timing (training: --train-precision); cpu: fp32 or bf16")(f)

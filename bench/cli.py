"""`bench` command line: parses options and calls library functions, nothing else."""
from __future__ import annotations

import sys

import click

from bench.errors import BenchError


def common_options(f):
    """Options every command that trains or evaluates shares."""
    options = [
        click.option("--dataset", default="synthetic", show_default=True, help="dataset name (see `bench datasets`)"),
        click.option("--data-root", default=None, help="dataset root (default: the dataset's environment variable or ./data)"),
        click.option("--model", default=None, help="model preset: tiny, vit_tiny, vit_small, vit_base (default: the dataset's)"),
        click.option("--decoder", type=click.Choice(["linear", "mask"]), default=None, help="decoder (default: the dataset's)"),
        click.option("--depth", type=click.IntRange(min=1), default=None, help="encoder blocks (default: the preset's)"),
        click.option("--pretrained", is_flag=True, help="start from timm's ImageNet weights (needs the network or a warm cache)"),
        click.option("--steps", type=click.IntRange(min=1), default=None, help="training budget in steps (default: the dataset's)"),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N"),
        click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch CPU threads"),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                     help="batch for throughput (batch 1 is always measured too)"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--checkpoints", default="checkpoints", show_default=True, help="checkpoint folder"),
        click.option("--results", default="results", show_default=True, help="results folder"),
        click.option("--quiet", is_flag=True, help="no progress bars"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _options(**kw):
    from bench.runner import RunOptions

    kw["progress"] = not kw.pop("quiet", False)
    if kw["device"].startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BenchError(f"--device {kw['device']}: CUDA is not available on this machine")
    return RunOptions(**kw)


@click.group()
def cli():
    """Adaptive-compute semantic segmentation under one evaluation protocol."""


@cli.command()
@click.option("--method", default="baseline", show_default=True, help="baseline, static, paumer, ...")
@click.option("--op", "ops", multiple=True, help="operating point, e.g. 'tau=0.2' (repeatable; default: the method's sweep)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="evaluate on the first N validation images")
@click.option("--replace", is_flag=True, help="re-measure operating points already stored")
@click.option("--timing-images", type=click.IntRange(min=1), default=32, show_default=True,
              help="pre-loaded validation images that throughput is timed on")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="timed repeats (median reported), after 2 warm-up passes")
@common_options
def run(method, ops, limit, replace, timing_images, repeats, **kw):
    """Train (or reuse) the checkpoints, evaluate the method's operating points and the
    baseline in one process, and append the records to the results folder."""
    from bench.runner import get_method, parse_op, run as run_method

    spec = get_method(method)
    opts = _options(method=method, ops=[parse_op(spec, o) for o in ops] or None, limit=limit, replace=replace,
                    timing_images=timing_images, repeats=repeats, **kw)
    records = run_method(opts)
    for r in records:
        s = r["speed"]
        click.echo(f"{r['method']:9s} {_knobs(r['knobs']):24s} mIoU {100 * r['miou']:6.2f} "
                   f"({100 * r['miou_delta']:+.2f})  GFLOPs {r['gflops']['mean']:7.3f} "
                   f"({100 * (r['gflops_ratio'] - 1):+.1f}%)  "
                   + "  ".join(f"b{b}: {s[b]['throughput']:7.1f} img/s x{s[b]['speedup']:.2f}" for b in s))
    if records:
        click.echo(f"{len(records)} record(s) appended to {opts.results}/{opts.dataset}.jsonl")
    else:
        click.echo(f"nothing to do: every operating point is already in {opts.results}/{opts.dataset}.jsonl "
                   "for this checkpoint (--replace measures them again)")


def _knobs(knobs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in knobs.items()) or "-"


@cli.command()
@click.option("--method", default="baseline", show_default=True, help="baseline, or a method that fine-tunes")
@common_options
def train(method, **kw):
    """Train a checkpoint (resumes if interrupted; reuses it if complete)."""
    from bench import datasets
    from bench.runner import fine_tune, get_method, train_checkpoint, train_config

    spec = datasets.get_spec(kw["dataset"])
    m = get_method(method)
    if m.fine_tune is None and method != "baseline":
        raise BenchError(f"{method} uses the baseline's weights; there is nothing of its own to train")
    opts = _options(method=method, **kw)
    base_cfg = train_config(opts, spec)
    model, payload = train_checkpoint(opts, base_cfg)
    if m.fine_tune is not None:
        model, payload = fine_tune(opts, m, spec, base_cfg, model, payload)
    click.echo(f"checkpoint ready: {payload['config']['method']} weights {payload['weights']} "
               f"after {payload['step']} steps")


@cli.command(name="datasets")
@click.option("--data-root", default=None, help="look here instead of the default roots")
def datasets_cmd(data_root):
    """Known datasets: where each is looked for, found or not, image counts."""
    from bench import datasets

    for name in datasets.DATASETS:
        s = datasets.dataset_status(name, data_root)
        counts = ", ".join(f"{k} {v}" for k, v in s["splits"].items())
        state = "found" if s["found"] else "missing"
        click.echo(f"{name:10s} {state:8s} {s['root']}  (${s['env']})  {counts}")
        if s["problem"]:
            click.echo(f"{'':10s} {s['problem']}")


@cli.command(name="report")
@click.option("--results", default="results", show_default=True, help="results folder")
@click.option("--out", default="reports", show_default=True, help="where tables and figures go")
def report_cmd(results, out):
    """Tables (Markdown + CSV) and trade-off figures from the stored records."""
    from bench.report import report

    for path in report(results, out):
        click.echo(f"wrote {path}")


def main(argv=None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="bench")
    except BenchError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()

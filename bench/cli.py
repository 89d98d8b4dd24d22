"""`bench` command line: parses options and calls library functions, nothing else."""
from __future__ import annotations

import sys

import click

from bench.cli_options import common_options, execution_options, measure_options, train_options
from bench.errors import BenchError


def _require_device(device: str, here: bool = True) -> None:
    """A device that is not cpu, cuda or cuda:N, or (``here``) that this machine lacks,
    is a one-line error."""
    from bench.runner import check_device

    check_device(device, here=here)


def _warn_single_repeat(repeats: int) -> None:
    """One timed repeat has no median to steady it: its speedups, even the baseline's
    against itself, are noise. Said on stderr, after the speedups it is about."""
    if repeats == 1:
        click.echo("warning: --repeats 1 times each method once: its speedups are noise (the baseline against "
                   "itself reads far from 1.00x); use 3 or more to compare methods", err=True)


def _options(*, launch: bool = True, check_device: bool = True, **kw):
    """RunOptions from the parsed options; ``launch``: join torchrun's process group when
    this command runs under it (each process gets its own GPU); ``check_device``: the
    device must exist here (not so for jobs sent to a cluster)."""
    from bench.runner import RunOptions

    kw["progress"] = not kw.pop("quiet", False)
    _require_device(kw["device"], here=check_device)
    if launch:
        from bench import distributed

        kw["device"] = distributed.setup(kw["device"])
    return RunOptions(**kw)


def _is_main() -> bool:
    """False on torchrun's ranks other than 0: they print nothing."""
    dist = sys.modules.get("bench.distributed")
    return dist is None or dist.is_main()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bench")
    except PackageNotFoundError:
        return "unknown (not installed)"


@click.group()
@click.version_option(version=_version(), prog_name="bench", message="%(prog)s %(version)s")
def cli():
    """Adaptive-compute semantic segmentation under one evaluation protocol."""


@cli.command()
@click.option("--method", default="baseline", show_default=True, help="baseline, static, paumer, ...")
@click.option("--op", "ops", multiple=True, help="operating point, e.g. 'tau=0.2' (repeatable; default: the method's sweep)")
@measure_options
@common_options
def run(method, ops, limit, replace, timing_images, repeats, seeds, dry_run, **kw):
    """Train (or reuse) the checkpoints, evaluate the method's operating points and the
    baseline in one process, and append the records to the results folder.
    Under torchrun: training and evaluation are shared by the processes, timing is rank 0's."""
    from dataclasses import replace as with_seed

    from bench.runner import describe_plan, get_method, parse_op, plan, run_seeds

    spec = get_method(method)
    seed_list = _seeds(seeds, kw)
    opts = _options(launch=not dry_run, method=method, ops=[parse_op(spec, o) for o in ops] or None, limit=limit,
                    replace=replace, timing_images=timing_images, repeats=repeats, **kw)
    if dry_run:
        click.echo("dry run: nothing is trained, measured or written")
        for seed in seed_list:
            click.echo("\n".join(describe_plan(plan(with_seed(opts, seed=seed)))))
        return
    records = run_seeds(opts, seed_list)
    if not _is_main():
        return
    for r in records:
        s = r["speed"]
        control = f", {100 * r['miou_delta_control']:+.2f} vs baseline-ft" if "miou_delta_control" in r else ""
        click.echo(f"{r['method']:9s} {_knobs(r['knobs']):24s} mIoU {100 * r['miou']:6.2f} "
                   f"({100 * r['miou_delta']:+.2f}{control})  GFLOPs {r['gflops']['mean']:7.3f} "
                   f"({100 * (r['gflops_ratio'] - 1):+.1f}%)  "
                   + "  ".join(f"b{b}: {s[b]['throughput']:7.1f} img/s x{s[b]['speedup']:.2f}" for b in s))
    stored = f"{opts.results}/{records[0]['dataset'] if records else _dataset_name(opts)}.jsonl"
    if records:
        click.echo(f"{len(records)} record(s) appended to {stored}")
        _warn_single_repeat(repeats)
    else:
        click.echo(f"nothing to do: every operating point is already in {stored} "
                   "for this checkpoint, image count, device, precision, batch sizes and evaluation settings "
                   "(--replace measures them again)")


def _seeds(text, kw: dict) -> list[int]:
    from bench.runner import parse_seeds

    return parse_seeds(text, kw["seed"])


def _dataset_name(opts) -> str:
    from bench.runner import dataset_spec

    return dataset_spec(opts).name


@cli.command(name="speed")
@click.option("--model", default="vit_small", show_default=True, help="model preset (random weights)")
@click.option("--decoder", type=click.Choice(["linear", "mask"]), default=None, help="decoder (default: the preset's)")
@click.option("--size", type=click.IntRange(min=1), default=768, show_default=True, help="square input size, pixels")
@click.option("--batch-size", "batch_sizes", default="1,8", show_default=True, help="comma-separated batch sizes")
@click.option("--method", "methods", default="paumer,tome,early-exit,static", show_default=True,
              help="comma-separated registered methods (`bench methods`; the baseline is always timed)")
@click.option("--op", "ops", multiple=True,
              help="METHOD:KNOBS for a method without its own options below, e.g. 'algm:threshold=0.9' "
                   "(repeatable; default: its sweep)")
@click.option("--stay", multiple=True,
              help="share of the grid active after each pausing layer, e.g. 0.75,0.575,0.4 (repeat: several schedules)")
@click.option("--spread", type=click.FloatRange(0, 1), default=0.1, show_default=True, help="image-to-image spread of --stay")
@click.option("--batching", default="pad", show_default=True, help="pad, packed or pad,packed (each is timed)")
@click.option("--tome-r", default=None, help="ToMe's r, comma-separated for several (default: half the largest)")
@click.option("--scale", default="0.75", show_default=True, help="static's input scale(s), comma-separated")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="decoder classes (default: 19, Cityscapes', or those of --weights)")
@click.option("--weights", default=None, help="time these trained weights (see `bench run --weights`), not random ones")
@click.option("--weights-format", type=click.Choice(["bench", "segmenter", "mmseg"]), default=None,
              help="the layout of --weights (default: detected)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--timing-images", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="untimed passes first")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--results", default="results", show_default=True)
@execution_options
def speed_cmd(batch_sizes, methods, ops, stay, batching, tome_r, scale, **kw):
    """Time methods at any model and input size on random weights and images, decisions
    forced by a token schedule; records go to <results>/speed.jsonl."""
    from bench.runner import get_method, parse_op
    from bench.speed import SpeedOptions, run_speed

    _require_device(kw["device"])
    names = [m for m in methods.split(",") if m]
    by_method = _ops_by_method(ops, names, parse_op, get_method, option="--method")
    sizes = _numbers("--batch-size", batch_sizes, int)
    schedules = [_numbers("--stay", one, float) for one in stay] or None
    batchings = batching.split(",")
    if set(batchings) - {"pad", "packed"}:
        raise BenchError(f"--batching takes pad, packed or both, comma-separated; got {batching!r}")
    tome_rs = _numbers("--tome-r", tome_r, int) if tome_r else [None]
    opts = SpeedOptions(batch_sizes=sizes, methods=names, ops=by_method, stay=schedules,
                        batching=batchings, tome_r=tome_rs, scale=_numbers("--scale", scale, float), **kw)
    for r in run_speed(opts):
        s = r["speed"]
        click.echo(f"{r['method']:10s} {_knobs(r['knobs']):58s} GFLOPs {r['gflops']['mean']:8.2f} (x{r['gflops_ratio']:.2f})  "
                   + "  ".join(f"b{b}: {s[b]['throughput']:7.2f} img/s x{s[b]['speedup']:.2f}" for b in s))
    click.echo(f"records written to {opts.results}/speed.jsonl")
    _warn_single_repeat(opts.repeats)


def _ops_by_method(ops, names: list, parse_op, get_method, option: str = "--methods") -> dict:
    """``--op METHOD:KNOBS`` texts as {method: [knobs, ...]}, each method one of ``names``."""
    by_method: dict = {}
    for text in ops:
        m, sep, knobs = text.partition(":")
        if not sep or m not in names:
            raise BenchError(f"bad --op {text!r}: expected METHOD:KNOBS with METHOD one of {option} "
                             f"({', '.join(names)})")
        by_method.setdefault(m, []).append(parse_op(get_method(m), knobs))
    return by_method


def _numbers(option: str, text: str, kind) -> list:
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise BenchError(f"{option} takes comma-separated {kind.__name__} values, got {text!r}") from None


def _knobs(knobs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in knobs.items()) or "-"


@cli.command()
@click.option("--method", default="baseline", show_default=True, help="baseline, or a method that fine-tunes")
@click.option("--op", "ops", multiple=True,
              help="operating point whose checkpoint to train, e.g. 'depth=2' for shallow (default: its sweep's)")
@train_options
def train(method, ops, **kw):
    """Train a checkpoint (resumes if interrupted; reuses it if complete): the baseline's,
    then the method's own if it fine-tunes (shallow: one per depth). Deterministic: the
    same options give the same weights, interrupted or not."""
    from bench.runner import get_method, parse_op, train_method

    spec = get_method(method)
    payloads = train_method(_options(method=method, ops=[parse_op(spec, o) for o in ops] or None, **kw))
    if _is_main():
        for payload in payloads:
            click.echo(f"checkpoint ready: {payload['config']['method']} weights {payload['weights']} "
                       f"after {payload['step']} steps")


@cli.command()
@click.option("--methods", default=None,
              help="comma-separated; one job per method and dataset (default: every registered method, `bench methods`)")
@click.option("--op", "ops", multiple=True,
              help="METHOD:KNOBS, e.g. 'paumer:tau=0.2' (repeatable; a method without one runs its default sweep)")
@click.option("--cluster", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="local: the jobs one after another on this machine; slurm: sbatch, via submitit")
@click.option("--folder", default="sweeps", show_default=True, help="job folders: submitit's pickles and logs")
@click.option("--partition", default=None, help="slurm partition")
@click.option("--gpus-per-node", type=click.IntRange(min=0), default=None,
              help="GPUs per job (default: 1 with --device cuda, else 0); several: one process per GPU (DDP)")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=None, help="CPU cores per process")
@click.option("--mem-gb", type=click.FloatRange(min=0), default=None, help="memory per job")
@click.option("--time", "time_min", type=click.IntRange(min=1), default=720, show_default=True,
              help="time limit per job, minutes (on Slurm, a job that reaches it is requeued and resumes)")
@click.option("--slurm-param", "slurm_params", multiple=True,
              help="extra sbatch option KEY=VALUE, e.g. account=abc (repeatable)")
@click.option("--wait/--no-wait", default=False,
              help="slurm: wait for the jobs and report how they ended (local always waits)")
@measure_options
@common_options
def sweep(methods, ops, cluster, folder, partition, gpus_per_node, cpus_per_task, mem_gb, time_min, slurm_params,
          wait, limit, replace, timing_images, repeats, seeds, dry_run, **kw):
    """Run several methods on one or more datasets (--dataset a,b) as submitit jobs:
    the baseline checkpoint of each dataset first, then one job per method and dataset.
    Resumable: run the same command again and only what is missing runs."""
    from bench.runner import get_method, parse_op
    from bench.sweep import sweep as run_sweep
    from methods import all_methods

    names = [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else list(all_methods())
    by_method = _ops_by_method(ops, names, parse_op, get_method)
    extra = {}
    for text in slurm_params:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise BenchError(f"bad --slurm-param {text!r}: expected KEY=VALUE, e.g. account=abc")
        extra[key] = value
    seed_list = _seeds(seeds, kw)
    dataset_names = [d.strip() for d in kw.pop("dataset").split(",") if d.strip()]
    if not dataset_names:
        raise BenchError("--dataset: expected one or more dataset names, e.g. synthetic,cityscapes")
    base = _options(launch=False, check_device=cluster == "local", dataset=dataset_names[0], limit=limit,
                    replace=replace, timing_images=timing_images, repeats=repeats, **kw)
    from dataclasses import replace as with_seed

    reports = []
    for seed in seed_list:  # each seed: its own baseline, checkpoints and records
        reports += run_sweep(with_seed(base, seed=seed), names, dataset_names, by_method, cluster=cluster,
                             folder=folder, gpus_per_node=gpus_per_node, partition=partition,
                             cpus_per_task=cpus_per_task, mem_gb=mem_gb, time_min=time_min, slurm_params=extra,
                             wait=wait, dry_run=dry_run, echo=click.echo)
    if not dry_run:
        _warn_single_repeat(repeats)
    failed = [r for r in reports if r.state == "failed"]
    if failed:
        logs = ", ".join(str(r.stderr) for r in failed)
        raise BenchError(f"{len(failed)} job(s) failed (logs: {logs}); run the same command again to resume",
                         exit_code=1)


@cli.command(name="datasets")
@click.option("--data-root", default=None, help="look here instead of the default roots")
@click.option("--dataset", "names", multiple=True, help="only this dataset (repeatable; default: all)")
@click.option("--speed", is_flag=True, help="also time the training loader alone (images/s) on each dataset found")
@click.option("--batches", type=click.IntRange(min=1), default=20, show_default=True,
              help="--speed: batches timed, after one warm-up batch")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="--speed: DataLoader workers (default: what training uses)")
@click.option("--device", default="cpu", show_default=True, help="--speed: copy batches to this device (pinned memory on cuda)")
@click.option("--ranks", type=click.IntRange(min=1), default=1, show_default=True,
              help="--speed: time rank 0's loader of this many torchrun processes (its slots of each batch)")
@click.option("--name", "dataset_name", default=None, help="folder datasets: the name to check (default: bench.json's)")
def datasets_cmd(data_root, names, speed, batches, workers, device, dataset_name, ranks):
    """Known datasets: where each is looked for (and why there: --data-root, its
    environment variable or the default), found or not, image counts per split, and what
    is wrong with a tree that is malformed. Exit code 2 when a dataset named with
    --dataset is missing or malformed."""
    from bench import datasets

    for name in names:
        if name not in datasets.DATASETS:
            datasets.get_spec(name)  # raises: unknown dataset
    if speed:
        _require_device(device)
    unusable = []
    for name in names or datasets.DATASETS:
        named = dataset_name if datasets.DATASETS[name].resolve is not None else None
        s = datasets.dataset_status(name, data_root, named)
        counts = ", ".join(f"{k} {v}" for k, v in s["splits"].items())
        state = "found" if s["found"] else "missing"
        as_name = f"  as {s['as']!r}" if s["as"] not in (None, name) else ""
        source = f"default, ${s['env']} not set" if s["source"] == "default" else s["source"]
        click.echo(f"{name:10s} {state:8s} {s['root']}  ({source})  {counts}{as_name}")
        if s["problem"]:
            click.echo(f"{'':10s} {s['problem']}")
        if not s["found"]:
            unusable.append(name)
        if speed and s["found"]:
            r = datasets.loader_speed(name, data_root, batches=batches, workers=workers, device=device, as_name=named,
                                      ranks=ranks)
            per_rank = f" per rank of {ranks}, {r['steps_per_s']:.2f} global batches/s" if ranks > 1 else ""
            click.echo(f"{'':10s} training loader: {r['images_per_s']:.1f} images/s{per_rank} ({r['images']} images in "
                       f"{r['batches']} batches of {r['batch_size']}, crops {r['crop_size']}, workers {r['workers']}, "
                       f"pin_memory={r['pin_memory']})")
    asked = [n for n in unusable if n in names]
    if asked:
        raise BenchError(f"{', '.join(asked)}: missing or malformed (see above)")


@cli.command(name="methods")
def methods_cmd():
    """The methods: what each does, whether it fine-tunes, its knobs (type, allowed
    values) and its default sweep."""
    from methods import all_methods

    for m in all_methods().values():  # plugins' methods too
        click.echo(f"{m.name}: {m.description}")
        ft = m.fine_tune
        if ft is None:
            click.echo("  weights: the baseline's" if m.name != "baseline" else "  weights: trained (every other method starts from them)")
        else:
            knobs = f"; training knobs {_knobs(ft.knobs)}" if ft.knobs else ""
            click.echo(f"  weights: fine-tuned from the baseline ({ft.steps_fraction:g} of its steps at "
                       f"{ft.lr_factor:g} x its learning rate{knobs})")
        for knob, kind in m.knob_types.items():
            type_name = f"list of {kind[0].__name__}" if isinstance(kind, list) else kind.__name__
            choices = m.knob_choices.get(knob)
            allowed = f", one of: {', '.join(map(str, choices))}" if choices else ""
            help_text = f": {m.knob_help[knob]}" if knob in m.knob_help else ""
            click.echo(f"  knob {knob} ({type_name}{allowed}){help_text}")
        if not m.knob_types:
            click.echo("  knobs: none")
        swept = f" (varies {m.swept})" if m.swept else ""
        follows = " (for tiny on 128x128; it follows the model's depth and the input's tokens)" if m.default_ops_for else ""
        click.echo(f"  default sweep{swept}{follows}: " + ", ".join(_knobs(k) for k in m.default_ops))


@cli.command(name="report")
@click.option("--results", default="results", show_default=True, help="results folder")
@click.option("--out", default="reports", show_default=True, help="where tables and figures go")
@click.option("--width", type=click.Choice(["column", "text"]), default="text", show_default=True,
              help="figure width: one column (3.3 in) or the text width (7 in) of a two-column paper")
@click.option("--checkpoints", default="checkpoints", show_default=True,
              help="checkpoint folder, where the training logs drawn as curves are")
@click.option("--readme", default=None,
              help="a Markdown file whose `bench-report:<dataset>-facts` blocks are rewritten "
                   "(default: ./README.md with the default --results and --out; '' for none)")
def report_cmd(results, out, width, checkpoints, readme):
    """Tables (Markdown, LaTeX, CSV) and figures (PNG, SVG, PDF) from the stored records."""
    from pathlib import Path

    from bench.report import report

    if readme is None:  # other folders (results/h100, a scratch --out) leave the README's numbers alone
        default = results == "results" and out == "reports"
        readme = "README.md" if default and Path("README.md").is_file() else ""
    for path in report(results, out, width=width, checkpoints=checkpoints, readme=readme or None):
        click.echo(f"wrote {path}")


@cli.command(name="check")
@click.option("--update", is_flag=True, help="rewrite the reference with the fresh results (after an intended change)")
@click.option("--results", default="results", show_default=True, help="results folder (reference: <results>/check/)")
@click.option("--checkpoints", default="checkpoints", show_default=True, help="checkpoint folder")
@click.option("--data-root", default=None, help="where synthetic is cached (default: ./data)")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch CPU threads")
@click.option("--quiet", is_flag=True, help="no progress bars")
def check_cmd(update, results, checkpoints, data_root, threads, quiet):
    """Re-derive a small set of stored results on synthetic and compare: mIoU and
    GFLOPs within tight tolerances, speedups (same-run ratios) above a lower bound."""
    from bench import check

    stored = None if update else check.load_reference(results)  # fail before minutes of work
    fresh = check.fresh_records(checkpoints=checkpoints, threads=threads, data_root=data_root,
                                progress=not quiet)
    rows = check.compare(stored if stored is not None else fresh, fresh)
    click.echo(check.format_rows(rows))
    if update:
        click.echo(f"reference rewritten: {check.write_reference(fresh, results)} ({len(fresh)} records)")
        return
    bad = check.failed(rows)
    if bad:
        names = ", ".join(sorted({f"{r['point']}: {r['metric']}" for r in bad}))
        raise BenchError(f"bench check failed on {len(bad)} metric(s): {names}", exit_code=1)
    click.echo(f"bench check passed: {len(rows)} metrics within tolerance of {check.reference_path(results)}")


def _rank_prefix() -> str:
    dist = sys.modules.get("bench.distributed")
    return f"[rank {dist.rank()}] " if dist is not None and dist.is_distributed() else ""


def main(argv=None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="bench")
    except BenchError as e:
        click.echo(f"{_rank_prefix()}error: {e}", err=True)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    finally:
        dist = sys.modules.get("bench.distributed")
        if dist is not None:
            dist.cleanup()  # leave torchrun's process group cleanly


if __name__ == "__main__":
    main()

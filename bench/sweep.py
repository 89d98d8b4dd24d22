"""`bench sweep`: many (method, dataset) rows as jobs, through submitit.

One job per dataset trains the baseline checkpoint when it is missing (and, when a
method of the sweep fine-tunes, the equal-budget control ``baseline-ft`` that every
fine-tuned method is compared with); then one job per method and dataset runs ``bench.runner.run`` (which fine-tunes the method's own
checkpoint if it needs one, and measures the baseline in the same process). Method jobs
start only once their dataset's baseline exists, so no two jobs ever train the same
checkpoint: on Slurm they depend on the baseline job (``afterok``); locally the jobs run
one after another, which also keeps one job's timing from disturbing another's.

Everything is resumable: a job skips the operating points already stored and resumes
training from the last checkpoint, and the sweep does not submit a job whose points are
all stored. A job that Slurm preempts or times out is requeued by submitit
(``Checkpointable``) and resumes the same way; a job that failed or was killed is run
again by running the same ``bench sweep`` command.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import submitit

from bench import datasets, distributed
from bench.errors import BenchError
from bench.runner import (RunOptions, dataset_spec, describe_plan, fine_tune_config, get_method, pending_ops, plan,
                          run, stored_baseline, stored_checkpoint, train_config, train_method, validate)
from methods import CONTROL

CLUSTERS = ("local", "slurm")


class SweepJob(submitit.helpers.Checkpointable):
    """What one job runs: ``kind`` "train" (the dataset's baseline checkpoint, and the
    control's when ``opts.method`` is it) or "run"
    (one method on one dataset). On preemption or timeout submitit pickles it again
    and requeues it (``Checkpointable``): it resumes from the stored state."""

    def __init__(self, kind: str, opts: RunOptions):
        self.kind, self.opts = kind, opts

    def __call__(self):
        if submitit.JobEnvironment().num_tasks > 1:  # one task per GPU: torchrun's variables
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        try:
            if self.kind == "train":
                payload = train_method(self.opts)[-1]
                return {"weights": payload["weights"], "step": payload["step"]}
            return [{"method": r["method"], "knobs": r["knobs"]} for r in run(self.opts)]
        finally:
            distributed.cleanup()


@dataclass
class JobReport:
    dataset: str
    what: str  # "baseline checkpoint" or the method
    job_id: Optional[str] = None
    state: str = "submitted"  # submitted, done, failed, skipped
    stdout: Optional[Path] = None
    stderr: Optional[Path] = None
    message: str = ""


def _last_line(text: str) -> str:
    lines = [l.strip() for l in str(text).splitlines() if l.strip() and not l.startswith("---")]
    return lines[-1] if lines else str(text)


def _wait(job, report: JobReport, poll_s: float = 0.2) -> JobReport:
    while not job.done():
        time.sleep(poll_s)
    if not job.paths.result_pickle.exists():  # killed: the job never wrote its outcome
        report.state, report.message = "failed", f"killed before it finished ({job.state})"
        return report
    error = job.exception()
    if error is not None:
        report.state, report.message = "failed", _last_line(error)
        return report
    result = job.result()
    report.state = "done"
    if isinstance(result, dict):
        report.message = f"checkpoint {result['weights']} after {result['step']} steps"
    else:
        report.message = f"{len(result)} record(s) appended" if result else "nothing left to measure"
    return report


def sweep(base: RunOptions, methods: list[str], dataset_names: list[str], ops: Optional[dict] = None, *,
          cluster: str = "local", folder: str = "sweeps", gpus_per_node: Optional[int] = None,
          partition: Optional[str] = None, cpus_per_task: Optional[int] = None, mem_gb: Optional[float] = None,
          time_min: int = 720, slurm_params: Optional[dict] = None, wait: Optional[bool] = None,
          dry_run: bool = False, echo: Callable[[str], None] = print, job_class=SweepJob) -> list[JobReport]:
    """Runs (local) or submits (slurm) the jobs of a sweep; returns one report per job.

    ``base`` holds every run option but the method and dataset; ``ops`` maps a method to
    its operating points (knob dicts; a method not in it runs its default sweep).
    ``wait``: slurm only (local always waits), wait for the jobs and report how they ended.
    Every job's options and operating points are checked (``bench.runner.validate``)
    before anything is submitted; ``dry_run``: then say what would run, and stop.
    """
    if cluster not in CLUSTERS:
        raise BenchError(f"unknown cluster {cluster!r}; expected one of: {', '.join(CLUSTERS)}")
    for m in methods:
        get_method(m)
    ops = ops or {}

    def options(dataset: str, method: str = "baseline") -> RunOptions:
        named = dataset in datasets.DATASETS and datasets.DATASETS[dataset].resolve is not None
        return replace(base, dataset=dataset, method=method, ops=ops.get(method),
                       dataset_name=base.dataset_name if named else None)

    here = cluster == "local"  # else the device is the cluster's
    if dry_run:
        plans = [plan(options(d, m), device_here=here) for d in dataset_names for m in methods]  # checks all first
        for p in plans:
            for line in describe_plan(p):
                echo(line)
        return []
    for d in dataset_names:
        for m in methods:
            validate(options(d, m), device_here=here)
    wait = cluster == "local" or bool(wait)
    if gpus_per_node is None:
        gpus_per_node = 1 if base.device.startswith("cuda") else 0
    # jobs may start elsewhere (another node, another folder): absolute paths
    base = replace(base, checkpoints=str(Path(base.checkpoints).resolve()), results=str(Path(base.results).resolve()),
                   data_root=str(Path(base.data_root).resolve()) if base.data_root else None,
                   weights=str(Path(base.weights).resolve()) if base.weights else None)
    try:
        executor = submitit.AutoExecutor(folder=Path(folder).resolve() / "%j", cluster=cluster)
    except RuntimeError as e:  # slurm: no sbatch/srun here
        raise BenchError(f"--cluster {cluster}: {e}") from None
    params = dict(timeout_min=time_min, gpus_per_node=gpus_per_node, tasks_per_node=max(1, gpus_per_node),
                  cpus_per_task=cpus_per_task, mem_gb=mem_gb)
    extra = dict(slurm_params or {})
    if cluster == "slurm":
        params["slurm_partition"] = partition
    how = "one job at a time on this machine" if cluster == "local" else "submitted to Slurm"
    echo(f"sweep: {len(methods)} method(s) x {len(dataset_names)} dataset(s), {how}; "
         f"job folders and logs under {Path(folder).resolve()}/<job id>/")

    reports: list[JobReport] = []
    pending: list[tuple] = []  # slurm: (job, report) still running when submitted

    def submit(kind: str, opts: RunOptions, report: JobReport, after=None):
        name = f"bench-{report.dataset}-{report.what.split()[0]}"
        slurm = {"slurm_additional_parameters": dict(extra)} if cluster == "slurm" else {}
        if after is not None and cluster == "slurm":
            slurm["slurm_additional_parameters"]["kill-on-invalid-dep"] = "yes"
            slurm["slurm_dependency"] = f"afterok:{after.job_id}"
        executor.update_parameters(name=name, **params, **slurm)
        job = executor.submit(job_class(kind, opts))
        report.job_id, report.stdout, report.stderr = job.job_id, job.paths.stdout, job.paths.stderr
        echo(f"[{report.dataset}] {report.what}: job {job.job_id}, log {job.paths.stdout} "
             f"(errors: {job.paths.stderr.name})"
             + (f", after job {after.job_id}" if after is not None and cluster == "slurm" else ""))
        reports.append(report)
        if cluster == "local":
            _wait(job, report)
            echo(f"[{report.dataset}] {report.what}: job {job.job_id} {report.state}: {report.message}")
        else:
            pending.append((job, report))
        return job

    # method jobs that fine-tune also need the control: trained once, before them
    control = CONTROL if any(get_method(m).fine_tune is not None for m in methods) else None
    for name in dataset_names:
        opts = options(name)
        spec = dataset_spec(opts)
        first = None
        base_cfg = train_config(opts, spec)
        trained = stored_baseline(opts, base_cfg)  # imported with --weights
        if trained is not None and control is not None:
            trained = stored_checkpoint(opts, fine_tune_config(get_method(control), base_cfg, trained["weights"]))
        if trained is None:
            first = submit("train", replace(opts, method=control or "baseline"), JobReport(name, "baseline checkpoint"))
            if first is not None and cluster == "local" and reports[-1].state != "done":
                for m in methods:  # their baseline is missing: running them would train it again
                    reports.append(JobReport(name, m, state="skipped", message="the baseline checkpoint job failed"))
                    echo(f"[{name}] {m}: not run: the baseline checkpoint job failed")
                continue
        for m in methods:
            method_opts = options(name, m)
            todo = pending_ops(method_opts)
            if todo is not None and not todo:
                reports.append(JobReport(name, m, state="skipped", message="every operating point is stored"))
                echo(f"[{name}] {m}: nothing to do: every operating point is stored")
                continue
            submit("run", method_opts, JobReport(name, m), after=first)

    if wait:
        for job, report in pending:
            _wait(job, report, poll_s=10.0)
            echo(f"[{report.dataset}] {report.what}: job {job.job_id} {report.state}: {report.message}")
    elif pending:
        echo(f"{len(pending)} job(s) submitted; follow them with `squeue -u $USER` and their logs above. "
             "Run the same command again to resubmit what failed: stored points are skipped.")
    return reports

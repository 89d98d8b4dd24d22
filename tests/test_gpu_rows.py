"""scripts/gpu_rows.sh's argument handling, on the CPU: its dry run prints every command
(and runs none), each one a `bench` command line that parses, under a time budget of
less than 8 minutes; bad arguments are one-line errors (exit 2)."""
import shlex
import subprocess
from pathlib import Path

import click
import pytest

from bench.cli import cli

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_rows.sh"


def _run(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_the_dry_run_prints_the_gpu_rows_commands_within_the_budget_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    done = _run("--dry-run", "--python", "py3", "--gpu-name", "test-gpu", "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert all(line.startswith("timeout ") for line in lines)
    assert sum(int(line.split()[1]) for line in lines) < 8 * 60  # every step's limit together
    commands = [shlex.split(line)[2:] for line in lines]
    assert all(c[:3] == ["py3", "-m", "bench.cli"] for c in commands)
    speed = [c[3:] for c in commands if c[3] == "speed"]
    report = [c[3:] for c in commands if c[3] == "report"]
    assert len(speed) == 4 and report == [["report", "--results", "results/test-gpu", "--out", "reports/test-gpu"]]

    def value(c, option):
        return c[c.index(option) + 1] if option in c else None

    settings = {(value(c, "--size"), value(c, "--batch-size"), value(c, "--num-classes"), "--compile" in c)
                for c in speed}
    assert settings == {("768", "1,8", None, False), ("768", "1,8", None, True),
                        ("512", "8", "150", False), ("512", "8", "150", True)}
    for c in speed:
        assert value(c, "--device") == "cuda" and value(c, "--precision") == "bf16"
        assert value(c, "--model") == "vit_small" and value(c, "--decoder") == "mask"
        assert value(c, "--results") == "results/test-gpu"
        # every method with an inference-time policy of its own (fine-tuned variants run the same code)
        assert set(value(c, "--method").split(",")) == {"paumer", "early-exit", "dtop", "tome", "algm", "static"}
        # the line parses as `bench speed` options (names, types, choices)
        cli.get_command(click.Context(cli), "speed").make_context("speed", c[1:])
    assert not out.exists() and not (SCRIPT.parents[1] / "results" / "test-gpu").exists()


def test_the_dry_run_names_the_folder_without_asking_the_machine():
    done = _run("--dry-run")
    assert done.returncode == 0 and "--results results/gpu " in done.stdout


@pytest.mark.parametrize("args,words", [
    (["--bogus"], ["unknown argument '--bogus'", "usage"]),
    (["--python"], ["--python expects a value"]),
    (["--out"], ["--out expects a value"]),
    (["--gpu-name", "a/b"], ["--gpu-name 'a/b'", "expected letters"]),
    (["--python", "/nonexistent/python"], ["no CUDA GPU found by /nonexistent/python"]),
])
def test_bad_arguments_are_one_line_errors(args, words):
    done = _run(*args)
    assert done.returncode == 2
    lines = [l for l in done.stderr.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1, done.stderr
    assert all(w in lines[0] for w in words), lines[0]

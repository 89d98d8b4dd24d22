"""--compile-mode (timm's --torchcompile-mode): passed to torch.compile, recorded, part of
a record's identity only when compiled in a mode other than the default, refused in
one line without --compile."""
import json
from pathlib import Path

import pytest
import torch

from bench.protocol import EvalSettings, predict
from bench.results import identity_fields, record_identity
from bench.speed import SpeedOptions, run_speed
from methods.encoder import Policy
from tests.test_cli import assert_one_line_error, run_cli


class ModeBackend:
    """A torch.compile backend that notes the mode it was given and runs graphs eagerly."""

    __name__ = "mode-noting"

    def __init__(self):
        self.modes = []

    def __call__(self, gm, example_inputs, mode=None):
        self.modes.append(mode)
        return gm.forward


@pytest.mark.parametrize("mode,given", [("default", None), ("max-autotune", "max-autotune"),
                                        ("reduce-overhead", "reduce-overhead")])
def test_the_mode_reaches_torch_compile(small_model, mode, given):
    backend = ModeBackend()
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    predict(small_model, Policy(), x, EvalSettings(batch_size=2, compile=True, compile_backend=backend,
                                                   compile_mode=mode))
    assert backend.modes and set(backend.modes) == {given}


def test_a_mode_without_compile_is_a_one_line_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "speed", "--model", "tiny", "--size", "32", "--compile-mode", "max-autotune",
                           "--results", str(tmp_path / "res"))
    assert_one_line_error(code, err, "--compile-mode max-autotune needs --compile")
    assert not (tmp_path / "res").exists()
    code, _, err = run_cli(capsys, "run", "--method", "static", "--compile-mode", "reduce-overhead",
                           "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"))
    assert_one_line_error(code, err, "--compile-mode reduce-overhead needs --compile")
    assert not (tmp_path / "ck").exists()


def test_speed_records_the_mode_and_only_a_non_default_mode_is_identity(tmp_path):
    common = dict(model="tiny", size=32, batch_sizes=[2], methods=["baseline"], timing_images=2, warmup=0,
                  repeats=1, results=str(tmp_path), compile=True)
    default = run_speed(SpeedOptions(**common, compile_backend=ModeBackend()))[0]
    tuned = run_speed(SpeedOptions(**common, compile_backend=ModeBackend(), compile_mode="max-autotune"))[0]
    assert default["compile_mode"] == "default" and tuned["compile_mode"] == "max-autotune"
    assert "compile_mode" not in identity_fields(default)
    assert identity_fields(tuned)["compile_mode"] == "max-autotune"
    assert record_identity(tuned) != record_identity(default)
    # a compiled record from before the option is the default mode's measurement
    old = {k: v for k, v in default.items() if k != "compile_mode"}
    assert record_identity(old) == record_identity(default)
    # uncompiled: the mode means nothing, and is no identity
    plain = dict(default, compile=False)
    assert record_identity(dict(plain, compile_mode="max-autotune")) == record_identity(
        {k: v for k, v in plain.items() if k != "compile_mode"})


def test_stored_records_are_found_by_a_default_mode_run():
    """A run of a stored record's settings now records compile_mode "default" (when
    compiled): its identity must be the stored record's, so nothing is re-measured."""
    root = Path(__file__).resolve().parents[1] / "results"
    records = [json.loads(line) for path in sorted(root.rglob("*.jsonl")) for line in path.read_text().splitlines()
               if line.strip().startswith("{")]
    records = [r for r in records if "method" in r and "checkpoint" in r]
    assert records
    for r in records:  # none stored is compiled yet: a compiled copy stands for one
        for rec in (r, dict(r, compile=True)):
            assert record_identity(dict(rec, compile_mode="default")) == record_identity(rec)

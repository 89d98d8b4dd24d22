"""What the CLI can do is discoverable: --version, `bench methods`, --dry-run on run and
sweep (says what would happen, does nothing), and `bench train` has only the options it uses."""
import pytest

from bench.cli import main
from methods import METHODS
from tests.test_cli import run_cli, toy  # noqa: F401  (fixture)


def output(capsys, *args) -> str:
    main(list(args))
    return capsys.readouterr().out


def test_version(capsys):
    out = output(capsys, "--version")
    assert out.startswith("bench ") and len(out.split()) == 2


def test_methods_lists_each_method_with_its_knobs_choices_and_sweep(capsys):
    out = output(capsys, "methods")
    blocks = {b.split(":")[0]: b for b in ("\n" + out).split("\n") if b and not b.startswith(" ")}
    assert set(blocks) == set(METHODS)
    sections = out.split("\n" + "paumer:")[1].split("\ntome:")[0]
    assert "fine-tuned from the baseline" in sections
    assert "knob tau (float)" in sections and "knob layers (list of int)" in sections
    assert "knob criterion (str, one of: entropy, confidence, random, oracle, schedule)" in sections
    assert "default sweep (varies tau): tau=0.0, tau=0.05" in sections
    tome = out.split("\ntome:")[1].split("\nearly-exit:")[0]
    assert "weights: the baseline's" in tome and "schedule (str, one of: constant, decreasing)" in tome


def test_every_string_knob_lists_its_allowed_values():
    for m in METHODS.values():
        for knob, kind in m.knob_types.items():
            if kind is str:
                assert knob in m.knob_choices, (m.name, knob)


def test_run_dry_run_says_what_would_be_trained_and_does_nothing(tmp_path, capsys, toy):  # noqa: F811
    args = ["--dataset", "toy", "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"), "--quiet"]
    out = output(capsys, "run", "--method", "paumer", "--dry-run", *args)
    assert "baseline checkpoint: would train 4 steps" in out
    assert "paumer checkpoint: would train 2 steps" in out
    assert "baseline-ft checkpoint: would train 2 steps" in out  # the equal-budget control it is compared with
    n = len(METHODS["paumer"].default_ops)
    assert f"operating points: {n}, pending {n}: tau=0.0" in out
    assert not (tmp_path / "ck").exists() and not (tmp_path / "res").exists()

    main(["run", "--method", "static", "--op", "scale=1.0", "--timing-images", "2", "--repeats", "1", *args])
    capsys.readouterr()
    out = output(capsys, "run", "--method", "static", "--op", "scale=1.0", "--op", "scale=0.5", "--dry-run", *args)
    assert "baseline checkpoint: stored, 4 steps" in out and "pending 1: scale=0.5" in out
    out = output(capsys, "run", "--method", "paumer", "--op", "tau=0.1", "--dry-run", *args)
    assert "baseline checkpoint: stored" in out and "paumer checkpoint: would train 2 steps (" in out
    assert "baseline-ft checkpoint: would train 2 steps (" in out
    assert {p.name.split("-")[0] for p in (tmp_path / "ck" / "toy").iterdir()} == {"baseline"}  # .pt and its log


def test_sweep_dry_run_lists_every_job_and_submits_nothing(tmp_path, capsys, toy):  # noqa: F811
    out = output(capsys, "sweep", "--methods", "static,tome", "--op", "tome:r=2", "--op", "tome:r=4", "--dataset", "toy",
                 "--dry-run", "--folder", str(tmp_path / "sweeps"), "--checkpoints", str(tmp_path / "ck"),
                 "--results", str(tmp_path / "res"))
    n = len(METHODS["static"].default_ops)
    assert "toy / static:" in out and f"pending {n}: scale=1.0, scale=0.875" in out
    assert "toy / tome:" in out and "pending 2: r=2, r=4" in out
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("option", [["--batch-size", "4"], ["--results", "somewhere"], ["--dry-run"]])
def test_train_has_only_the_options_it_uses(tmp_path, capsys, toy, option):  # noqa: F811
    code, _, err = run_cli(capsys, "train", *option, "--dataset", "toy", "--checkpoints", str(tmp_path), "--quiet")
    assert code == 2 and "No such option" in err

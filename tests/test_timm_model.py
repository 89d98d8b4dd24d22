"""--model timm:<name>: Segmenter's encoder from any plain timm ViT by name (methods/timm_arch.py)."""
import json

import pytest

from methods.segmenter import PRESETS, build_model, model_config
from methods.timm_arch import timm_config
from bench.cli import main
from tests.test_cli import assert_one_line_error, register_toy, run_cli


def run_ok(capsys, *args):
    """Runs the CLI; a success may return or exit 0."""
    try:
        main(list(args))
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


def test_the_config_is_the_timm_architecture():
    c = model_config("timm:deit_small_patch16_224", decoder="linear")
    assert (c.patch_size, c.embed_dim, c.depth, c.num_heads, c.img_size) == (16, 384, 12, 6, 224)
    assert c.class_token and c.timm_name == "deit_small_patch16_224" and c.decoder == "linear"
    assert model_config("timm:vit_base_patch16_384.augreg_in21k_ft_in1k").img_size == 384  # a weights tag is kept
    model = build_model(5, "timm:vit_tiny_patch16_224", depth=2)
    assert model.depth == 2 and model.config.embed_dim == 192


def test_presets_are_untouched():
    assert PRESETS["vit_small"] == model_config("vit_small")


@pytest.mark.parametrize("name, words", [
    ("vit_tny_patch16_224", ["unknown timm model", "vit_tiny_patch16_224"]),
    ("resnet50", ["is a ResNet, not a VisionTransformer"]),
    ("deit_small_distilled_patch16_224", ["distillation token"]),
    ("vit_small_patch14_reg4_dinov2", ["register tokens", "layer scale"]),
])
def test_unsupported_names_are_one_line(name, words):
    with pytest.raises(ValueError) as e:
        timm_config(name)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def toy(monkeypatch):
    register_toy(monkeypatch, PRESETS["tiny"])


def test_dry_run_with_a_timm_model(capsys, tmp_path, monkeypatch):
    toy(monkeypatch)
    out = run_ok(capsys, "run", "--dataset", "toy", "--model", "timm:vit_tiny_patch16_224", "--method",
                 "baseline", "--dry-run", "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"))
    assert "timm:vit_tiny_patch16_224" in out


def test_the_record_stores_the_timm_name(capsys, tmp_path, monkeypatch):
    toy(monkeypatch)
    run_ok(capsys, "run", "--dataset", "toy", "--model", "timm:vit_tiny_patch16_224", "--depth", "1",
           "--steps", "1", "--limit", "2", "--timing-images", "1", "--repeats", "1", "--batch-size", "1",
           "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"), "--quiet")
    rec = json.loads((tmp_path / "res" / "toy.jsonl").read_text().splitlines()[0])
    assert rec["model"] == "timm:vit_tiny_patch16_224"


def test_bad_timm_models_are_one_line_errors(capsys, tmp_path, monkeypatch):
    toy(monkeypatch)
    common = ["--dataset", "toy", "--checkpoints", str(tmp_path), "--dry-run"]
    code, _, err = run_cli(capsys, "run", "--model", "timm:vit_tny_patch16_224", *common)
    assert_one_line_error(code, err, "unknown timm model", "did you mean vit_tiny_patch16_224")
    code, _, err = run_cli(capsys, "run", "--model", "timm:vit_huge_patch14_224", *common)
    assert_one_line_error(code, err, "training crop 32 is not a multiple", "patch size 14")

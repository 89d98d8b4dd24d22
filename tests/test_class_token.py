"""The class token (ModelConfig.class_token): Segmenter's ViT carries it through the
encoder, where it attends and is attended to, and its decoder drops it."""
import json
from pathlib import Path

import pytest
import timm
import torch

from bench import datasets
from bench.runner import RunOptions, train_config
from bench.train import TrainConfig
from methods.segmenter import build_model, config_dict, copy_timm_encoder, model_config

RESULTS = Path(__file__).resolve().parent.parent / "results" / "synthetic.jsonl"


def cls_model(decoder="linear", **kw):
    torch.manual_seed(0)
    over = dict(depth=4, embed_dim=64, num_heads=2, img_size=32, decoder=decoder, decoder_layers=1, class_token=True)
    return build_model(5, "tiny", **{**over, **kw}).eval()


def timm_style_forward(model, images):
    """timm's ViT layout written out: class token row 0 through every block, then the
    decoder on the grid rows only."""
    x = model.patch_embed(images)
    B, gh, gw, D = x.shape
    x = torch.cat([model.cls_token.expand(B, -1, -1), x.reshape(B, gh * gw, D)], 1)
    pos = timm.layers.resample_abs_pos_embed(model.pos_embed, [gh, gw], list(model.base_grid), num_prefix_tokens=1)
    x = x + pos
    for block in model.blocks:
        x = block(x)
    return model.decode(x[:, 1:], (gh, gw), images.shape[-2:])


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_class_token_runs_through_the_encoder_and_the_decoder_drops_it(decoder):
    model = cls_model(decoder)
    images = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        out = model(images)
        assert torch.allclose(out, timm_style_forward(model, images), atol=1e-5)
        # the class token takes part in attention: another class token, another output
        model.cls_token.copy_(10 * torch.randn_like(model.cls_token))
        assert (model(images) - out).abs().max() > 1e-4


def test_parameters_and_layout():
    model = cls_model()
    assert model.cls_token.shape == (1, 1, 64) and model.pos_embed.shape == (1, 1 + 16, 64)
    assert model.num_prefix_tokens == 1
    tokens, grid = model.embed(torch.randn(1, 3, 32, 32))
    assert tokens.shape == (1, 17, 64) and grid == (4, 4)
    assert torch.allclose(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0])
    plain = build_model(5, "tiny")
    assert not hasattr(plain, "cls_token") and plain.pos_embed.shape[1] == 16 * 16


def test_position_embedding_resize_keeps_the_prefix():
    model = cls_model()
    with torch.no_grad():
        tokens, grid = model.embed(torch.zeros(1, 3, 64, 48))  # 8 x 6 grid, learnt on 4 x 4
    assert grid == (8, 6) and tokens.shape[1] == 1 + 48
    patches = model.patch_embed(torch.zeros(1, 3, 64, 48)).reshape(1, 48, -1)
    assert torch.allclose(tokens[:, 0], model.cls_token[:, 0] + model.pos_embed[:, 0])  # not resampled
    grid_pos = tokens[:, 1:] - patches
    expected = torch.nn.functional.interpolate(
        model.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(8, 6), mode="bicubic",
        antialias=True, align_corners=False).permute(0, 2, 3, 1).reshape(1, 48, -1)
    assert torch.allclose(grid_pos, expected, atol=1e-5)


def test_presets():
    assert not model_config("tiny").class_token
    assert all(model_config(p).class_token for p in ("vit_tiny", "vit_small", "vit_base"))


def test_imagenet_weights_bring_the_class_token_and_its_position():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    model = build_model(5, "vit_tiny", img_size=224, decoder_layers=1)
    copy_timm_encoder(model, vit)
    model.eval(), vit.eval()
    for m in model.modules():  # timm's ViT norms use eps 1e-6, ours torch's default
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
    assert torch.equal(model.cls_token, vit.cls_token)
    assert torch.equal(model.pos_embed, vit.pos_embed)  # same grid: all of it, prefix first
    with torch.no_grad():
        images = torch.randn(1, 3, 224, 224)
        ours = model.embed(images)[0]
        for block in model.blocks:
            ours = block(ours)
        ours = model.norm(ours)
        theirs = vit.forward_features(images)
    assert torch.allclose(ours, theirs, atol=1e-4)
    without = build_model(5, "vit_tiny", img_size=64, decoder_layers=1, class_token=False)
    copy_timm_encoder(without, vit)  # dropped, as before
    assert without.pos_embed.shape == (1, 16, 192)


def test_config_without_class_token_hashes_as_before():
    """The stored synthetic records (tiny, no class token) name their configuration hash;
    the same configuration still hashes to it, with or without an explicit False."""
    stored = {json.loads(line)["train"]["config_hash"] for line in RESULTS.read_text().splitlines() if line}
    base = train_config(RunOptions(), datasets.get_spec("synthetic"))
    assert base.hash() in stored
    explicit = TrainConfig(**{**base.__dict__, "model_overrides": {**base.model_overrides, "class_token": False}})
    assert explicit.hash() == base.hash()
    on = TrainConfig(**{**base.__dict__, "model_overrides": {**base.model_overrides, "class_token": True}})
    assert on.hash() != base.hash() and on.to_dict()["class_token"] is True
    # a vit_* preset's class token enters its hash, so no weights of a model without one load into it
    vit = TrainConfig(dataset="ade20k", num_classes=150, model="vit_small")
    assert vit.to_dict()["class_token"] is True
    assert "class_token" not in config_dict(model_config("tiny"))
    assert config_dict(model_config("vit_small"))["class_token"] is True

import pytest
import timm
import torch

from methods.segmenter import build_model, copy_timm_encoder, model_config


def test_timm_weights_copy_into_the_encoder_with_resized_position_embeddings():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    model = build_model(5, "vit_tiny", img_size=64, decoder_layers=1)
    copy_timm_encoder(model, vit)
    assert torch.equal(model.blocks[3].mlp.fc1.weight, vit.blocks[3].mlp.fc1.weight)
    assert torch.equal(model.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    assert model.pos_embed.shape == (1, 1 + 16, 192)  # class token (vit_* presets), then the 4x4 grid


def test_weights_of_another_shape_are_refused():
    vit = timm.create_model("vit_small_patch16_224", pretrained=False)
    with pytest.raises(ValueError, match="do not fit"):
        copy_timm_encoder(build_model(5, "vit_tiny", img_size=64), vit)


def test_any_input_size_multiple_of_the_patch(small_model):
    with torch.inference_mode():
        assert small_model(torch.randn(1, 3, 40, 72)).shape == (1, 5, 40, 72)


def test_unknown_preset_and_decoder_are_refused():
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("huge")
    with pytest.raises(ValueError, match="unknown decoder"):
        build_model(5, "tiny", decoder="fancy")

"""bench.patch on timm ViTs and bench's Segmenter (methods/timm_patch.py)."""
from pathlib import Path

import pytest
import timm
import torch

import bench
from bench.errors import BenchError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOME_TIMM = SHARED / "fixtures" / "reference" / "tome" / "timm" / "vit.pt"


def tiny_vit(**kw):
    args = dict(embed_dim=64, depth=2, num_heads=2, img_size=64, num_classes=0)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kw}).eval()


def images(n=2, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kw", [{}, {"class_token": False, "global_pool": "avg"}, {"num_classes": 7}])
def test_baseline_patch_equals_the_timm_model(kw):
    vit, x = tiny_vit(**kw), images()
    patched = bench.patch(vit, "baseline")
    with torch.no_grad():
        assert torch.equal(patched.forward_features(x), vit.forward_features(x))
        # same features; the pooled head may round differently on another memory layout
        assert (patched(x) - vit(x)).abs().max() < 1e-6
    assert bench.unpatch(patched) is vit and patched.model is vit


def test_distilled_vit_runs_pausing_and_keeps_its_output():
    vit = timm.create_model("deit_tiny_distilled_patch16_224", embed_dim=64, depth=3, num_heads=2, img_size=64,
                            num_classes=5).eval()
    x = images()
    with torch.no_grad():
        assert (bench.patch(vit, "baseline")(x) - vit(x)).abs().max() < 1e-6
        out = bench.patch(vit, "paumer", tau=1.0, layers=[1]).forward_features(x)
    assert out.shape == vit.forward_features(x).shape  # every token back, both prefix tokens kept
    with pytest.raises(BenchError, match="one class token only"):
        bench.patch(vit, "tome", r=2)


def test_acceptance_tome_runs_and_costs_less():
    vit, x = tiny_vit(), images(3)
    patched = bench.patch(vit, "tome", r=4)
    with torch.no_grad():
        out = patched.forward_features(x)
    assert out.shape[0] == 3
    assert bench.flops(patched, x) < bench.flops(vit, x)


def test_flops_of_an_unpatched_vit_equal_fvcore_on_the_whole_model():
    from bench.flops import count_flops

    vit, x = tiny_vit(num_classes=5), images(1)
    assert bench.flops(vit, x) == pytest.approx(count_flops(vit, (x,)) / 1e9, rel=1e-9)
    # the baseline's priced trace gives the same figure
    assert bench.flops(bench.patch(vit, "baseline"), x) == pytest.approx(bench.flops(vit, x), rel=1e-9)


@pytest.mark.parametrize("method, knobs", [("tome", {"r": 4}), ("algm", {"threshold": 0.5}),
                                           ("paumer", {"tau": 0.5}), ("early-exit", {"threshold": 0.5}),
                                           ("static", {"scale": 0.5})])
def test_every_method_keeps_the_grid_shape_and_spends_no_more(method, knobs):
    vit = tiny_vit(num_classes=5, dynamic_img_size=True)
    x = images()
    patched = bench.patch(vit, method, **knobs)
    with torch.no_grad():
        feats = patched.forward_features(x)
    grid = 16 if method != "static" else 4  # static runs the downscaled input's grid
    assert feats.shape == (2, 1 + grid, 64)
    assert bench.flops(patched, x) <= bench.flops(vit, x) * 1.2  # heads cost something, merging saves


def test_static_and_tome_on_a_segmenter(small_model):
    x = images(2, 32)
    with torch.no_grad():
        assert torch.equal(bench.patch(small_model, "baseline")(x), small_model(x))
        logits = bench.patch(small_model, "static", scale=0.5)(x)
        tome = bench.patch(small_model, "tome", r=3)
        merged = tome(x)
    assert logits.shape == merged.shape == (2, 5, 32, 32)
    assert bench.flops(tome, x) < bench.flops(small_model, x)
    paumer = bench.patch(small_model, "paumer", tau=0.3)
    assert any(k.startswith("trainable.pausing.") for k in paumer.state_dict())


def test_bad_models_and_inputs_get_one_line():
    with pytest.raises(BenchError, match="timm VisionTransformer or bench's Segmenter"):
        bench.patch(torch.nn.Linear(3, 3), "tome", r=1)
    with pytest.raises(BenchError, match="register tokens"):
        bench.patch(tiny_vit(reg_tokens=4), "tome", r=1)
    custom = tiny_vit()
    custom.blocks[0] = type("MyBlock", (torch.nn.Module,), {"forward": lambda self, x: x})()
    with pytest.raises(BenchError, match="timm's vision_transformer.Block .* has Block, MyBlock"):
        bench.patch(custom, "tome", r=1)
    with pytest.raises(BenchError, match="unknown method"):
        bench.patch(tiny_vit(), "tomme")
    with pytest.raises(BenchError, match="no knob"):
        bench.patch(tiny_vit(), "tome", tau=1)
    with pytest.raises(BenchError, match="not a multiple of the model's 16x16 patch"):
        bench.flops(bench.patch(tiny_vit(dynamic_img_size=True), "tome", r=2), images(1, 70))


@pytest.mark.skipif(not TOME_TIMM.exists(), reason="ToMe reference fixture not in ../shared")
@pytest.mark.parametrize("run", ["cls_r4_prop_attn", "cls_r4_no_prop_attn", "cls_r4_decreasing_prop_attn",
                                 "nocls_r4_prop_attn", "nocls_r4_no_prop_attn", "nocls_r4_decreasing_prop_attn"])
def test_tome_on_timm_gives_the_reference_output(run):
    ref = torch.load(TOME_TIMM, weights_only=True)
    case = ref["runs"][run]
    config = dict(ref["configs"][case["model"]])
    vit = timm.models.vision_transformer.VisionTransformer(**config).eval()
    state = dict(ref["state_dict"])
    if not case["class_token"]:
        del state["cls_token"]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    vit.load_state_dict(state)
    r, schedule = (case["r"][0], "decreasing") if isinstance(case["r"], (list, tuple)) else (case["r"], "constant")
    patched = bench.patch(vit, "tome", r=r, schedule=schedule, prop_attn=case["prop_attn"], output="rows")
    assert patched.policy.rs == case["r_per_block"]
    with torch.no_grad():
        features, state = patched.forward_state(ref["image"], features_only=True)
        logits = patched(ref["image"])
    assert features.shape == case["features"].shape
    assert (features - case["features"]).abs().max() <= 5e-6
    assert (logits - case["logits"]).abs().max() <= 5e-6
    assert torch.equal(state.size, case["size"][:, int(case["class_token"]):, 0])
    # every patch's merged row is the reference's (its unmerge index, class token row dropped)
    P = int(case["class_token"])
    assert torch.equal(state.source + P, case["unmerge_index"][:, P:])

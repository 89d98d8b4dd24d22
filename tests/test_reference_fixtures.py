"""Equal to the reference code: every case of ``../shared/fixtures/reference`` (see its
README): checkpoints saved by rstrudel/segmenter and mmsegmentation 1.1 / 1.2 give the
reference's logits through ``bench.load_segmenter``; ALGM's and ToMe's merges give the
reference's rows, sizes, sources and unmerge indices."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.errors import BenchError

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "reference"
needs_fixtures = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"no reference fixtures at {REFERENCE}")
MODEL_CASES = [f"{src}/{case}" for src in ("segmenter", "mmseg-1.1", "mmseg-1.2")
               for case in ("linear", "mask", "mask_resize", "mask_distilled")
               if not (src != "segmenter" and case == "mask_distilled")]
TOLERANCE = 2e-5  # every meta.json's; the reference's own float32 noise is <= 9.2e-6
# bench's own numerics (its defaults before this module read the reference's)
BENCH_NUMERICS = dict(eps_blocks=1e-6, eps_norm=1e-5, eps_decoder=1e-6, eps_decoder_norms=1e-5,
                      pos_resize="bicubic_antialias")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference ran
    yield
    torch.set_num_threads(threads)


def _logits_difference(case: str, **overrides) -> float:
    import bench

    folder = REFERENCE / case
    model = bench.load_segmenter(folder / "checkpoint.pth", **overrides)
    with torch.no_grad():
        logits = model(torch.load(folder / "input.pt", weights_only=True))
    return (logits - torch.load(folder / "logits.pt", weights_only=True)).abs().max().item()


@needs_fixtures
@pytest.mark.parametrize("case", MODEL_CASES)
def test_released_layouts_give_the_reference_logits(case):
    assert _logits_difference(case) <= TOLERANCE


@needs_fixtures
@pytest.mark.parametrize("case", ["segmenter/mask", "segmenter/mask_resize", "mmseg-1.1/mask_resize"])
def test_bench_numerics_miss_the_reference(case):
    """The fixtures can tell: bench's own eps / resize (what --weights used before) miss."""
    assert _logits_difference(case, **BENCH_NUMERICS) > 5 * TOLERANCE


@needs_fixtures
def test_numerics_come_from_the_files_configuration(capsys):
    import bench

    rstrudel = bench.load_segmenter(REFERENCE / "segmenter/mask_distilled/checkpoint.pth").config
    assert (rstrudel.eps_blocks, rstrudel.eps_norm, rstrudel.pos_resize) == (1e-5, 1e-5, "bilinear")
    assert rstrudel.dist_token and rstrudel.mean == (0.485, 0.456, 0.406) and rstrudel.num_heads == 2
    mmseg = bench.load_segmenter(REFERENCE / "mmseg-1.2/mask/checkpoint.pth").config
    assert (mmseg.eps_blocks, mmseg.eps_norm, mmseg.eps_decoder, mmseg.pos_resize) == (1e-6, 1e-6, 1e-5, "bicubic")
    assert not mmseg.patch_bias and mmseg.img_size == 128
    err = capsys.readouterr().err
    assert "variant.yml" in err and "meta.cfg" in err


@needs_fixtures
def test_a_checkpoint_without_its_configuration_is_refused_in_one_line(tmp_path):
    import bench

    (tmp_path / "checkpoint.pth").write_bytes((REFERENCE / "segmenter/mask/checkpoint.pth").read_bytes())
    with pytest.raises(BenchError) as e:
        bench.load_segmenter(tmp_path / "checkpoint.pth")
    message = str(e.value)
    assert "\n" not in message and "variant.yml" in message and "width 64" in message
    assert "encoder.patch_embed.proj.weight" in message


def test_an_unknown_layout_names_what_it_expected(tmp_path):
    import bench

    torch.save({"weights": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "w.pth")
    with pytest.raises(BenchError, match="rstrudel/segmenter or mmsegmentation"):
        bench.load_segmenter(tmp_path / "w.pth")


def test_mmseg_config_text_is_parsed_without_running_it():
    from bench.loading import parse_mmseg_cfg

    cfg = parse_mmseg_cfg("a = dict(b=(1, 2), c=[-1.5, 'x'])\nimport os\nd = os.system('false')\ne = None\n")
    assert cfg == {"a": {"b": (1, 2), "c": [-1.5, "x"]}, "e": None}


# ---------------------------------------------------------------- ALGM (tue-mps/algm-segmenter)

def _one_hot_source(dest: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, n) destination rows -> (B, rows, n) 0/1: row i covers input j."""
    return F.one_hot(dest, rows).transpose(1, 2).float()


@needs_fixtures
@pytest.mark.parametrize("case", ["batch1", "batch4"])
def test_algm_merges_equal_the_reference(case):
    from methods.algm import (global_merge_plan_reference, local_merge_plan, local_merge_plan_reference, merge_rows)

    d = torch.load(REFERENCE / "algm" / f"{case}.pt", weights_only=True)
    batch = d["tokens_local_in"].shape[0]
    local_plan = local_merge_plan_reference if batch > 1 else local_merge_plan  # batch 1: both the same
    grid_in = d["tokens_local_in"][:, 1:]
    dest, kept = local_plan(grid_in, (16, 16), float(d["local_threshold"]))
    assert kept.tolist() == [int(d["rows_local"]) - 1] * batch
    x, size, valid = merge_rows(grid_in, dest, None, None, kept)
    assert valid is None
    assert torch.equal(size[..., None], d["size_local_out"][:, 1:])
    assert torch.equal(_one_hot_source(dest, x.shape[1]), d["source_local"][:, 1:, 1:])
    assert (x - d["tokens_local_out"][:, 1:]).abs().max() <= 1e-6

    x = d["tokens_global_in"]  # class token row 0
    size = d["size_global_in"][..., 0]
    dest2, kept2 = global_merge_plan_reference(x, int(d["layer_idx"]), protect_cls=True)
    assert kept2.tolist() == [int(d["rows_global"])] * batch
    out, size_out, _ = merge_rows(x, dest2, size, None, kept2)
    assert torch.equal(size_out[..., None], d["size_global_out"])
    assert (out - d["tokens_global_out"]).abs().max() <= 1e-6
    unmerge = dest2.gather(1, dest + 1) - 1  # grid position -> local row (after the class token) -> global row
    assert torch.equal(unmerge, d["unmerge_index"])
    full = torch.cat([torch.zeros(batch, 1, dtype=torch.long), dest + 1], 1)  # class token column too
    assert torch.equal(_one_hot_source(dest2.gather(1, full), out.shape[1]), d["source_global"])


@needs_fixtures
def test_algm_per_image_default_differs_from_the_reference_batch():
    """bench's default decides per image: the images' own counts (meta.json ``alone``)."""
    import json

    from methods.algm import local_merge_plan

    d = torch.load(REFERENCE / "algm" / "batch4.pt", weights_only=True)
    alone = json.loads((REFERENCE / "algm" / "meta.json").read_text())["cases"]["batch4"]["alone"]
    _, kept = local_merge_plan(d["tokens_local_in"][:, 1:], (16, 16), float(d["local_threshold"]))
    assert (kept + 1).tolist() == alone["rows_local_alone"]


@needs_fixtures
def test_algm_reference_batching_through_the_policy():
    """``batching=reference``: every image of the batch keeps the batch's rows."""
    from methods.algm import ALGMPolicy
    from methods.segmenter import ModelConfig, Segmenter

    torch.manual_seed(0)
    model = Segmenter(5, ModelConfig(16, 64, 6, 2, decoder="mask", img_size=128, class_token=True)).eval()
    images = torch.randn(4, 3, 128, 128)
    images[0] *= 0.05  # a flat image and a smooth one merge more windows than noise
    images[1] = F.avg_pool2d(images[1:2], 9, 1, 4)[0]
    with torch.no_grad():
        _, state = model.forward_state(images, ALGMPolicy(6, threshold=0.3, batching="reference"))
        _, own = model.forward_state(images, ALGMPolicy(6, threshold=0.3))  # bench's default: per image
    assert state.valid is None and len(set(state.trace.tokens[:, -1].tolist())) == 1
    # after the local merge (entering block 2): the batch merges the smallest count of its images
    local_own = own.trace.tokens[:, 1].tolist()
    assert len(set(local_own)) > 1 and state.trace.tokens[:, 1].tolist() == [max(local_own)] * 4


def test_algm_default_layers_are_the_references():
    from methods.algm import default_layers

    assert default_layers(12) == [1, 5] and default_layers(24) == [1, 7]
    assert default_layers(6) == [1, 3]  # tiny: unchanged (stored rows)


# ---------------------------------------------------------------- ToMe (facebookresearch/ToMe)

TOME_CASES = sorted(p.stem for p in (REFERENCE / "tome" / "matching").glob("*.pt")) if REFERENCE.is_dir() else []


@needs_fixtures
def test_every_tome_matching_case_is_read():
    assert len(TOME_CASES) == 44


@needs_fixtures
@pytest.mark.parametrize("case", TOME_CASES)
def test_tome_matching_equals_the_reference(case):
    from methods.tome import bipartite_soft_matching, merge_wavg

    d = torch.load(REFERENCE / "tome" / "matching" / f"{case}.pt", weights_only=True)
    B, n = d["x_in"].shape[:2]
    r = int(d["r_effective"])
    size_in = None if d["size_in"] is None else d["size_in"][..., 0]
    if r == 0:  # as tome_block: no matching, nothing moves
        dest, x_out = torch.arange(n).expand(B, n), d["x_in"]
        size_out = size_in if size_in is not None else torch.ones(B, n)
    else:
        dest = bipartite_soft_matching(d["metric"], r, protect_cls=bool(d["class_token"]))
        x_out, size_out = merge_wavg(d["x_in"], dest, size_in, n - r)
    assert torch.equal(dest, d["step_index"])
    assert torch.equal(size_out[..., None], d["size_out"])
    assert (x_out - d["x_out"]).abs().max() <= 1e-6
    source_in = torch.eye(n, dtype=torch.bool).expand(B, n, n) if d["source_in"] is None else d["source_in"]
    source = torch.zeros(B, n - r, source_in.shape[-1], dtype=torch.bool)
    source.scatter_reduce_(1, dest[..., None].expand_as(source_in).long(), source_in, "amax")
    assert torch.equal(source, d["source_out"])
    assert torch.equal(source.float().argmax(1), d["unmerge_index"])


@needs_fixtures
@pytest.mark.parametrize("run", ["cls_r4_prop_attn", "cls_r4_no_prop_attn", "cls_r4_decreasing_prop_attn",
                                 "nocls_r4_prop_attn", "nocls_r4_no_prop_attn", "nocls_r4_decreasing_prop_attn"])
def test_tome_on_timm_equals_the_reference(run):
    """ToMe's timm patch end to end: every block's rows, the final features (timm's final
    norm eps 1e-6: ``eps_norm``), logits, sizes and unmerge index."""
    from methods.segmenter import ModelConfig, Segmenter
    from methods.tome import ToMePolicy

    t = torch.load(REFERENCE / "tome" / "timm" / "vit.pt", weights_only=True)
    ref = t["runs"][run]
    cls = ref["class_token"]
    model = Segmenter(5, ModelConfig(16, 64, 2, 2, img_size=64, class_token=cls, eps_norm=1e-6, drop_path=0.0))
    state = {k: v for k, v in t["state_dict"].items() if not k.startswith("head.")}
    if not cls:
        state = {k: (v[:, 1:] if k == "pos_embed" else v) for k, v in state.items() if k != "cls_token"}
    model.load_state_dict({**model.state_dict(), **state})
    model.eval()

    outputs = []

    class Recording(ToMePolicy):
        def run_block(self, index, block, st):
            super().run_block(index, block, st)
            outputs.append(st.joined())

    decreasing = "decreasing" in run
    policy = Recording(2, 4, schedule="decreasing" if decreasing else "constant", prop_attn="no_prop" not in run)
    assert policy.rs == ref["r_per_block"]
    with torch.no_grad():
        tokens, grid = model.embed(t["image"])
        from methods.encoder import run_encoder

        st = run_encoder(model.blocks, tokens, grid, policy, model=model, prefix=model.num_prefix_tokens)
        features = model.norm(st.joined())
    for ours, theirs in zip(outputs, ref["block_out"]):
        assert (ours - theirs).abs().max() <= 5e-6
    assert (features - ref["features"]).abs().max() <= 5e-6
    head_w, head_b = t["state_dict"]["head.weight"], t["state_dict"]["head.bias"]
    pooled = features[:, 0] if cls else features.mean(1)
    assert (F.linear(pooled, head_w, head_b) - ref["logits"]).abs().max() <= 5e-6
    P = int(cls)
    size = torch.cat([torch.ones(2, P), st.size], 1) if P else st.size
    assert torch.equal(size[..., None], ref["size"])
    unmerge = st.source + P
    if P:
        unmerge = torch.cat([torch.zeros(2, 1, dtype=torch.long), unmerge], 1)
    assert torch.equal(unmerge, ref["unmerge_index"])


# ---------------------------------------------------------------- bench's own models keep their numerics

def test_bench_defaults_are_unchanged_and_hash_as_before():
    """A model bench trains keeps its numerics, and its config hash (the stored
    synthetic baseline's) holds, with the numerics left out or given at their defaults."""
    from dataclasses import replace

    from bench import datasets
    from bench.runspec import RunOptions, train_config
    from methods.segmenter import DEFAULT_NUMERICS, build_model

    model = build_model(5, "tiny", decoder="mask")
    eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps["blocks.0.norm1"] == 1e-6 and eps["norm"] == 1e-5
    assert eps["decoder.blocks.0.norm2"] == 1e-6 and eps["decoder.mask_norm"] == eps["decoder.decoder_norm"] == 1e-5
    base = train_config(RunOptions(), datasets.get_spec("synthetic"))
    assert base.hash() == "507ac65522a9"  # results/synthetic.jsonl's baseline
    explicit = replace(base, model_overrides={**base.model_overrides, **DEFAULT_NUMERICS,
                                              "mean": [0.5] * 3, "dist_token": False, "patch_bias": True})
    assert explicit.hash() == base.hash()
    other = replace(base, model_overrides={**base.model_overrides, "eps_norm": 1e-6})
    assert other.hash() != base.hash() and other.to_dict()["model_overrides"]["eps_norm"] == 1e-6


@needs_fixtures
def test_imported_models_run_at_their_own_grid():
    """--weights: the file's trained size becomes the model's grid and the sliding window
    (none stated in these configurations), with its numerics, not the preset's."""
    from bench.loading import native_window, preset_overrides

    path = REFERENCE / "mmseg-1.1/mask/checkpoint.pth"
    assert native_window(path, None, "vit_tiny", None, 512, 512) == (128, 128)
    over = preset_overrides(path, None, "vit_tiny")
    assert over["img_size"] == 128 and over["eps_norm"] == 1e-6 and over["pos_resize"] == "bicubic"
    assert "dist_token" not in over and "patch_bias" not in over  # as the preset's
    assert preset_overrides(REFERENCE / "mmseg-1.2/mask/checkpoint.pth", None, "vit_tiny")["patch_bias"] is False


@needs_fixtures
@pytest.mark.parametrize("case", ["mmseg-1.2/mask", "segmenter/mask_distilled"])
def test_reference_checkpoints_run_through_every_method(case):
    """mmseg >= 1.2 (no patch bias) and the DeiT-distilled encoder under every policy:
    finite logits at input size; a policy that drops nothing gives the reference's logits."""
    import bench
    from methods.algm import ALGMPolicy
    from methods.early_exit import EarlyExitModel, EarlyExitPolicy
    from methods.paumer import PaumerModel, PaumerPolicy
    from methods.tome import ToMePolicy

    folder = REFERENCE / case
    model = bench.load_segmenter(folder / "checkpoint.pth")
    x, reference = (torch.load(folder / n, weights_only=True) for n in ("input.pt", "logits.pt"))
    torch.manual_seed(0)
    paumer, exits = PaumerModel(model).eval(), EarlyExitModel(model).eval()
    nothing = {"tome r=0": ToMePolicy(2, 0), "algm none": ALGMPolicy(2, 1.01, global_threshold=1.01),
               "paumer tau=0": PaumerPolicy(paumer.pausing, tau=0.0)}
    something = {"tome": ToMePolicy(2, 8), "algm": ALGMPolicy(2, -1.0),
                 "algm reference": ALGMPolicy(2, -1.0, batching="reference"),
                 "paumer": PaumerPolicy(paumer.pausing, tau=1.0),
                 "early-exit": EarlyExitPolicy(exits.heads, threshold=0.0, mode="token")}
    with torch.no_grad():
        for name, policy in nothing.items():
            assert (model(x, policy) - reference).abs().max() <= TOLERANCE, name
        for name, policy in something.items():
            logits, state = model.forward_state(x, policy)
            assert logits.shape == reference.shape and torch.isfinite(logits).all(), name
            assert state.prefix.shape[1] == model.num_prefix_tokens, name

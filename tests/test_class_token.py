"""The class token (ModelConfig.class_token): Segmenter's ViT carries it through the
encoder, where it attends and is attended to, and its decoder drops it."""
import json
import statistics
from pathlib import Path

import pytest
import timm
import torch

from bench import datasets
from bench.runner import RunOptions, train_config
from bench.flops import FlopModel, count_flops
from bench.train import TrainConfig
from methods.algm import ALGMPolicy, global_merge_plan
from methods.early_exit import EarlyExitModel, EarlyExitPolicy
from methods.encoder import Policy
from methods.paumer import PaumerModel, PaumerPolicy
from methods.references import truncate
from methods.segmenter import build_model, config_dict, copy_timm_encoder, model_config
from methods.tome import ToMePolicy, bipartite_soft_matching, max_r

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


# --- every method leaves the class token alone ---------------------------------------


def images(n=2, h=32, w=32, seed=3):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def with_heads(model_cls, seg, std):
    torch.manual_seed(1)
    m = model_cls(seg).eval()
    for head in getattr(m, m.heads_attr).heads:  # confident on some tokens, unsure on others
        torch.nn.init.normal_(head[1].weight, std=std)
    return m


def watch(policy):
    """Records the class token's state after every block (before the policy decides)."""
    seen = []
    after = policy.after_block

    def after_block(index, block, state):
        seen.append(state.prefix.clone())
        after(index, block, state)

    policy.after_block = after_block
    return seen


def extreme_policies(seg):
    """Per method, a policy that takes (nearly) every grid token out: pause / exit all at
    the first layer, merge as much as allowed."""
    pm = with_heads(PaumerModel, seg, 0.5)
    ee = with_heads(EarlyExitModel, seg, 0.7)
    return {
        "paumer": PaumerPolicy(pm.pausing, tau=1.0),
        "paumer-packed": PaumerPolicy(pm.pausing, tau=1.0, batching="packed"),
        "paumer-simulated": PaumerPolicy(pm.pausing, tau=1.0, simulate=True),
        "early-exit-token": EarlyExitPolicy(ee.heads, threshold=0.0, mode="token"),
        "early-exit-image": EarlyExitPolicy(ee.heads, threshold=0.0, mode="image"),
        "tome": ToMePolicy(seg.depth, r=max_r(16, seg.depth)),
        "algm": ALGMPolicy(seg.depth, threshold=-1.0, global_threshold=-1.0, layers=[1, 2, 3]),
    }


@pytest.mark.parametrize("name", ["paumer", "paumer-packed", "paumer-simulated", "early-exit-token",
                                  "early-exit-image", "tome", "algm"])
def test_no_method_pauses_exits_or_merges_the_class_token(name):
    seg = cls_model("mask")
    policy = extreme_policies(seg)[name]
    seen = watch(policy)
    with torch.no_grad():
        logits, state = seg.forward_state(images(2), policy)
    assert logits.shape == (2, 5, 32, 32) and torch.isfinite(logits).all()
    assert len(seen) == seg.depth and state.prefix.shape == (2, 1, 64)
    embedded = seg.embed(images(2))[0][:, :1]
    for before, after in zip([embedded] + seen, seen):
        assert (after - before).abs().max() > 1e-4  # every block ran it
    assert torch.equal(state.prefix, seen[-1])
    blocks = [counts for key, counts in state.trace.items if key[0] in ("block", "tome_block", "algm_attention")]
    assert len(blocks) == seg.depth
    grid = state.trace.tokens  # grid tokens only
    if name == "paumer-simulated":  # every row stays in x; the trace prices the active ones
        assert [b.tolist() for b in blocks] == [[17, 17]] + [[1, 1]] * 3
        assert (state.left_at == 1).all()
        return
    assert all(torch.equal(b, g + 1) for b, g in zip(blocks, grid.T))  # the class token counted in every block
    if name.startswith("paumer") or name.startswith("early-exit"):
        assert (state.left_at == 1).all() and grid[:, 1:].sum() == 0  # every grid token left at once
    else:  # merged, every patch in exactly one row; none in the class token's
        assert state.size is not None and (state.size.sum(1) == 16).all()
        assert state.size.shape[1] == state.x.shape[1] < 16


def test_pausing_nothing_equals_the_baseline_with_the_class_token():
    seg = cls_model("mask")
    pm = with_heads(PaumerModel, seg, 0.5)
    x = images(3)
    with torch.no_grad():
        base = seg(x)
        for batching in ("pad", "packed"):
            out, state = seg.forward_state(x, PaumerPolicy(pm.pausing, tau=1e-6, batching=batching))
            assert [k for k, _ in state.trace.items].count(("head",)) == 3  # the heads ran
            assert (state.left_at == seg.depth).all()
            assert torch.equal(out, base)


@pytest.mark.parametrize("batching", ["pad", "packed"])
def test_ragged_batches_equal_each_image_alone_with_the_class_token(batching):
    seg = cls_model("mask")
    pm = with_heads(PaumerModel, seg, 0.5)
    x = images(3, 32, 48)
    x[1] = x[1].mean((1, 2), keepdim=True)  # a flat image: ALGM merges it more
    policies = {"paumer": lambda: PaumerPolicy(pm.pausing, tau=0.3, batching=batching),
                "algm": lambda: ALGMPolicy(seg.depth, threshold=0.0, batching=batching)}
    with torch.no_grad():
        for name, make in policies.items():
            batched, state = seg.forward_state(x, make())
            assert (state.trace.tokens != state.trace.tokens[:1]).any(), name  # ragged
            for b in range(3):
                alone = seg(x[b : b + 1], make())
                assert (batched[b : b + 1] - alone).abs().max() < 1e-5, name


def test_masked_pausing_equals_gathered_with_the_class_token():
    seg = cls_model("mask")
    pm = with_heads(PaumerModel, seg, 0.5)
    x = images(3)
    with torch.no_grad():
        gathered, gs = seg.forward_state(x, PaumerPolicy(pm.pausing, tau=0.3))
        masked, ms = seg.forward_state(x, PaumerPolicy(pm.pausing, tau=0.3, simulate=True))
    assert (gs.left_at < seg.depth).any() and torch.equal(gs.left_at, ms.left_at)
    assert (gathered - masked).abs().max() < 1e-4
    assert (gs.prefix - ms.prefix).abs().max() < 1e-4


def test_tome_unmerging_before_or_after_the_decoder_agree_with_the_class_token():
    seg = cls_model("mask")
    x = images(2)
    with torch.no_grad():
        after = seg(x, ToMePolicy(seg.depth, r=3, unmerge="after"))
        before = seg(x, ToMePolicy(seg.depth, r=3, unmerge="before"))
    assert (after - before).abs().max() < 1e-4


def tome_official(metric, r):
    """ToMe's bipartite_soft_matching with class_token=True (facebookresearch/ToMe), by
    hand: row 0 in A never merges; unmerged A rows sorted by index, then the B rows."""
    unit = [[v / sum(w * w for w in row) ** 0.5 for v in row] for row in metric]
    n = len(unit)
    A, B = list(range(0, n, 2)), list(range(1, n, 2))
    sim = lambda i, j: sum(p * q for p, q in zip(unit[i], unit[j]))  # noqa: E731
    best = {i: (float("-inf") if i == 0 else max(sim(i, j) for j in B)) for i in A}
    match = {i: max(B, key=lambda j: sim(i, j)) for i in A}
    merging = set(sorted(A, key=lambda i: -best[i])[:r])
    rows = [[i] for i in A if i not in merging] + [[j] + [i for i in merging if match[i] == j] for j in B]
    return [sorted(g) for g in rows]


@pytest.mark.parametrize("n, r", [(9, 4), (10, 4), (17, 8), (17, 3)])
def test_tome_matching_protects_the_class_token_as_tome_does(n, r):
    metric = torch.randn(1, n, 5, generator=torch.Generator().manual_seed(n))
    metric[0, 0] = metric[0, 1]  # the class token looks like a B token: still never merged
    dest = bipartite_soft_matching(metric, r, protect_cls=True)
    expected = tome_official(metric[0].tolist(), r)
    assert [sorted(i for i in range(n) if dest[0, i] == row) for row in range(n - r)] == expected
    assert expected[0] == [0]


def algm_official(x, layer):
    """The reference's turbo_matching with class_token=True, by hand (one image): A = even
    rows (row 0 the class token, never merging, out of the statistics), B = odd rows."""
    unit = [[v / sum(w * w for w in row) ** 0.5 for v in row] for row in x]
    A, B = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    sim = lambda i, j: sum(p * q for p, q in zip(unit[i], unit[j]))  # noqa: E731
    best = {i: max(sim(i, j) for j in B) for i in A[1:]}
    match = {i: max(B, key=lambda j: sim(i, j)) for i in A[1:]}
    cut = statistics.mean(best.values()) + statistics.stdev(best.values()) / layer
    merging = {i for i in A[1:] if best[i] >= cut}
    rows = [[i] for i in A if i not in merging] + [[j] + [i for i in merging if match[i] == j] for j in B]
    return [sorted(g) for g in rows]


@pytest.mark.parametrize("n, layer", [(13, 3), (16, 2), (11, 1)])
def test_algm_global_matching_protects_the_class_token_as_the_reference(n, layer):
    x = torch.randn(1, n, 4, generator=torch.Generator().manual_seed(n))
    x[0, 0] = x[0, 1]
    dest, kept = global_merge_plan(x, None, layer, protect_cls=True)
    expected = algm_official(x[0].tolist(), layer)
    assert kept.tolist() == [len(expected)] and len(expected) < n
    assert [sorted(i for i in range(n) if dest[0, i] == row) for row in range(len(expected))] == expected
    assert expected[0] == [0]


# --- FLOPs count the class token in every block --------------------------------------


def test_flops_equal_fvcore_with_the_class_token():
    seg = cls_model("mask")
    pm = with_heads(PaumerModel, seg, 0.5)
    ee = with_heads(EarlyExitModel, seg, 0.7)
    plain = build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32, decoder="mask",
                        decoder_layers=1).eval()
    plain.load_state_dict({k: v for k, v in seg.state_dict().items() if k != "cls_token" and k != "pos_embed"},
                          strict=False)
    policies = {
        "baseline": (lambda: Policy(), seg),
        "paumer": (lambda: PaumerPolicy(pm.pausing, tau=0.3), pm),
        "early-exit": (lambda: EarlyExitPolicy(ee.heads, threshold=0.97), ee),
        "tome": (lambda: ToMePolicy(seg.depth, r=3), seg),
        "algm": (lambda: ALGMPolicy(seg.depth, threshold=0.0), seg),
    }
    for h, w in [(32, 48)]:
        x = images(1, h, w)
        for name, (make, owner) in policies.items():
            policy = make()
            with torch.no_grad():
                _, state = seg.forward_state(x, policy)
            # some grid token reaches the last block (see the next test for when none does)
            assert (state.trace.tokens[:, -1] > 0).all()
            if name in ("paumer", "early-exit"):
                assert state.any_left  # some tokens did leave
            traced = FlopModel(seg, policy).image_flops(state.trace, (h, w)).item()
            counted = count_flops(lambda im: seg(im, make()), (x,), owner=owner)
            assert traced == counted, (name, h, w)
        # the class token is priced: one more row in every block than the same model without it
        with torch.no_grad():
            _, plain_state = plain.forward_state(x)
            _, state = seg.forward_state(x)
        assert FlopModel(seg).image_flops(state.trace, (h, w)) > FlopModel(plain).image_flops(plain_state.trace, (h, w))
        assert [c.tolist() for _, c in state.trace.items] == [[c + 1 for c in cs.tolist()] for _, cs in plain_state.trace.items]


def test_a_class_token_left_alone_is_computed_and_priced():
    """Every grid token exits at the first head: the class token still runs blocks 2-4
    alone (no method stops it). Nothing reads it then, so fvcore's trace drops those
    blocks as dead code; the FLOP model prices them, as they are computed."""
    seg = cls_model("mask")
    ee = with_heads(EarlyExitModel, seg, 0.7)
    x = images(1)
    policy = EarlyExitPolicy(ee.heads, threshold=0.0)
    with torch.no_grad():
        _, state = seg.forward_state(x, policy)
    assert state.trace.tokens.tolist() == [[16, 0, 0, 0]]
    flops = FlopModel(seg, policy)
    counted = count_flops(lambda im: seg(im, EarlyExitPolicy(ee.heads, threshold=0.0)), (x,), owner=ee)
    assert flops.image_flops(state.trace, (32, 32)).item() == counted + 3 * flops.cost(("block",), 1)


def test_static_and_shallow_run_with_the_class_token():
    seg = cls_model()
    x = images(1, 32, 32)
    with torch.no_grad():
        small = seg(torch.nn.functional.interpolate(x, size=(24, 24)))  # static: a smaller grid
        assert small.shape == (1, 5, 24, 24)
        full = seg(x)
        cut = truncate(seg, 2)
        assert cut.config.class_token and cut(x).shape == full.shape

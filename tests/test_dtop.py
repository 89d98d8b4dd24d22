import math

import pytest
import torch

from bench.flops import FlopModel, count_flops
from methods import METHODS
from methods.dtop import DToPModel, DToPPolicy, default_layers, dtop_loss
from methods.dtop_head import atm_loss, prune_decision, token_scores
from methods.segmenter import build_model

def make_dtop(decoder="linear"):
    torch.manual_seed(1)
    seg = build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32, decoder=decoder)
    m = DToPModel(seg, [1, 2]).eval()
    for head in list(m.heads.heads) + [m.heads.final]:  # masks and presence far from 0.5: some tokens prune
        for layer in head.layers:
            torch.nn.init.normal_(layer.q.weight, std=0.3)
            torch.nn.init.normal_(layer.k.weight, std=0.3)
        head.class_embed.bias.data[0] = 3.0
    return m


@pytest.fixture(scope="module")
def dtop():
    return make_dtop()


@pytest.fixture(scope="module")
def dtop_mask():
    return make_dtop("mask")


def images(n=3, h=64, w=64):  # 8 x 8 tokens: more than the top-k of 5 classes protect
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(3))


def test_default_layers_are_dtops_and_tiny_takes_vit_b_fractions():
    assert default_layers(12) == [6, 8]
    assert default_layers(24) == [8, 16]
    assert default_layers(6) == [3, 4]


def test_score_is_class_presence_times_mask_sigmoid_by_hand():
    class_logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # (1, C=2, present/absent)
    masks = torch.tensor([[[0.0, 3.0], [-1.0, 0.5], [4.0, -2.0]]])  # (1, n=3, C=2)
    present = [math.exp(2) / (math.exp(2) + 1), 1 / (1 + math.e)]
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = [[present[c] * sig(masks[0, t, c].item()) for c in range(2)] for t in range(3)]
    assert torch.allclose(token_scores(class_logits, masks)[0], torch.tensor(expected), atol=1e-6)


def test_top_k_tokens_of_each_class_survive_a_threshold_that_would_prune_them():
    best = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92])
    label = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    scores = torch.zeros(1, 8, 2)
    scores[0, torch.arange(8), label] = best
    prune = prune_decision(scores, threshold=0.5, top_k=2)[0]
    assert prune.tolist() == [False, False, True, True, True, True, False, False]
    # only running tokens count: with token 0 gone, tokens 1 and 2 are class 0's best two
    candidates = torch.ones(1, 8, dtype=torch.bool)
    candidates[0, 0] = False
    prune = prune_decision(scores, threshold=0.5, top_k=2, candidates=candidates)[0]
    assert prune.tolist() == [False, False, False, True, True, True, False, False]
    assert not prune_decision(scores, threshold=0.995, top_k=0).any()


def test_pruning_nothing_equals_the_baseline_with_the_heads_priced(dtop):
    x = images()
    seg = dtop.segmenter
    policy = DToPPolicy(dtop.heads, threshold=1.0)
    with torch.inference_mode():
        base, base_state = seg.forward_state(x)
        out, state = seg.forward_state(x, policy)
    assert torch.equal(out, base)
    assert (state.trace.tokens == 64).all()
    flops = FlopModel(seg, policy)
    heads = 2 * flops.cost(("dtop-head",), 64)
    assert heads > 0
    assert flops.image_flops(state.trace, (64, 64)).tolist() == \
        (FlopModel(seg).image_flops(base_state.trace, (64, 64)) + heads).tolist()


@pytest.mark.parametrize("decoder, threshold", [("linear", 0.8), ("mask", 0.0)])
def test_trace_flops_equal_fvcore_count_per_image(dtop, dtop_mask, decoder, threshold):
    model = dtop if decoder == "linear" else dtop_mask
    seg = model.segmenter
    for x in images().split(1)[:1]:  # one image: fvcore traces are slow
        policy = DToPPolicy(model.heads, threshold=threshold)
        with torch.inference_mode():
            _, state = seg.forward_state(x, policy)
        assert state.any_left
        traced = FlopModel(seg, policy).image_flops(state.trace, (64, 64)).item()
        counted = count_flops(lambda im: seg(im, DToPPolicy(model.heads, threshold=threshold)), (x,), owner=model)
        assert traced == counted


@pytest.mark.parametrize("decoder", ["linear", "mask"])
@pytest.mark.parametrize("batching", ["pad", "packed"])
def test_batched_equals_per_image_on_a_ragged_batch(dtop, dtop_mask, decoder, batching):
    model = dtop if decoder == "linear" else dtop_mask
    seg, x = model.segmenter, images()
    with torch.inference_mode():
        out, state = seg.forward_state(x, DToPPolicy(model.heads, threshold=0.7, batching=batching))
        singles = [seg.forward_state(xi, DToPPolicy(model.heads, threshold=0.7)) for xi in x.split(1)]
    assert len({tuple(t) for t in state.trace.tokens.tolist()}) > 1  # certainly ragged
    for b, (o, s) in enumerate(singles):
        assert (out[b] - o[0]).abs().max() < 1e-4
        assert state.trace.tokens[b].tolist() == s.trace.tokens[0].tolist()
    # what each image is priced at: the same components at the same counts as alone
    batched = [(key, counts.tolist()) for key, counts in state.trace.items]
    for b, (_, s) in enumerate(singles):
        alone = [(key, c.tolist()) for key, c in s.trace.items]
        assert [(k, c[b]) for k, c in batched if c[b] > 0] == [(k, c[0]) for k, c in alone if c[0] > 0]
        assert state.trace.decoder_rows[b] == (s.trace.decoder_rows[0] if s.trace.decoder_rows is not None else 64)


def pixels(pruned):
    """(B, 64) grid flags -> (B, 64, 64) pixel flags."""
    return torch.nn.functional.interpolate(pruned.reshape(-1, 1, 8, 8).float(), size=(64, 64))[:, 0].bool()


class Perturbed(DToPPolicy):
    """DToP that scrambles every pruned token's state right after each pruning layer and
    records each later head's outputs."""

    def __init__(self, *args, noise: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise, self.seen = noise, []

    def after_block(self, index, block, state):
        super().after_block(index, block, state)
        if self.outputs:  # simulate: the head's (class logits, canvas)
            self.seen.append(self.outputs[-1][0].clone())
        elif self.canvas is not None:
            self.seen.append(self.canvas.clone())
        if not self.noise or index + 1 not in self.layers:
            return
        g = torch.Generator().manual_seed(index)
        if self.simulate:  # pruned rows are still in x, frozen
            noise = torch.randn(state.x.shape, generator=g) * 100
            state.x = torch.where(self.pruned[..., None], state.x + noise, state.x)
        elif state.parked is not None:
            state.parked = state.parked + torch.randn(state.parked.shape, generator=g) * 100


@pytest.mark.parametrize("simulate", [False, True])
def test_a_pruned_token_no_longer_influences_any_later_block_or_head(dtop_mask, simulate):
    seg, x = dtop_mask.segmenter, images()
    runs = {}
    for noise in (False, True):
        policy = Perturbed(dtop_mask.heads, threshold=0.7, simulate=simulate, noise=noise)
        with torch.no_grad():
            runs[noise] = seg.forward_state(x, policy)[0], policy
    (clean, p0), (noisy, p1) = runs[False], runs[True]
    assert p0.pruned.any() and torch.equal(p0.pruned, p1.pruned)
    # inference: every pixel (decoder's and finished); training: the pixels the decoder labels
    kept = torch.ones(3, 64, 64) if not simulate else ~pixels(p0.pruned)
    assert ((clean - noisy).abs().amax(1) * kept).max() < 1e-4
    for a, b in zip(p0.seen, p1.seen):  # every later head: the same outputs
        assert (a - b).abs().max() < 1e-4
    assert (p0.presence - p1.presence).abs().max() < 1e-6


def test_training_simulation_equals_the_gathered_inference(dtop_mask):
    seg, x = dtop_mask.segmenter, images()
    with torch.no_grad():
        out, state = seg.forward_state(x, DToPPolicy(dtop_mask.heads, threshold=0.7))
        sim = DToPPolicy(dtop_mask.heads, threshold=0.7, simulate=True)
        decoder, _ = seg.forward_state(x, sim)
    assert torch.equal(sim.pruned, state.left_at < 4)
    kept = ~pixels(sim.pruned)
    assert ((decoder - out).abs().amax(1) * kept).max() < 1e-4


def test_default_sweep_runs_from_nothing_pruned_to_everything_prunable_at_the_first_head(dtop):
    seg, x = dtop.segmenter, images()
    thresholds = [op["threshold"] for op in METHODS["dtop"].default_ops]
    assert thresholds[0] == 1.0 and thresholds[-1] == 0.0 and thresholds == sorted(thresholds, reverse=True)
    with torch.inference_mode():
        _, none = seg.forward_state(x, DToPPolicy(dtop.heads, threshold=1.0))
        _, most = seg.forward_state(x, DToPPolicy(dtop.heads, threshold=0.0))
        tokens = seg.blocks[0](seg.embed(x)[0])
        _, label = token_scores(*dtop.heads.heads[0](tokens)).max(-1)
    assert (none.trace.tokens == 64).all()
    protected = [sum(min(5, int((lab == c).sum())) for c in range(5)) for lab in label]
    assert most.trace.tokens[:, 1].tolist() == protected  # only each class's top 5 stay after the first head


def test_loss_trains_every_head_the_backbone_and_the_decoder():
    model = make_dtop().train()
    labels = torch.randint(0, 5, (3, 64, 64), generator=torch.Generator().manual_seed(0))
    labels[0, :4] = 255
    loss = dtop_loss(model, images(), labels)
    assert torch.isfinite(loss)
    loss.backward()
    seg = model.segmenter
    for p in (model.heads.heads[0].input_proj.weight, model.heads.heads[1].queries, model.heads.final.queries,
              seg.blocks[0].attn.qkv.weight, seg.decoder.head.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_atm_loss_is_small_when_heads_are_right_and_large_when_wrong():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :, 4:] = 1  # classes 0 (left) and 1 (right) present, 2 absent
    right = torch.full((1, 4, 3), -10.0)
    right[0, [0, 2], 0] = 10.0
    right[0, [1, 3], 1] = 10.0
    present = torch.tensor([[[10.0, -10.0], [10.0, -10.0], [-10.0, 10.0]]])
    good = atm_loss(present, right, labels, (2, 2))
    bad = atm_loss(-present, -right, labels, (2, 2))
    assert good < 0.1 < bad


@pytest.mark.parametrize("bad", [{"threshold": 1.5}, {"threshold": -0.1}, {"top_k": -1}, {"layers": [3]}])
def test_bad_knobs_are_refused_in_one_line(dtop, bad):
    with pytest.raises(ValueError):
        METHODS["dtop"].make_policy(dtop, **bad)


def test_policy_needs_the_dtop_checkpoint(small_model):
    with pytest.raises(ValueError, match="DToPModel"):
        METHODS["dtop"].make_policy(small_model)


def test_bench_speed_times_dtop_under_a_forced_schedule(tmp_path):
    from bench.speed import SpeedOptions, run_speed

    opts = SpeedOptions(model="tiny", size=64, batch_sizes=[1, 2], methods=["dtop"], timing_images=2, warmup=0,
                        repeats=1, results=str(tmp_path), batching=["pad", "packed"])
    records = run_speed(opts)
    assert [r["method"] for r in records] == ["baseline", "dtop", "dtop"]
    for r in records[1:]:
        assert r["schedule"]["stay"] == [0.75, 0.4] and r["schedule"]["layers"] == [3, 4]
        tokens = r["tokens_per_block"]
        assert tokens[:3] == [1.0, 1.0, 1.0] and tokens[3] < 1.0 and tokens[4] < tokens[3]


def test_a_class_token_is_never_pruned_and_every_block_runs_it():
    torch.manual_seed(1)
    seg = build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32, class_token=True).eval()
    model = DToPModel(seg, [1, 2]).eval()
    x = images()
    with torch.inference_mode():
        out, state = seg.forward_state(x, DToPPolicy(model.heads, threshold=0.0))
        singles = [seg(xi, DToPPolicy(model.heads, threshold=0.0)) for xi in x.split(1)]
    assert state.any_left and state.prefix.shape[1] == 1
    blocks = [counts for key, counts in state.trace.items if key == ("block",)]
    assert (blocks[-1] == state.trace.tokens[:, -1] + 1).all()  # the grid's survivors plus the class token
    assert max((out[b] - s[0]).abs().max().item() for b, s in enumerate(singles)) < 1e-4
    assert torch.isfinite(dtop_loss(model.train(), x, torch.randint(0, 5, (3, 64, 64))))

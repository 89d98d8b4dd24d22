import math

import pytest
import torch
import torch.nn.functional as F

from bench.flops import FlopModel, count_flops
from methods import METHODS
from methods.early_exit import EarlyExitModel, EarlyExitPolicy, confidence, paint


@pytest.fixture
def ee(small_model):
    torch.manual_seed(1)
    m = EarlyExitModel(small_model).eval()  # heads after blocks 1, 2, 3 of 4
    for head in m.heads.heads:  # confident on some tokens and images, unsure on others
        torch.nn.init.normal_(head[1].weight, std=0.7)
    return m


def images(n=2, h=32, w=32):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(3))


def head_outputs(ee, x):
    """Each head's logits on the full model's tokens, computed without the policy."""
    seg = ee.segmenter
    tokens, _ = seg.embed(x)
    out = {}
    for i, block in enumerate(seg.blocks):
        tokens = block(tokens)
        if i + 1 in ee.heads.layers:
            out[i + 1] = ee.heads.head_at(i + 1)(tokens)
    return out


def test_paint_overwrites_only_the_marked_patches():
    logits = torch.zeros(1, 2, 4, 4)
    head = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]])
    where = torch.tensor([[[[True, False], [False, True]]]])
    out = paint(logits, head, where, "nearest")
    assert out[0, 1, :2, :2].eq(5).all() and out[0, 1, 2:, 2:].eq(8).all()
    assert out[0, :, :2, 2:].eq(0).all() and out[0, :, 2:, :2].eq(0).all()


def test_confidence_is_the_max_softmax_probability():
    logits = torch.randn(3, 7)
    assert torch.allclose(confidence(logits), logits.softmax(-1).amax(-1))


@pytest.mark.parametrize("mode", ["token", "image"])
def test_exiting_nothing_equals_the_baseline(ee, mode):
    x = images()
    policy = EarlyExitPolicy(ee.heads, threshold=1.0, mode=mode)
    with torch.inference_mode():
        base = ee.segmenter(x)
        out, state = ee.segmenter.forward_state(x, policy)
    assert (out - base).abs().max() < 1e-5
    assert not policy.exited.any() and (policy.exit_layer == 4).all()
    assert (state.trace.tokens == 16).all()


def test_exited_tokens_keep_their_head_prediction(ee):
    seg = ee.segmenter
    x = images()
    with torch.inference_mode():
        out, state = seg.forward_state(x, EarlyExitPolicy(ee.heads, threshold=0.9))
        tokens = state.to_grid()  # exited tokens are parked with the state they exited with
        decoded = seg.decode(tokens, state.grid, (32, 32))
        labels = {l: ee.heads.head_at(l)(tokens).argmax(-1) for l in ee.heads.layers}
    assert {1, 2, 3, 4} <= set(state.left_at.unique().tolist())  # exits at every head, some never
    pred = out.argmax(1)
    for b, p in (state.left_at < seg.depth).nonzero().tolist():
        label = labels[int(state.left_at[b, p])][b, p]
        r, c = divmod(p, 4)
        assert (pred[b, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] == label).all()
    stayed = (state.left_at == seg.depth).reshape(2, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    assert torch.equal(out.masked_select(stayed), decoded.masked_select(stayed))  # the decoder labels the rest


def test_image_exit_picks_the_first_layer_that_passes(ee):
    seg = ee.segmenter
    x = images(6)
    threshold = 0.9
    with torch.inference_mode():
        heads = head_outputs(ee, x)
        base = seg(x)
        policy = EarlyExitPolicy(ee.heads, threshold=threshold, mode="image")
        out, state = seg.forward_state(x, policy)
    means = {l: confidence(logits).mean(1) for l, logits in heads.items()}
    assert min((m - threshold).abs().min() for m in means.values()) > 1e-3  # no near-ties
    expected = [next((l for l in heads if means[l][b] > threshold), seg.depth) for b in range(6)]
    assert len(set(expected)) >= 3, expected  # the fixture exercises several layers
    assert policy.exit_layer.tolist() == expected
    for b, layer in enumerate(expected):
        assert (state.left_at[b] == layer).all()
        assert (state.trace.tokens[b, layer:] == 0).all() and (state.trace.tokens[b, :layer] == 16).all()
        if layer == seg.depth:
            assert (out[b] - base[b]).abs().max() < 1e-5
        else:
            head = heads[layer][b].T.reshape(1, 5, 4, 4)
            want = F.interpolate(head, size=(32, 32), mode="bilinear", align_corners=False)[0]
            assert (out[b] - want).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["token", "image"])
@pytest.mark.parametrize("batching", ["pad", "packed"])
def test_batched_inference_equals_per_image(ee, mode, batching):
    x = images(4)
    seg = ee.segmenter
    with torch.inference_mode():
        batched, state = seg.forward_state(x, EarlyExitPolicy(ee.heads, 0.9, mode, batching))
        assert state.valid is not None  # a ragged batch
        for b in range(4):
            alone, s = seg.forward_state(x[b : b + 1], EarlyExitPolicy(ee.heads, 0.9, mode))
            assert (batched[b : b + 1] - alone).abs().max() < 1e-5
            assert torch.equal(state.left_at[b], s.left_at[0])


def test_flops_fall_along_the_default_sweep(ee):
    spec = METHODS["early-exit"]
    x = images(4)
    seg = ee.segmenter
    for mode in ("token", "image"):
        ops = [op for op in spec.default_ops if op["mode"] == mode]
        assert len(ops) >= 5 and ops[0]["threshold"] == 1.0
        means, flop_model = [], None
        for op in ops:
            policy = spec.make_policy(ee, **op)
            flop_model = flop_model or FlopModel(seg, policy)  # prices depend on the mode only: share its cache
            with torch.inference_mode():
                _, state = seg.forward_state(x, policy)
            means.append(flop_model.image_flops(state.trace, (32, 32)).double().mean().item())
        assert all(a >= b for a, b in zip(means, means[1:])), (mode, means)
        assert means[-1] < 0.8 * means[0], (mode, means)


@pytest.mark.parametrize("mode", ["token", "image"])
def test_default_sweep_ends_where_everything_exits_at_the_first_head(ee, mode):
    thresholds = [op["threshold"] for op in METHODS["early-exit"].default_ops if op["mode"] == mode]
    assert thresholds[0] == 1.0 and thresholds[-1] == 0.0 and thresholds == sorted(thresholds, reverse=True)
    seg, first = ee.segmenter, ee.heads.layers[0]
    policy = METHODS["early-exit"].make_policy(ee, mode=mode, threshold=0.0)
    with torch.inference_mode():
        _, state = seg.forward_state(images(4), policy)
    # confidence is a max probability, at least 1/C > 0: every token passes threshold 0
    assert (state.left_at == first).all() and (state.trace.tokens[:, first:] == 0).all()


@pytest.mark.parametrize("mode,threshold", [("token", 0.9), ("image", 0.8)])
def test_trace_flops_equal_fvcore_count_of_the_executed_image(ee, mode, threshold):
    seg = ee.segmenter
    for h, w in [(32, 32), (32, 48)]:
        x = images(1, h, w)
        policy = EarlyExitPolicy(ee.heads, threshold, mode)
        with torch.inference_mode():
            _, state = seg.forward_state(x, policy)
        assert policy.exited.any()
        traced = FlopModel(seg, policy).image_flops(state.trace, (h, w)).item()
        counted = count_flops(lambda im: seg(im, EarlyExitPolicy(ee.heads, threshold, mode)), (x,), owner=ee)
        assert traced == counted  # fvcore drops nothing here: the trace must price every flop
        assert counted < count_flops(seg, (x,))


@pytest.mark.parametrize("bad", [dict(threshold=1.5), dict(threshold=-0.1), dict(threshold=math.nan),
                                 dict(mode="pixel"), dict(batching="ragged")])
def test_bad_knobs_are_refused_in_one_line(ee, bad):
    with pytest.raises(ValueError) as err:
        METHODS["early-exit"].make_policy(ee, **bad)
    assert "\n" not in str(err.value)


def test_policy_needs_the_early_exit_checkpoint(small_model):
    with pytest.raises(ValueError, match="EarlyExitModel"):
        METHODS["early-exit"].make_policy(small_model, threshold=0.9)


def test_loss_trains_heads_and_backbone(ee):
    ee.train()
    labels = torch.randint(0, 5, (2, 32, 32))
    loss = METHODS["early-exit"].fine_tune.loss(ee, images(), labels, head_weight=0.5)
    loss.backward()
    assert all(head[1].weight.grad.abs().sum() > 0 for head in ee.heads.heads)
    assert ee.segmenter.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert ee.segmenter.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0  # the final CE reaches the top block

import math

import pytest
import torch

from bench.flops import FlopModel, count_flops
from methods import METHODS
from methods.segmenter import build_model
from methods.tome import (ToMePolicy, bipartite_soft_matching, default_rs, max_r, merge_wavg,
                          proportional_attention, r_schedule, tokens_per_block)


def images(n=2, h=32, w=32):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(3))


def test_merging_nothing_equals_the_baseline(small_model):
    x = images()
    with torch.inference_mode():
        base = small_model(x)
        out, state = small_model.forward_state(x, ToMePolicy(small_model.depth, r=0))
    assert (out - base).abs().max() < 1e-5
    assert (state.trace.tokens == 16).all() and state.size is None


@pytest.mark.parametrize("r, schedule, expected", [
    (3, "constant", [16, 13, 10, 7]),
    ([4, 3, 2, 1], "constant", [16, 12, 9, 7]),
    (2, "decreasing", [16, 12, 10, 9]),  # ToMe's schedule: r = 4, 2, 1, 0
])
def test_tokens_per_block_follow_the_schedule(small_model, r, schedule, expected):
    policy = ToMePolicy(small_model.depth, r=r, schedule=schedule)
    with torch.inference_mode():
        _, state = small_model.forward_state(images(), policy)
    assert state.trace.tokens.tolist() == [expected] * 2
    assert state.x.shape[1] == expected[-1] - policy.rs[-1]
    assert [key for key, _ in state.trace.items] == [("tome_block", r) for r in policy.rs]
    assert (state.size.sum(1) == 16).all()  # every patch is in exactly one row
    assert state.valid is None and (state.left_at == small_model.depth).all()


def test_decreasing_schedule_is_tomes():
    assert r_schedule(8, 12, "decreasing") == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert r_schedule(36, 6, "decreasing") == [72, 57, 43, 28, 14, 0]


def test_unmerging_gives_each_grid_position_its_merged_token(small_model):
    with torch.inference_mode():
        _, state = small_model.forward_state(images(), ToMePolicy(small_model.depth, r=3))
        grid = state.to_grid()
    assert grid.shape == (2, 16, 64)
    for b in range(2):
        rows = state.source[b]
        assert rows.min() >= 0 and set(rows.tolist()) == set(range(state.x.shape[1]))
        for row in range(state.x.shape[1]):
            where = rows == row
            assert where.sum() == state.size[b, row]  # a row stands for as many patches as point to it
            assert torch.equal(grid[b, where], state.x[b, row].expand(int(where.sum()), -1))
        assert len(torch.unique(grid[b], dim=0)) == state.x.shape[1]


def test_batched_merging_equals_each_image_alone(small_model):
    x = images(3)
    with torch.inference_mode():
        batched = small_model(x, ToMePolicy(small_model.depth, r=3))
        for b in range(3):
            alone = small_model(x[b : b + 1], ToMePolicy(small_model.depth, r=3))
            assert (batched[b : b + 1] - alone).abs().max() < 1e-5


def test_matching_merges_the_most_similar_a_token_into_its_b_match():
    # A = rows 0, 2; B = rows 1, 3. Row 2 equals row 1 (cosine 1); row 0 is closest to row 3.
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 1.0]]])
    assert bipartite_soft_matching(metric, 0).tolist() == [[1, 2, 0, 3]]  # ToMe order: best match first
    assert bipartite_soft_matching(metric, 1).tolist() == [[0, 1, 1, 2]]  # kept A, then B
    assert bipartite_soft_matching(metric, 2).tolist() == [[1, 0, 0, 1]]
    x = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    merged, size = merge_wavg(x, torch.tensor([[0, 1, 1, 2]]), torch.tensor([[1.0, 2.0, 3.0, 1.0]]), 3)
    assert size.tolist() == [[1.0, 5.0, 1.0]]
    assert merged.flatten().tolist() == pytest.approx([1.0, (2 * 2 + 3 * 4) / 5, 8.0])


def test_proportional_attention_adds_log_size_to_the_logits():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3, 4, generator=g) for _ in range(3))
    size = torch.tensor([[1.0, 3.0, 2.0]])
    logits = q @ k.transpose(-1, -2) / math.sqrt(4) + size.log()
    manual = logits.softmax(-1) @ v
    assert (proportional_attention(q, k, v, size) - manual).abs().max() < 1e-6
    # a key of size s weighs as s copies of it
    copies = [0, 1, 1, 1, 2, 2]
    repeated = proportional_attention(q, k[:, :, copies], v[:, :, copies], None)
    assert (proportional_attention(q, k, v, size) - repeated).abs().max() < 1e-6


@pytest.mark.parametrize("r, hw", [(3, (32, 32)), ([4, 3, 2, 1], (32, 32)), (4, (32, 48))])
def test_trace_flops_equal_fvcore_count_of_the_executed_image(small_model, r, hw):
    seg = small_model
    x = images(1, *hw)
    with torch.inference_mode():
        _, state = seg.forward_state(x, ToMePolicy(seg.depth, r=r))
    policy = ToMePolicy(seg.depth, r=r)
    traced = FlopModel(seg, policy).image_flops(state.trace, hw).item()
    counted = count_flops(lambda im: seg(im, ToMePolicy(seg.depth, r=r)), (x,), owner=seg)
    assert traced == counted  # fvcore drops nothing here: the trace must price every flop


def test_flops_fall_as_r_rises(small_model):
    x = images(1)
    flops = []
    for r in range(4):
        policy = ToMePolicy(small_model.depth, r=r)
        with torch.inference_mode():
            _, state = small_model.forward_state(x, policy)
        flops.append(FlopModel(small_model, policy).image_flops(state.trace, (32, 32)).item())
    assert all(a > b for a, b in zip(flops, flops[1:])), flops
    assert flops[0] == count_flops(small_model, (x,))  # r = 0 costs what the baseline costs


@pytest.mark.parametrize("bad", [dict(r=-1), dict(r=1.5), dict(r=[1, 2]), dict(r=[1, 1, 1, -1]),
                                 dict(r=2, schedule="magic"), dict(r=[1, 1, 1, 1], schedule="decreasing"),
                                 dict(r=2, unmerge="middle")])
def test_bad_knobs_are_refused(bad):
    with pytest.raises(ValueError):
        ToMePolicy(4, **bad)


def test_r_above_half_the_tokens_is_refused(small_model):
    assert tokens_per_block(16, [3, 3, 3, 3]) == [16, 13, 10, 7]
    with pytest.raises(ValueError, match="r=5 in block 3 of 4 is more than half of its 6 tokens"):
        small_model(images(1), ToMePolicy(small_model.depth, r=5))  # 16 -> 11 -> 6: r = 5 > 6 // 2


def test_default_sweep_is_valid_on_tiny_at_128():
    spec = METHODS["tome"]
    model = build_model(5, "tiny").eval()
    assert spec.default_ops == spec.sweep(6, 256)  # what `tiny` on 128 x 128 gets
    constant = [op["r"] for op in spec.default_ops if "schedule" not in op]
    decreasing = [op["r"] for op in spec.default_ops if op.get("schedule") == "decreasing"]
    assert len(constant) >= 5 and constant[0] == 0 and constant[-1] == 36 and spec.fine_tune is None
    assert len(decreasing) >= 4 and decreasing[-1] == 40
    for op in spec.default_ops:
        policy = spec.make_policy(model, **op)
        counts = tokens_per_block(256, policy.rs)  # valid: no block merges more than half
        assert counts[-1] - policy.rs[-1] >= (40 if "schedule" not in op else 16)
    with torch.inference_mode():
        _, state = model.forward_state(images(1, 128, 128), spec.make_policy(model, r=max(constant)))
    assert state.x.shape[1] == 256 - 6 * max(constant)


@pytest.mark.parametrize("schedule", ["constant", "decreasing"])
@pytest.mark.parametrize("tokens, depth", [(256, 6), (432, 6), (1024, 12), (2304, 12), (16, 3)])
def test_the_largest_default_r_is_the_largest_r_the_input_allows(tokens, depth, schedule):
    top = max(default_rs(tokens, depth, schedule))
    assert top == max_r(tokens, depth, schedule) > 0
    tokens_per_block(tokens, r_schedule(top, depth, schedule))  # allowed
    with pytest.raises(ValueError):
        tokens_per_block(tokens, r_schedule(top + 1, depth, schedule))
    if schedule == "constant":  # the closed form agrees with trying every r
        assert all(tokens_per_block(tokens, [r] * depth) for r in range(top + 1))


def test_default_sweep_spans_the_same_flops_range_whatever_the_token_count():
    """The old fixed r <= 36 (chosen for 256 tokens) stopped at 28% fewer FLOPs on 432."""
    spec = METHODS["tome"]
    model = build_model(5, "tiny").eval()
    lowest = {}
    for h, w in [(128, 128), (144, 192)]:  # 256 and 432 tokens
        x = images(1, h, w)
        with torch.inference_mode():
            full = FlopModel(model).image_flops(model.forward_state(x)[1], (h, w)).item()
            for op in spec.sweep(model.depth, (h // 8) * (w // 8)):
                if op["r"] == max(o["r"] for o in spec.sweep(model.depth, (h // 8) * (w // 8))
                                  if o.get("schedule") == op.get("schedule")):  # each schedule's end
                    policy = spec.make_policy(model, **op)
                    _, state = model.forward_state(x, policy)
                    ratio = FlopModel(model, policy).image_flops(state, (h, w)).item() / full
                    lowest[(h, w, op.get("schedule", "constant"))] = ratio
    for schedule, below in (("constant", 0.6), ("decreasing", 0.4)):
        a, b = lowest[(128, 128, schedule)], lowest[(144, 192, schedule)]
        assert abs(a - b) < 0.03 and max(a, b) < below, lowest


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_unmerging_after_the_decoder_gives_the_same_output_for_less(decoder):
    torch.manual_seed(0)
    seg = build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32, decoder=decoder,
                      decoder_layers=2).eval()
    x = images(2, 32, 48)  # 24 tokens
    for r in (0, 3):
        before, after = ToMePolicy(4, r=r, unmerge="before"), ToMePolicy(4, r=r, unmerge="after")
        with torch.inference_mode():
            a, sa = seg.forward_state(x, before)
            b, sb = seg.forward_state(x, after)
        # a patch's copies are identical tokens and the mask decoder's attention is
        # proportional to the row sizes: decoding the rows is decoding the unmerged grid
        assert (a - b).abs().max() < (1e-6 if decoder == "linear" else 1e-5), (decoder, r)
        assert sa.trace.decoder_rows is None and sb.trace.decoder_rows.tolist() == [24 - 4 * r] * 2
        flops_before = FlopModel(seg, before).image_flops(sa, (32, 48))
        flops_after = FlopModel(seg, after).image_flops(sb, (32, 48))
        counted = count_flops(lambda im: seg(im, ToMePolicy(4, r=r, unmerge="after")), (x[:1],), owner=seg)
        assert flops_after[0] == flops_after[1] == counted  # priced at the merged count, exactly
        if r == 0:
            assert torch.equal(flops_after, flops_before)
        else:
            assert (flops_after < flops_before).all()
    assert METHODS["tome"].make_policy(seg, r=2).unmerge == "after"  # the default

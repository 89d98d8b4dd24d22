import math
import statistics

import pytest
import torch

from bench.flops import FlopModel, count_flops
from methods import METHODS
from methods.algm import ALGMPolicy, default_layers, global_merge_plan, local_merge_plan, merge_rows
from methods.segmenter import build_model
from tests.test_cli import stored, toy, toy_args  # noqa: F401  (fixture)


def images(n=2, h=32, w=32, seed=3):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def mask_model(depth=4):
    torch.manual_seed(0)
    return build_model(5, "tiny", depth=depth, embed_dim=64, num_heads=2, img_size=32, decoder="mask",
                       decoder_layers=2).eval()


def cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def groups_of(dest, rows):
    """Row -> sorted list of the input rows that went to it."""
    return [sorted(i for i, d in enumerate(dest) if d == r) for r in range(rows)]


def brute_local(x, gh, gw, threshold):
    """The reference's conditional_pooling, by hand: 2x2 windows, mean similarity of the 12
    ordered pairs, windows at or above the threshold merged (most similar first), then
    the other tokens in grid order."""
    windows = [[(2 * i + a) * gw + 2 * j + b for a in (0, 1) for b in (0, 1)]
               for i in range(gh // 2) for j in range(gw // 2)]
    sims = [sum(cos(x[p], x[q]) for p in w for q in w if p != q) / 12 for w in windows]
    merged = sorted((k for k in range(len(windows)) if sims[k] >= threshold), key=lambda k: -sims[k])
    in_merged = {p for k in merged for p in windows[k]}
    return [sorted(windows[k]) for k in merged] + [[p] for p in range(gh * gw) if p not in in_merged]


def brute_global(x, layer, threshold=None):
    """The reference's turbo_matching without class token, by hand: A = even rows, B = odd
    rows; A tokens whose best similarity is >= mean + stdev / layer merge into their best
    B token; rows: unmerged A tokens by falling similarity, then the B tokens."""
    A, B = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    best = {i: max(cos(x[i], x[j]) for j in B) for i in A}
    match = {i: max(B, key=lambda j: cos(x[i], x[j])) for i in A}
    if threshold is None:
        threshold = statistics.mean(best.values()) + statistics.stdev(best.values()) / layer
    merging = {i for i in A if best[i] >= threshold}
    unmerged = sorted((i for i in A if i not in merging), key=lambda i: -best[i])
    return [[i] for i in unmerged] + [sorted([j] + [i for i in merging if match[i] == j]) for j in B]


@pytest.mark.parametrize("gh, gw, threshold", [(4, 4, 0.0), (4, 6, 0.2), (5, 5, 0.1), (4, 4, -1.0), (4, 4, 1.01)])
def test_local_merge_equals_the_reference_by_hand(gh, gw, threshold):
    g = torch.Generator().manual_seed(gh * gw)
    x = torch.randn(1, gh * gw, 3, generator=g) + torch.tensor([1.0, 0.0, 0.0])  # some windows alike
    dest, kept = local_merge_plan(x, (gh, gw), threshold)
    expected = brute_local(x[0].tolist(), gh, gw, threshold)
    assert kept.tolist() == [len(expected)]
    assert groups_of(dest[0].tolist(), len(expected)) == expected
    merged, size, valid = merge_rows(x, dest, None, None, kept)
    assert valid is None and size[0].tolist() == [len(g) for g in expected]
    for row, group in enumerate(expected):  # a merged row is its tokens' mean
        assert torch.allclose(merged[0, row], x[0, group].mean(0), atol=1e-6)


def test_local_merge_counts_differ_per_image():
    x = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(1))
    x[1] = x[1, :1]  # every token of image 1 alike: every window merges
    dest, kept = local_merge_plan(x, (4, 4), 0.5)
    assert kept[1] == 4 and kept[0] == len(brute_local(x[0].tolist(), 4, 4, 0.5)) > 4


@pytest.mark.parametrize("n, layer, threshold", [(9, 3, None), (12, 5, None), (10, 1, None), (9, 3, 0.2)])
def test_global_merge_equals_the_reference_by_hand(n, layer, threshold):
    x = torch.randn(1, n, 4, generator=torch.Generator().manual_seed(n))
    size = torch.arange(1.0, n + 1)[None]
    dest, kept = global_merge_plan(x, None, layer, threshold)
    expected = brute_global(x[0].tolist(), layer, threshold)
    assert kept.tolist() == [len(expected)] and len(expected) < n  # something merged
    assert groups_of(dest[0].tolist(), len(expected)) == expected
    merged, new_size, _ = merge_rows(x, dest, size, None, kept)
    for row, group in enumerate(expected):  # size-weighted average, sizes add up
        weights = size[0, group]
        assert new_size[0, row] == weights.sum()
        assert torch.allclose(merged[0, row], (x[0, group] * weights[:, None]).sum(0) / weights.sum(), atol=1e-6)


def test_global_merge_of_a_padded_batch_equals_each_image_alone():
    x = torch.randn(2, 11, 4, generator=torch.Generator().manual_seed(0))
    valid = torch.arange(11)[None] < torch.tensor([[11], [8]])
    dest, kept = global_merge_plan(x, valid, 3)
    for b, n in enumerate((11, 8)):
        alone, kept_alone = global_merge_plan(x[b : b + 1, :n], None, 3)
        assert kept[b] == kept_alone[0] and dest[b, :n].tolist() == alone[0].tolist()
    assert (dest[1, 8:] == 11).all()  # padding is dropped


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_thresholds_that_merge_nothing_give_the_baseline_exactly(decoder):
    seg = build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32, decoder=decoder).eval()
    x = images(2, 32, 48)
    with torch.inference_mode():
        base = seg(x)
        out, state = seg.forward_state(x, ALGMPolicy(4, threshold=1.01, global_threshold=1.01))
    assert torch.equal(out, base)
    assert (state.trace.tokens == 24).all() and state.size is None


@pytest.mark.parametrize("threshold, hw", [(-1.0, (32, 48)), (0.0, (40, 40)), (-1.0, (40, 40))])
def test_trace_flops_equal_fvcore_count_of_the_executed_image(threshold, hw):
    seg = mask_model()
    x = images(1, *hw)
    policy = ALGMPolicy(4, threshold=threshold)
    with torch.inference_mode():
        _, state = seg.forward_state(x, policy)
    tokens = state.trace.tokens[0].tolist()  # layers [1, 2]: local in block 0, global in block 1
    assert tokens[1] < tokens[0] and state.x.shape[1] < tokens[1]  # both merges ran
    traced = FlopModel(seg, policy).image_flops(state.trace, hw).item()
    counted = count_flops(lambda im: seg(im, ALGMPolicy(4, threshold=threshold)), (x,), owner=seg)
    assert traced == counted  # similarities, merged blocks and the decoder on merged rows, exactly
    assert traced < count_flops(seg, (x,))


@pytest.mark.parametrize("batching", ["pad", "packed"])
@pytest.mark.parametrize("unmerge", ["after", "before"])
def test_ragged_batches_equal_each_image_alone(batching, unmerge):
    seg = mask_model()
    x = images(3, 32, 48)
    x[1] = x[1].mean((1, 2), keepdim=True)  # a flat image: every window alike
    with torch.inference_mode():
        batched, state = seg.forward_state(x, ALGMPolicy(4, threshold=0.0, batching=batching, unmerge=unmerge))
        counts = []
        for b in range(3):
            alone, s = seg.forward_state(x[b : b + 1], ALGMPolicy(4, threshold=0.0, unmerge=unmerge))
            counts.append(s.counts().item())
            assert (batched[b : b + 1] - alone).abs().max() < 1e-5
    assert state.valid is not None and state.counts().tolist() == counts and len(set(counts)) > 1
    assert (state.size.sum(1) == 24).all()  # every patch in exactly one row


def test_decoder_runs_on_merged_rows_without_sizes_and_copies_masks_back():
    seg = mask_model()
    x = images(1, 32, 32)
    with torch.inference_mode():
        logits, state = seg.forward_state(x, ALGMPolicy(4, threshold=-1.0))
        rows = seg.decoder(seg.norm(state.x))  # plain attention: the reference passes no sizes
        by_patch = rows.gather(1, state.source[..., None].expand(-1, -1, rows.shape[-1]))
        expected = seg._to_pixels(by_patch, state.grid, (32, 32))
    assert state.x.shape[1] < 16 and state.trace.decoder_rows.tolist() == [state.x.shape[1]]
    assert torch.equal(logits, expected)
    assert (state.size > 1).any()  # rows of several patches, whose sizes the decoder ignored


def test_default_layers_scale_the_references_layers():
    assert default_layers(12) == [1, 5]  # the reference's ViT layers 1 and 5
    assert default_layers(6) == [1, 3] and default_layers(4) == [1, 2]
    assert default_layers(24) == [1, 7]  # the reference's Seg-L
    assert ALGMPolicy(6).layers == [1, 3] and ALGMPolicy(6).threshold == 0.88


@pytest.mark.parametrize("bad", [dict(layers=[3, 1]), dict(layers=[0, 2]), dict(layers=[1, 5]), dict(layers=[]),
                                 dict(threshold="high"), dict(global_threshold="x"), dict(batching="magic"),
                                 dict(unmerge="middle")])
def test_bad_knobs_are_refused(bad):
    with pytest.raises(ValueError):
        ALGMPolicy(4, **bad)


def test_registered_with_a_sweep_over_the_local_threshold():
    spec = METHODS["algm"]
    assert spec.swept == "threshold" and spec.fine_tune is None
    thresholds = [op["threshold"] for op in spec.default_ops]
    assert thresholds == sorted(thresholds, reverse=True) and thresholds[0] > 1 and thresholds[-1] == -1
    model = build_model(5, "tiny").eval()
    x = images(1, 128, 128)
    flops = []
    with torch.inference_mode():
        for t in (thresholds[0], thresholds[-1]):
            policy = spec.make_policy(model, threshold=t)
            _, state = model.forward_state(x, policy)
            flops.append(FlopModel(model, policy).image_flops(state, (128, 128)).item())
    assert state.trace.tokens[0, 1] == 64  # the lowest threshold merges every window
    full = count_flops(model, (x,))
    assert flops[0] < full and flops[1] < 0.4 * full


def test_a_training_step_through_algm_merging_reaches_every_block_and_every_patch():
    """algm-ft's loss: gradients flow through both merges (weighted means) to the blocks
    before, between and after them and to the patch embedding of every merged patch."""
    torch.manual_seed(0)
    seg = build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32).train()  # drop_path on
    x = images(2, 32, 48).requires_grad_()
    labels = torch.randint(0, 5, (2, 32, 48), generator=torch.Generator().manual_seed(1))
    knobs = dict(threshold=-1.0, layers=[2, 3])  # every window merges in block 2, then the global merge in 3
    with torch.no_grad():
        _, state = seg.forward_state(x, METHODS["algm-ft"].make_policy(seg, **knobs))
    tokens = state.trace.tokens.tolist()
    assert all(t[:2] == [24, 24] and t[2] == 6 and t[3] < 6 for t in tokens)  # both merges ran, in training mode
    loss = METHODS["algm-ft"].fine_tune.loss(seg, x, labels, **knobs)
    loss.backward()
    for name, module in [("patch_embed", seg.patch_embed), *((f"block {i}", b) for i, b in enumerate(seg.blocks)),
                         ("decoder", seg.decoder)]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    per_patch = x.grad.abs().reshape(2, 3, 4, 8, 6, 8).sum((1, 3, 5))  # (B, 4, 6): one value per patch
    assert (per_patch > 0).all()  # every merged token got its share of its row's gradient


def test_algm_ft_is_algm_on_weights_fine_tuned_with_the_budget_of_every_fine_tune():
    from bench.runner import RunOptions, fine_tune_config, train_config
    from bench.datasets import get_spec
    from methods import CONTROL

    algm, ft, paumer = METHODS["algm"], METHODS["algm-ft"], METHODS["paumer"]
    assert ft.fine_tune is not None and algm.fine_tune is None
    assert (ft.fine_tune.steps_fraction, ft.fine_tune.lr_factor) == (paumer.fine_tune.steps_fraction,
                                                                      paumer.fine_tune.lr_factor)
    assert ft.fine_tune.knobs == {"threshold": 0.88, "layers": None}  # ALGM's default operating point
    for field in ("default_ops", "knob_types", "knob_choices", "knob_help", "swept", "make_policy"):
        assert getattr(ft, field) == getattr(algm, field), field
    seg = build_model(5, "tiny")
    assert ft.fine_tune.build(seg, **ft.fine_tune.knobs) is seg  # the checkpoint is a plain Segmenter
    base = train_config(RunOptions(), get_spec("synthetic"))
    mine, control, theirs = (fine_tune_config(m, base, "w0") for m in (ft, METHODS[CONTROL], paumer))
    budget = ("steps", "lr", "warmup_steps", "poly_power", "batch_size", "init_from")
    assert {k: getattr(mine, k) for k in budget} == {k: getattr(theirs, k) for k in budget}
    assert mine.steps == base.steps // 2 and mine.lr == base.lr / 2
    assert mine.method_knobs == {"threshold": 0.88, "layers": None}
    assert mine.hash() not in (control.hash(), theirs.hash(), base.hash())


def test_run_algm_ft_fine_tunes_from_the_baseline_sweeps_and_is_compared_with_the_control(tmp_path, capsys, toy):
    from bench.cli import main
    from bench.report import series_styles, table
    from bench.train import load_checkpoint

    main(["run", "--method", "algm-ft", "--dry-run", *toy_args(tmp_path)])
    out = capsys.readouterr().out
    assert "algm-ft checkpoint: would train 2 steps" in out and "baseline-ft checkpoint: would train 2 steps" in out
    n = len(METHODS["algm-ft"].default_ops)
    assert f"operating points: {n}, pending {n}: threshold=1.01" in out
    main(["run", "--method", "algm-ft", "--limit", "2", "--op", "threshold=1.01", "--op", "threshold=-1",
          *toy_args(tmp_path)])  # two points of the sweep above: the run is the same, shorter
    records = stored(tmp_path)
    assert [r["knobs"] for r in records] == [{"threshold": 1.01}, {"threshold": -1.0}]
    ckpts = {p.name.rsplit("-", 2)[0]: load_checkpoint(p) for p in (tmp_path / "ck" / "toy").glob("*.pt")}
    assert set(ckpts) == {"baseline", "algm-ft", "baseline-ft"}
    mine, control, base = ckpts["algm-ft"], ckpts["baseline-ft"], ckpts["baseline"]
    assert mine["weights"] not in (base["weights"], control["weights"])
    assert mine["config"]["init_from"] == base["weights"] and mine["step"] == 2 == base["step"] // 2
    assert mine["config"]["lr"] == base["config"]["lr"] / 2
    assert mine["config"]["method_knobs"] == {"threshold": 0.88, "layers": None}
    assert mine["config"]["hash"] != control["config"]["hash"]
    for r in records:
        assert r["method"] == "algm-ft" and r["checkpoint"] == mine["weights"] != r["baseline_checkpoint"]
        assert r["train"]["config_hash"] == mine["config"]["hash"]
        assert r["control_checkpoint"] == control["weights"]
        assert r["miou_delta_control"] == r["miou"] - r["control_miou"]
    assert records[-1]["gflops"]["mean"] < records[0]["gflops"]["mean"]  # threshold -1 merges every window

    main(["run", "--method", "algm", "--op", "threshold=-1", "--limit", "2", *toy_args(tmp_path)])
    df = table(stored(tmp_path))
    assert set(df["series"]) == {"algm", "algm-ft"}  # two lines in the report's figures
    styles = series_styles(df["series"])
    assert styles["algm"]["color"] != styles["algm-ft"]["color"]

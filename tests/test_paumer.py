import pytest
import torch

from bench.flops import FlopModel, count_flops
from methods import METHODS
from methods.encoder import Policy
from methods.paumer import (PaumerModel, PaumerPolicy, default_layers, normalized_entropy, patch_labels,
                            paumer_loss)


@pytest.fixture
def paumer(small_model):
    torch.manual_seed(1)
    m = PaumerModel(small_model, layers=[1, 2]).eval()
    for head in m.pausing.heads:  # confident on some tokens, unsure on others
        torch.nn.init.normal_(head[1].weight, std=0.5)
    return m


def images(n=2, h=32, w=32):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(3))


def test_default_layers_are_evenly_spaced_in_the_middle():
    assert default_layers(12) == [4, 6, 8]
    assert default_layers(6) == [2, 3, 4]


def test_normalized_entropy_is_zero_when_certain_and_one_when_uniform():
    h = normalized_entropy(torch.tensor([[100.0, 0, 0, 0], [1.0, 1, 1, 1]]))
    assert h[0] < 1e-6 and abs(h[1] - 1) < 1e-6


def test_pausing_nothing_equals_the_baseline_and_costs_what_it_costs(paumer):
    x = images()
    seg = paumer.segmenter
    with torch.inference_mode():
        base, base_state = seg.forward_state(x)
        out, state = seg.forward_state(x, PaumerPolicy(paumer.pausing, tau=0.0))
    assert (out - base).abs().max() < 1e-5
    assert (state.trace.tokens == 16).all()
    # at tau = 0 no token can pause: the heads are not run, nor priced
    assert not [key for key, _ in state.trace.items if key == ("head",)]
    flops = FlopModel(seg, PaumerPolicy(paumer.pausing, tau=0.0)).image_flops(state, (32, 32))
    assert torch.equal(flops, FlopModel(seg).image_flops(base_state, (32, 32)))


def test_a_layer_with_tau_0_runs_no_head(paumer):
    with torch.inference_mode():
        _, state = paumer.segmenter.forward_state(images(), PaumerPolicy(paumer.pausing, tau=[0.3, 0.0]))
    assert [key for key, _ in state.trace.items].count(("head",)) == 1
    assert (state.left_at == 1).any() and not (state.left_at == 2).any()


class Snapshotting(PaumerPolicy):
    """Records each token's state at the moment it pauses."""

    def after_block(self, index, block, state):
        before = state.to_grid().clone()
        super().after_block(index, block, state)
        self.at_pause = getattr(self, "at_pause", {})
        for b, p in (state.left_at == index + 1).nonzero().tolist():
            self.at_pause[(b, p)] = before[b, p]


def test_paused_tokens_keep_the_state_they_paused_with(paumer):
    seg = paumer.segmenter
    policy = Snapshotting(paumer.pausing, tau=0.3)
    with torch.inference_mode():
        _, state = seg.forward_state(images(), policy)
        decoder_input = state.to_grid()
    assert {1, 2} <= set(state.left_at.unique().tolist())  # paused at both layers, some never
    assert (state.left_at == seg.depth).any()
    for (b, p), snapshot in policy.at_pause.items():
        assert torch.equal(decoder_input[b, p], snapshot)


def test_flops_do_not_increase_as_tau_rises(paumer):
    x = images(4)
    seg = paumer.segmenter
    means, fractions = [], []
    for tau in (0.0, 0.2, 0.5, 0.8, 0.95, 1.0):
        policy = PaumerPolicy(paumer.pausing, tau=tau)
        with torch.inference_mode():
            _, state = seg.forward_state(x, policy)
        means.append(FlopModel(seg, policy).image_flops(state.trace, (32, 32)).float().mean().item())
        fractions.append(state.trace.tokens.sum().item())
        # tokens per block follow the pausing decisions
        for b in range(4):
            for block in range(seg.depth):
                assert state.trace.tokens[b, block] == (state.left_at[b] > block).sum()
    assert all(a >= b for a, b in zip(means, means[1:]))
    assert means[-1] < means[0]
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))


def test_trace_flops_equal_fvcore_count_of_the_executed_image(paumer):
    seg = paumer.segmenter
    for h, w in [(32, 32), (32, 48)]:
        x = images(1, h, w)
        policy = PaumerPolicy(paumer.pausing, tau=0.3)
        with torch.inference_mode():
            _, state = seg.forward_state(x, policy)
        assert (state.left_at < seg.depth).any()
        traced = FlopModel(seg, policy).image_flops(state.trace, (h, w)).item()
        counted = count_flops(lambda im: seg(im, PaumerPolicy(paumer.pausing, tau=0.3)), (x,), owner=paumer)
        assert traced == counted  # fvcore drops nothing here: the trace must price every flop
        full = count_flops(seg, (x,))
        assert counted < full


def test_masked_training_forward_equals_gathered_inference(paumer):
    x = images(3)
    seg = paumer.segmenter
    for tau in (0.1, 0.3, [0.05, 0.4]):
        with torch.no_grad():
            gathered, gs = seg.forward_state(x, PaumerPolicy(paumer.pausing, tau=tau))
            masked, ms = seg.forward_state(x, PaumerPolicy(paumer.pausing, tau=tau, simulate=True))
        assert torch.equal(gs.left_at, ms.left_at)
        assert (gathered - masked).abs().max() < 1e-4


@pytest.mark.parametrize("batching", ["pad", "packed"])
def test_batched_inference_equals_per_image(paumer, batching):
    x = images(4)
    seg = paumer.segmenter
    with torch.inference_mode():
        batched, state = seg.forward_state(x, PaumerPolicy(paumer.pausing, tau=0.3, batching=batching))
        counts = state.trace.tokens
        assert (counts != counts[:1]).any(dim=0).sum() >= 2  # ragged: images kept different counts in 2+ blocks
        for b in range(4):
            alone, s = seg.forward_state(x[b : b + 1], PaumerPolicy(paumer.pausing, tau=0.3))
            assert (batched[b : b + 1] - alone).abs().max() < 1e-5
            assert torch.equal(state.left_at[b], s.left_at[0])


def test_random_pauses_as_many_as_entropy(paumer):
    x = images(3)
    seg = paumer.segmenter
    with torch.inference_mode():
        _, ent = seg.forward_state(x, PaumerPolicy(paumer.pausing, tau=[0.3, 0.0]))
        _, rnd = seg.forward_state(x, PaumerPolicy(paumer.pausing, tau=[0.3, 0.0], criterion="random"))
    assert torch.equal((ent.left_at == 1).sum(1), (rnd.left_at == 1).sum(1))
    assert not torch.equal(ent.left_at, rnd.left_at)


class CountingRandom(PaumerPolicy):
    """`random`, recording at each pausing layer how many of the real tokens entropy
    would pause there, and whether the batch was ragged at that point."""

    def after_block(self, index, block, state):
        layer = index + 1
        if layer in self.layers:
            real = state.valid if state.valid is not None else torch.ones(state.x.shape[:2], dtype=torch.bool)
            scores = normalized_entropy(self.heads.head_at(layer)(state.x))
            self.entropy_count[layer] = ((scores < self.taus[self.layers.index(layer)]) & real).sum(1)
            self.ragged[layer] = state.valid is not None
        super().after_block(index, block, state)


def test_random_counts_only_real_tokens_of_a_ragged_batch(paumer):
    x = images(4)
    policy = CountingRandom(paumer.pausing, tau=0.3, criterion="random")
    policy.entropy_count, policy.ragged = {}, {}
    with torch.inference_mode():
        _, state = paumer.segmenter.forward_state(x, policy)
    assert policy.ragged == {1: False, 2: True}  # the second pausing layer sees a padded batch
    for layer in (1, 2):
        assert policy.entropy_count[layer].sum() > 0
        assert torch.equal((state.left_at == layer).sum(1), policy.entropy_count[layer]), layer


def test_default_sweep_reaches_tau_1_where_every_token_pauses_at_the_first_layer(paumer):
    taus = [op["tau"] for op in METHODS["paumer"].default_ops]
    assert taus[0] == 0.0 and taus[-1] == 1.0 and len(taus) >= 10 and taus == sorted(taus)
    first = paumer.pausing.layers[0]
    with torch.inference_mode():
        _, state = paumer.segmenter.forward_state(images(4), PaumerPolicy(paumer.pausing, tau=1.0))
    tokens = state.trace.tokens
    assert tokens[:, first:].sum() <= 0.005 * tokens[:, 0].sum() * (paumer.segmenter.depth - first)


def test_oracle_pauses_only_where_the_head_is_right(paumer):
    x = images(2)
    seg = paumer.segmenter
    policy = PaumerPolicy(paumer.pausing, tau=[1.0, 0.0], criterion="oracle")
    with torch.inference_mode():
        tokens, _ = seg.embed(x)
        head_pred = paumer.pausing.heads[0](seg.blocks[0](tokens)).argmax(-1)
        policy.targets = head_pred.clone()
        policy.targets[:, ::2] = (head_pred[:, ::2] + 1) % 5  # wrong on even patches
        _, state = seg.forward_state(x, policy)
    paused = state.left_at == 1
    assert paused[:, 1::2].all() and not paused[:, ::2].any()


def test_patch_labels_take_the_majority_and_ignore_mostly_ignored_patches():
    labels = torch.zeros(1, 4, 8, dtype=torch.long)
    labels[0, :, :4] = 2
    labels[0, :3, :1] = 1  # minority in the first patch
    labels[0, :, 4:] = 255
    labels[0, 0, 4:7] = 3  # 3 of 16 pixels: still mostly ignore
    assert patch_labels(labels, 4, 5).tolist() == [[2, 255]]


@pytest.mark.parametrize("bad", [dict(tau=1.5), dict(tau=[0.1, 0.2, 0.3]), dict(layers=[3]),
                                 dict(criterion="magic"), dict(tau=-0.1)])
def test_bad_knobs_are_refused(paumer, bad):
    with pytest.raises(ValueError):
        PaumerPolicy(paumer.pausing, **bad)


def test_pausing_layer_out_of_range_is_refused(small_model):
    with pytest.raises(ValueError, match="pausing layers must be in"):
        PaumerModel(small_model, layers=[4])


def test_loss_trains_heads_and_backbone(paumer):
    paumer.train()
    x = images(2)
    labels = torch.randint(0, 5, (2, 32, 32))
    loss = paumer_loss(paumer, x, labels)
    loss.backward()
    assert paumer.pausing.heads[0][1].weight.grad.abs().sum() > 0
    assert paumer.segmenter.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

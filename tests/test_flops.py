import pytest
import torch
from torch import nn

from bench.flops import QUADRATIC_CHECK, QUADRATIC_FIT, FlopModel, PriceCache, count_flops, fit_quadratic
from methods.encoder import Policy
from methods.segmenter import build_model


def small(decoder="linear"):
    torch.manual_seed(0)
    return build_model(5, "tiny", depth=2, img_size=32, decoder=decoder, decoder_layers=1)


class DropPolicy(Policy):
    """Keeps the first ``keep[b]`` active rows of image b after block 0."""

    name = "drop"

    def __init__(self, keep):
        self.keep_n = keep

    def after_block(self, index, block, state):
        if index == 0:
            rows = torch.arange(state.x.shape[1])
            state.keep(rows[None] < torch.tensor(self.keep_n)[:, None], index)


def test_vit_tiny_reference():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    x = torch.zeros(1, 3, 224, 224)
    full, no_attn = count_flops(vit, (x,)), count_flops(vit, (x,), attention=False)
    assert (full, no_attn) == (1_258_411_200, 1_079_579_328)
    assert full - no_attn == 178_831_872  # 12 blocks x 3 heads x 197^2 x (64 + 64)
    assert vit.training  # mode restored


def test_plain_function_and_mode_restored():
    model = small()
    model.train()
    model.blocks[1].eval()
    x = torch.randn(2, 3, 8)
    assert count_flops(lambda a: a @ a.transpose(1, 2), (x,)) == 2 * 3 * 3 * 8
    count_flops(model, (torch.zeros(1, 3, 32, 32),))
    FlopModel(model).image_flops(model.forward_state(torch.zeros(1, 3, 32, 32))[1].trace, (32, 32))
    assert model.training and model.blocks[0].training and not model.blocks[1].training


@pytest.mark.parametrize("decoder", ["linear", "mask"])
@pytest.mark.parametrize("hw", [(32, 32), (48, 80)])
def test_trace_matches_whole_model(decoder, hw):
    model = small(decoder).eval()
    images = torch.randn(2, 3, *hw)
    with torch.no_grad():
        _, state = model.forward_state(images)
    flops = FlopModel(model).image_flops(state.trace, hw)
    assert flops.dtype == torch.long and flops.shape == (2,)
    whole = count_flops(model, (images[:1],))
    assert flops[0] == flops[1]
    assert flops[0] == whole  # exact: fvcore drops nothing in this forward


def test_dropping_policy():
    model = small("mask").eval()
    hw = (48, 80)  # 6 x 10 = 60 tokens
    images = torch.randn(2, 3, *hw)
    keep = [10, 35]
    with torch.no_grad():
        _, state = model.forward_state(images, DropPolicy(keep))  # padded batch: per-image counts differ
    flop_model = FlopModel(model, DropPolicy(keep))
    flops = flop_model.image_flops(state, hw)
    full = count_flops(model, (images[:1],))
    for b, k in enumerate(keep):
        alone = count_flops(lambda im: model(im, DropPolicy([k])), (images[b : b + 1],), owner=model)
        assert flops[b] == alone, (b, int(flops[b]), alone)
        assert alone < full
    assert flops[0] < flops[1]


class ScorePolicy(Policy):
    """Adds a method component ("score",) priced through cost_probe."""

    def run_block(self, index, block, state):
        super().run_block(index, block, state)
        state.trace.add(("score",), state.counts())

    def cost_probe(self, model, key, n):
        return nn.Linear(model.config.embed_dim, 1), (torch.zeros(1, n, model.config.embed_dim),)


def test_method_keys_and_cache():
    model = small().eval()
    fm = FlopModel(model, ScorePolicy())
    assert fm.cost(("block",), 0) == fm.cost(("score",), 0) == 0
    assert fm.cost(("score",), 7) == 7 * 192
    with pytest.raises(KeyError):
        FlopModel(model).cost(("score",), 7)  # the baseline policy has no such component
    images = torch.zeros(1, 3, 32, 32)  # 4 x 4 = 16 tokens, 2 blocks
    with torch.no_grad():
        base = FlopModel(model).image_flops(model.forward_state(images)[1], (32, 32))
        flops = fm.image_flops(model.forward_state(images, ScorePolicy())[1], (32, 32))
    assert int(flops - base) == 2 * 16 * 192
    assert set(fm._costs) == {(("score",), 7), (("score",), 16)}  # not declared quadratic: per count
    fitted = {(("block",), n) for n in QUADRATIC_FIT + QUADRATIC_CHECK} | {("quadratic", ("block",))}
    assert set(fm._shared) == fitted | {("embed", 32, 32), ("decode", 32, 32)}  # no trace at 16 tokens


# ------------------------------------------------ fitted polynomials and the shared cache

def traced(fm: FlopModel, key, n) -> int:
    """fvcore's own count of ``key`` at ``n`` tokens, bypassing every cache and fit."""
    at, _ = fm._counter(key)
    return int(at(n)())


@pytest.mark.parametrize("shape", [dict(embed_dim=192, num_heads=3), dict(embed_dim=64, num_heads=2, class_token=True)])
def test_block_polynomial_equals_fvcore(shape):
    torch.manual_seed(0)
    model = build_model(5, "tiny", depth=2, img_size=32, **shape).eval()
    fm = FlopModel(model)
    for n in (1, 6, 7, 97, 256, 1161):  # odd and even, far past the fitted counts
        assert fm.cost(("block",), n) == traced(fm, ("block",), n), n
    assert fm._shared[("quadratic", ("block",))] is not None
    assert (("block",), 1161) not in fm._shared  # priced, not traced


def test_method_polynomials_equal_fvcore():
    from methods import METHODS
    from methods.algm import ALGMPolicy

    torch.manual_seed(0)
    seg = build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32).eval()
    policies = [ALGMPolicy(depth=4)]
    for name, knobs in (("paumer", {"tau": 0.2}), ("early-exit", {"threshold": 0.9})):
        spec = METHODS[name]
        policies.append(spec.make_policy(spec.fine_tune.build(seg, **spec.fine_tune.knobs), **knobs))
    for policy in policies:
        assert policy.quadratic_costs
        fm = FlopModel(seg, policy)
        for key in policy.quadratic_costs:
            for n in (1, 9, 50, 333):
                assert fm.cost(key, n) == traced(fm, key, n), (policy.name, key, n)
            assert fm._costs[("quadratic", key)] is not None


def test_non_quadratic_component_falls_back_to_tracing():
    class HalfPolicy(Policy):  # declared quadratic, but its cost depends on n's parity
        quadratic_costs = (("half",),)

        def cost_probe(self, model, key, n):
            return (lambda x: x[:, ::2] @ x[:, 1::2].transpose(1, 2)), (torch.zeros(1, n, 4),)

    fm = FlopModel(small(), HalfPolicy())
    assert fm.cost(("half",), 11) == 6 * 5 * 4  # exact, as fvcore counts it
    assert fm._costs[("quadratic", ("half",))] is None
    assert fit_quadratic({1: 1, 2: 4, 3: 9, 4: 16, 5: 25, 8: 64}) == (1, 0, 0)


def test_price_cache_is_shared_by_a_run():
    model = small().eval()
    prices = PriceCache()
    images = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        trace = model.forward_state(images)[1].trace
    first = FlopModel(model, prices=prices).image_flops(trace, (32, 32))
    traces = prices.traces
    assert traces > 0 and prices.seconds > 0
    again = FlopModel(model, DropPolicy([3, 5]), prices=prices).image_flops(trace, (32, 32))
    assert torch.equal(first, again) and prices.traces == traces  # nothing counted twice
    FlopModel(small().eval(), prices=prices).image_flops(trace, (32, 32))
    assert prices.traces > traces  # another model: its own prices

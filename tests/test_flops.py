import pytest
import torch
from torch import nn

from bench.flops import FlopModel, count_flops
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
    assert set(fm._costs) == {(("block",), 16), (("score",), 7), (("score",), 16),
                              ("embed", 32, 32), ("decode", 32, 32)}

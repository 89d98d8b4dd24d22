"""The kernel budget of the merging methods (issue 29): aten ops of one eager forward,
counted by ``bench.opcount.OpCounter``, on ViT-S/16's shape (12 blocks, class token,
mask decoder) with a small width, where counts do not depend on the width."""
import pytest
import torch
import torch.nn.functional as F

from bench.opcount import OpCounter
from methods.algm import ALGMPolicy
from methods.encoder import Policy
from methods.segmenter import build_model
from methods.tome import ToMePolicy


@pytest.fixture(scope="module")
def vit_s_shape():
    torch.manual_seed(0)
    return build_model(5, "vit_small", embed_dim=64, num_heads=2, img_size=128).eval()


def _images(n=4, size=128):
    g = torch.Generator().manual_seed(1)
    flat = F.interpolate(torch.randn(n, 3, size // 16, size // 16, generator=g), size=(size, size), mode="nearest")
    return flat + torch.linspace(0.0, 2.0, n)[:, None, None, None] * torch.randn(n, 3, size, size, generator=g)


def _ops(model, policy, x):
    with torch.inference_mode():
        model.forward_state(x, policy)  # warm: index constants are kept between forwards
        counter = OpCounter()
        with counter:
            _, state = model.forward_state(x, policy)
    return counter.ops, state


def test_tome_dispatches_at_most_18_ops_per_merging_block(vit_s_shape):
    x = _images()
    base, _ = _ops(vit_s_shape, Policy(), x)
    ops, state = _ops(vit_s_shape, ToMePolicy(12, r=2), x)
    assert state.trace.tokens[0, -1] == 64 - 2 * 11
    assert ops - base <= 18 * 12


@pytest.mark.parametrize("threshold", [0.88, 0.0, -1.0])
def test_algm_dispatches_at_most_1_6_times_the_baselines_ops(vit_s_shape, threshold):
    x = _images()
    base, _ = _ops(vit_s_shape, Policy(), x)
    pad, state = _ops(vit_s_shape, ALGMPolicy(12, threshold=threshold), x)
    tokens = state.trace.tokens
    assert (tokens[:, -1] < tokens[:, 0]).all() and (tokens[:, -1] != tokens[0, -1]).any()  # ragged merges
    assert pad <= 1.6 * base
    # packed: attention once per image in every ragged block, plus the packing's few ops
    packed, _ = _ops(vit_s_shape, ALGMPolicy(12, threshold=threshold, batching="packed"), x)
    ragged = int((tokens != tokens[:1]).any(0).sum())
    assert packed - pad <= ragged * (x.shape[0] + 6)

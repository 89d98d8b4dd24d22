"""The kernel budget of pausing and exit decisions (bench.opcount), as properties of the
code path: a decision dispatches a fixed handful of ops, whatever the batch and token
count, and blocks between two decisions dispatch none of their own.

The budget: at ViT-S (12 blocks, ~15 ops each) with 3 decisions, staying within 1.3x
the baseline's ops leaves ~1.6 blocks' worth of ops per decision (head, score, one sort,
and the few index ops that take rows out)."""
import pytest
import torch

from bench.opcount import OpCounter
from methods.early_exit import EarlyExitModel, EarlyExitPolicy
from methods.encoder import Policy
from methods.paumer import PaumerModel, PaumerPolicy
from methods.segmenter import build_model

PER_DECISION = 1.6  # blocks' worth of ops


def ops(seg, policy, x) -> OpCounter:
    """The ops of one forward (after a warm one)."""
    with torch.inference_mode():
        seg.forward_state(x, policy)  # warm: per-shape constants are cached (as `bench speed` leaves them)
        counter = OpCounter()
        with counter:
            seg.forward_state(x, policy)
    return counter


def model(class_token: bool):
    torch.manual_seed(0)
    return build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32, class_token=class_token).eval()


def block_ops(seg, tokens: int) -> int:
    x, counter = torch.randn(4, tokens, seg.config.embed_dim), OpCounter()
    with torch.inference_mode(), counter:
        seg.blocks[0](x)
    return counter.ops


def policies(seg, layers, batching="pad"):
    stay = [0.7, 0.5, 0.3][: len(layers)]
    pm, ee = PaumerModel(seg, layers=layers).eval(), EarlyExitModel(seg, layers=layers).eval()
    return {"paumer": PaumerPolicy(pm.pausing, criterion="schedule", stay=stay, spread=0.3, batching=batching),
            "early-exit": EarlyExitPolicy(ee.heads, stay=stay, spread=0.3, batching=batching)}


@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("method", ["paumer", "early-exit"])
def test_a_decision_costs_a_fixed_handful_of_ops(class_token, method):
    seg = model(class_token)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base = ops(seg, Policy(), x).ops
    counts = [ops(seg, policies(seg, layers)[method], x).ops for layers in ([1], [1, 2], [1, 2, 3])]
    per_decision = max(counts[1] - counts[0], counts[2] - counts[1])  # one more decision, on a ragged batch
    block = block_ops(seg, 16 + class_token)
    assert 0 < per_decision <= PER_DECISION * block, (counts, block)
    # the first decision (an even batch) and what a forward adds once (early exit: painting
    # the exited patches) stay below a decision and a block
    assert counts[0] - base <= per_decision + block, (base, counts, block)


@pytest.mark.parametrize("batching", ["pad", "packed"])
def test_decision_ops_do_not_grow_with_the_batch_or_the_token_count(batching):
    seg = model(True)
    counts = set()
    for B, size in [(2, 32), (4, 48), (8, 64)]:
        x = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(B))
        base = launches(ops(seg, Policy(), x))
        counts.add(tuple(launches(ops(seg, p, x)) - base for p in policies(seg, [1, 2], batching).values()))
    assert len(counts) == 1, counts


def launches(counter: OpCounter) -> int:
    """Ops but attention calls: packed blocks attend image by image."""
    return counter.ops - counter.by_name["scaled_dot_product_attention"]


def test_packed_rows_are_packed_once_per_decision_not_per_block():
    seg = model(True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, policy in policies(seg, [1, 2], "packed").items():
        by_name = ops(seg, policy, x).by_name
        # two ragged active sets (after blocks 1 and 2), blocks 2 and 3 run on them
        assert by_name["index_select"] == 2, (name, by_name)
        assert by_name.get("index_copy", 0) + by_name.get("index_copy_", 0) <= 2  # unpacked to decide, to decode
        assert "zeros_like" not in by_name

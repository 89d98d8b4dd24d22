"""Attention on packed ragged batches (methods.ragged): the fused nested-tensor path
(CUDA's default, forced here on the CPU) equals one SDPA per image, inside a whole
packed PAUMER forward too, with one attention op per block instead of one per image
and no host read added; and a batch with no padded row runs SDPA with no mask."""
import pytest
import torch
import torch.nn.functional as F

from bench.opcount import OpCounter, count_host_reads
from methods import ragged
from methods.encoder import packed_block, packed_index
from methods.paumer import PaumerModel, PaumerPolicy
from methods.ragged import segment_attention, use_fused
from methods.segmenter import build_model


def per_image(q, k, v, segments):
    return torch.cat([F.scaled_dot_product_attention(a, b, c)
                      for a, b, c in zip(q.split(segments, 1), k.split(segments, 1), v.split(segments, 1))], 1)


def packed_qkv(segments, heads=3, head_dim=16, dtype=torch.float32, seed=0):
    """q, k, v (heads, T, head_dim) as packed_block makes them: views of one qkv tensor."""
    T = sum(segments)
    qkv = torch.randn(T, 3, heads, head_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return qkv.permute(1, 2, 0, 3).unbind(0)


def attention_ops(counter: OpCounter) -> int:
    """Launching ops that compute attention scores: a fused SDPA kernel or a softmax."""
    return sum(n for name, n in counter.by_name.items() if "attention" in name or "softmax" in name)


SEGMENTS = [
    [5, 1, 9, 3],  # a segment of length 1
    [c + 1 for c in (0, 7, 2, 12, 4)],  # with the class token counted: an image with no grid row left is 1
    [4, 0, 6],  # an image with no row at all (no prefix): no rows in the output either
    [6, 6, 6],  # not ragged
]


@pytest.mark.parametrize("segments", SEGMENTS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_attention_equals_one_sdpa_per_image(segments, dtype, tol):
    q, k, v = packed_qkv(segments, dtype=dtype, seed=len(segments))
    expected = per_image(q, k, v, segments)
    fused = segment_attention(q, k, v, segments, fused=True)
    assert fused.shape == expected.shape == q.shape and fused.dtype == dtype
    assert (fused.float() - expected.float()).abs().max() < tol
    # the default on the CPU is the per-image expression itself
    assert torch.equal(segment_attention(q, k, v, segments), expected)


def test_the_fused_path_is_cudas_default_and_the_switch_forces_it(monkeypatch):
    assert use_fused(torch.device("cuda")) and not use_fused(torch.device("cpu"))
    assert not use_fused(torch.device("cuda"), fused=False)
    monkeypatch.setattr(ragged, "FUSED", True)
    assert use_fused(torch.device("cpu"))
    segments = [3, 1, 5]
    q, k, v = packed_qkv(segments)
    counter = OpCounter()
    with counter:
        segment_attention(q, k, v, segments)
    assert attention_ops(counter) == 1


def test_a_packed_block_runs_one_attention_op_instead_of_one_per_image(small_model):
    block = small_model.blocks[0]
    segments = [9, 1, 14, 5]
    B, n = len(segments), max(segments)
    x = torch.randn(B, n, small_model.config.embed_dim)
    valid = torch.arange(n) < torch.tensor(segments)[:, None]
    index = packed_index(valid, sum(segments))
    outs, ops = {}, {}
    with torch.inference_mode():
        for fused in (False, True):
            ragged.FUSED = fused
            try:
                counter = OpCounter()
                with counter:
                    outs[fused] = packed_block(block, x, valid, segments, index)
            finally:
                ragged.FUSED = None
            ops[fused] = attention_ops(counter)
    assert ops == {False: B, True: 1}
    assert (outs[True] - outs[False]).abs().max() < 1e-5


def test_the_op_counter_sees_through_nested_tensors():
    values = torch.randn(7, 2, 4)
    offsets = torch.tensor([0, 3, 7])
    counter = OpCounter()
    with counter:
        nt = torch.nested.nested_tensor_from_jagged(values, offsets, min_seqlen=3, max_seqlen=4)
        view = nt.transpose(1, 2)  # a view of ``values``: no kernel
        view.values()
        nt * 2  # a kernel on the jagged values
    assert counter.ops == 1 and counter.by_name == {"mul": 1}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def paumer_model(class_token: bool, device="cpu"):
    torch.manual_seed(0)
    seg = build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32, class_token=class_token).eval()
    return PaumerModel(seg, layers=[1, 2]).eval().to(device)


def forward(model, policy, x, fused=None):
    """(logits, state, attention ops, host reads) of one forward, the nested path forced or not."""
    ragged.FUSED = fused
    try:
        counter = OpCounter()
        with torch.inference_mode(), count_host_reads() as reads, counter:
            out, state = model.segmenter.forward_state(x, policy)
    finally:
        ragged.FUSED = None
    return out, state, attention_ops(counter), list(reads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("class_token", [False, True])
def test_a_packed_paumer_forward_with_fused_attention_equals_per_image_and_pad(class_token, device):
    model = paumer_model(class_token, device)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(device)
    tol = 1e-5 if device == "cpu" else 1e-4  # CUDA: different kernels per path

    def policy(batching):
        return PaumerPolicy(model.pausing, criterion="schedule", stay=[0.7, 0.4], spread=0.3, batching=batching)

    per_image, state, per_image_ops, per_image_reads = forward(model, policy("packed"), x, fused=False)
    fused, fused_state, fused_ops, fused_reads = forward(model, policy("packed"), x, fused=True)
    default, _, default_ops, _ = forward(model, policy("packed"), x)
    pad, _, _, _ = forward(model, policy("pad"), x)
    tokens = state.trace.tokens
    ragged_blocks = int((tokens != tokens[:1]).any(0).sum())
    assert ragged_blocks == 3  # blocks 1-3 ran on a ragged batch (after the decisions at 1 and 2)
    assert torch.equal(fused_state.trace.tokens, tokens)
    assert (fused - per_image).abs().max() < tol and (fused - pad).abs().max() < tol
    assert per_image_ops - fused_ops == (x.shape[0] - 1) * ragged_blocks  # one attention op per block, not B
    assert fused_reads == per_image_reads == ["tolist"] * 2  # no host read added: one per decision
    # the default: per image on the CPU, fused on CUDA
    assert torch.equal(default, per_image if device == "cpu" else fused)
    assert default_ops == (per_image_ops if device == "cpu" else fused_ops)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, kernel, tol", [(torch.float32, "_efficient_attention_forward", 1e-4),
                                                (torch.bfloat16, "_flash_attention_forward", 2e-2)])
def test_on_cuda_the_default_is_one_varlen_kernel_with_no_sync(dtype, kernel, tol):
    segments = [197, 1, 150, 64, 129]
    q, k, v = (t.cuda() for t in packed_qkv(segments, heads=6, head_dim=64, dtype=dtype))
    expected = per_image(q, k, v, segments)
    segment_attention(q, k, v, segments)  # the offsets, made once per ragged shape
    torch.cuda.synchronize()
    counter = OpCounter()
    torch.cuda.set_sync_debug_mode("error")  # any stream synchronisation raises
    try:
        with counter:
            out = segment_attention(q, k, v, segments)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert counter.by_name.get(kernel) == 1 and attention_ops(counter) == 1
    assert (out.float() - expected.float()).abs().max() < tol


def block_masks(model, policy, x) -> list:
    """The attn_mask each encoder block was called with (pad batching: blocks run whole)."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("attn_mask")),
                                         with_kwargs=True) for b in model.segmenter.blocks]
    try:
        with torch.inference_mode():
            model.segmenter.forward_state(x, policy)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_no_key_mask_reaches_sdpa_where_no_row_is_padded(small_model, monkeypatch):
    model = PaumerModel(small_model, layers=[1, 2]).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    sdpa_masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        sdpa_masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    same = PaumerPolicy(model.pausing, criterion="schedule", stay=[0.7, 0.4], spread=0.0)  # every image keeps as many
    assert block_masks(model, same, x) == [None] * 4
    assert len(sdpa_masks) >= 4 and all(m is None for m in sdpa_masks)  # timm's attention got no mask either
    spread = PaumerPolicy(model.pausing, criterion="schedule", stay=[0.7, 0.4], spread=0.3)
    masks = block_masks(model, spread, x)
    assert masks[0] is None and all(m is not None and m.dtype == torch.bool for m in masks[1:])  # ragged after block 0


def test_fused_attention_under_bf16_autocast_equals_per_image():
    model = paumer_model(True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    policy = lambda: PaumerPolicy(model.pausing, criterion="schedule", stay=[0.7, 0.4], spread=0.3, batching="packed")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_image, _, per_image_ops, _ = forward(model, policy(), x, fused=False)
        fused, _, fused_ops, _ = forward(model, policy(), x, fused=True)
    assert fused.dtype == per_image.dtype == torch.bfloat16
    assert (fused.float() - per_image.float()).abs().max() < 2e-2
    assert per_image_ops - fused_ops == 3 * 3  # B - 1 = 3 fewer per ragged block

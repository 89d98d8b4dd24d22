"""DeiT's distillation token (ModelConfig.dist_token): a second prefix token after the
class token. Like the class token it runs in every block, is priced in every block, is
never paused, exited or merged, and the decoder never sees it."""
import pytest
import torch

from methods.algm import ALGMPolicy
from methods.early_exit import EarlyExitModel, EarlyExitPolicy
from methods.paumer import PaumerModel, PaumerPolicy
from methods.segmenter import build_model, config_dict, model_config
from methods.tome import ToMePolicy, max_r


def dist_model(decoder="mask"):
    torch.manual_seed(0)
    return build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32, decoder=decoder,
                       decoder_layers=1, class_token=True, dist_token=True).eval()


def images(n=2, seed=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def with_heads(model_cls, seg, std):
    torch.manual_seed(1)
    m = model_cls(seg).eval()
    for head in getattr(m, m.heads_attr).heads:
        torch.nn.init.normal_(head[1].weight, std=std)
    return m


def test_layout_is_class_then_distillation_then_the_grid():
    model = dist_model()
    assert model.num_prefix_tokens == 2 and model.pos_embed.shape == (1, 2 + 16, 64)
    tokens, _ = model.embed(torch.zeros(1, 3, 32, 32))
    assert torch.allclose(tokens[:, 1], (model.dist_token + model.pos_embed[:, 1:2])[:, 0])
    x = images(2)
    with torch.no_grad():  # written out: both prefix tokens through every block, dropped before the decoder
        t, grid = model.embed(x)
        for block in model.blocks:
            t = block(t)
        expected = model.decode(t[:, 2:], grid, x.shape[-2:])
        assert torch.allclose(model(x), expected, atol=1e-5)
        model.dist_token.copy_(10 * torch.randn_like(model.dist_token))  # it attends: another token, another output
        assert (model(x) - expected).abs().max() > 1e-4


def test_dist_token_needs_the_class_token_and_defaults_hash_as_before():
    with pytest.raises(ValueError, match="class_token"):
        build_model(5, "tiny", dist_token=True)
    assert "dist_token" not in config_dict(model_config("vit_small"))
    assert config_dict(model_config("vit_small", dist_token=True))["dist_token"] is True


def policies(seg):
    pm = with_heads(PaumerModel, seg, 0.5)
    ee = with_heads(EarlyExitModel, seg, 0.7)
    return {
        "paumer": PaumerPolicy(pm.pausing, tau=1.0),
        "paumer-packed": PaumerPolicy(pm.pausing, tau=1.0, batching="packed"),
        "early-exit-token": EarlyExitPolicy(ee.heads, threshold=0.0, mode="token"),
        "tome": ToMePolicy(seg.depth, r=max_r(16, seg.depth)),
        "algm": ALGMPolicy(seg.depth, threshold=-1.0, global_threshold=-1.0, layers=[1, 2, 3]),
        "algm-reference": ALGMPolicy(seg.depth, threshold=-1.0, layers=[1, 2, 3], batching="reference"),
    }


@pytest.mark.parametrize("name", ["paumer", "paumer-packed", "early-exit-token", "tome", "algm", "algm-reference"])
def test_no_method_pauses_exits_or_merges_the_distillation_token(name):
    seg = dist_model()
    policy = policies(seg)[name]
    seen = []
    after = policy.after_block
    policy.after_block = lambda i, b, s: (seen.append(s.prefix.clone()), after(i, b, s))
    with torch.no_grad():
        logits, state = seg.forward_state(images(2), policy)
    assert logits.shape == (2, 5, 32, 32) and torch.isfinite(logits).all()
    assert state.prefix.shape == (2, 2, 64) and len(seen) == seg.depth
    embedded = seg.embed(images(2))[0][:, :2]
    for before, now in zip([embedded] + seen, seen):
        assert ((now - before).abs().amax((0, 2)) > 1e-4).all()  # every block ran both prefix tokens
    blocks = [c for key, c in state.trace.items if key[0] in ("block", "tome_block", "algm_attention")]
    assert len(blocks) == seg.depth
    assert all(torch.equal(b, g + 2) for b, g in zip(blocks, state.trace.tokens.T))  # priced in every block
    if name.startswith(("paumer", "early-exit")):
        assert (state.left_at == 1).all()  # every grid token left; the prefix did not
    else:  # every patch in exactly one grid row, none merged into a prefix token
        assert (state.size.sum(1) == 16).all() and state.size.shape[1] == state.x.shape[1] < 16

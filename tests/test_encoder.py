import torch

from methods.encoder import Policy, TokenState


class DropSome(Policy):
    """Keeps a fixed random subset of tokens after ``layer``, different per image."""

    def __init__(self, layer=1, p=0.5, seed=0):
        self.layer, self.p, self.seed = layer, p, seed

    def after_block(self, index, block, state):
        if index == self.layer:
            g = torch.Generator().manual_seed(self.seed)
            state.keep(torch.rand(state.x.shape[:2], generator=g) > self.p, index)


def test_keep_then_to_grid_puts_every_token_back():
    x = torch.randn(3, 10, 4)
    state = TokenState(x.clone(), (2, 5), depth=4)
    keep = torch.rand(3, 10) > 0.4
    state.keep(keep, layer=1)
    assert state.counts().tolist() == keep.sum(1).tolist()
    state.x = state.x + 1  # later blocks change only the active tokens
    grid = state.to_grid()
    assert torch.equal(grid[keep], x[keep] + 1)
    assert torch.equal(grid[~keep], x[~keep])
    assert torch.equal(state.left_at[~keep], torch.ones(int((~keep).sum()), dtype=torch.long))
    assert (state.left_at[keep] == 4).all()


def test_second_keep_composes_with_the_first():
    x = torch.arange(2 * 6, dtype=torch.float).reshape(2, 6, 1)
    state = TokenState(x.clone(), (2, 3), depth=3)
    state.keep(torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 0]], dtype=torch.bool), 0)
    state.x = state.x * 10
    state.keep(torch.tensor([[0, 1, 1, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool), 1)
    grid = state.to_grid()[..., 0]
    assert grid[0].tolist() == [0, 1, 20, 30, 4, 50]
    assert grid[1].tolist() == [60, 70, 80, 90, 100, 11]
    assert state.left_at.tolist() == [[1, 0, 3, 3, 0, 1], [3, 1, 3, 1, 3, 0]]


def test_doing_nothing_is_the_plain_model(small_model):
    images = torch.randn(2, 3, 32, 48)
    with torch.inference_mode():
        tokens, grid = small_model.embed(images)
        x = tokens
        for block in small_model.blocks:
            x = block(x)
        direct = small_model.decode(x, grid, (32, 48))
        looped, state = small_model.forward_state(images)
    assert torch.allclose(direct, looped, atol=1e-6)
    assert state.trace.tokens.tolist() == [[24] * 4] * 2


def test_padded_batch_equals_each_image_alone(small_model):
    images = torch.randn(3, 3, 32, 32)
    policy = DropSome(layer=1)
    with torch.inference_mode():
        batched, state = small_model.forward_state(images, policy)
        assert state.valid is not None  # images kept different numbers of tokens
        for b in range(3):
            # the same per-image decisions, taken alone: slice the shared random mask
            class One(DropSome):
                def after_block(self, index, block, st, b=b):
                    if index == self.layer:
                        g = torch.Generator().manual_seed(self.seed)
                        st.keep((torch.rand(3, 16, generator=g) > self.p)[b : b + 1], index)

            alone = small_model(images[b : b + 1], One(layer=1))
            assert torch.allclose(batched[b : b + 1], alone, atol=1e-5)


def test_trace_counts_follow_the_policy(small_model):
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        _, state = small_model.forward_state(images, DropSome(layer=1))
    kept = (state.left_at == 4).sum(1)
    assert state.trace.tokens[:, :2].tolist() == [[16, 16], [16, 16]]
    assert state.trace.tokens[:, 2].tolist() == kept.tolist()
    assert state.trace.tokens[:, 3].tolist() == kept.tolist()


def test_packed_blocks_equal_padded_blocks(small_model):
    images = torch.randn(3, 3, 32, 32)
    padded, packed = DropSome(layer=0), DropSome(layer=0)
    packed.batching = "packed"
    with torch.inference_mode():
        a, sa = small_model.forward_state(images, padded)
        b, sb = small_model.forward_state(images, packed)
    assert sa.valid is not None
    assert torch.equal(sa.trace.tokens, sb.trace.tokens)
    assert (a - b).abs().max() < 1e-5

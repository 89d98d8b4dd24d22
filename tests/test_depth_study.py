"""scripts/depth_study.py's windowed attention: the mask means what it says."""
import importlib.util
from pathlib import Path

import torch
from timm.models.vision_transformer import Block

spec = importlib.util.spec_from_file_location(
    "depth_study", Path(__file__).resolve().parent.parent / "scripts" / "depth_study.py")
depth_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(depth_study)


def test_window_radius_bounds_what_a_token_sees():
    torch.manual_seed(0)
    block = Block(16, 2).eval()
    x = torch.randn(2, 16, 16)  # a 4x4 grid
    with torch.no_grad():
        whole = depth_study.WindowedBlock(block, radius=3)(x)  # the window covers the grid
        alone = depth_study.WindowedBlock(block, radius=0)(x)  # each token sees itself
        torch.testing.assert_close(whole, block(x))
        torch.testing.assert_close(alone, block(x.reshape(32, 1, 16)).reshape(2, 16, 16))
        # radius 1: changing a token two grid steps away leaves token 0 unchanged,
        # changing a neighbour does not
        near, far = x.clone(), x.clone()
        near[:, 5] += torch.randn(16)  # (1, 1): diagonal neighbour of (0, 0)
        far[:, 10] += torch.randn(16)  # (2, 2)
        ref = depth_study.WindowedBlock(block, radius=1)(x)[:, 0]
        assert torch.equal(depth_study.WindowedBlock(block, radius=1)(far)[:, 0], ref)
        assert not torch.allclose(depth_study.WindowedBlock(block, radius=1)(near)[:, 0], ref)

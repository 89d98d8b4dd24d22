"""The trained references: baseline-ft (equal budget) and shallow (the first k blocks)."""
import copy
import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench import datasets
from bench.flops import FlopModel, count_flops
from bench.runner import RunOptions, checkpoint_groups, checkpoint_path, fine_tune_config, train_config
from bench.train import save_checkpoint, weights_hash
from methods import CONTROL, METHODS
from methods.references import default_depths, truncate


def images(n=2, h=32, w=48):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_shallow_runs_exactly_its_blocks_and_fvcore_agrees_with_the_trace(small_model, depth):
    full = copy.deepcopy(small_model)
    model = METHODS["shallow"].fine_tune.build(small_model, depth=depth).eval()
    assert model.depth == depth == model.config.depth and len(model.blocks) == depth
    for mine, theirs in zip(model.blocks, full.blocks):  # the baseline's first blocks, unchanged
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    x = images()
    with torch.inference_mode():
        out, state = model.forward_state(x, METHODS["shallow"].make_policy(model, depth=depth))
        tokens, grid = full.embed(x)
        for block in full.blocks[:depth]:
            tokens = block(tokens)
        by_hand = full.decode(tokens, grid, (32, 48))
    assert state.trace.tokens.shape == (2, depth) and (state.trace.tokens == 24).all()
    assert torch.allclose(out, by_hand, atol=1e-5)
    traced = FlopModel(model).image_flops(state.trace, (32, 48))
    assert traced[0] == traced[1] == count_flops(model, (x[:1],))  # exact: nothing is dropped
    if depth < full.depth:
        assert traced[0] < count_flops(full, (x[:1],))


def test_shallow_policy_refuses_a_checkpoint_of_another_depth(small_model):
    model = truncate(small_model, 2)
    with pytest.raises(ValueError, match="depth=3 needs its own checkpoint"):
        METHODS["shallow"].make_policy(model, depth=3)


@pytest.mark.parametrize("depth", [0, 5, 2.0, True, None])
def test_bad_depth_is_refused(small_model, depth):
    with pytest.raises(ValueError):
        truncate(small_model, depth)


def test_default_depths_are_the_pausing_layers_and_the_full_depth():
    assert default_depths(6) == [2, 3, 4, 6]
    assert default_depths(12) == [4, 6, 8, 12]
    assert METHODS["shallow"].sweep(12, 1024) == [{"depth": d} for d in (4, 6, 8, 12)]
    assert METHODS["shallow"].default_ops == METHODS["shallow"].sweep(6, 256)  # tiny's


def synthetic_configs():
    spec = datasets.get_spec("synthetic")
    return spec, train_config(RunOptions(), spec)


def test_stored_fine_tune_config_hashes_do_not_change():
    """The stored synthetic records name these configurations (results/synthetic.jsonl)."""
    _, base = synthetic_configs()
    assert base.hash() == "507ac65522a9"
    assert fine_tune_config(METHODS["paumer"], base, "83f770df2cf3").hash() == "4bf0cc2976b8"
    assert fine_tune_config(METHODS["early-exit"], base, "83f770df2cf3").hash() == "c9cb1866f6a3"


def test_every_fine_tune_has_the_same_budget_and_its_own_checkpoint():
    _, base = synthetic_configs()
    configs = {name: fine_tune_config(m, base, "w0", {"depth": 2}) for name, m in METHODS.items() if m.fine_tune}
    assert set(configs) == {"baseline-ft", "shallow", "paumer", "early-exit", "algm-ft", "dtop"}
    budget = {(c.steps, c.lr, c.warmup_steps, c.poly_power, c.batch_size, c.init_from) for c in configs.values()}
    assert budget == {(800, base.lr / 2, 50, base.poly_power, base.batch_size, "w0")}
    assert len({c.hash() for c in configs.values()}) == 6
    assert configs["baseline-ft"].method_knobs == {} and configs["shallow"].method_knobs == {"depth": 2}


def test_each_shallow_depth_is_its_own_checkpoint_and_the_full_depth_is_the_control():
    _, base = synthetic_configs()
    shallow = METHODS["shallow"]
    hashes = [fine_tune_config(shallow, base, "w0", {"depth": d}).hash() for d in (2, 3, 4)]
    assert len(set(hashes)) == 3
    full = fine_tune_config(shallow, base, "w0", {"depth": 6})
    assert full == fine_tune_config(METHODS[CONTROL], base, "w0") and full.method == CONTROL
    ops = [{"depth": 2}, {"depth": 3}, {"depth": 2}]
    assert checkpoint_groups(shallow, ops) == [[{"depth": 2}, {"depth": 2}], [{"depth": 3}]]
    assert checkpoint_groups(METHODS["paumer"], [{"tau": 0.1}, {"tau": 0.2}]) == [[{"tau": 0.1}, {"tau": 0.2}]]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_script_takes_the_paumer_checkpoint_of_the_run_configuration(tmp_path):
    profile = load_script("profile_paumer")
    spec, _ = synthetic_configs()
    opts = RunOptions(checkpoints=str(tmp_path))
    base_cfg = train_config(opts, spec)

    def fake(cfg, value, path=None):
        """A complete checkpoint of ``cfg`` whose one weight is ``value``; returns its hash."""
        module = torch.nn.Module()
        module.register_buffer("w", torch.tensor([value]))
        save_checkpoint(path or checkpoint_path(opts, cfg), {
            "model": module.state_dict(), "step": cfg.steps, "done": True, "weights": weights_hash(module),
            "config": {**cfg.to_dict(), "hash": cfg.hash()}})
        return weights_hash(module)

    base_weights = fake(base_cfg, 0.0)
    fake(fine_tune_config(METHODS["paumer"], base_cfg, base_weights), 1.0)
    # another fine-tune whose name sorts last: a longer budget, from another baseline
    other = replace(fine_tune_config(METHODS["paumer"], base_cfg, "zzz"), steps=5000)
    fake(other, 2.0, path=checkpoint_path(opts, base_cfg).parent / "paumer-tiny-zzzzzzzzzzzz.pt")
    _, base, paumer = profile.checkpoints(opts, spec)
    assert base["weights"] == base_weights and paumer["model"]["w"].item() == 1.0


def test_static_sweep_reaches_a_quarter_scale():
    scales = [op["scale"] for op in METHODS["static"].default_ops]
    assert scales[0] == 1.0 and scales[-1] == 0.25 and scales == sorted(scales, reverse=True)

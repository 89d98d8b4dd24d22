"""Compute maps: images spread over the split, a colour bar of the blocks a patch can
leave after, written as PNG, SVG and PDF."""
from bench.figures import exit_levels, level_labels, pause_maps, spread_indices


def test_maps_images_are_spread_over_the_whole_split():
    assert spread_indices(100, 4) == [0, 33, 66, 99]
    assert spread_indices(3, 4) == [0, 1, 2]
    assert spread_indices(0, 4) == []


def test_colour_bar_levels_are_the_policies_layers_and_full_depth():
    from methods.encoder import Policy

    class Pausing(Policy):
        def describe(self):
            return {"layers": [2, 4]}

    assert exit_levels([Pausing()], depth=6) == [2, 4, 6]
    assert level_labels([2, 4, 6], 6) == ["after block 2", "after block 4", "full depth (6)"]
    import numpy as np

    assert exit_levels([Policy()], depth=6, maps=[np.array([[3, 6]])]) == [3, 6]  # no layers named: what was drawn


def test_pause_maps_writes_png_svg_and_pdf(small_model, toy_dataset, tmp_path):
    from methods.paumer import PaumerModel, PaumerPolicy

    trained = PaumerModel(small_model, [1, 2]).eval()
    runs = [("paumer tau=0.9", PaumerPolicy(trained.pausing, tau=0.9))]
    path = pause_maps(small_model, runs, toy_dataset, spread_indices(len(toy_dataset), 2), tmp_path / "toy-maps",
                      palette=[(255, 0, 0), (0, 255, 0), (0, 0, 255)], depth=small_model.depth,
                      classes=toy_dataset.classes)
    assert path == tmp_path / "toy-maps.png"
    for ext in ("png", "svg", "pdf"):
        assert (tmp_path / f"toy-maps.{ext}").stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp"))

"""The embedded synthetic dataset: deterministic scenes, sane labels, a working cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.datasets import synthetic
from bench.datasets.synthetic import (
    CLASSES,
    IGNORE_INDEX,
    PALETTE,
    SyntheticDataset,
    generate_sample,
)

EASY = ("road", "building", "sky")


@pytest.fixture(scope="module")
def samples():
    """50 scenes, shared by the statistics tests."""
    return [generate_sample(seed) for seed in range(50)]


def test_same_seed_gives_identical_arrays():
    a_img, a_lab = generate_sample(123)
    b_img, b_lab = generate_sample(123)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)


def test_different_seeds_give_different_scenes():
    a_img, a_lab = generate_sample(1)
    b_img, b_lab = generate_sample(2)
    assert not np.array_equal(a_img, b_img)
    assert not np.array_equal(a_lab, b_lab)


def test_generation_ignores_global_random_state():
    np.random.seed(0)
    a = generate_sample(7)
    np.random.seed(1)
    np.random.random(100)
    b = generate_sample(7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_sample_shapes_and_dtypes(samples):
    image, label = samples[0]
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert label.shape == (128, 128) and label.dtype == np.uint8


def test_palette_matches_classes():
    assert 8 <= len(CLASSES) <= 11
    assert len(PALETTE) == len(CLASSES) and len(set(CLASSES)) == len(CLASSES)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTE)


def test_label_values_are_classes_or_ignore(samples):
    labels = np.stack([lab for _, lab in samples])
    valid = (labels < len(CLASSES)) | (labels == IGNORE_INDEX)
    assert valid.all()
    assert (labels == IGNORE_INDEX).mean() <= 0.02


def test_easy_classes_cover_most_pixels(samples):
    labels = np.stack([lab for _, lab in samples])
    easy = np.isin(labels, [CLASSES.index(c) for c in EASY]).mean()
    assert easy >= 0.6


def test_every_class_appears_in_50_images(samples):
    labels = np.stack([lab for _, lab in samples])
    present = set(np.unique(labels).tolist())
    missing = [c for i, c in enumerate(CLASSES) if i not in present]
    assert not missing, f"classes never drawn: {missing}"


def test_images_are_not_flat(samples):
    # noise and lighting: no class is drawn in a single exact colour
    image, label = samples[0]
    road = image[label == CLASSES.index("road")]
    assert road.std(0).min() > 1.0


def test_dataset_items_and_attributes(tmp_path):
    ds = SyntheticDataset("val", tmp_path, size=3)
    assert len(ds) == 3
    assert ds.classes == CLASSES and ds.palette == PALETTE and ds.ignore_index == 255
    image, label = ds[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 128, 128)
    assert label.dtype == torch.int64 and label.shape == (128, 128)
    ref_img, ref_lab = generate_sample(synthetic.split_seed("val", 1))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), ref_img)
    assert np.array_equal(label.numpy(), ref_lab.astype(np.int64))


def test_splits_use_different_seeds(tmp_path):
    train = SyntheticDataset("train", tmp_path, size=2)
    val = SyntheticDataset("val", tmp_path, size=2)
    assert not torch.equal(train[0][0], val[0][0])


def test_cache_round_trips_without_regenerating(tmp_path, monkeypatch):
    first = SyntheticDataset("train", tmp_path, size=4)
    assert first.path.exists() and first.path.parent.name == synthetic.VERSION
    assert not list(first.path.parent.glob("*.tmp"))  # written atomically, nothing left over

    def fail(seed):
        raise AssertionError("regenerated although a cache exists")

    monkeypatch.setattr(synthetic, "generate_sample", fail)
    second = SyntheticDataset("train", tmp_path, size=4)
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.labels, second.labels)
    with np.load(second.path) as z:
        assert z["images"].shape == (4, 128, 128, 3) and z["labels"].shape == (4, 128, 128)


def test_default_size_names_the_split_file(tmp_path, monkeypatch):
    monkeypatch.setitem(synthetic.SPLITS, "val", (synthetic.SPLITS["val"][0], 2))
    ds = SyntheticDataset("val", tmp_path)
    assert len(ds) == 2 and ds.path.name == "val.npz"


def test_corrupt_cache_is_regenerated(tmp_path):
    ds = SyntheticDataset("val", tmp_path, size=2)
    ds.path.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="regenerating"):
        again = SyntheticDataset("val", tmp_path, size=2)
    assert np.array_equal(again.images, ds.images)


def test_unknown_split_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        SyntheticDataset("nope", tmp_path)

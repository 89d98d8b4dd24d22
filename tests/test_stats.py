import math

import numpy as np
import pytest
import torch

from bench import stats
from bench.errors import BenchError
from bench.metrics import confusion_matrix, iou_scores


def random_counts(n=40, classes=4, seed=0):
    """Per-image (intersection, union) of a random prediction against a random label."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, classes, (n, 8, 8), generator=g)
    pred = torch.where(torch.rand(n, 8, 8, generator=g) < 0.6, label, torch.randint(0, classes, (n, 8, 8), generator=g))
    label[:, 0, 0] = 255  # ignored pixels stay out
    return pred, label, stats.per_image_counts(pred, label, classes)


def test_per_image_counts_sum_to_the_split_confusion_matrix():
    pred, label, (inter, union) = random_counts()
    cm = confusion_matrix(pred, label, 4)
    assert inter.sum(0).tolist() == cm.diag().tolist()
    assert union.sum(0).tolist() == (cm.sum(0) + cm.sum(1) - cm.diag()).tolist()


def test_identity_resample_reproduces_the_point_estimate():
    pred, label, (inter, union) = random_counts()
    _, miou = iou_scores(confusion_matrix(pred, label, 4))
    identity = np.ones((1, len(inter)))
    assert stats.resampled_miou(inter.numpy(), union.numpy(), identity)[0] == pytest.approx(miou, abs=1e-12)


def test_miou_leaves_out_classes_with_an_empty_union():
    inter = np.array([[5, 0, 0]])
    union = np.array([[10, 4, 0]])  # class 1 only predicted: IoU 0, counts; class 2 absent: left out
    assert stats.miou_from_counts(inter.sum(0), union.sum(0)) == pytest.approx(0.25)


def test_identical_predictions_give_a_delta_interval_of_exactly_zero():
    _, _, (inter, union) = random_counts()
    counts = (inter.numpy(), union.numpy())
    out = stats.paired_bootstrap(counts, [counts])
    assert out["delta_ci"] == [[0.0, 0.0]]
    low, high = out["miou_ci"]
    assert low < stats.miou_from_counts(inter.sum(0).numpy(), union.sum(0).numpy()) < high


def test_better_on_every_image_by_a_margin_excludes_zero():
    _, _, (inter, union) = random_counts()
    worse = (inter.numpy(), union.numpy())
    gain = np.minimum(2, union.numpy() - inter.numpy())  # two more right pixels per class where possible
    better = (worse[0] + gain, worse[1])
    delta = stats.paired_bootstrap(better, [worse])["delta_ci"][0]
    assert delta[0] > 0 and stats.verdict(delta) == "better"
    assert stats.verdict([-(delta[1]), -(delta[0])]) == "worse" and stats.verdict([-0.1, 0.2]) == "within noise"


def test_a_bootstrap_of_one_image_is_a_clear_error():
    counts = (np.array([[3, 1]]), np.array([[4, 2]]))
    with pytest.raises(BenchError, match="at least 2 images; got 1"):
        stats.paired_bootstrap(counts)


def test_the_same_seed_gives_the_same_interval_and_another_seed_another():
    _, _, (inter, union) = random_counts()
    counts = (inter.numpy(), union.numpy())
    a, b = stats.paired_bootstrap(counts), stats.paired_bootstrap(counts)
    assert a == b
    assert stats.paired_bootstrap(counts, seed=1)["miou_ci"] != a["miou_ci"]
    assert stats.resample_weights(40).shape == (stats.RESAMPLES, 40) and stats.RESAMPLES >= 1000


def test_counts_on_other_images_get_no_paired_interval():
    _, _, (inter, union) = random_counts(n=40)
    _, _, (other_i, other_u) = random_counts(n=30, seed=1)
    out = stats.paired_bootstrap((inter.numpy(), union.numpy()), [(other_i.numpy(), other_u.numpy()), None])
    assert out["delta_ci"] == [None, None]


def test_seed_aggregation_matches_the_hand_computation():
    records = [{"seed": 0, "miou": 0.60}, {"seed": 1, "miou": 0.62}, {"seed": 2, "miou": 0.67}]
    out = stats.seed_summary([r["miou"] for r in records])
    mean = (0.60 + 0.62 + 0.67) / 3
    std = math.sqrt(((0.60 - mean) ** 2 + (0.62 - mean) ** 2 + (0.67 - mean) ** 2) / 2)
    assert out == {"mean": pytest.approx(mean), "std": pytest.approx(std), "seeds": 3}
    assert math.isnan(stats.seed_summary([0.5])["std"])


def test_combined_interval_widens_with_seed_spread():
    rng = np.random.default_rng(0)
    images = rng.normal(0, 0.01, size=1000)
    same = np.stack([0.6 + images] * 3)
    spread = np.stack([0.55 + images, 0.6 + images, 0.65 + images])
    narrow, wide = stats.interval(stats.combine_seeds(same)), stats.interval(stats.combine_seeds(spread))
    assert narrow == pytest.approx(stats.interval(0.6 + images))  # no seed spread: the images' interval
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])


def test_interpolation_is_exact_at_points_monotone_between_and_blank_outside():
    xs = [0.3, 0.5, 0.8, 1.0]
    ys = np.array([50.0, 58.0, 60.0, 59.0])
    for x, y in zip(xs, ys):
        assert stats.interpolate(xs, ys, x) == pytest.approx(y)
    between = [float(stats.interpolate(xs, ys, x)) for x in np.linspace(0.5, 0.8, 31)]
    assert all(a <= b for a, b in zip(between, between[1:]))  # rising between rising points
    assert all(58.0 <= v <= 60.0 for v in between)
    falling = [float(stats.interpolate(xs, ys, x)) for x in np.linspace(0.8, 1.0, 11)]
    assert all(a >= b for a, b in zip(falling, falling[1:]))
    assert stats.interpolate(xs, ys, 0.29) is None and stats.interpolate(xs, ys, 1.01) is None
    assert stats.interpolate([0.5], np.array([1.0]), 0.4) is None


def test_interpolation_reads_every_resample_at_once():
    xs = [0.4, 0.6]
    ys = np.array([[1.0, 2.0], [3.0, 6.0]])  # (points, resamples)
    assert stats.interpolate(xs, ys, 0.5).tolist() == [2.0, 4.0]


def test_a_record_of_one_image_gets_no_interval_rather_than_a_crash():
    from bench.per_image import intervals

    one = (np.array([[3, 1]]), np.array([[4, 2]]))
    assert intervals(one, one, None) == {}
    _, _, (inter, union) = random_counts()
    two = (inter.numpy(), union.numpy())
    assert set(intervals(two, two, None)) == {"miou_ci", "miou_delta_ci"}  # no control: no control interval

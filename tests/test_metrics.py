import math

import pytest
import torch

from bench.errors import BenchError
from bench.metrics import ConfusionMatrix, confusion_matrix, iou_scores


def test_confusion_matrix_by_hand_with_ignored_pixels():
    label = torch.tensor([[0, 0, 1, 255],
                          [1, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 2],    # the 2 at an ignored pixel must not count
                         [1, 2, 0, 0]])
    expected = torch.tensor([[1, 1, 0],   # rows = label, cols = prediction
                             [0, 2, 0],
                             [1, 0, 1]])
    m = confusion_matrix(pred, label, num_classes=3)
    assert m.dtype == torch.int64
    assert torch.equal(m, expected)
    per_class, miou = iou_scores(m)
    # class 0: TP 1, FP 1, FN 1; class 1: TP 2, FP 1; class 2: TP 1, FN 1
    assert per_class == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_absent_class_is_nan_and_excluded_false_positive_class_counts():
    label = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])    # class 2 only predicted; class 3 never seen
    per_class, miou = iou_scores(confusion_matrix(pred, label, num_classes=4))
    assert per_class[:3] == pytest.approx([0.5, 1.0, 0.0])
    assert math.isnan(per_class[3])
    assert miou == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_all_ignored_gives_nan_miou():
    per_class, miou = iou_scores(confusion_matrix(torch.zeros(3), torch.full((3,), 255), 2))
    assert all(math.isnan(x) for x in per_class) and math.isnan(miou)


def test_accumulating_two_batches_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 5, (4, 16, 16), generator=g)
    label[:, :2] = 255
    pred = torch.randint(0, 5, (4, 16, 16), generator=g)
    acc = ConfusionMatrix(5)
    acc.update(pred[:2], label[:2]).update(pred[2:], label[2:])
    assert torch.equal(acc.matrix, confusion_matrix(pred, label, 5))
    # merging per-shard accumulators (as ranks would) gives the same totals
    a, b = ConfusionMatrix(5).update(pred[:1], label[:1]), ConfusionMatrix(5)
    b.update(pred[1:], label[1:])
    assert torch.equal(a.merge(b).matrix, acc.matrix)
    assert acc.iou() == iou_scores(acc.matrix)


def test_out_of_range_label_names_the_bad_values():
    with pytest.raises(BenchError, match=r"\[7, 9\]"):
        confusion_matrix(torch.zeros(4), torch.tensor([0, 7, 9, 255]), num_classes=3)


def test_shape_mismatch_is_an_error():
    with pytest.raises(BenchError, match="shape"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(4), num_classes=3)


def test_miou_equals_cityscapesscripts_evaluation(tmp_path):
    """Random predictions against cityscapesscripts' own pixel-level evaluation
    (evalPixelLevelSemanticLabeling: evaluatePair, getIouScoreForLabel, getScoreAverage), on
    label-id PNGs with ignored pixels, classes absent from both, and classes only predicted."""
    csEval = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    import numpy as np
    from PIL import Image

    from bench.datasets.cityscapes import label_id_to_train_id

    to_train = label_id_to_train_id()
    train_to_id = {t: i for i, t in sorted(to_train.items(), reverse=True) if t != 255}  # first id per train id
    ignored_ids = [i for i, t in to_train.items() if t == 255 and i >= 0]
    rng = np.random.default_rng(0)
    in_label = list(range(0, 12))  # train ids 12..18 absent from every label
    in_pred = list(range(0, 10)) + [15]  # 10, 11 never predicted; 15 only predicted
    args = csEval.CArgs()
    args.evalInstLevelScore, args.evalPixelAccuracy, args.quiet = False, False, True
    conf = csEval.generateMatrix(args)
    ours = ConfusionMatrix(19)
    for k in range(3):
        gt_train = rng.choice(in_label, size=(24, 40))
        pred_train = rng.choice(in_pred, size=(24, 40))
        gt = np.vectorize(train_to_id.get)(gt_train).astype(np.uint8)
        ignore = rng.random(gt.shape) < 0.2
        gt[ignore] = rng.choice(ignored_ids, size=int(ignore.sum()))
        pred = np.vectorize(train_to_id.get)(pred_train).astype(np.uint8)
        Image.fromarray(gt).save(tmp_path / f"gt{k}.png")
        Image.fromarray(pred).save(tmp_path / f"pred{k}.png")
        csEval.evaluatePair(str(tmp_path / f"pred{k}.png"), str(tmp_path / f"gt{k}.png"), conf, {}, {}, args)
        label = torch.from_numpy(np.vectorize(lambda i: to_train[int(i)])(gt).astype(np.int64))
        ours.update(torch.from_numpy(pred_train), label)
    scores = {label: csEval.getIouScoreForLabel(label, conf, args) for label in args.evalLabels}
    theirs_miou = csEval.getScoreAverage(scores, args)
    per_class, miou = ours.iou()
    theirs = [scores[train_to_id[t]] for t in range(19)]
    assert [math.isnan(x) for x in per_class] == [math.isnan(x) for x in theirs]
    assert sum(math.isnan(x) for x in theirs) == 6 and theirs[15] == 0.0  # absent: NaN; only predicted: 0
    assert all(a == pytest.approx(b, abs=1e-12) for a, b in zip(per_class, theirs) if not math.isnan(b))
    assert abs(miou - theirs_miou) < 1e-12

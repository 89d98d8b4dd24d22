"""Cityscapes, ADE20K and `folder` on tiny trees made here in exactly their on-disk layouts:
end-to-end runs, label mapping, sliding windows, the loader, and every kind of bad input
as a one-line error that leaves stored results alone."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import datasets
from bench.cli import main
from bench.datasets import ade20k, cityscapes
from bench.datasets.files import DataError
from bench.errors import BenchError
from bench.protocol import EvalSettings, evaluate, predict
from bench.train import augment
from tests.test_cli import assert_one_line_error, run_cli

CS_IDS = sorted(cityscapes.label_id_to_train_id())  # every label id of cityscapesscripts' table


# --------------------------------------------------------------------------- tiny trees
def _scene(h: int, w: int, seed: int, values) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of label values with an image whose colour follows the label."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values)
    grid = rng.choice(values, size=(max(1, h // 8), max(1, w // 8)))
    label = np.kron(grid, np.ones((8, 8), grid.dtype))[:h, :w]
    label = np.pad(label, ((0, h - label.shape[0]), (0, w - label.shape[1])), mode="edge")
    image = np.stack([(label * 37) % 256, (label * 91) % 256, (label * 13) % 256], -1)
    image = np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
    return image, label.astype(np.uint8)


def _save(path: Path, array: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def make_cityscapes(root: Path, counts=None, size=(64, 128), train_ids_splits=("val",)) -> Path:
    """leftImg8bit + gtFine; `train_ids_splits` get *_labelTrainIds.png, the others only
    *_labelIds.png (the raw ids, mapped by the loader)."""
    counts = counts or {"train": 4, "val": 2}
    for split, n in counts.items():
        for i in range(n):
            city = ["aachen", "bochum"][i % 2]
            name = f"{city}_{i:06d}_000019"
            image, ids = _scene(*size, seed=i + 100 * len(split), values=CS_IDS)
            _save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", image)
            if split in train_ids_splits:
                lut = np.array([cityscapes.label_id_to_train_id().get(v, 255) for v in range(256)], np.uint8)
                _save(root / "gtFine" / split / city / f"{name}_gtFine_labelTrainIds.png", lut[ids])
            else:
                _save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", ids)
            _save(root / "gtFine" / split / city / f"{name}_gtFine_color.png", image)  # ignored
    return root


def make_ade20k(root: Path, counts=None, sizes=((48, 64), (64, 48), (40, 72))) -> Path:
    counts = counts or {"training": 4, "validation": 3}
    base = root / "ADEChallengeData2016"
    for split, n in counts.items():
        for i in range(n):
            name = f"ADE_{'train' if split == 'training' else 'val'}_{i + 1:08d}"
            image, label = _scene(*sizes[i % len(sizes)], seed=i + 7 * len(split), values=range(0, 151, 5))
            _save(base / "images" / split / f"{name}.jpg", image, quality=95)
            _save(base / "annotations" / split / f"{name}.png", label)
    return root


def make_folder(root: Path, config=None, counts=None, list_splits=("val",)) -> Path:
    """3 classes, ignore index 9, named 'mine'; `list_splits` as <split>.txt + images/, the
    others as images/<split>/ + labels/<split>/."""
    counts = counts or {"train": 4, "val": 2}
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("road\ncar\nsky\n")
    (root / "bench.json").write_text(json.dumps({"name": "mine", "ignore_index": 9, **(config or {})}))
    for split, n in counts.items():
        names = []
        for i in range(n):
            image, label = _scene(64, 96, seed=i + 100 * len(split), values=[0, 1, 2, 9])
            if split in list_splits:
                name = f"{split}_{i}"
                _save(root / "images" / f"{name}.jpg", image, quality=95)
                _save(root / "labels" / f"{name}.png", label)
                names.append(name)
            else:
                _save(root / "images" / split / f"img{i}.png", image)
                _save(root / "labels" / split / f"img{i}.png", label)
        if split in list_splits:
            (root / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


# --------------------------------------------------------------------------- fixtures
SMALL = dict(window=32, stride=16, crop_size=32, batch_size=2, steps=2, model="tiny", decoder="linear")


@pytest.fixture
def small(monkeypatch):
    """Tiny presets: windows of 32 stride 16 (so 64x128 images still slide), crops 32,
    a 1-2 block model of width 32; no loader workers unless a test asks."""
    from methods import segmenter

    monkeypatch.setitem(segmenter.PRESETS, "tiny",
                        segmenter.ModelConfig(depth=2, embed_dim=32, num_heads=2, img_size=32))
    for name in ("cityscapes", "ade20k"):
        spec = datasets.DATASETS[name]
        over = dict(SMALL, resize_short=48) if name == "ade20k" else SMALL
        monkeypatch.setitem(datasets.DATASETS, name, replace(spec, preset=replace(spec.preset, **over)))
    monkeypatch.setenv("BENCH_WORKERS", "0")
    for var in ("CITYSCAPES_DATASET", "ADE20K_DATASET", "BENCH_FOLDER_ROOT"):
        monkeypatch.delenv(var, raising=False)


def _run_args(tmp_path, dataset, root, *extra):
    return ["run", "--dataset", dataset, "--data-root", str(root), "--model", "tiny", "--depth", "1",
            "--steps", "2", "--limit", "2", "--timing-images", "2", "--repeats", "1", "--batch-size", "4",
            "--threads", "1", "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"), "--quiet", *extra]


def _records(tmp_path, dataset):
    return [json.loads(l) for l in (tmp_path / "res" / f"{dataset}.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- end to end
def test_cityscapes_run_end_to_end(tmp_path, small, monkeypatch):
    root = make_cityscapes(tmp_path / "cs")  # train: labelIds only, val: labelTrainIds
    monkeypatch.setenv("BENCH_WORKERS", "1")  # decoding and augmentation in a worker
    main(_run_args(tmp_path, "cityscapes", root, "--method", "static", "--op", "scale=1.0", "--op", "scale=0.5"))
    records = _records(tmp_path, "cityscapes")
    assert [r["knobs"] for r in records] == [{"scale": 1.0}, {"scale": 0.5}]
    r = records[0]
    assert r["dataset"] == "cityscapes" and r["split"] == "val" and r["images"] == 2
    assert r["eval"] == {"mode": "slide", "window": 32, "stride": 16, "scale": 1.0}
    assert list(r["per_class_iou"]) == list(cityscapes.CLASSES) and len(cityscapes.CLASSES) == 19
    assert abs(r["miou_delta"]) < 1e-9 and records[1]["gflops"]["mean"] < r["gflops"]["mean"]
    ckpt = next((tmp_path / "ck" / "cityscapes").glob("*.pt"))
    assert torch.load(ckpt, weights_only=False)["config"]["optimizer"] == "sgd"


def test_ade20k_run_end_to_end(tmp_path, small):
    root = make_ade20k(tmp_path / "ade")  # images of three sizes: timing batches by size
    main(_run_args(tmp_path, "ade20k", root / "ADEChallengeData2016", "--limit", "3", "--timing-images", "3"))
    (r,) = _records(tmp_path, "ade20k")
    assert r["method"] == "baseline" and r["images"] == 3 and r["timing_images"] == 3
    assert len(r["per_class_iou"]) == 150 and r["eval"]["mode"] == "slide"
    assert r["speed"]["4"]["throughput"] > 0 and r["speed"]["1"]["latency_ms"]["p50"] > 0


def test_folder_run_end_to_end_with_its_own_preset(tmp_path, small):
    root = make_folder(tmp_path / "mine", config=dict(SMALL, window=32, stride=32))
    main(_run_args(tmp_path, "folder", root))
    (r,) = _records(tmp_path, "mine")
    assert list(r["per_class_iou"]) == ["road", "car", "sky"]
    assert r["eval"] == {"mode": "slide", "window": 32, "stride": 32, "scale": 1.0}
    spec = datasets.get_spec("folder", str(root))
    assert spec.num_classes == 3 and spec.preset.crop_size == 32 and spec.preset.optimizer == "sgd"


# --------------------------------------------------------------------------- labels
def test_cityscapes_label_ids_map_to_train_ids_with_cityscapesscripts_table(tmp_path):
    from cityscapesscripts.helpers.labels import id2label

    table = cityscapes.label_id_to_train_id()
    for label_id, label in id2label.items():
        if label_id < 0:
            continue  # license plate: -1, never in a PNG
        expected = label.trainId if 0 <= label.trainId < 255 else 255
        assert table[label_id] == expected, label.name
    assert cityscapes.CLASSES == tuple(l.name for l in sorted(
        (l for l in id2label.values() if 0 <= l.trainId < 255), key=lambda l: l.trainId))
    ids = np.array(CS_IDS * 2, np.uint8)[: 8 * 8].reshape(8, 8)
    root = tmp_path / "cs"
    _save(root / "leftImg8bit/val/x/x_0_0_leftImg8bit.png", np.zeros((8, 8, 3), np.uint8))
    _save(root / "gtFine/val/x/x_0_0_gtFine_labelIds.png", ids)
    _save(root / "leftImg8bit/val/x/x_0_1_leftImg8bit.png", np.zeros((8, 8, 3), np.uint8))
    train_ids = np.array([[0, 18, 255, 7]], np.uint8).repeat(8, 0).repeat(2, 1)
    _save(root / "gtFine/val/x/x_0_1_gtFine_labelTrainIds.png", train_ids)
    val = cityscapes.open_split("val", root)
    label = val[0][1].numpy()
    assert label.dtype == np.int64
    assert (label == np.vectorize(lambda v: table[int(v)])(ids)).all()
    assert set(label[ids <= 6].tolist()) == {255}  # unlabeled .. ground: ignored
    assert (val[1][1].numpy() == train_ids).all()  # train ids as stored, 255 stays 255


def test_ade20k_zero_is_ignored_and_classes_shift_down(tmp_path):
    values = np.arange(151, dtype=np.uint8)
    label = np.concatenate([values, values[:9]]).reshape(16, 10)
    base = tmp_path / "ADEChallengeData2016"
    _save(base / "images/validation/a.jpg", np.zeros((16, 10, 3), np.uint8))
    _save(base / "annotations/validation/a.png", label)
    got = ade20k.open_split("val", tmp_path)[0][1].numpy()
    expected = np.where(label == 0, 255, label.astype(np.int64) - 1)
    assert (got == expected).all() and got[got != 255].max() == 149 and (got == 255).sum() == 2
    assert len(ade20k.CLASSES) == len(set(ade20k.CLASSES)) == 150


# --------------------------------------------------------------------------- protocol and loader
def _local_model(num_classes: int):
    """A Segmenter whose output at a pixel depends on that pixel only: 1x1 patches, no
    position embedding, attention output zeroed; so windows must agree with the whole image."""
    from methods.segmenter import build_model

    model = build_model(num_classes, "tiny", patch_size=1, depth=1, embed_dim=16, num_heads=1, img_size=8)
    with torch.no_grad():
        model.pos_embed.zero_()
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
    return model.eval()


@pytest.mark.parametrize("stride", [8, 4])  # windows tiling the image; overlapping windows
def test_sliding_windows_equal_the_whole_image_on_a_cityscapes_shaped_image(tmp_path, stride):
    from bench.flops import FlopModel
    from methods.encoder import Policy

    torch.set_num_threads(1)
    root = make_cityscapes(tmp_path / "cs", counts={"val": 2}, size=(16, 32), train_ids_splits=())
    val = cityscapes.open_split("val", root)
    model, policy = _local_model(19), Policy()
    whole, slide = EvalSettings("whole"), EvalSettings("slide", window=8, stride=stride, batch_size=5)
    images = torch.stack([val[i][0] for i in range(2)])
    a, b = predict(model, policy, images, whole).logits, predict(model, policy, images, slide).logits
    assert torch.allclose(a, b, atol=1e-5)
    flops = FlopModel(model, policy)
    ra = evaluate(model, policy, val, whole, flops, num_classes=19)
    rb = evaluate(model, policy, val, slide, flops, num_classes=19)
    assert ra["miou"] == rb["miou"]
    assert np.array_equal(np.nan_to_num(ra["per_class_iou"], nan=-1), np.nan_to_num(rb["per_class_iou"], nan=-1))


def test_file_augment_draws_and_crops_like_train_augment(tmp_path):
    root = make_cityscapes(tmp_path / "cs", counts={"train": 1}, size=(64, 128), train_ids_splits=("train",))
    ds = cityscapes.open_split("train", root)
    image, label = ds[0]
    for seed, crop, scales in [(0, 32, (0.5, 2.0)), (1, 48, (0.5, 2.0)), (2, 96, (0.5, 0.75)), (3, 40, (1.3, 1.7))]:
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        ref_img, ref_lab = augment(image, label, crop, scales, g1)
        img, lab = ds.augment(image, label, crop, scales, g2)
        assert img.shape == ref_img.shape and img.dtype == torch.uint8
        assert (img.int() - ref_img.int()).abs().max() <= 1
        assert torch.equal(lab, ref_lab)
        assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # same draws


def test_items_are_decoded_lazily(tmp_path):
    root = make_cityscapes(tmp_path / "cs", counts={"val": 2})
    val = cityscapes.open_split("val", root)
    assert all(isinstance(p, Path) for item in val.items for p in item[:2])
    next(iter((root / "leftImg8bit" / "val").rglob("*.png"))).write_bytes(b"")  # only noticed when loaded
    with pytest.raises(DataError):
        [val[i] for i in range(len(val))]


def test_datasets_command_lists_roots_counts_problems_and_loader_speed(tmp_path, capsys, small):
    make_cityscapes(tmp_path / "cityscapes", counts={"train": 4, "val": 2, "test": 1})
    main(["datasets", "--data-root", str(tmp_path / "cityscapes"), "--dataset", "cityscapes", "--speed", "--batches", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["cityscapes", "found", str(tmp_path / "cityscapes")]
    assert "train 4, val 2, test 1" in lines[0] and "(--data-root)" in lines[0]
    assert "training loader:" in lines[1] and "images/s" in lines[1] and "(4 images in 2 batches of 2" in lines[1]

    make_ade20k(tmp_path / "ade")
    (tmp_path / "ade/ADEChallengeData2016/annotations/training/ADE_train_00000002.png").unlink()
    main(["datasets", "--data-root", str(tmp_path / "ade")])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if not line.startswith(" ")}
    assert set(rows) == {"synthetic", "cityscapes", "ade20k", "idd-lite", "folder"}
    assert rows["ade20k"].split()[1] == "missing"
    assert "ADE_train_00000002.jpg has no annotation" in out
    assert "folder: " in out and "classes.txt" in out


def test_loader_speed_reports_images_per_second(tmp_path, small, monkeypatch):
    root = make_folder(tmp_path / "f", config=SMALL)
    monkeypatch.setenv("BENCH_WORKERS", "1")
    r = datasets.loader_speed("folder", str(root), batches=3)
    assert r["images"] == 3 * 2 and r["workers"] == 1 and r["images_per_s"] > 0 and r["crop_size"] == 32
    rank0 = datasets.loader_speed("folder", str(root), batches=3, ranks=2)  # its slot of each batch of 2
    assert rank0["images"] == 3 and rank0["ranks"] == 2 and rank0["steps_per_s"] > 0
    with pytest.raises(BenchError, match="divides the batch of 2"):
        datasets.loader_speed("folder", str(root), batches=3, ranks=3)


# --------------------------------------------------------------------------- bad input
def _break(kind: str, tmp_path: Path) -> tuple[str, Path, list]:
    """A tree with one defect: (dataset, root, words the error must contain)."""
    cs = tmp_path / "cs"
    if kind == "missing root":
        return "cityscapes", tmp_path / "nowhere", [str(tmp_path / "nowhere"), "not found", "leftImg8bit"]
    if kind == "empty split":
        make_cityscapes(cs)
        for p in (cs / "leftImg8bit" / "val").rglob("*.png"):
            p.unlink()
        for p in (cs / "gtFine" / "val").rglob("*.png"):
            p.unlink()
        return "cityscapes", cs, [str(cs / "leftImg8bit" / "val"), "no images"]
    if kind == "image without label":
        make_cityscapes(cs)
        label = next((cs / "gtFine" / "val").rglob("*_labelTrainIds.png"))
        label.unlink()
        image = cs / "leftImg8bit" / "val" / label.parent.name / label.name.replace("_gtFine_labelTrainIds", "_leftImg8bit")
        return "cityscapes", cs, [str(image), "has no label"]
    if kind == "label without image":
        make_ade20k(tmp_path)
        image = tmp_path / "ADEChallengeData2016/images/training/ADE_train_00000003.jpg"
        image.unlink()
        return "ade20k", tmp_path, [str(image.with_suffix(".png")).replace("images", "annotations"), "has no image"]
    # defects in training images: the tree has 2, so step 0 (a batch of 2) meets them
    if kind == "unreadable image":
        make_folder(cs, config=SMALL, counts={"train": 2, "val": 2})
        bad = cs / "images" / "train" / "img1.png"
        bad.write_bytes(b"this is not a png")
        return "folder", cs, [str(bad), "not a readable image"]
    if kind == "truncated image":  # met in a DataLoader worker: still one line
        make_cityscapes(cs, counts={"train": 2, "val": 2})
        bad = sorted((cs / "leftImg8bit" / "train").rglob("*.png"))[1]
        bad.write_bytes(bad.read_bytes()[:-200])
        return "cityscapes", cs, [str(bad), "not a readable image"]
    if kind == "label values":
        make_folder(cs, config=SMALL, counts={"train": 2, "val": 2})
        bad = cs / "labels" / "train" / "img0.png"
        label = np.asarray(Image.open(bad)).copy()
        label[0, :3] = [3, 255, 7]
        _save(bad, label)
        return "folder", cs, [str(bad), "3, 7, 255", "outside the classes", "ignore index 9"]
    if kind == "size mismatch":  # a validation image: met during evaluation
        make_cityscapes(cs)
        bad = sorted((cs / "gtFine" / "val").rglob("*_labelTrainIds.png"))[0]
        _save(bad, np.zeros((32, 64), np.uint8))
        return "cityscapes", cs, [str(bad), "64x32", "128x64", "expected the same size"]
    if kind == "label ids":
        make_cityscapes(cs, counts={"train": 2, "val": 2}, train_ids_splits=())
        bad = sorted((cs / "gtFine" / "train").rglob("*_labelIds.png"))[0]
        _save(bad, np.full((64, 128), 40, np.uint8))
        return "cityscapes", cs, [str(bad), "40", "label ids 0-33"]
    if kind == "no classes file":
        make_folder(cs)
        (cs / "classes.txt").unlink()
        return "folder", cs, [str(cs / "classes.txt"), "not found", "one name per line"]
    if kind == "listed image missing":
        make_folder(cs, config=SMALL)
        (cs / "val.txt").write_text("val_0\nghost\n")
        return "folder", cs, [str(cs / "val.txt"), "'ghost'", "no image"]
    raise AssertionError(kind)


BAD = ["missing root", "empty split", "image without label", "label without image", "unreadable image",
       "truncated image", "label values", "size mismatch", "label ids", "no classes file", "listed image missing"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_line_error_and_stored_results_stay(tmp_path, capsys, small, monkeypatch, kind):
    dataset, root, words = _break(kind, tmp_path)
    if kind == "truncated image":
        monkeypatch.setenv("BENCH_WORKERS", "1")
    stored = tmp_path / "res" / f"{dataset}.jsonl"
    stored.parent.mkdir()
    stored.write_text(json.dumps({"schema_version": 1, "method": "baseline", "knobs": {}, "dataset": dataset,
                                  "split": "val", "checkpoint": "earlier", "miou": 0.5}) + "\n")
    before = stored.read_bytes()
    code, _, err = run_cli(capsys, *_run_args(tmp_path, dataset, root, "--steps", "1"))
    assert_one_line_error(code, err, *words)
    assert code == 2 and err.startswith("error: ")
    assert stored.read_bytes() == before
    assert sorted(p.name for p in stored.parent.iterdir() if not p.name.startswith(".")) == [stored.name]


def test_worker_wrapped_error_keeps_its_one_line_message():
    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n    raise DataError(msg)\n'
               "bench.datasets.files.DataError: /data/a.png: not a readable image (OSError: truncated)\n")
    assert str(DataError(wrapped)) == "/data/a.png: not a readable image (OSError: truncated)"

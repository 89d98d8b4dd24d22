"""IDD-Lite: its official layout on tiny trees made here (reading, root resolution, a run
end to end, every kind of bad input as a one-line error), and the real dataset where a
copy is at hand (skipped otherwise)."""
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import datasets
from bench.cli import main
from bench.datasets import idd_lite
from tests.test_cli import assert_one_line_error, run_cli

REAL_ROOT = Path(os.environ.get("IDD_LITE_DATASET") or Path(__file__).resolve().parents[2] / "shared/data/idd-lite")
VALUES = [0, 1, 2, 3, 4, 5, 6, 255]


def make_idd_lite(root: Path, counts=None, size=(28, 40), nested=True) -> Path:
    """``idd20k_lite/{leftImg8bit,gtFine}/<split>/<sequence>/<frame>_{image.jpg,label.png}``
    (under ``root`` when ``nested``, else ``root`` is the idd20k_lite folder); the image's
    colour follows the label, so a model can learn it."""
    counts = counts or {"train": 4, "val": 2}
    base = root / "idd20k_lite" if nested else root
    for split, n in counts.items():
        for i in range(n):
            rng = np.random.default_rng(i + 10 * len(split))
            grid = rng.choice(VALUES, size=(size[0] // 4 + 1, size[1] // 4 + 1))
            label = np.kron(grid, np.ones((4, 4), int))[: size[0], : size[1]]
            image = np.stack([(label * 37) % 256, (label * 91) % 256, (label * 13) % 256], -1).astype(np.uint8)
            label = label.astype(np.uint8)
            sequence, frame = str(i % 2), f"{i:06d}"
            for path, array, kw in [(base / "leftImg8bit" / split / sequence / f"{frame}_image.jpg", image,
                                     {"quality": 95}),
                                    (base / "gtFine" / split / sequence / f"{frame}_label.png", label, {})]:
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path, **kw)
    return root


@pytest.fixture
def small(monkeypatch):
    """A 32-wide tiny model, crops 16, short side 24, no loader workers."""
    from methods import segmenter

    monkeypatch.setitem(segmenter.PRESETS, "tiny",
                        segmenter.ModelConfig(depth=2, embed_dim=32, num_heads=2, img_size=32))
    spec = datasets.DATASETS["idd-lite"]
    monkeypatch.setitem(datasets.DATASETS, "idd-lite", replace(spec, preset=replace(
        spec.preset, crop_size=16, resize_short=24, batch_size=2, steps=2)))
    monkeypatch.setenv("BENCH_WORKERS", "0")
    monkeypatch.delenv("IDD_LITE_DATASET", raising=False)


def _run_args(tmp_path, root, *extra):
    return ["run", "--dataset", "idd-lite", "--data-root", str(root), "--depth", "1", "--steps", "2",
            "--limit", "2", "--timing-images", "2", "--repeats", "1", "--batch-size", "2", "--threads", "1",
            "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"), "--quiet", *extra]


# --------------------------------------------------------------------------- layout
@pytest.mark.parametrize("nested", [True, False])
def test_reads_the_official_layout_from_either_root(tmp_path, nested):
    root = make_idd_lite(tmp_path / "idd", counts={"train": 3, "val": 2}, nested=nested)
    if not nested:
        assert not (root / "idd20k_lite").exists()
    assert idd_lite.count_splits(root) == {"train": 3, "val": 2}
    val = idd_lite.open_split("val", root)
    image, label = val[1]
    assert image.shape == (3, 28, 40) and label.shape == (28, 40) and label.dtype == torch.int64
    stored = np.asarray(Image.open(root / ("idd20k_lite" if nested else "") / "gtFine/val/1/000001_label.png"))
    assert (label.numpy() == stored).all()  # level-1 ids used as they are, 255 stays void
    assert set(np.unique(stored)) <= set(VALUES) and 255 in stored and 6 in stored
    assert val.classes == list(idd_lite.CLASSES) and len(val.palette) == 7
    assert [p.name for p, _, _ in val.items] == ["000000_image.jpg", "000001_image.jpg"]


def test_registered_with_its_classes_and_root_order(tmp_path, monkeypatch):
    spec = datasets.get_spec("idd-lite")
    assert spec.classes == ("drivable", "non-drivable", "living thing", "vehicle", "roadside object",
                            "far object", "sky")
    monkeypatch.delenv("IDD_LITE_DATASET", raising=False)
    assert spec.root() == Path("data/idd-lite")
    monkeypatch.setenv("IDD_LITE_DATASET", str(tmp_path / "env"))
    assert spec.root() == tmp_path / "env"
    assert spec.root(str(tmp_path / "opt")) == tmp_path / "opt"  # --data-root wins


def test_preset_is_cpu_sized_whole_image_on_the_tiny_model():
    from methods.segmenter import PRESETS

    p = datasets.get_spec("idd-lite").preset
    assert p.model == "tiny" and PRESETS["tiny"].patch_size == 8 and p.decoder == "linear"
    assert p.eval_mode == "whole" and p.resize_short == 160 and p.crop_size <= p.resize_short
    assert p.optimizer == "adamw" and p.steps == datasets.get_spec("synthetic").preset.steps


def test_datasets_command_lists_it_with_counts(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IDD_LITE_DATASET", raising=False)
    make_idd_lite(tmp_path / "idd", counts={"train": 3, "val": 1})
    main(["datasets", "--data-root", str(tmp_path / "idd"), "--dataset", "idd-lite"])
    line = capsys.readouterr().out.splitlines()[0]
    assert line.split()[:3] == ["idd-lite", "found", str(tmp_path / "idd")]
    assert "train 3, val 1" in line and "(--data-root)" in line
    main(["datasets", "--data-root", str(tmp_path / "nowhere")])
    out = capsys.readouterr().out
    assert "idd-lite   missing" in out and "idd20k_lite/leftImg8bit/<split>/<sequence>/*_image.jpg" in out


def test_run_end_to_end(tmp_path, small):
    root = make_idd_lite(tmp_path / "idd")
    main(_run_args(tmp_path, root))
    (r,) = [json.loads(l) for l in (tmp_path / "res" / "idd-lite.jsonl").read_text().splitlines()]
    assert r["dataset"] == "idd-lite" and r["split"] == "val" and r["images"] == 2 and r["model"] == "tiny"
    assert list(r["per_class_iou"]) == list(idd_lite.CLASSES)
    assert r["eval"] == {"mode": "whole", "window": None, "stride": None, "scale": 1.0}
    assert 0 <= r["miou"] <= 1 and r["gflops"]["mean"] > 0


# --------------------------------------------------------------------------- bad input
def _break(kind: str, tmp_path: Path) -> tuple[Path, list]:
    """A tree with one defect: (root, words the error must contain)."""
    root = tmp_path / "idd"
    if kind == "missing root":
        return tmp_path / "nowhere", [str(tmp_path / "nowhere"), "not found", "idd20k_lite/leftImg8bit"]
    make_idd_lite(root, counts={"train": 2, "val": 2})
    base = root / "idd20k_lite"
    if kind == "missing split":
        shutil.rmtree(base / "gtFine" / "val")
        return root, [str(base / "gtFine" / "val"), "not found", "$IDD_LITE_DATASET"]
    if kind == "empty split":
        for p in (base / "leftImg8bit" / "val").rglob("*.jpg"):
            p.unlink()
        return root, [str(base / "leftImg8bit" / "val"), "no images", "*_image.jpg"]
    if kind == "image without label":
        label = base / "gtFine/val/1/000001_label.png"
        label.unlink()
        return root, [str(base / "leftImg8bit/val/1/000001_image.jpg"), "has no label", "_label.png"]
    if kind == "label without image":
        (base / "leftImg8bit/train/0/000000_image.jpg").unlink()
        return root, [str(base / "gtFine/train/0/000000_label.png"), "has no image"]
    if kind == "label values":  # a training label: met at step 0
        bad = base / "gtFine/train/1/000001_label.png"
        label = np.asarray(Image.open(bad)).copy()
        label[0, :3] = [7, 100, 7]
        Image.fromarray(label).save(bad)
        return root, [str(bad), "7, 100", "outside the classes", "level-1 ids 0-6 or 255"]
    if kind == "size mismatch":  # a validation label: met during evaluation
        bad = base / "gtFine/val/0/000000_label.png"
        Image.fromarray(np.zeros((14, 20), np.uint8)).save(bad)
        return root, [str(bad), "20x14", "40x28", "expected the same size"]
    if kind == "unreadable image":
        bad = base / "leftImg8bit/train/0/000000_image.jpg"
        bad.write_bytes(b"not a jpeg")
        return root, [str(bad), "not a readable image"]
    raise AssertionError(kind)


BAD = ["missing root", "missing split", "empty split", "image without label", "label without image",
       "label values", "size mismatch", "unreadable image"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_line_error_and_stored_results_stay(tmp_path, capsys, small, kind):
    root, words = _break(kind, tmp_path)
    stored = tmp_path / "res" / "idd-lite.jsonl"
    stored.parent.mkdir()
    stored.write_text(json.dumps({"schema_version": 1, "method": "baseline", "knobs": {}, "dataset": "idd-lite",
                                  "split": "val", "checkpoint": "earlier", "miou": 0.5}) + "\n")
    before = stored.read_bytes()
    code, _, err = run_cli(capsys, *_run_args(tmp_path, root, "--steps", "1"))
    assert_one_line_error(code, err, *words)
    assert code == 2 and err.startswith("error: idd-lite: ")
    assert stored.read_bytes() == before


# --------------------------------------------------------------------------- the real dataset
real = pytest.mark.skipif(not (REAL_ROOT / "idd20k_lite").is_dir() and not (REAL_ROOT / "leftImg8bit").is_dir(),
                          reason=f"IDD-Lite not at {REAL_ROOT} (set $IDD_LITE_DATASET)")


@real
def test_real_dataset_has_its_official_counts():
    assert idd_lite.count_splits(REAL_ROOT) == {"train": 1403, "val": 204}


@real
@pytest.mark.parametrize("split", ["train", "val"])
def test_real_images_are_320x227_with_level1_labels(split):
    ds = idd_lite.open_split(split, REAL_ROOT)
    image, label = ds[len(ds) // 2]
    assert image.shape == (3, 227, 320) and label.shape == (227, 320)
    values = set(label.unique().tolist())
    assert values <= set(VALUES) and len(values - {255}) >= 3

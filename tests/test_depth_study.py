"""scripts/depth_study.py: the windowed attention mask means what it says; a study on a
named dataset stores its runs as records and skips the ones stored."""
import importlib.util
import json
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


def test_study_runs_on_a_named_dataset_stores_records_and_skips_what_is_stored(tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    from bench import datasets
    from bench.results import ResultsStore
    from methods import segmenter
    from tests.test_idd_lite import make_idd_lite

    monkeypatch.setitem(segmenter.PRESETS, "tiny", segmenter.ModelConfig(embed_dim=32, num_heads=2, img_size=32))
    spec = datasets.DATASETS["idd-lite"]
    monkeypatch.setitem(datasets.DATASETS, "idd-lite", replace(spec, preset=replace(
        spec.preset, crop_size=16, resize_short=24, batch_size=2)))
    monkeypatch.setenv("BENCH_WORKERS", "0")
    root = make_idd_lite(tmp_path / "idd", counts={"train": 2, "val": 2})
    args = ["--dataset", "idd-lite", "--data-root", str(root), "--depth", "2", "--depth", "1", "--steps", "1",
            "--steps", "2", "--threads", "1", "--checkpoints", str(tmp_path / "ck"), "--out", str(tmp_path / "out")]
    depth_study.main(args)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["steps"], p["depth"]) for p in printed] == [(1, 2), (1, 1), (2, 2), (2, 1)]
    records = ResultsStore(tmp_path / "out").load("idd-lite")
    assert [r["study"] for r in records] == [{k: p[k] for k in ("depth", "steps", "lr", "window")} for p in printed]
    assert all(r["dataset"] == "idd-lite" and r["method"] == "baseline" and r["train"]["steps"] == r["study"]["steps"]
               and list(r["per_class_iou"]) == list(spec.classes) for r in records)
    assert records[0]["gflops"]["mean"] > records[1]["gflops"]["mean"]  # 2 blocks cost more than 1
    assert len(list((tmp_path / "ck" / "idd-lite").glob("*.pt"))) == 4
    assert len(list((tmp_path / "ck" / "idd-lite").glob("*.config.json"))) == 4  # the configuration beside each

    before = (tmp_path / "out" / "idd-lite.jsonl").read_bytes()
    depth_study.main(args)  # all stored: nothing trained, evaluated or appended
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("stored already") == 4
    assert (tmp_path / "out" / "idd-lite.jsonl").read_bytes() == before


def test_study_refuses_windows_on_non_square_images_before_training(tmp_path, capsys):
    import pytest

    from tests.test_idd_lite import make_idd_lite

    root = make_idd_lite(tmp_path / "idd", counts={"train": 1, "val": 1})  # 40x28 images
    with pytest.raises(SystemExit) as exit_info:
        depth_study.main(["--dataset", "idd-lite", "--data-root", str(root), "--window", "1", "--steps", "1",
                          "--checkpoints", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip() == "error: --window needs square images (a square token " \
        "grid); idd-lite's are 40x28"
    assert not (tmp_path / "ck").exists()

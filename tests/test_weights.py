"""--weights: Segmenter checkpoints in bench's, rstrudel/segmenter's and mmsegmentation's
layouts load into the model with identical outputs; what does not fit is one line."""
import json
from pathlib import Path

import pytest
import torch

from bench.weights import load_into, read_weights
from methods.segmenter import ModelConfig, build_model
from tests.test_cli import assert_one_line_error, register_toy, run_cli

SHAPE = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, class_token=True)


def tiny(decoder: str, seed: int = 1, classes: int = 5, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(classes, "tiny", decoder=decoder, decoder_layers=2, **{**SHAPE, **over}).eval()


# ---- test-side writers, from the key names of each project's model code --------------

def as_segmenter(model) -> dict:
    """rstrudel/segmenter (segm/model): Segmenter(encoder=VisionTransformer, decoder) with
    timm's block names; the ViT keeps its 1000-way ImageNet head; train.py saves
    {"model": state_dict, "optimizer", "n_cls", "lr_scheduler", "epoch"}."""
    sd = model.state_dict()
    out = {"encoder.patch_embed.proj.weight": sd["patch_embed.proj.weight"],
           "encoder.patch_embed.proj.bias": sd["patch_embed.proj.bias"],
           "encoder.cls_token": sd["cls_token"], "encoder.pos_embed": sd["pos_embed"]}
    for i in range(model.depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                out[f"encoder.blocks.{i}.{part}.{p}"] = sd[f"blocks.{i}.{part}.{p}"]
    out["encoder.norm.weight"], out["encoder.norm.bias"] = sd["norm.weight"], sd["norm.bias"]
    dim = sd["norm.weight"].shape[0]
    out["encoder.head.weight"], out["encoder.head.bias"] = torch.randn(1000, dim), torch.randn(1000)
    if model.config.decoder == "linear":
        out["decoder.head.weight"], out["decoder.head.bias"] = sd["decoder.head.weight"], sd["decoder.head.bias"]
    else:
        for name in ("proj_dec.weight", "proj_dec.bias", "cls_emb", "proj_patch", "proj_classes",
                     "decoder_norm.weight", "decoder_norm.bias", "mask_norm.weight", "mask_norm.bias"):
            out[f"decoder.{name}"] = sd[f"decoder.{name}"]
        for k, v in sd.items():
            if k.startswith("decoder.blocks."):
                out[k] = v
    return {"model": out, "optimizer": {}, "n_cls": model.num_classes, "lr_scheduler": {}, "epoch": 63}


def _mmseg_layer(sd: dict, ours: str, theirs: str, out: dict) -> None:
    """mmseg's TransformerEncoderLayer: ln1, attn.attn (nn.MultiheadAttention), ln2,
    ffn.layers.0.0 (Linear in a Sequential with the activation) and ffn.layers.1."""
    names = {"ln1": "norm1", "ln2": "norm2", "ffn.layers.0.0": "mlp.fc1", "ffn.layers.1": "mlp.fc2",
             "attn.attn.out_proj": "attn.proj"}
    for mm, timm_name in names.items():
        for p in ("weight", "bias"):
            out[f"{theirs}.{mm}.{p}"] = sd[f"{ours}.{timm_name}.{p}"]
    out[f"{theirs}.attn.attn.in_proj_weight"] = sd[f"{ours}.attn.qkv.weight"]
    out[f"{theirs}.attn.attn.in_proj_bias"] = sd[f"{ours}.attn.qkv.bias"]


def as_mmseg(model) -> dict:
    """mmsegmentation: EncoderDecoder(backbone=VisionTransformer(final_norm=True),
    decode_head=SegmenterMaskTransformerHead | FCNHead(num_convs=0)); saved as
    {"meta", "state_dict"}."""
    sd, C = model.state_dict(), model.num_classes
    out = {"backbone.patch_embed.projection.weight": sd["patch_embed.proj.weight"],
           "backbone.patch_embed.projection.bias": sd["patch_embed.proj.bias"],
           "backbone.cls_token": sd["cls_token"], "backbone.pos_embed": sd["pos_embed"],
           "backbone.ln1.weight": sd["norm.weight"], "backbone.ln1.bias": sd["norm.bias"]}
    for i in range(model.depth):
        _mmseg_layer(sd, f"blocks.{i}", f"backbone.layers.{i}", out)
    dim = sd["norm.weight"].shape[0]
    if model.config.decoder == "linear":  # conv_seg: a 1x1 conv
        out["decode_head.conv_seg.weight"] = sd["decoder.head.weight"][:, :, None, None]
        out["decode_head.conv_seg.bias"] = sd["decoder.head.bias"]
    else:
        out["decode_head.dec_proj.weight"], out["decode_head.dec_proj.bias"] = (
            sd["decoder.proj_dec.weight"], sd["decoder.proj_dec.bias"])
        out["decode_head.cls_emb"] = sd["decoder.cls_emb"]
        for j in range(model.config.decoder_layers):
            _mmseg_layer(sd, f"decoder.blocks.{j}", f"decode_head.layers.{j}", out)
        # nn.Linear(bias=False) computes x @ W^T: W is our matrix transposed
        out["decode_head.patch_proj.weight"] = sd["decoder.proj_patch"].t().contiguous()
        out["decode_head.classes_proj.weight"] = sd["decoder.proj_classes"].t().contiguous()
        for norm in ("decoder_norm", "mask_norm"):
            for p in ("weight", "bias"):
                out[f"decode_head.{norm}.{p}"] = sd[f"decoder.{norm}.{p}"]
        out["decode_head.conv_seg.weight"] = torch.randn(C, dim, 1, 1)  # BaseDecodeHead's, unused by this head
        out["decode_head.conv_seg.bias"] = torch.randn(C)
    return {"meta": {"CLASSES": list("abcde")[:C]}, "state_dict": out}


def as_bench(model) -> dict:
    from bench.train import weights_hash

    return {"model": model.state_dict(), "step": 4, "done": True, "config": {"hash": "x"},
            "weights": weights_hash(model)}


WRITERS = {"segmenter": as_segmenter, "mmseg": as_mmseg, "bench": as_bench}


@pytest.mark.parametrize("fmt", ["segmenter", "mmseg", "bench"])
@pytest.mark.parametrize("decoder", ["mask", "linear"])
def test_each_layout_round_trips_to_identical_outputs(tmp_path, fmt, decoder):
    source = tiny(decoder)
    path = tmp_path / "w.pth"
    torch.save(WRITERS[fmt](source), path)
    imported = read_weights(path)
    assert imported.format == fmt
    assert imported.shape["num_classes"] == 5 and imported.shape["depth"] == 2 and imported.shape["decoder"] == decoder
    target = tiny(decoder, seed=2)
    assert not torch.equal(target.pos_embed, source.pos_embed)
    weights = load_into(target, imported, preset="tiny", dataset="toy")
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(target(images), source(images))
    from bench.train import weights_hash

    assert weights == weights_hash(source)  # the same weights, the same name, whatever the layout


def test_position_embeddings_are_resized_to_the_preset_grid_keeping_the_class_token(tmp_path):
    from timm.layers import resample_abs_pos_embed

    source = tiny("mask", img_size=48)  # a 6x6 grid, the preset's is 4x4
    torch.save(as_mmseg(source), tmp_path / "w.pth")
    target = tiny("mask", seed=2)
    load_into(target, read_weights(tmp_path / "w.pth"), preset="tiny")
    assert torch.equal(target.pos_embed[:, :1], source.pos_embed[:, :1])
    expected = resample_abs_pos_embed(source.pos_embed.detach(), [4, 4], [6, 6], num_prefix_tokens=1)
    assert torch.equal(target.pos_embed.detach(), expected)


def _error(tmp_path, payload_or_bytes, **load):
    path = tmp_path / "w.pth"
    if isinstance(payload_or_bytes, bytes):
        path.write_bytes(payload_or_bytes)
    else:
        torch.save(payload_or_bytes, path)
    from bench.errors import BenchError

    with pytest.raises(BenchError) as e:
        load_into(tiny("mask", seed=2, **load.pop("over", {})), read_weights(path), preset="tiny", **load)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_what_does_not_fit_is_one_line_naming_the_key(tmp_path):
    mm = as_mmseg(tiny("mask"))
    assert "decode_head.cls_emb has 5 classes; toy has 3" in _error(tmp_path, mm, num_classes=3, dataset="toy")
    mm["state_dict"]["backbone.layers.0.extra.weight"] = torch.zeros(1)
    assert "unknown key 'backbone.layers.0.extra.weight'" in _error(tmp_path, mm)
    del mm["state_dict"]["backbone.layers.0.extra.weight"]
    mm["state_dict"]["decode_head.dec_proj.weight"] = torch.zeros(32, 31)
    assert "decode_head.dec_proj.weight has shape (32, 31)" in _error(tmp_path, mm)
    sg = as_segmenter(tiny("mask"))
    assert "encoder.patch_embed.proj.weight gives embed dim 32; --model tiny has 64" in _error(
        tmp_path, sg, over={"embed_dim": 64})
    assert "encoder.blocks.1.norm1.weight gives encoder blocks 2; --model tiny has 3" in _error(
        tmp_path, sg, over={"depth": 3})
    assert "not a readable checkpoint" in _error(tmp_path, b"\x00 not a torch file")
    assert "not a Segmenter checkpoint" in _error(tmp_path, {"something": torch.zeros(1)})


def test_a_bench_checkpoint_changed_after_it_was_written_is_refused(tmp_path):
    payload = as_bench(tiny("mask"))
    payload["model"]["norm.bias"] = payload["model"]["norm.bias"] + 1
    assert "was changed after it was written" in _error(tmp_path, payload)


@pytest.fixture
def toy(monkeypatch):
    return register_toy(monkeypatch, ModelConfig(**{**SHAPE, "depth": 3}))


def test_run_with_imported_weights_fine_tunes_paumer_from_them_and_records_them(tmp_path, toy):
    from bench.cli import main
    from bench.train import load_checkpoint

    source = tiny("linear", depth=3)
    torch.save(as_mmseg(source), tmp_path / "seg.pth")
    args = ["--dataset", "toy", "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"), "--quiet",
            "--timing-images", "2", "--repeats", "1", "--limit", "2", "--weights", str(tmp_path / "seg.pth")]
    main(["run", "--method", "paumer", "--op", "tau=0.5", *args])
    records = [json.loads(l) for l in (tmp_path / "res" / "toy.jsonl").read_text().splitlines()]
    from bench.train import weights_hash

    assert [r["method"] for r in records] == ["paumer"]
    r = records[0]
    assert r["baseline_checkpoint"] == weights_hash(source)
    assert r["baseline_source"]["format"] == "mmseg" and r["baseline_source"]["released"] is None
    # no meta.cfg in the file: mmseg's own numerics, said in the record
    assert r["model_numerics"]["ln_eps"] == {"encoder_blocks": 1e-6, "encoder_norm": 1e-6, "decoder_blocks": 1e-5,
                                             "decoder_norms": 1e-5}
    assert r["model_numerics"]["pos_resize"] == "bicubic"
    ckpts = {p.name.rsplit("-", 2)[0]: load_checkpoint(p) for p in (tmp_path / "ck" / "toy").glob("*.pt")}
    assert sorted(ckpts) == ["baseline-ft", "paumer"]  # the baseline is imported, not trained
    for name in ("paumer", "baseline-ft"):  # both from the imported weights, with the budget rules
        assert ckpts[name]["config"]["init_from"] == weights_hash(source) and ckpts[name]["step"] == 2
    main(["run", "--method", "baseline", *args])
    base = json.loads((tmp_path / "res" / "toy.jsonl").read_text().splitlines()[-1])
    assert base["checkpoint"] == base["baseline_checkpoint"] == weights_hash(source)


def test_cli_errors_are_one_line_with_exit_2(capsys, tmp_path, toy):
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    common = ["--dataset", "toy", "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"), "--quiet"]
    code, _, err = run_cli(capsys, "run", "--weights", str(tmp_path / "bad.pth"), *common)
    assert code == 2
    assert_one_line_error(code, err, "not a readable checkpoint")
    torch.save(as_segmenter(tiny("linear", depth=3, classes=7)), tmp_path / "seven.pth")
    code, _, err = run_cli(capsys, "train", "--weights", str(tmp_path / "seven.pth"), *common[:-4], "--quiet")
    assert code == 2
    assert_one_line_error(code, err, "decoder.head.weight has 7 classes; toy has 5")
    assert not (tmp_path / "res").exists() and not (tmp_path / "ck").exists()


def test_published_numbers_are_data_with_their_source():
    from bench.released import RELEASED, find_released

    assert len({r.key for r in RELEASED}) == len(RELEASED)
    for r in RELEASED:
        assert r.source.startswith("https://") and r.url.startswith("https://") and 0 < r.miou < 100
    tiny_mask = next(r for r in RELEASED if r.name == "Seg-T-Mask/16")
    path = Path("/x/seg_tiny_mask/checkpoint.pth")
    assert find_released(path, "ade20k", "", "vit_tiny", "mask") is tiny_mask
    assert find_released(path, "cityscapes", "", "vit_tiny", "mask") is None
    mm = next(r for r in RELEASED if r.format == "mmseg" and r.model == "vit_tiny")
    name = Path(mm.url.rsplit("/", 1)[1])
    assert find_released(name, "ade20k", "ffcf7509" + "0" * 56, "vit_tiny", "mask") is mm
    assert find_released(name, "ade20k", "0" * 64, "vit_tiny", "mask") is None  # another file under that name


def test_report_draws_the_published_point_of_a_released_baseline_at_its_cost():
    from bench.released import RELEASED
    from bench.report import figure_style, table, tradeoff_figure
    from tests.test_report import full_record

    row = next(r for r in RELEASED if r.name == "Seg-T-Mask/16")
    source = {"format": "segmenter", "released": row.key}
    records = [full_record("baseline", {}, 0.36, 2.0, baseline_source=source),
               full_record("paumer", {"tau": 0.2}, 0.35, 1.5, baseline_source=source)]
    with figure_style() as plt:
        fig = tradeoff_figure(table(records), "toy")
        points = [[(l.get_xdata()[0], l.get_ydata()[0]) for l in ax.get_lines() if l.get_label().startswith("published")]
                  for ax in fig.axes if ax.get_xlabel()]
        plt.close(fig)
        plain = tradeoff_figure(table([full_record("baseline", {}, 0.36, 2.0)]), "toy")
        assert not [l for ax in plain.axes for l in ax.get_lines() if l.get_label().startswith("published")]
        plt.close(plain)
    assert points[0] == [(2.0, 38.1)]  # at the baseline's GFLOPs: ratio 1.0
    assert all(p == [(1.0, 38.1)] for p in points[1:]) and len(points) == 3  # speedup 1.0 at each batch size


def test_speed_times_imported_weights_and_names_them(tmp_path, monkeypatch):
    from bench.speed import SpeedOptions, run_speed
    from bench.train import weights_hash
    from methods import segmenter

    monkeypatch.setitem(segmenter.PRESETS, "tiny", ModelConfig(**{**SHAPE, "depth": 4, "decoder": "mask"}))
    source = tiny("mask", depth=4, classes=7)
    torch.save(as_segmenter(source), tmp_path / "w.pth")
    opts = SpeedOptions(model="tiny", size=32, batch_sizes=[1], methods=["static"], timing_images=2, repeats=1,
                        results=str(tmp_path / "res"), weights=str(tmp_path / "w.pth"))
    records = run_speed(opts)
    assert {r["checkpoint"] for r in records} == {weights_hash(source)}
    assert all(r["eval"]["num_classes"] == 7 for r in records)  # the checkpoint's classes


def test_train_with_imported_weights_trains_nothing_for_the_baseline(capsys, tmp_path, toy):
    from bench.cli import main
    from bench.train import weights_hash

    source = tiny("linear", depth=3)
    torch.save(as_segmenter(source), tmp_path / "w.pth")
    main(["train", "--dataset", "toy", "--checkpoints", str(tmp_path / "ck"), "--quiet", "--weights",
          str(tmp_path / "w.pth")])
    assert f"checkpoint ready: baseline weights {weights_hash(source)} after 0 steps" in capsys.readouterr().out
    assert not (tmp_path / "ck").exists()


def test_weights_take_shape_numerics_and_grid_from_the_files_configuration(tmp_path, toy):
    """--weights goes through bench.loading: variant.yml beside an rstrudel file sets the
    model's numerics, normalisation and trained size in the run's model config."""
    import yaml

    from bench.runspec import RunOptions, _model_config, dataset_spec, train_config

    source = tiny("linear", depth=3, img_size=48)
    (tmp_path / "run").mkdir()
    torch.save(as_segmenter(source), tmp_path / "run" / "checkpoint.pth")
    variant = {"net_kwargs": {"d_model": 32, "n_layers": 3, "n_heads": 2, "patch_size": 8, "image_size": [48, 48],
                              "decoder": {"name": "linear"}, "n_cls": 5, "normalization": "deit"},
               "dataset_kwargs": {"crop_size": 48}}
    (tmp_path / "run" / "variant.yml").write_text(yaml.dump(variant))
    opts = RunOptions(dataset="toy", weights=str(tmp_path / "run" / "checkpoint.pth"))
    cfg = train_config(opts, dataset_spec(opts))
    config = _model_config(cfg)
    assert (config.img_size, config.eps_blocks, config.pos_resize) == (48, 1e-5, "bilinear")
    assert config.mean == (0.485, 0.456, 0.406) and cfg.crop_size == 48
    plain = train_config(RunOptions(dataset="toy"), dataset_spec(RunOptions(dataset="toy")))
    assert "eps_blocks" not in plain.model_overrides and cfg.hash() != plain.hash()


def test_load_segmenter_builds_a_bench_checkpoint_from_its_own_config(tmp_path, capsys):
    import bench

    source = tiny("mask")
    payload = as_bench(source)
    overrides = {k: v for k, v in SHAPE.items() if k != "class_token"}
    payload["config"] = {"model": "tiny", "model_overrides": {**overrides, "decoder": "mask", "decoder_layers": 2},
                         "class_token": True, "num_classes": 5, "hash": "x"}
    torch.save(payload, tmp_path / "w.pt")
    model = bench.load_segmenter(tmp_path / "w.pt")
    assert not model.training and model.config == source.config
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(model(images), source(images))
    assert "bench config" in capsys.readouterr().err

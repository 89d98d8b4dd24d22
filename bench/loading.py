"""``bench.load_segmenter``: a Segmenter built and loaded from any checkpoint bench reads.

Shape and numerics come from the checkpoint's own configuration where it has one:

- rstrudel/segmenter: ``variant.yml`` beside ``checkpoint.pth`` (``net_kwargs``: width,
  depth, heads, patch, trained size, decoder, distillation; ``dataset_kwargs`` /
  ``net_kwargs.normalization``; ``inference_kwargs``: window and stride). Their code's
  numerics: every LayerNorm eps 1e-5, position embeddings resized bilinearly.
- mmsegmentation 1.x: the config text in the checkpoint's ``meta.cfg``, parsed as data
  (``parse_mmseg_cfg``: literals and ``dict(...)`` only, nothing executed). Backbone eps
  from ``norm_cfg`` (1e-6 in Segmenter's configs), the head's LayerNorms its default
  1e-5, ``interpolate_mode`` (bicubic) without antialias, ``data_preprocessor`` mean/std.
- bench: its own training config (preset + overrides), bench's numerics.

Without a configuration the shape is read from the tensors and the heads from the
standard presets (width / 64), with the layout's reference numerics; one line says
which source was used (``CheckpointConfig.source``).
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

from bench.errors import BenchError
from bench.weights import Imported, load_into, read_weights
from methods.segmenter import NUMERICS, PRESETS, ModelConfig, Segmenter, model_config

# the reference code's own numerics, where the file says nothing of them
RSTRUDEL_NUMERICS = dict(eps_blocks=1e-5, eps_norm=1e-5, eps_decoder=1e-5, eps_decoder_norms=1e-5,
                         pos_resize="bilinear")
MMSEG_NUMERICS = dict(eps_blocks=1e-6, eps_norm=1e-6, eps_decoder=1e-5, eps_decoder_norms=1e-5,
                      pos_resize="bicubic")
# rstrudel's segm/data/utils.py STATS
NORMALIZATIONS = {"vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                  "deit": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
MMSEG_POS_RESIZES = {"bicubic": "bicubic", "bilinear": "bilinear"}


@dataclass(frozen=True)
class CheckpointConfig:
    """What a checkpoint says of its model: the config, its classes, the inference window
    and stride it was evaluated with (None: not stated) and where all this was read."""

    config: ModelConfig
    num_classes: int
    source: str  # "variant.yml", "meta.cfg", "bench config" or "presets"
    window: Optional[int] = None
    stride: Optional[int] = None
    crop: Optional[int] = None  # its training crop

    def line(self, imported: Imported) -> str:
        """The one line that says what was read and from where."""
        layout = {"segmenter": "rstrudel/segmenter", "mmseg": "mmsegmentation", "bench": "bench"}[imported.format]
        return (f"{imported.path}: {layout} layout, shape and numerics from {self.source} "
                f"(width {self.config.embed_dim}, {self.config.depth} blocks, {self.config.num_heads} heads, "
                f"{self.config.decoder} decoder, trained at {self.config.img_size}, "
                f"eps {self.config.eps_blocks:g}/{self.config.eps_norm:g}/{self.config.eps_decoder:g}/"
                f"{self.config.eps_decoder_norms:g}, pos_resize {self.config.pos_resize})")


def _fail(path, message: str):
    raise BenchError(f"--weights {path}: {message}")


class _Unsafe(Exception):
    pass


def _literal(node):
    """A config value as data: constants, lists, tuples, dicts, ``dict(k=v)``, negation."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand)
    raise _Unsafe(type(node).__name__)


def parse_mmseg_cfg(text: str) -> dict:
    """mmengine's pretty-printed config (``meta.cfg``) as data: every top-level ``name =
    value`` whose value is a literal; anything else (a name, an expression) is left out.
    Nothing of the file is executed."""
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise ValueError(f"meta.cfg is not a config text ({e.msg}, line {e.lineno})") from None
    out = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                out[stmt.targets[0].id] = _literal(stmt.value)
            except _Unsafe:
                continue
    return out


def _read_variant(path: Path):
    """rstrudel's ``variant.yml``: YAML with ``!!python/tuple`` tags, read without running
    any other tag (a safe loader that knows tuples)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node)))
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as e:
        raise BenchError(f"{path}: not a readable variant.yml ({type(e).__name__}); "
                         "expected the yaml.dump of rstrudel/segmenter's train.py variant") from None


def _square(path, field_name: str, value) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            _fail(path, f"{field_name} is {list(value)}; bench's position grid is square")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(path, f"{field_name} is {value!r}; expected a positive image size")
    return value


def _need(path, layout: str, table: dict, key: str, where: str):
    if not isinstance(table, dict) or key not in table:
        _fail(path, f"{where} has no {key!r}, which a {layout} configuration has")
    return table[key]


def _shape_from_tensors(imported: Imported, numerics: dict, base: Optional[ModelConfig] = None) -> ModelConfig:
    """Shape from the tensors, heads from ``base`` (the ``--model`` preset) or the preset
    of the same width (width / 64); a width no preset has needs the file's configuration."""
    s = imported.shape
    widths = sorted({c.embed_dim for c in PRESETS.values() if c.patch_size == 16})
    preset = base or next((c for c in PRESETS.values() if c.embed_dim == s["embed_dim"] and c.patch_size == 16), None)
    if preset is None:
        where = "variant.yml beside it" if imported.format == "segmenter" else "its configuration (meta.cfg)"
        _fail(imported.path, f"{imported.format} checkpoint without {where}, and "
                             f"{imported.source['patch_embed.proj.weight']} gives width {s['embed_dim']}, which no "
                             f"preset has (widths {', '.join(map(str, widths))}): the number of heads is unknown")
    return replace(preset, embed_dim=s["embed_dim"], depth=s["depth"], patch_size=s["patch_size"],
                   decoder=s["decoder"], decoder_layers=s["decoder_layers"] or 2,
                   img_size=s["grid"] * s["patch_size"], timm_name=None, **_tokens(imported), **numerics)


def _tokens(imported: Imported) -> dict:
    st = imported.state
    return dict(class_token="cls_token" in st, dist_token="dist_token" in st,
                patch_bias=imported.shape["patch_bias"])


def _rstrudel(imported: Imported, base: Optional[ModelConfig] = None) -> CheckpointConfig:
    path, s = imported.path, imported.shape
    variant_path = imported.path.parent / "variant.yml"
    if not variant_path.is_file():
        config = _shape_from_tensors(imported, RSTRUDEL_NUMERICS, base)
        return CheckpointConfig(config, s["num_classes"], "presets (no variant.yml beside the file)")
    variant = _read_variant(variant_path)
    net = _need(path, "rstrudel/segmenter", variant, "net_kwargs", "variant.yml")
    decoder = _need(path, "rstrudel/segmenter", net, "decoder", "variant.yml net_kwargs")
    kind = {"linear": "linear", "mask_transformer": "mask"}.get(decoder.get("name") if isinstance(decoder, dict) else None)
    if kind is None:
        _fail(path, f"variant.yml net_kwargs.decoder.name is {decoder.get('name')!r}; "
                    "expected 'linear' or 'mask_transformer'")
    data = variant.get("dataset_kwargs") or {}
    norm = net.get("normalization", data.get("normalization", "vit"))
    if norm not in NORMALIZATIONS:
        _fail(path, f"variant.yml normalization is {norm!r}; expected one of {', '.join(NORMALIZATIONS)}")
    mean, std = NORMALIZATIONS[norm]
    size = _square(path, "variant.yml net_kwargs.image_size", _need(path, "rstrudel/segmenter", net, "image_size",
                                                                     "variant.yml net_kwargs"))
    config = ModelConfig(
        patch_size=_need(path, "rstrudel/segmenter", net, "patch_size", "variant.yml net_kwargs"),
        embed_dim=_need(path, "rstrudel/segmenter", net, "d_model", "variant.yml net_kwargs"),
        depth=_need(path, "rstrudel/segmenter", net, "n_layers", "variant.yml net_kwargs"),
        num_heads=_need(path, "rstrudel/segmenter", net, "n_heads", "variant.yml net_kwargs"),
        decoder=kind, decoder_layers=decoder.get("n_layers", 2) if kind == "mask" else 2, img_size=size,
        class_token=True, dist_token=bool(net.get("distilled", False)), patch_bias=s["patch_bias"],
        mean=mean, std=std, **RSTRUDEL_NUMERICS)
    inference = variant.get("inference_kwargs") or {}
    return CheckpointConfig(config, net.get("n_cls", s["num_classes"]), "variant.yml",
                            window=inference.get("window_size"), stride=inference.get("window_stride"),
                            crop=data.get("crop_size"))


def _mmseg(imported: Imported, base: Optional[ModelConfig] = None) -> CheckpointConfig:
    path, s = imported.path, imported.shape
    meta = imported.meta or {}
    text = meta.get("cfg", meta.get("config"))  # mmseg 1.x: cfg; 0.x (the 2022 releases): config
    if not isinstance(text, str):
        config = _shape_from_tensors(imported, MMSEG_NUMERICS, base)
        return CheckpointConfig(config, s["num_classes"], "presets (no meta.cfg in the file)")
    try:
        cfg = parse_mmseg_cfg(text)
    except ValueError as e:
        _fail(path, str(e))
    model = _need(path, "mmsegmentation", cfg, "model", "meta.cfg")
    backbone = _need(path, "mmsegmentation", model, "backbone", "meta.cfg model")
    head = _need(path, "mmsegmentation", model, "decode_head", "meta.cfg model")
    if backbone.get("type") != "VisionTransformer":
        _fail(path, f"meta.cfg model.backbone.type is {backbone.get('type')!r}; expected 'VisionTransformer'")
    kinds = {"SegmenterMaskTransformerHead": "mask", "FCNHead": "linear"}
    if head.get("type") not in kinds:
        _fail(path, f"meta.cfg model.decode_head.type is {head.get('type')!r}; "
                    f"expected one of {', '.join(kinds)}")
    if head["type"] == "FCNHead" and head.get("num_convs", 2) != 0:
        _fail(path, f"meta.cfg model.decode_head.num_convs is {head.get('num_convs', 2)}; Segmenter's linear head has 0")
    dim = _need(path, "mmsegmentation", backbone, "embed_dims", "meta.cfg model.backbone")
    if head["type"] == "SegmenterMaskTransformerHead" and head.get("num_heads", dim // 64) != max(1, dim // 64):
        _fail(path, f"meta.cfg model.decode_head.num_heads is {head['num_heads']}; bench's mask decoder has "
                    f"width / 64 = {max(1, dim // 64)}")
    mode = backbone.get("interpolate_mode", "bicubic")
    if mode not in MMSEG_POS_RESIZES:
        _fail(path, f"meta.cfg model.backbone.interpolate_mode is {mode!r}; expected bicubic or bilinear")
    numerics = dict(MMSEG_NUMERICS, pos_resize=MMSEG_POS_RESIZES[mode])
    eps = (backbone.get("norm_cfg") or {}).get("eps")
    if eps is not None:
        numerics.update(eps_blocks=eps, eps_norm=eps)
    head_eps = (head.get("norm_cfg") or {}).get("eps")
    if head_eps is not None:
        numerics.update(eps_decoder=head_eps, eps_decoder_norms=head_eps)
    pre = model.get("data_preprocessor") or cfg.get("data_preprocessor") or cfg.get("img_norm_cfg") or {}
    mean = tuple(v / 255 for v in pre.get("mean", (127.5,) * 3))
    std = tuple(v / 255 for v in pre.get("std", (127.5,) * 3))
    if not pre.get("bgr_to_rgb", pre.get("to_rgb", True)):
        _fail(path, "meta.cfg data_preprocessor has bgr_to_rgb False; bench feeds RGB images")
    config = ModelConfig(
        patch_size=backbone.get("patch_size", 16), embed_dim=dim,
        depth=backbone.get("num_layers", 12), num_heads=backbone.get("num_heads", 12),
        mlp_ratio=backbone.get("mlp_ratio", 4), decoder=kinds[head["type"]],
        decoder_layers=head.get("num_layers", 2), img_size=_square(path, "meta.cfg model.backbone.img_size",
                                                                     backbone.get("img_size", 224)),
        class_token=bool(backbone.get("with_cls_token", True)), patch_bias=s["patch_bias"],
        mean=mean, std=std, **numerics)
    test = model.get("test_cfg") or {}
    window = stride = None
    if test.get("mode") == "slide":
        window = _square(path, "meta.cfg model.test_cfg.crop_size", test.get("crop_size"))
        stride = _square(path, "meta.cfg model.test_cfg.stride", test.get("stride"))
    crop = cfg.get("crop_size")
    return CheckpointConfig(config, head.get("num_classes", s["num_classes"]), "meta.cfg", window=window,
                            stride=stride, crop=_square(path, "meta.cfg crop_size", crop) if crop else None)


def _bench(imported: Imported, base: Optional[ModelConfig] = None) -> CheckpointConfig:
    meta = imported.meta or {}
    try:
        overrides = dict(meta.get("model_overrides") or {})
        if meta.get("class_token"):
            overrides["class_token"] = True
        else:
            overrides.setdefault("class_token", False)
        config = model_config(meta.get("model", "tiny"), **overrides)
    except (TypeError, ValueError) as e:
        _fail(imported.path, f"its bench config does not build a model ({e})")
    return CheckpointConfig(config, meta.get("num_classes", imported.shape["num_classes"]), "bench config",
                            crop=meta.get("crop_size"))


def checkpoint_config(imported: Imported, base: Optional[ModelConfig] = None) -> CheckpointConfig:
    """The model a read checkpoint describes (``read_weights``), from its configuration;
    where it has none, from its tensors and ``base`` (a preset; None: the preset of its width)."""
    ref = {"segmenter": _rstrudel, "mmseg": _mmseg, "bench": _bench}[imported.format](imported, base)
    s, c = imported.shape, ref.config
    checks = [("patch_embed.proj.weight", "width", s["embed_dim"], c.embed_dim),
              ("patch_embed.proj.weight", "patch size", s["patch_size"], c.patch_size),
              ("pos_embed", "encoder blocks", s["depth"], c.depth),
              ("pos_embed", "decoder", s["decoder"], c.decoder),
              ("pos_embed", "trained grid", s["grid"] * s["patch_size"], c.img_size),
              ("pos_embed", "prefix tokens", s["prefix"], c.num_prefix_tokens)]
    for key, what, theirs, ours in checks:
        if theirs != ours:
            _fail(imported.path, f"{imported.source.get(key, key)} gives {what} {theirs}; its {ref.source} says {ours}")
    return ref


_OPTIONS = {f.name for f in fields(ModelConfig)}


def load_segmenter(path, format: Optional[str] = None, **overrides) -> Segmenter:
    """A Segmenter built and loaded from the checkpoint at ``path`` (bench's, rstrudel/
    segmenter's with its ``variant.yml`` beside it, or mmsegmentation 1.x's), in eval
    mode. Its forward takes a normalised batch (B, 3, H, W) (``model.config.mean`` /
    ``std``) and returns logits (B, C, H, W) at input size. ``format`` forces a layout
    (bench, segmenter, mmseg); ``overrides`` replace ModelConfig fields read from the file
    (e.g. ``pos_resize="bicubic_antialias"``). One line on stderr says what was read."""
    unknown = sorted(set(overrides) - _OPTIONS)
    if unknown:
        raise BenchError(f"load_segmenter: unknown model option {unknown[0]!r}; expected ModelConfig fields "
                         f"({', '.join(sorted(_OPTIONS))})")
    imported = read_weights(path, format)
    ref = checkpoint_config(imported)
    try:
        model = Segmenter(ref.num_classes, replace(ref.config, **overrides))
    except (TypeError, ValueError) as e:
        raise BenchError(f"load_segmenter: {e}") from None
    load_into(model, imported, preset=ref.source, num_classes=ref.num_classes, dataset=ref.source)
    print(f"load_segmenter: {ref.line(imported)}", file=sys.stderr)
    return model.eval()


# what --weights reads for a run: ``(path, size, mtime, format)`` -> (Imported, CheckpointConfig, base)
_FILES: dict = {}
# fields the file decides for ``--model``: its shape must be the preset's (``check_fits``)
FILE_DECIDES = ("img_size", "num_heads", "dist_token", "patch_bias", *NUMERICS)


def read_for_preset(path, fmt: Optional[str], preset: str, decoder: Optional[str] = None):
    """``--weights``: the file (``read_weights``) and its configuration for ``--model
    preset``, read once per file. Returns (Imported, CheckpointConfig)."""
    p = Path(path)
    stat = p.stat() if p.is_file() else None
    key = (str(p.resolve()), stat and (stat.st_size, stat.st_mtime_ns), fmt, preset, decoder)
    if key not in _FILES:
        imported = read_weights(path, fmt)
        try:
            base = model_config(preset, **({"decoder": decoder} if decoder else {}))
        except (TypeError, ValueError) as e:
            raise BenchError(str(e)) from None
        _FILES.clear()
        _FILES[key] = (imported, checkpoint_config(imported, base))
    return _FILES[key]


def preset_overrides(path, fmt: Optional[str], preset: str, decoder: Optional[str] = None) -> dict:
    """The ModelConfig overrides that make ``--model preset`` the file's model: its
    trained size (the native grid), heads, prefix tokens, patch bias and numerics, each
    only where it differs from the preset's."""
    _, ref = read_for_preset(path, fmt, preset, decoder)
    base = model_config(preset, **({"decoder": decoder} if decoder else {}))
    return {name: getattr(ref.config, name) for name in FILE_DECIDES
            if getattr(ref.config, name) != getattr(base, name)}


def native_window(path, fmt: Optional[str], preset: str, decoder: Optional[str],
                  window: Optional[int], stride: Optional[int]) -> tuple:
    """The sliding window and stride an imported model is evaluated with: its
    configuration's, else its trained size (stride at most that), else the dataset's."""
    _, ref = read_for_preset(path, fmt, preset, decoder)
    if ref.window:
        return ref.window, ref.stride or ref.window
    size = ref.config.img_size
    return size, min(stride or size, size)

"""``--weights PATH``: a trained Segmenter as the baseline, instead of training one.

Three layouts are read, told apart by their key names (``--weights-format`` forces one):

- ``bench``: a checkpoint bench wrote (``{"model", "step", "config", "weights"}``); its
  stored weights hash is checked as for any checkpoint (``bench.train.load_checkpoint``).
- ``segmenter``: rstrudel/segmenter's ``checkpoint.pth`` (``{"model": state_dict, ...}``,
  ``segm/train.py``). Keys ``encoder.*`` are timm's ViT names (``patch_embed.proj``,
  ``cls_token``, ``pos_embed``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
  ``norm``; the ImageNet head ``encoder.head`` is unused) and ``decoder.*`` are ours
  (mask transformer: ``proj_dec, cls_emb, blocks.*, proj_patch, proj_classes,
  decoder_norm, mask_norm``; linear: ``head``), ``x @ proj`` Parameters as here.
- ``mmseg``: mmsegmentation's (``{"meta", "state_dict"}``). ``backbone.*`` is its
  VisionTransformer: ``patch_embed.projection``, ``layers.i.ln1/ln2``,
  ``attn.attn.in_proj_weight/bias`` and ``attn.attn.out_proj`` (nn.MultiheadAttention:
  the same [q; k; v] row layout as timm's ``qkv``), ``ffn.layers.0.0`` / ``ffn.layers.1``
  (fc1 / fc2) and the final norm ``ln1``. ``decode_head.*`` is either
  SegmenterMaskTransformerHead (``dec_proj, cls_emb, layers.*, decoder_norm,
  mask_norm``; ``patch_proj`` / ``classes_proj`` are ``nn.Linear(bias=False)``, so
  ``W^T`` is our ``x @ proj`` matrix; the base head's ``conv_seg`` is unused) or the
  linear FCNHead with ``num_convs=0`` (``conv_seg``, a 1x1 conv: our ``decoder.head``).

Position embeddings are resized, where the model's grid is not the file's, with the
model's ``pos_resize`` (the prefix tokens' rows kept as they are). DeiT-distilled
encoders (``dist_token``) and mmseg >= 1.2's patch embedding without a bias are read
too. The model's shape (width, depth, patch, decoder and its layers, classes, prefix
tokens, patch bias) is read from the tensors and compared with the model's config;
heads, trained size and numerics come from the file's own configuration
(``bench.loading``). Anything that does not fit is a one-line error naming the first
offending key of the file.

The imported weights are named, as any checkpoint, by the content hash of the model's
state dict after loading (``bench.train.weights_hash``): records carry it as their
``baseline_checkpoint``, and ``baseline_source`` says where it came from.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from bench.errors import BenchError
from methods.segmenter import resize_pos_embed

FORMATS = ("bench", "segmenter", "mmseg")

# keys a layout stores that the model does not use
_UNUSED = {
    "segmenter": re.compile(r"encoder\.head(_dist)?\.(weight|bias)"),  # ViT's (DeiT's two) ImageNet classifiers
    "mmseg": re.compile(r"decode_head\.conv_seg\.(weight|bias)"),  # the mask head's base-class conv, never run
}

_BLOCK = {  # mmseg's layer names -> timm's block names
    "ln1.weight": "norm1.weight", "ln1.bias": "norm1.bias", "ln2.weight": "norm2.weight", "ln2.bias": "norm2.bias",
    "attn.attn.in_proj_weight": "attn.qkv.weight", "attn.attn.in_proj_bias": "attn.qkv.bias",
    "attn.attn.out_proj.weight": "attn.proj.weight", "attn.attn.out_proj.bias": "attn.proj.bias",
    "ffn.layers.0.0.weight": "mlp.fc1.weight", "ffn.layers.0.0.bias": "mlp.fc1.bias",
    "ffn.layers.1.weight": "mlp.fc2.weight", "ffn.layers.1.bias": "mlp.fc2.bias",
}
_MMSEG_TOP = {
    "backbone.patch_embed.projection.weight": "patch_embed.proj.weight",
    "backbone.patch_embed.projection.bias": "patch_embed.proj.bias",
    "backbone.cls_token": "cls_token", "backbone.pos_embed": "pos_embed",
    "backbone.ln1.weight": "norm.weight", "backbone.ln1.bias": "norm.bias",
    "decode_head.dec_proj.weight": "decoder.proj_dec.weight", "decode_head.dec_proj.bias": "decoder.proj_dec.bias",
    "decode_head.cls_emb": "decoder.cls_emb",
    "decode_head.decoder_norm.weight": "decoder.decoder_norm.weight",
    "decode_head.decoder_norm.bias": "decoder.decoder_norm.bias",
    "decode_head.mask_norm.weight": "decoder.mask_norm.weight", "decode_head.mask_norm.bias": "decoder.mask_norm.bias",
    "decode_head.patch_proj.weight": "decoder.proj_patch", "decode_head.classes_proj.weight": "decoder.proj_classes",
}
_TRANSPOSED = ("decode_head.patch_proj.weight", "decode_head.classes_proj.weight")  # nn.Linear(bias=False): W^T


@dataclass
class Imported:
    """Weights read from a file, in bench's names. ``source[k]``: the file's key of ``k``."""

    path: Path
    format: str
    state: dict
    source: dict
    sha256: str
    shape: dict = field(default_factory=dict)  # read from the tensors (``infer_shape``)
    meta: Optional[dict] = None  # the file's own configuration: mmseg's ``meta``, bench's ``config``

    def describe(self, released: Optional[str] = None) -> dict:
        """What records store as ``baseline_source``."""
        return {"path": str(self.path), "file": self.path.name, "format": self.format, "sha256": self.sha256,
                "released": released}


def _fail(path, message: str):
    raise BenchError(f"--weights {path}: {message}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def detect_format(payload) -> Optional[str]:
    """The layout of a loaded file by its key names, or None."""
    if not isinstance(payload, dict):
        return None
    if {"model", "step", "config"} <= payload.keys():
        return "bench"
    state = payload.get("state_dict", payload.get("model", payload))
    keys = [k for k in state if isinstance(k, str)] if isinstance(state, dict) else []
    if any(k.startswith("backbone.") for k in keys) or any(k.startswith("decode_head.") for k in keys):
        return "mmseg"
    if any(k.startswith("encoder.") for k in keys):
        return "segmenter"
    return None


def _state_of(payload, fmt: str, path) -> dict:
    """The state dict inside a file's wrapper (rstrudel: ``model``; mmseg: ``state_dict``)."""
    wrapper = {"segmenter": "model", "mmseg": "state_dict"}[fmt]
    state = payload.get(wrapper, payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not state:
        _fail(path, f"holds no state dict (expected a {fmt} checkpoint with its weights under '{wrapper}')")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            _fail(path, f"entry {k!r} of its state dict is not a named tensor")
    return state


def convert(state: dict, fmt: str, path="weights") -> tuple[dict, dict]:
    """A file's state dict in bench's names: (bench key -> tensor, bench key -> file key).
    A key that the layout does not have is an error naming it."""
    ours, source = {}, {}
    unused = _UNUSED.get(fmt)
    if fmt == "mmseg" and "decode_head.dec_proj.weight" not in state:
        unused = None  # the linear head: conv_seg is the classifier
    for key, value in state.items():
        if unused is not None and unused.fullmatch(key):
            continue
        name = None
        if fmt == "segmenter":
            if key.startswith("encoder."):
                name = key[len("encoder."):]
            elif key.startswith("decoder."):
                name = key
            if name is not None and name.startswith("head"):  # ImageNet heads: not a segmenter's
                name = None
        elif fmt == "mmseg":
            name = _MMSEG_TOP.get(key)
            m = re.fullmatch(r"(backbone|decode_head)\.layers\.(\d+)\.(.+)", key)
            if m and m[3] in _BLOCK:
                name = f"{'blocks' if m[1] == 'backbone' else 'decoder.blocks'}.{m[2]}.{_BLOCK[m[3]]}"
            if key in _TRANSPOSED and value.dim() == 2:
                value = value.t()
            if key in ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias"):
                name = "decoder.head." + key.rsplit(".", 1)[1]
                value = value.flatten(1) if value.dim() == 4 else value  # 1x1 conv (C, D, 1, 1) -> (C, D)
        if name is None:
            _fail(path, f"unknown key {key!r} for a {fmt} checkpoint of Segmenter")
        ours[name], source[name] = value, key
    return ours, source


def infer_shape(state: dict, source: dict, path="weights") -> dict:
    """The model's shape from the tensors (bench names): embed_dim, patch_size, depth,
    decoder, decoder_layers, num_classes, grid (pos_embed side) and prefix tokens."""
    def get(name):
        if name not in state:
            _fail(path, f"lacks {name!r} (bench's name), which a Segmenter checkpoint has")
        return state[name]

    patch = get("patch_embed.proj.weight")
    if patch.dim() != 4 or patch.shape[1] != 3 or patch.shape[2] != patch.shape[3]:
        _fail(path, f"{source['patch_embed.proj.weight']} has shape {tuple(patch.shape)}, expected (D, 3, p, p)")
    dim = patch.shape[0]
    depth = 1 + max((int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    shape = {"embed_dim": dim, "patch_size": patch.shape[-1], "depth": depth}
    if "decoder.head.weight" in state:
        shape.update(decoder="linear", decoder_layers=None, num_classes=state["decoder.head.weight"].shape[0])
    elif "decoder.cls_emb" in state:
        cls_emb = state["decoder.cls_emb"]
        layers = 1 + max((int(m[1]) for k in state if (m := re.match(r"decoder\.blocks\.(\d+)\.", k))), default=-1)
        shape.update(decoder="mask", decoder_layers=layers, num_classes=cls_emb.shape[1] if cls_emb.dim() == 3 else -1)
    else:
        _fail(path, "has no decoder weights (expected a linear head or a mask transformer's class embeddings)")
    if "dist_token" in state and "cls_token" not in state:
        _fail(path, f"{source['dist_token']} without a class token; expected DeiT's [class, distillation] tokens")
    pos = get("pos_embed")
    prefix = int("cls_token" in state) + int("dist_token" in state)
    cells = pos.shape[1] - prefix if pos.dim() == 3 else -1
    side = math.isqrt(max(cells, 0))
    if pos.dim() != 3 or pos.shape[-1] != dim or side * side != cells:
        _fail(path, f"{source['pos_embed']} has shape {tuple(pos.shape)}, expected (1, {prefix} + a square grid, {dim})")
    shape.update(grid=side, prefix=prefix, patch_bias="patch_embed.proj.bias" in state)
    return shape


def read_weights(path, fmt: Optional[str] = None) -> Imported:
    """Reads ``path`` in layout ``fmt`` (None: detected) and converts it to bench's names."""
    from bench.train import load_checkpoint

    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise BenchError(f"--weights-format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if path.is_dir():
        _fail(path, "is a folder; expected a checkpoint file (.pt/.pth) in it, e.g. checkpoint.pth")
    if not path.is_file():
        _fail(path, "no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a torch file, or a pickle that does not load
        _fail(path, f"not a readable checkpoint ({type(e).__name__}); expected a .pt/.pth that torch.save wrote")
    found = detect_format(payload)
    fmt = fmt or found
    if fmt is None:
        keys = list(payload)[:3] if isinstance(payload, dict) else type(payload).__name__
        _fail(path, f"not a Segmenter checkpoint of bench, rstrudel/segmenter or mmsegmentation (keys {keys}); "
                    "--weights-format names the layout")
    if fmt == "bench":
        checkpoint = load_checkpoint(path)  # refuses weights changed after bench wrote them
        state, source = dict(checkpoint["model"]), {k: k for k in checkpoint["model"]}
        meta = checkpoint.get("config")
    else:
        state, source = convert(_state_of(payload, fmt, path), fmt, path)
        meta = payload.get("meta") if fmt == "mmseg" and isinstance(payload.get("meta"), dict) else None
    imported = Imported(path, fmt, state, source, file_sha256(path), meta=meta)
    imported.shape = infer_shape(state, source, path)
    return imported


def _first_source(imported: Imported, names) -> str:
    return next((imported.source[n] for n in names if n in imported.source), "?")


def check_fits(imported: Imported, config, preset: str, num_classes: int, dataset: str) -> None:
    """The imported shape against the preset's ``config`` and the dataset's classes."""
    s, c, src = imported.shape, config, imported.source
    if s["num_classes"] != num_classes:
        key = src.get("decoder.head.weight") or src.get("decoder.cls_emb")
        _fail(imported.path, f"{key} has {s['num_classes']} classes; {dataset} has {num_classes}")
    checks = [
        (("patch_embed.proj.weight",), "embed dim", s["embed_dim"], c.embed_dim),
        (("patch_embed.proj.weight",), "patch size", s["patch_size"], c.patch_size),
        # the first block too many, or the last one there is
        ((f"blocks.{c.depth if s['depth'] > c.depth else s['depth'] - 1}.norm1.weight",), "encoder blocks",
         s["depth"], c.depth),
        (("decoder.head.weight", "decoder.cls_emb"), "decoder", s["decoder"], c.decoder),
        (("cls_token", "pos_embed"), "class token", "cls_token" in imported.state, bool(c.class_token)),
        (("dist_token", "pos_embed"), "distillation token", "dist_token" in imported.state,
         bool(getattr(c, "dist_token", False))),
        (("patch_embed.proj.weight",), "patch-embedding bias", s["patch_bias"], getattr(c, "patch_bias", True)),
    ]
    if s["decoder"] == "mask" and c.decoder == "mask":
        layer = c.decoder_layers if s["decoder_layers"] > c.decoder_layers else s["decoder_layers"] - 1
        checks.append(((f"decoder.blocks.{layer}.norm1.weight",),
                       "decoder layers", s["decoder_layers"], c.decoder_layers))
    for names, what, theirs, ours in checks:
        if theirs != ours:
            _fail(imported.path, f"{_first_source(imported, names)} gives {what} {theirs}; "
                                 f"--model {preset} has {ours}")


def load_into(model, imported: Imported, *, preset: str = "?", num_classes: Optional[int] = None,
              dataset: str = "the dataset") -> str:
    """Copies ``imported`` into ``model`` (position embeddings resized to its grid);
    returns the weights hash that names them."""
    from bench.train import weights_hash

    check_fits(imported, model.config, preset, model.num_classes if num_classes is None else num_classes, dataset)
    state = dict(imported.state)
    pos = state["pos_embed"]
    prefix = imported.shape["prefix"]
    if list(pos.shape) != list(model.pos_embed.shape):  # a grid other than the file's: said by the caller
        side = imported.shape["grid"]
        state["pos_embed"] = resize_pos_embed(pos.float(), model.base_grid, (side, side), prefix,
                                              model.config.pos_resize).to(pos.dtype)
    ours = model.state_dict()
    for name, value in state.items():
        if name not in ours:
            _fail(imported.path, f"unknown key {imported.source.get(name, name)!r} for --model {preset}")
        if tuple(value.shape) != tuple(ours[name].shape):
            _fail(imported.path, f"{imported.source.get(name, name)} has shape {tuple(value.shape)}; "
                                 f"--model {preset} expects {tuple(ours[name].shape)}")
    missing = [k for k in ours if k not in state]
    if missing:
        _fail(imported.path, f"lacks {missing[0]!r} (bench's name), which --model {preset} has")
    for name, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            _fail(imported.path, f"{imported.source.get(name, name)} holds NaN or infinite values")
    model.load_state_dict({k: v.to(ours[k].dtype) for k, v in state.items()})
    return weights_hash(model)

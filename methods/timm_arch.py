"""timm ViT architectures by name: ``--model timm:<name>``.

``timm_config("deit_small_patch16_224")`` reads the architecture's shape (width, depth,
heads, MLP ratio, patch and image size, class token) from timm's own registry, building
the model on the ``meta`` device (no weights are allocated), and returns the
``ModelConfig`` of a Segmenter whose encoder has that shape. The dataset still chooses
the decoder and the classes. ``timm_name`` is the name, so ``--pretrained`` fetches that
architecture's ImageNet weights (``load_imagenet_weights``).

Supported: timm's plain ``VisionTransformer`` (pre-norm ``Block`` with qkv bias, GELU
MLP, class token on or off, learnt position embeddings that include the class token's
row). An architecture with anything the Segmenter encoder does not build (register or
distillation tokens, layer scale, q/k norm, a pre-norm, another block) is refused with
one line naming it.
"""
from __future__ import annotations

import difflib
import functools

import torch
from torch import nn

TIMM_PREFIX = "timm:"


def unsupported_vit(vit: nn.Module) -> list[str]:
    """What the Segmenter encoder cannot build of a timm VisionTransformer (empty: none)."""
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(vit, VisionTransformer):
        return [f"it is a {type(vit).__name__}, not a timm VisionTransformer"]
    problems = []
    if getattr(vit, "dist_token", None) is not None:
        problems.append("a distillation token")
    if getattr(vit, "reg_token", None) is not None:
        problems.append("register tokens")
    if vit.no_embed_class or vit.pos_embed is None:
        problems.append("position embeddings without the class token's row")
    if not isinstance(vit.norm_pre, nn.Identity):
        problems.append("a pre-norm (norm_pre)")
    blocks = list(vit.blocks)
    if any(type(b) is not Block or type(b.attn) is not Attention for b in blocks):
        problems.append("blocks other than timm's vision_transformer.Block")
    else:
        b = blocks[0]
        if not isinstance(b.ls1, nn.Identity):
            problems.append("layer scale")
        if not isinstance(b.attn.q_norm, nn.Identity) or not isinstance(b.attn.norm, nn.Identity):
            problems.append("q/k or attention norms")
        if b.attn.qkv.bias is None:
            problems.append("qkv without bias")
        if type(b.mlp) is not Mlp or not isinstance(b.mlp.act, nn.GELU):
            problems.append("an MLP other than Linear-GELU-Linear")
    return problems


def close_timm_names(name: str, count: int = 3) -> list[str]:
    """The registered timm model names closest to ``name`` (its pretrained tag ignored)."""
    import timm

    return difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=count, cutoff=0.5)


def timm_architecture(name: str) -> nn.Module:
    """timm's model ``name`` built on the meta device (shapes only); ValueError with the
    closest names when timm does not know it."""
    import timm

    arch = name.split(".")[0]  # "vit_base_patch16_384.augreg_in21k_ft_in1k": the tag names weights only
    if not timm.is_model(arch):
        close = close_timm_names(name)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('vit_*')"
        raise ValueError(f"unknown timm model {name!r}{hint}")
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False)


@functools.lru_cache(maxsize=None)
def timm_config(name: str):
    """The ``ModelConfig`` of a Segmenter whose encoder is timm's architecture ``name``."""
    from methods.segmenter import ModelConfig

    vit = timm_architecture(name)
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"timm model {name!r} is a {type(vit).__name__}, not a VisionTransformer; "
                         "--model timm:<name> takes timm ViTs (e.g. vit_base_patch16_384, deit_small_patch16_224)")
    problems = unsupported_vit(vit)
    if problems:
        raise ValueError(f"timm model {name!r} has {', '.join(problems)}; --model timm:<name> supports plain "
                         "ViTs (e.g. vit_base_patch16_384, deit_small_patch16_224)")
    ph, pw = vit.patch_embed.patch_size
    ih, iw = vit.patch_embed.img_size
    if ph != pw or ih != iw:
        raise ValueError(f"timm model {name!r} has a {ph}x{pw} patch on a {ih}x{iw} image; "
                         "--model timm:<name> supports square patches and images")
    block = vit.blocks[0]
    dim = vit.embed_dim
    return ModelConfig(patch_size=ph, embed_dim=dim, depth=len(vit.blocks), num_heads=block.attn.num_heads,
                       mlp_ratio=block.mlp.fc1.out_features / dim, decoder="mask", img_size=ih,
                       timm_name=name, class_token=vit.cls_token is not None)

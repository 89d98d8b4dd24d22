"""Segmenter (Strudel et al., ICCV 2021) on timm's ViT blocks.

The network is split where methods plug in: ``embed`` (patch embedding + position
embedding resized to the input), the encoder loop (``methods.encoder.run_encoder``),
and ``decode`` (final norm + linear or mask-transformer decoder, upsampled to pixels).

The class token (``ModelConfig.class_token``): Segmenter carries ViT's class token
through the encoder, where it takes part in attention, and drops it before the decoder.
With ``class_token`` on, so does this model: ``embed`` puts it first (row 0, its
position embedding first too: timm's layout, one prefix token), the encoder state keeps
it apart from the grid tokens (``TokenState.prefix``: no method pauses, exits or merges
it; every block computes it) and the decoder sees the grid only. The ``vit_*`` presets
(Segmenter's shapes, those of its released weights) have it on; ``tiny`` has it off (our
CPU model, and every stored checkpoint and record of it, predate the option; a token
with no grid position buys nothing there). ImageNet weights (``--pretrained``) load the
class token and its position embedding when the model has one, and drop them otherwise.

A DeiT-distilled encoder (``dist_token``, rstrudel's Seg-B†) has a second prefix token
after the class token: P = 2, handled by the encoder loop exactly as the class token.

Numerics (``NUMERICS``): LayerNorm eps per module group, how the position embedding is
resized, and the input normalisation. The defaults are bench's own, which every model
bench trains keeps; checkpoints of other code bring their reference's
(``bench.loading``). A config names them only where they differ from the defaults
(``config_dict``, ``TrainConfig.to_dict``), so no stored hash changes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from methods.encoder import Policy, TokenState, run_encoder


@dataclass(frozen=True)
class ModelConfig:
    patch_size: int = 8
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    decoder: str = "linear"  # "linear" or "mask"
    decoder_layers: int = 2  # mask decoder only
    img_size: int = 128  # position embeddings are learnt on this grid, resized otherwise
    drop_path: float = 0.1
    timm_name: Optional[str] = None  # where ImageNet weights come from (--pretrained)
    class_token: bool = False  # ViT's class token through the encoder (Segmenter's); see the module notes
    dist_token: bool = False  # DeiT's distillation token after the class token (Seg-B†); needs class_token
    patch_bias: bool = True  # the patch embedding's bias (mmseg >= 1.2 trains without one)
    # numerics (NUMERICS): bench's own defaults; imported checkpoints set their reference's
    eps_blocks: float = 1e-6  # LayerNorm eps of the encoder blocks (timm's)
    eps_norm: float = 1e-5  # the encoder's final norm
    eps_decoder: float = 1e-6  # the mask decoder's blocks
    eps_decoder_norms: float = 1e-5  # the mask decoder's decoder_norm and mask_norm
    pos_resize: str = "bicubic_antialias"  # how position embeddings follow the input grid (POS_RESIZES)
    mean: tuple = (0.5, 0.5, 0.5)  # input normalisation: (image / 255 - mean) / std, per RGB channel
    std: tuple = (0.5, 0.5, 0.5)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.dist_token)


# timm's bicubic with antialias (bench's default), rstrudel's bilinear, mmseg's bicubic (both without antialias)
POS_RESIZES = ("bicubic_antialias", "bicubic", "bilinear")
# the ModelConfig fields that say how the network computes, not its shape
NUMERICS = ("eps_blocks", "eps_norm", "eps_decoder", "eps_decoder_norms", "pos_resize", "mean", "std")
DEFAULT_NUMERICS = {f.name: f.default for f in fields(ModelConfig) if f.name in NUMERICS}


def model_numerics(config: ModelConfig) -> dict:
    """What records of an imported model store as ``model_numerics``."""
    return {"ln_eps": {"encoder_blocks": config.eps_blocks, "encoder_norm": config.eps_norm,
                       "decoder_blocks": config.eps_decoder, "decoder_norms": config.eps_decoder_norms},
            "pos_resize": config.pos_resize, "mean": list(config.mean), "std": list(config.std)}


def non_default_numerics(config: ModelConfig) -> dict:
    """The numerics of ``config`` that differ from bench's defaults (what hashes name)."""
    return {k: getattr(config, k) for k in NUMERICS if getattr(config, k) != DEFAULT_NUMERICS[k]}


def resize_pos_embed(pos: Tensor, new_grid, old_grid, prefix: int, mode: str = "bicubic_antialias") -> Tensor:
    """Position embeddings (1, P + gh * gw, D) on ``old_grid`` -> on ``new_grid``; the P
    prefix rows are kept as they are. ``mode``: one of POS_RESIZES."""
    if mode == "bicubic_antialias":  # timm's, exactly as bench always did
        return resample_abs_pos_embed(pos, list(new_grid), list(old_grid), num_prefix_tokens=prefix)
    if mode not in POS_RESIZES:
        raise ValueError(f"unknown pos_resize {mode!r}; expected one of {', '.join(POS_RESIZES)}")
    head, grid = pos[:, :prefix], pos[:, prefix:]
    D = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos.dtype)
    return torch.cat([head, grid], 1)


# Presets are data. `tiny` is our CPU model for `synthetic` (see README: 6 blocks of
# ViT-Ti width on 8x8 patches trains to a useful mIoU in ~15 min on 2 cores), without a
# class token. The vit_* shapes are Segmenter's (patch 16, mask decoder with 2 layers,
# class token).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "vit_tiny": ModelConfig(16, 192, 12, 3, decoder="mask", img_size=512,
                            timm_name="vit_tiny_patch16_384.augreg_in21k_ft_in1k", class_token=True),
    "vit_small": ModelConfig(16, 384, 12, 6, decoder="mask", img_size=512,
                             timm_name="vit_small_patch16_384.augreg_in21k_ft_in1k", class_token=True),
    "vit_base": ModelConfig(16, 768, 12, 12, decoder="mask", img_size=512,
                            timm_name="vit_base_patch16_384.augreg_in21k_ft_in1k", class_token=True),
    # Seg-L's shape, for its released weights (--weights; bench.released)
    "vit_large": ModelConfig(16, 1024, 24, 16, decoder="mask", img_size=512,
                             timm_name="vit_large_patch16_384.augreg_in21k_ft_in1k", class_token=True),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    """A preset's config, or (``timm:<name>``) the encoder shape of timm's ViT ``name``
    (``methods.timm_arch``), with ``overrides``."""
    if preset.startswith("timm:"):
        from methods.timm_arch import timm_config

        base = timm_config(preset[len("timm:"):])
    elif preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; expected one of {', '.join(PRESETS)} "
                         "or timm:<name> (any plain timm ViT)")
    else:
        base = PRESETS[preset]
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


class LinearDecoder(nn.Module):
    """Per-patch linear classifier."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor, size: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Tensor:
        return self.head(x)  # (B, N, D) -> (B, N, C) per token: a row's size or padding changes nothing


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer: class embeddings decoded jointly with the patches;
    masks are scalar products of L2-normalised patch and class features."""

    def __init__(self, dim: int, num_classes: int, layers: int, drop_path: float = 0.0,
                 eps_blocks: float = 1e-6, eps_norms: float = 1e-5):
        super().__init__()
        d_model = dim
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(dim, d_model)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, d_model))
        heads = max(1, d_model // 64)
        self.blocks = nn.ModuleList(
            Block(d_model, heads, 4.0, qkv_bias=True, drop_path=drop_path * i / max(layers - 1, 1),
                  norm_layer=partial(LayerNorm, eps=eps_blocks))
            for i in range(layers)
        )
        scale = d_model**-0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model, eps=eps_norms)
        self.mask_norm = nn.LayerNorm(num_classes, eps=eps_norms)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, x: Tensor, size: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> Tensor:
        """(B, N, D) -> (B, N, C). ``size`` (B, N): how many patches each row stands for
        (merged tokens); attention is then proportional (log size added to the keys'
        logits), so a row weighs as that many copies of it would. ``valid`` (B, N): the
        real rows of a padded batch; padded rows are hidden from attention."""
        x = self.proj_dec(x)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        mask = None
        if size is not None:
            mask = torch.cat([size.log(), size.new_zeros(size.shape[0], self.num_classes)], 1)
            mask = mask.to(x.dtype)[:, None, None, :]
        if valid is not None:
            hidden = torch.cat([~valid, valid.new_zeros(valid.shape[0], self.num_classes)], 1)[:, None, None, :]
            mask = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device) if mask is None else mask
            mask = mask.masked_fill(hidden, float("-inf"))
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        x = self.decoder_norm(x)
        patches, classes = x[:, : -self.num_classes], x[:, -self.num_classes :]
        patches = F.normalize(patches @ self.proj_patch, dim=-1)
        classes = F.normalize(classes @ self.proj_classes, dim=-1)
        return self.mask_norm(patches @ classes.transpose(1, 2))


class Segmenter(nn.Module):
    def __init__(self, num_classes: int, config: ModelConfig = ModelConfig()):
        super().__init__()
        c = config
        if c.img_size % c.patch_size:
            raise ValueError(f"img_size {c.img_size} is not a multiple of patch_size {c.patch_size}")
        if c.dist_token and not c.class_token:
            raise ValueError("dist_token needs class_token (DeiT's tokens are [class, distillation, patches])")
        if c.pos_resize not in POS_RESIZES:
            raise ValueError(f"unknown pos_resize {c.pos_resize!r}; expected one of {', '.join(POS_RESIZES)}")
        self.config = c
        self.num_classes = num_classes
        self.patch_size = c.patch_size
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, 3, c.embed_dim, flatten=False,
                                      output_fmt="NHWC", strict_img_size=False, bias=c.patch_bias)
        self.base_grid = (c.img_size // c.patch_size,) * 2
        self.num_prefix_tokens = c.num_prefix_tokens
        if c.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        if c.dist_token:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.base_grid[0] * self.base_grid[1],
                                                  c.embed_dim))
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=True,
                  drop_path=c.drop_path * i / max(c.depth - 1, 1), norm_layer=partial(LayerNorm, eps=c.eps_blocks))
            for i in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.eps_norm)
        if c.decoder == "linear":
            self.decoder = LinearDecoder(c.embed_dim, num_classes)
        elif c.decoder == "mask":
            self.decoder = MaskTransformer(c.embed_dim, num_classes, c.decoder_layers,
                                           eps_blocks=c.eps_decoder, eps_norms=c.eps_decoder_norms)
        else:
            raise ValueError(f"unknown decoder {c.decoder!r}; expected 'linear' or 'mask'")
        trunc_normal_(self.pos_embed, std=0.02)
        if c.class_token:
            trunc_normal_(self.cls_token, std=0.02)  # as timm's VisionTransformer
        self.apply(_init_weights)
        if c.dist_token:  # drawn after every other init: a model without one draws as before
            trunc_normal_(self.dist_token, std=0.02)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images (B, 3, H, W), H and W multiples of the patch size -> tokens (B, P + N, D):
        the class token first when the model has one (P = ``num_prefix_tokens``), then
        the N grid tokens in row-major order."""
        x = self.patch_embed(images)
        B, gh, gw, D = x.shape
        pos = self.pos_embed
        if (gh, gw) != self.base_grid:  # the prefix's embedding is kept as it is
            pos = resize_pos_embed(pos, (gh, gw), self.base_grid, self.num_prefix_tokens, self.config.pos_resize)
        x = x.reshape(B, gh * gw, D)
        if self.num_prefix_tokens:
            prefix = [self.cls_token] + ([self.dist_token] if self.config.dist_token else [])
            x = torch.cat([t.expand(B, -1, -1) for t in prefix] + [x], dim=1)
        return x + pos, (gh, gw)

    def decode(self, tokens: Tensor, grid: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
        """Full token grid (B, N, D) -> logits (B, C, H, W)."""
        return self._to_pixels(self.decoder(self.norm(tokens)), grid, out_size)

    def decode_rows(self, rows: Tensor, size: Optional[Tensor], source: Tensor, grid: tuple[int, int],
                    out_size: tuple[int, int], valid: Optional[Tensor] = None) -> Tensor:
        """Merged rows (B, n, D), row i of image b standing for ``size[b, i]`` patches (None:
        one each) -> logits (B, C, H, W). The decoder runs on the rows, then every grid
        position takes its row's logits (``source`` (B, N): the row of each position). The
        same output as decoding the unmerged grid, on n rows instead of N. ``valid`` (B, n):
        the real rows when images keep different numbers of rows (padding is ignored)."""
        logits = self.decoder(self.norm(rows), size, valid)
        logits = logits.gather(1, source[..., None].expand(-1, -1, logits.shape[-1]))
        return self._to_pixels(logits, grid, out_size)

    def _to_pixels(self, logits: Tensor, grid: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
        """Per-patch logits (B, N, C) -> upsampled logits (B, C, H, W)."""
        B = logits.shape[0]
        logits = logits.transpose(1, 2).reshape(B, self.num_classes, *grid)
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)

    def forward_state(self, images: Tensor, policy: Optional[Policy] = None,
                      host_trace: bool = True) -> tuple[Tensor, TokenState]:
        """Logits and the encoder's final state (compute trace, where tokens left).
        ``host_trace`` False: the trace stays on the device, unread (no host copy: a
        training forward, which never reads it)."""
        policy = policy or Policy()
        tokens, grid = self.embed(images)
        state = run_encoder(self.blocks, tokens, grid, policy, model=self, prefix=self.num_prefix_tokens)
        decode, out_size = policy.decodes(state), images.shape[-2:]
        if policy.unmerge == "after" and decode is None:  # decode the merged rows, then unmerge
            if state.any_left:  # a host flag: no sync
                raise ValueError("unmerge='after' needs every grid position in an active row")
            size = state.size if getattr(policy, "prop_attn", True) else None  # ALGM's decoder ignores sizes
            logits = self.decode_rows(state.x, size, state.source, grid, out_size, state.valid)
            state.trace.decoder_rows = state.counts()
        elif decode is None:
            logits = self.decode(state.to_grid(), grid, out_size)
        else:
            tokens = state.to_grid()
            B = tokens.shape[0]
            picked = policy.decoded_images(state, decode)  # host list: no boolean-mask indexing
            if len(picked) == B:
                logits = self.decode(tokens, grid, out_size)
            elif picked:  # the others' logits are zeros, in the decoder's dtype (bf16 under autocast)
                index = torch.tensor(picked, device=tokens.device)
                out = self.decode(tokens.index_select(0, index), grid, out_size)
                logits = out.new_zeros(B, *out.shape[1:]).index_copy_(0, index, out)
            else:
                logits = tokens.new_zeros(B, self.num_classes, *out_size)
            state.trace.decoded = decode
        logits = policy.finish(logits, state)
        if host_trace:
            state.trace.to_host()  # the forward's one read of its compute trace
        return logits, state

    def forward(self, images: Tensor, policy: Optional[Policy] = None) -> Tensor:
        return self.forward_state(images, policy, host_trace=False)[0]  # the trace is dropped: never read


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_model(num_classes: int, preset: str = "tiny", pretrained: bool = False, **overrides) -> Segmenter:
    config = model_config(preset, **overrides)
    model = Segmenter(num_classes, config)
    if pretrained:
        load_imagenet_weights(model)
    return model


def load_imagenet_weights(model: Segmenter) -> None:
    """Fetch timm's ImageNet weights for the preset and copy them into the encoder."""
    name = model.config.timm_name
    if name is None:
        raise ValueError("this model preset has no ImageNet weights; use vit_tiny, vit_small, vit_base or timm:<name>")
    import timm

    try:
        source = timm.create_model(name, pretrained=True)
    except Exception as e:  # network, hub or cache problems all end here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"could not load ImageNet weights {name!r} through timm ({first}); "
                           "check the network or the Hugging Face cache, or run without --pretrained") from None
    copy_timm_encoder(model, source)


def copy_timm_encoder(model: Segmenter, vit: nn.Module) -> None:
    """Copy a timm VisionTransformer's patch embedding, blocks and norm into ``model``.
    Position embeddings are resized to the model's grid; the class token and its position
    embedding are copied when the model has a class token, dropped otherwise."""
    state = vit.state_dict()
    prefix = getattr(vit, "num_prefix_tokens", 1)
    pos = state["pos_embed"]
    old = int(math.sqrt(pos.shape[1] - prefix))
    pos = resample_abs_pos_embed(pos, list(model.base_grid), [old, old], num_prefix_tokens=prefix)
    if model.num_prefix_tokens:
        if prefix != model.num_prefix_tokens or "cls_token" not in state:
            raise ValueError(f"timm weights do not fit this preset: they have {prefix} prefix token(s), "
                             f"the model a class token only")
    ours = {
        "pos_embed": pos[:, prefix - model.num_prefix_tokens:],
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    if model.num_prefix_tokens:
        ours["cls_token"] = state["cls_token"]
    for k, v in state.items():
        if k.startswith(("patch_embed.", "blocks.")):
            ours[k] = v
    missing = [k for k in ours if k not in model.state_dict()]
    if missing:
        raise ValueError(f"timm weights do not fit this preset (unexpected {missing[:3]})")
    for k, v in ours.items():
        if model.state_dict()[k].shape != v.shape:
            raise ValueError(f"timm weights do not fit this preset: {k} is {tuple(v.shape)}, "
                             f"model expects {tuple(model.state_dict()[k].shape)}")
    model.load_state_dict(ours, strict=False)


def config_dict(config: ModelConfig) -> dict:
    """The config as a dict; ``class_token``, ``dist_token``, ``patch_bias`` and the
    numerics only where they differ from bench's defaults, so that a model without them
    describes (and hashes) as it did before the options existed."""
    d = asdict(config)
    for name, default in (("class_token", False), ("dist_token", False), ("patch_bias", True),
                          *DEFAULT_NUMERICS.items()):
        if d[name] == default:
            del d[name]
    return d

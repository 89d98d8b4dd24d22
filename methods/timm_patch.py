"""A method applied to a model that is not bench's own: ``bench.patch``.

``patch_model(model, spec, knobs)`` returns a *wrapper*; the model itself is not changed
(no class swap, no new attributes) and the wrapper shares its weights (``.model`` gives
it back; fine-tuning the wrapper trains them).

- A timm ``VisionTransformer`` becomes a ``PatchedViT``: ``forward_features`` and
  ``forward`` keep their signatures and output types. The encoder runs as
  ``methods.encoder.run_encoder`` under the method's policy, on timm's own patch
  embedding, position embedding, blocks, final norm and head (``TimmEncoder``).
  ``output="grid"`` (default) gives every patch position a token, as the unpatched
  model does: a paused or exited token its state when it left, a merged one its row's
  (so ``forward_features`` has the unpatched shape). ``output="rows"`` gives the prefix
  tokens then the active rows, as ToMe's own ``tome.patch.timm`` does (fewer tokens).
- bench's ``Segmenter`` becomes a ``PatchedSegmenter``: ``forward(images)`` -> logits.

Methods with heads (PAUMER, early exit) build them here, untrained; ``bench.fine_tune``
trains them. On a timm ViT the heads predict ``num_classes`` per-patch classes (default:
the model's); early exit's painting of head labels into the segmentation is Segmenter's
(``finish``), so on a timm ViT exited tokens are simply not updated further.
"""
from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.encoder import Policy, TokenState, run_encoder

OUTPUTS = ("grid", "rows")


def is_timm_vit(model) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def check_timm_vit(vit: nn.Module) -> None:
    """ValueError naming what a timm ViT has that the encoder loop cannot run."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    if getattr(vit, "reg_token", None) is not None:
        raise ValueError("bench.patch does not support register tokens; it takes timm ViTs with a class token, "
                         "none, or class + distillation tokens")
    if any(type(b) is not Block or type(b.attn) is not Attention for b in vit.blocks):
        kinds = sorted({type(b).__name__ for b in vit.blocks})
        raise ValueError(f"bench.patch runs timm's vision_transformer.Block with timm's Attention only; "
                         f"this model has {', '.join(kinds)}")
    if vit.pos_embed is None:
        raise ValueError("bench.patch needs learnt position embeddings (pos_embed), this model has none")


class TimmEncoder(nn.Module):
    """A timm VisionTransformer seen as the encoder loop sees a Segmenter: ``blocks``,
    ``depth``, ``embed``, ``config.embed_dim``, ``grid_size``, ``num_prefix_tokens`` (class and
    distillation tokens), ``num_classes`` (of a method's per-patch heads). ``decode`` and
    ``decode_rows`` are the model's tail (final norm, pooling, head), for FLOP pricing."""

    def __init__(self, vit: nn.Module, num_classes: Optional[int] = None):
        super().__init__()
        check_timm_vit(vit)
        self.vit = vit
        self.num_classes = int(num_classes if num_classes is not None else vit.num_classes)
        self.config = SimpleNamespace(embed_dim=vit.embed_dim)
        self.patch_hw = tuple(vit.patch_embed.patch_size)
        self.patch_size = self.patch_hw[0]  # square in every timm ViT preset (labels per patch use it)
        self.num_prefix_tokens = vit.num_prefix_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_hw[0], width // self.patch_hw[1]

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images (B, C, H, W) -> (tokens (B, P + N, D), grid): timm's patch embedding,
        position embedding, patch dropout and pre-norm, as its ``forward_features``."""
        vit = self.vit
        H, W = images.shape[-2:]
        if H % self.patch_hw[0] or W % self.patch_hw[1]:
            raise ValueError(f"input {H}x{W} is not a multiple of the model's {self.patch_hw[0]}x{self.patch_hw[1]} "
                             "patch; resize or pad it")
        grid = self.grid_size(H, W)
        if tuple(vit.patch_embed.grid_size) != grid and not vit.dynamic_img_size:
            ih, iw = vit.patch_embed.img_size
            raise ValueError(f"this model takes {ih}x{iw} inputs, got {H}x{W}; create it with "
                             "dynamic_img_size=True for other sizes")
        pe = vit.patch_embed
        x = pe.norm(pe.proj(images).permute(0, 2, 3, 1))  # (B, gh, gw, D): timm's NHWC
        if not vit.dynamic_img_size:
            x = x.flatten(1, 2)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        return x, grid

    def tail(self, tokens: Tensor, features_only: bool = False) -> Tensor:
        """Prefix + token rows (B, P + n, D) -> the final norm's output, or the head's."""
        x = self.vit.norm(tokens)
        return x if features_only else self.vit.forward_head(x)

    def decode(self, tokens: Tensor, grid, out_size) -> Tensor:
        """The tail on the grid tokens (B, N, D) of one image, its prefix rows zeros."""
        prefix = tokens.new_zeros(tokens.shape[0], self.num_prefix_tokens, tokens.shape[-1])
        return self.tail(torch.cat([prefix, tokens], 1))

    def decode_rows(self, rows: Tensor, size, source, grid, out_size, valid=None) -> Tensor:
        return self.decode(rows, grid, out_size)

    def forward_state(self, images: Tensor, policy: Policy, output: str = "grid",
                      features_only: bool = False) -> tuple[Tensor, TokenState]:
        """The tail's output (the head's, or with ``features_only`` the normed tokens) and
        the encoder's final state, under ``policy``."""
        tokens, grid = self.embed(images)
        P = self.num_prefix_tokens
        state = run_encoder(self.vit.blocks, tokens, grid, policy, model=self, prefix=P)
        if output == "rows":
            if state.any_left or state.valid is not None:
                raise ValueError("output='rows' needs every image to keep all its tokens in the same number of "
                                 "rows (merging only); use output='grid'")
            rows = state.x
            state.trace.decoder_rows = state.counts()
        else:
            rows = state.to_grid()
        joined = rows if state.prefix is None else torch.cat([state.prefix, rows], 1)
        out = self.tail(joined, features_only)
        state.trace.to_host()
        return out, state


def _scaled(images: Tensor, scale: float) -> Tensor:
    if scale == 1.0:
        return images
    return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False,
                         recompute_scale_factor=False)


class _Patched(nn.Module):
    """What both wrappers share: the trainable module (the model, or it with the method's
    heads), the policy, the input scale, and the original model (not a submodule: its
    weights are the trainable's)."""

    def __init__(self, original: nn.Module, trainable: nn.Module, policy: Policy, method: str, knobs: dict,
                 scale: float):
        super().__init__()
        self.trainable = trainable
        self.policy, self.method, self.knobs, self.scale = policy, method, dict(knobs), float(scale)
        self.__dict__["_original"] = original  # kept out of the module tree (no duplicate state-dict keys)

    @property
    def model(self) -> nn.Module:
        """The model that was patched, unchanged (it shares its weights with the wrapper)."""
        return self.__dict__["_original"]

    @property
    def encoder(self) -> nn.Module:
        return getattr(self.trainable, "segmenter", self.trainable)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, knobs={self.knobs}, scale={self.scale}"


class PatchedViT(_Patched):
    """A timm VisionTransformer under a method: ``forward_features(x)``, ``forward_head(x)``
    and ``forward(x)`` as timm's (see the module notes for ``output``)."""

    def __init__(self, *args, output: str = "grid"):
        super().__init__(*args)
        self.output = output

    def forward_state(self, x: Tensor, features_only: bool = False) -> tuple[Tensor, TokenState]:
        return self.encoder.forward_state(_scaled(x, self.scale), self.policy, self.output, features_only)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_state(x, features_only=True)[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_state(x)[0]


class PatchedSegmenter(_Patched):
    """bench's Segmenter under a method: ``forward(images)`` -> logits (B, C, H, W) at the
    input's size (a static scale's prediction upsampled back)."""

    def forward_state(self, images: Tensor) -> tuple[Tensor, TokenState]:
        logits, state = self.encoder.forward_state(_scaled(images, self.scale), self.policy)
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits, state

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_state(images)[0]


def _params(fn) -> list[str]:
    """Named parameters of ``fn`` after its first (the model)."""
    ps = list(inspect.signature(fn).parameters.values())[1:]
    return [p.name for p in ps if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def patch_model(model: nn.Module, spec, knobs: dict, *, output: str = "grid",
                num_classes: Optional[int] = None) -> _Patched:
    """``model`` (a timm VisionTransformer or bench's Segmenter) under the method ``spec``
    (a ``MethodSpec``) at ``knobs``; ValueError (one line) on what cannot be patched."""
    from methods.segmenter import Segmenter

    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; expected 'grid' or 'rows'")
    if isinstance(model, _Patched):
        raise ValueError(f"this model is already patched with {model.method}; patch its .model instead")
    if is_timm_vit(model):
        base = TimmEncoder(model, num_classes)
    elif isinstance(model, Segmenter):
        if num_classes is not None or output != "grid":
            raise ValueError("num_classes and output are for timm ViTs; a Segmenter keeps its classes and logits")
        base = model
    else:
        raise ValueError(f"bench.patch takes a timm VisionTransformer or bench's Segmenter, got {type(model).__name__}")
    ft = spec.fine_tune
    policy_knobs = _params(spec.make_policy)
    known = set(policy_knobs) | (set(ft.knobs) | set(_params(ft.build)) if ft else set())
    unknown = sorted(set(knobs) - known)
    if unknown:
        raise ValueError(f"{spec.name} has no knob {', '.join(unknown)}; its knobs: {', '.join(sorted(known)) or 'none'}")
    if ft is not None and base.num_classes < 1:
        raise ValueError(f"{spec.name}'s heads predict per-patch classes: pass num_classes (this model has none)")
    trainable = ft.build(base, **{k: v for k, v in knobs.items() if k not in policy_knobs or k == "layers"}) \
        if ft is not None else base
    policy = spec.make_policy(trainable, **{k: v for k, v in knobs.items() if k in policy_knobs})
    from methods.algm import ALGMPolicy
    from methods.tome import ToMePolicy

    if isinstance(policy, (ToMePolicy, ALGMPolicy)) and base.num_prefix_tokens > 1:  # they match row 0 apart only
        raise ValueError(f"{spec.name} protects one class token only; this model has {base.num_prefix_tokens} "
                         "prefix tokens (a distillation token)")
    scale = spec.input_scale(knobs)
    if isinstance(base, TimmEncoder):
        return PatchedViT(model, trainable, policy, spec.name, knobs, scale, output=output)
    return PatchedSegmenter(model, trainable, policy, spec.name, knobs, scale)

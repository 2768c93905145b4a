"""MoE vision encoder (CuMo's CLIP-MoE) on top of timm's ``VisionTransformer``.

timm builds the ViT; we only inject a block factory that makes the chosen layers :class:`VisionMoEBlock`s (a
timm ``Block`` whose MLP is :class:`VisionMoEMlp`, a thin adapter around :class:`~mmoe.model.moe.MoEFFN`) and
keeps timm's dense ``Block`` everywhere else. The encoder walks the blocks itself (``patch_embed`` ->
``_pos_embed`` -> ``norm_pre`` -> blocks), stops at ``feature_layer`` (blocks after it are never built, like
LLaVA which ignores them), hands each MoE block the token mask and collects the :class:`RoutingResult` it
returns, in layer order (arguments and return values only, so activation checkpointing recomputes correctly).

Co-upcycling (CuMo sec. 3.3): :func:`mmoe.interop.vision_ckpt.load_vision_checkpoint` loads a dense timm or
open_clip ViT and copies every dense MLP into all experts of its layer; routers stay freshly
initialised. With identical experts and renormalised top-k weights the encoder reproduces the dense
model's features exactly.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache, partial
from typing import Literal

import torch
from torch import Tensor, nn

from mmoe.constants import MODALITY_IMAGE

from .moe import MoEConfig, MoEFFN, RoutingResult, select_layers
from .moe.routing import checkpoint_context_fn


class VisionConfigError(ValueError):
    """A vision config that cannot work; the message names the field."""


@dataclass
class VisionConfig:
    """Vision tower: architecture, MoE placement, feature selection, checkpoint and preprocessing."""

    backend: Literal["timm", "open_clip"] = "timm"
    """Checkpoint family / layout. The module is always a timm ViT; 'open_clip' means the OpenAI-CLIP layout
    (ln_pre, class token, LayerNorm eps 1e-5), so `pre_norm` is forced on and open_clip checkpoints map in."""
    image_size: int = 64
    """Input side in pixels (always taken from here, also with a named architecture)."""
    patch_size: int = 8
    """Patch side in pixels (ignored when an architecture name is given)."""
    stem: Literal["patch", "conv"] = "patch"
    """Patch embedding: 'patch' is ViT's single strided conv (what pretrained checkpoints have); 'conv' is a
    stack of overlapping 3x3 stride-2 convs (Xiao et al. 2021, "Early convolutions help transformers see
    better"), which learns shapes from scratch far faster. 'conv' needs a power-of-two patch size; its only
    checkpoints are our own (stage-0 pretraining, `mmoe.training.vision_pretrain`)."""
    dim: int = 128
    """Embedding width (ignored when an architecture name is given; use `VisionEncoder.out_dim`)."""
    depth: int = 4
    """Number of transformer blocks of the full model (ignored when an architecture name is given)."""
    n_heads: int = 4
    """Attention heads (ignored when an architecture name is given)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / dim (ignored when an architecture name is given)."""
    activation: str = "gelu"
    """MLP activation: gelu, quick_gelu (OpenAI CLIP weights) or gelu_tanh."""
    class_token: bool = True
    """Prepend a CLS token (forced on for open_clip)."""
    pre_norm: bool = False
    """LayerNorm after the embeddings (CLIP's ln_pre; forced on for open_clip)."""
    moe: MoEConfig | None = None
    """MoE config of the MoE blocks; None keeps the tower dense."""
    moe_layers: str = "all"
    """Which blocks get an MoE MLP: `select_layers` spec over the full depth ('all', 'every_2', 'last_2')."""
    feature_layer: int = -2
    """Index into LLaVA/HF hidden states [embeddings, block_0 out, ..., block_{D-1} out]; -2 is the
    penultimate block's output (LLaVA's mm_vision_select_layer). Later blocks are not built."""
    keep_cls: bool = False
    """Keep the CLS token in the features (LLaVA drops it: 'patch' select feature)."""
    checkpoint: str | None = None
    """Local dense timm (.safetensors / .pth) or open_clip checkpoint; `mmoe.interop.factory` loads it after
    construction (MoE MLPs upcycled). The encoder itself never reads files."""
    timm_model_name: str | None = None
    """Take the architecture from timm's registry (pretrained=False, nothing downloaded),
    e.g. 'vit_large_patch14_clip_336'."""
    open_clip_model_name: str | None = None
    """Take the architecture from open_clip's bundled model configs, e.g. 'ViT-L-14-336'."""
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel normalisation mean of the image transform."""
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel normalisation std of the image transform."""
    norm_eps: float | None = None
    """LayerNorm epsilon; None: 1e-5 for CLIP-style towers (open_clip or pre_norm), else timm's 1e-6.
    Ignored with `timm_model_name` (the registry decides)."""


_TIMM_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_tanh"}


# ------------------------------------------------------------ MoE MLP adapter
class VisionMoEMlp(nn.Module):
    """Takes the place of timm's ``Mlp`` (same constructor keywords) in a :class:`VisionMoEBlock`, backed by an
    MoEFFN; ``forward(x, token_mask) -> (y, RoutingResult)``."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None, *,
                 act_layer=None, norm_layer=None, bias=True, drop=0.0, device=None, dtype=None,
                 moe: MoEConfig, activation: str = "gelu", layer: int = -1, **_unused):
        super().__init__()
        if out_features not in (None, in_features):
            raise VisionConfigError(f"vision.moe: MoE MLP needs out_features == in_features, "
                                    f"got {out_features}")
        if norm_layer is not None:
            raise VisionConfigError("vision.moe: timm's scale_mlp_norm (MLP norm) is not supported")
        if isinstance(bias, (tuple, list)):
            if len(set(bias)) != 1:
                raise VisionConfigError(f"vision.moe: mixed MLP bias {bias} is not supported")
            bias = bias[0]
        drop = drop[-1] if isinstance(drop, (tuple, list)) else drop
        with torch.device(device) if device is not None else nullcontext():
            self.moe = MoEFFN(in_features, hidden_features or in_features, moe, activation=activation,
                              bias=bool(bias), causal=False, site="vision", layer=layer)
        if dtype is not None:
            self.moe.to(dtype)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.layer = layer

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, RoutingResult]:
        """x: (B, T, D); token_mask: (B, T) bool real tokens (None: all real)."""
        B, T, _ = x.shape
        modality = torch.full((B, T), MODALITY_IMAGE, dtype=torch.long, device=x.device)
        y, r = self.moe(x, token_mask, modality)
        return self.drop(y), r

    @torch.no_grad()
    def upcycle_(self, dense: nn.Module) -> None:
        """Copy a dense MLP (fc1/fc2 or c_fc/c_proj) into every expert; router stays fresh."""
        self.moe.upcycle_(dense)


def _timm_block():
    from timm.models.vision_transformer import Block

    return Block


class VisionMoEBlock(nn.Module):
    """Marker base; the real class (a timm ``Block`` subclass) is built lazily so timm is imported on use."""


@cache
def _moe_block_class():
    Block = _timm_block()

    class _VisionMoEBlock(Block, VisionMoEBlock):
        """timm ``Block`` whose MLP is a :class:`VisionMoEMlp`: the token mask goes in and the routing comes
        out through the call (no side channel), so an activation-checkpointing recompute routes exactly
        like the forward it replays."""

        def forward(self, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, RoutingResult]:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
            h, routing = self.mlp(self.norm2(x), token_mask)
            return x + self.drop_path2(self.ls2(h)), routing

    _VisionMoEBlock.__name__ = _VisionMoEBlock.__qualname__ = "VisionMoEBlock"
    return _VisionMoEBlock


class _BlockFactory:
    """``block_fn`` for timm: a timm Block, or a VisionMoEBlock (MLP = VisionMoEMlp) at the chosen layers."""

    def __init__(self, moe_layers: set[int], moe: MoEConfig | None, activation: str):
        self.moe_layers, self.moe, self.activation = moe_layers, moe, activation
        self._next = 0

    def __call__(self, *args, **kwargs):
        i = kwargs.get("depth")
        if i is None:  # older timm passes no block index: count calls
            i = self._next
        self._next = i + 1
        if self.moe is not None and i in self.moe_layers:
            kwargs["mlp_layer"] = partial(VisionMoEMlp, moe=self.moe, activation=self.activation, layer=i)
            return _moe_block_class()(*args, **kwargs)
        return _timm_block()(*args, **kwargs)


# ------------------------------------------------------------ convolutional stem
class ConvStemPatchEmbed(nn.Module):
    """timm ``PatchEmbed`` whose projection is log2(patch) overlapping 3x3 stride-2 convs + a 1x1 conv.

    Same tokens out (one per patch, same grid) as the patch stem, so everything after it is unchanged.
    GroupNorm keeps samples independent of their batch (no running statistics to sync or resume).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, **kwargs):
        super().__init__()
        from timm.layers import PatchEmbed

        p = patch_size if isinstance(patch_size, int) else patch_size[0]
        n_down = int(math.log2(p)) if p > 1 else 0
        if p < 2 or 2**n_down != p:
            raise VisionConfigError(f"vision.stem='conv' needs a power-of-two patch_size >= 2, got {p}")
        # a PatchEmbed for the bookkeeping (grid, num_patches, size checks, output format), new projection
        self.inner = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                embed_dim=embed_dim, bias=bias, **kwargs)
        layers: list[nn.Module] = []
        ch_in = in_chans
        for i in range(n_down):
            ch = max(embed_dim // 2 ** (n_down - 1 - i), 8)
            layers += [nn.Conv2d(ch_in, ch, 3, stride=2, padding=1, bias=False),
                       nn.GroupNorm(math.gcd(8, ch), ch), nn.GELU()]
            ch_in = ch
        layers.append(nn.Conv2d(ch_in, embed_dim, 1, bias=bias))
        self.inner.proj = nn.Sequential(*layers)
        self.num_patches = self.inner.num_patches
        self.grid_size = self.inner.grid_size
        self.patch_size = self.inner.patch_size
        self.img_size = self.inner.img_size

    def feat_ratio(self, as_scalar=True):
        return self.inner.feat_ratio(as_scalar)

    def dynamic_feat_size(self, img_size):
        return self.inner.dynamic_feat_size(img_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


# ------------------------------------------------------------ architecture
@dataclass
class _Arch:
    patch_size: int
    dim: int
    depth: int
    n_heads: int
    mlp_ratio: float
    class_token: bool
    pre_norm: bool
    norm_eps: float | None  # None: the timm registry decides


def _resolve_arch(cfg: VisionConfig) -> _Arch:
    if cfg.timm_model_name and cfg.open_clip_model_name:
        raise VisionConfigError("vision: set at most one of timm_model_name and open_clip_model_name")
    clip_style = cfg.backend == "open_clip"
    if cfg.backend not in ("timm", "open_clip"):
        raise VisionConfigError(f"vision.backend must be 'timm' or 'open_clip', got {cfg.backend!r}")
    if cfg.timm_model_name:
        import timm

        with torch.device("meta"):
            try:
                m = timm.create_model(cfg.timm_model_name, pretrained=False, num_classes=0, global_pool="",
                                      img_size=cfg.image_size)
            except RuntimeError as e:
                raise VisionConfigError(f"vision.timm_model_name: {e}") from None
        if type(m).__name__ != "VisionTransformer":
            raise VisionConfigError(f"vision.timm_model_name: {cfg.timm_model_name!r} builds a "
                                    f"{type(m).__name__}, not a timm VisionTransformer")
        blk = m.blocks[0] if len(m.blocks) else None
        return _Arch(patch_size=int(m.patch_embed.patch_size[0]), dim=m.embed_dim, depth=len(m.blocks),
                     n_heads=blk.attn.num_heads if blk is not None else cfg.n_heads,
                     mlp_ratio=blk.mlp.fc1.out_features / m.embed_dim if blk is not None else cfg.mlp_ratio,
                     class_token=m.cls_token is not None, pre_norm=not isinstance(m.norm_pre, nn.Identity),
                     norm_eps=None)
    if cfg.open_clip_model_name:
        import open_clip

        mc = open_clip.get_model_config(cfg.open_clip_model_name)
        if mc is None:
            raise VisionConfigError(f"vision.open_clip_model_name: unknown open_clip model "
                                    f"{cfg.open_clip_model_name!r}")
        vc = mc["vision_cfg"]
        if vc.get("timm_model_name"):
            raise VisionConfigError(f"vision.open_clip_model_name: {cfg.open_clip_model_name!r} uses a timm "
                                    f"trunk ({vc['timm_model_name']}); set timm_model_name instead")
        width = int(vc.get("width", 768))
        return _Arch(patch_size=int(vc.get("patch_size", 16)), dim=width, depth=int(vc.get("layers", 12)),
                     n_heads=width // int(vc.get("head_width", 64)),
                     mlp_ratio=float(vc.get("mlp_ratio", 4.0)),
                     class_token=True, pre_norm=not vc.get("no_ln_pre", False),
                     norm_eps=cfg.norm_eps or 1e-5)
    if clip_style and not cfg.class_token:
        raise VisionConfigError("vision.class_token: open_clip towers always have a class token")
    pre_norm = cfg.pre_norm or clip_style
    eps = cfg.norm_eps or (1e-5 if pre_norm else 1e-6)
    return _Arch(cfg.patch_size, cfg.dim, cfg.depth, cfg.n_heads, cfg.mlp_ratio,
                 cfg.class_token or clip_style, pre_norm, eps)


def _feature_index(feature_layer: int, depth: int) -> int:
    """Hidden-state index in [0, depth] (0 = embeddings); equals the number of blocks to run."""
    idx = feature_layer if feature_layer >= 0 else depth + 1 + feature_layer
    if not 0 <= idx <= depth:
        raise VisionConfigError(f"vision.feature_layer: {feature_layer} is out of range for {depth} blocks "
                                f"(hidden states 0..{depth}, or -1..-{depth + 1})")
    return idx


# ------------------------------------------------------------ encoder
class VisionEncoder(nn.Module):
    """ViT (timm) with MoE MLPs; forward -> ((N, P, dim) features of `feature_layer`, routing results)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        self.cfg = cfg
        if cfg.activation not in _TIMM_ACT:
            raise VisionConfigError(f"vision.activation: {cfg.activation!r}; "
                                    f"choose one of {sorted(_TIMM_ACT)}")
        arch = _resolve_arch(cfg)
        self.arch = arch
        n_blocks = _feature_index(cfg.feature_layer, arch.depth)
        moe_layers = select_layers(cfg.moe_layers, arch.depth) if cfg.moe is not None else []
        if cfg.moe is not None:
            cfg.moe.validate(causal=False, site="vision")
        self.moe_layers = [i for i in moe_layers if i < n_blocks]  # MoE blocks that are built
        if cfg.keep_cls and not arch.class_token:
            raise VisionConfigError("vision.keep_cls: the tower has no class token")
        if cfg.stem not in ("patch", "conv"):
            raise VisionConfigError(f"vision.stem must be 'patch' or 'conv', got {cfg.stem!r}")

        kw = dict(img_size=cfg.image_size, num_classes=0, global_pool="", final_norm=False, depth=n_blocks,
                  act_layer=_TIMM_ACT[cfg.activation],
                  block_fn=_BlockFactory(set(self.moe_layers), cfg.moe, cfg.activation))
        if cfg.stem == "conv":
            kw["embed_layer"] = ConvStemPatchEmbed
        if cfg.timm_model_name:
            vit = timm.create_model(cfg.timm_model_name, pretrained=False, **kw)
        else:
            vit = VisionTransformer(patch_size=arch.patch_size, embed_dim=arch.dim, num_heads=arch.n_heads,
                                    mlp_ratio=arch.mlp_ratio, class_token=arch.class_token,
                                    pre_norm=arch.pre_norm,
                                    norm_layer=partial(nn.LayerNorm, eps=arch.norm_eps), **kw)
        vit.head = nn.Identity()
        self.vit = vit
        self.moe_mlps: dict[int, VisionMoEMlp] = {}
        for i, blk in enumerate(vit.blocks):
            if isinstance(blk, VisionMoEBlock):
                self.moe_mlps[i] = blk.mlp
        if sorted(self.moe_mlps) != self.moe_layers:
            raise RuntimeError(f"vision: built MoE layers {self.moe_layers} != {sorted(self.moe_mlps)}")
        self.num_prefix_tokens = vit.num_prefix_tokens
        gh, gw = vit.patch_embed.grid_size
        self.grid: int | None = gh if gh == gw else None
        self.num_patches = gh * gw + (self.num_prefix_tokens if cfg.keep_cls else 0)
        self.out_dim = vit.embed_dim
        self.grad_checkpointing = False

    # ------------------------------------------------------------------ forward
    def forward(self, pixel_values: Tensor, image_mask: Tensor | None = None
                ) -> tuple[Tensor, list[RoutingResult]]:
        """`image_mask` (N,) bool: images whose tokens are real; the others (placeholders run only so every
        rank issues the same expert-parallel collectives) are excluded from routing losses, loads and compute.
        The mask reaches each MoE block as an argument, so checkpointed blocks recompute with it."""
        vit = self.vit
        x = vit.patch_embed(pixel_values)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)  # (N, T, D)
        token_mask = None if image_mask is None else image_mask.bool()[:, None].expand(x.shape[0], x.shape[1])
        checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        routing: list[RoutingResult] = []
        for i, blk in enumerate(vit.blocks):
            args = (x, token_mask) if i in self.moe_mlps else (x,)
            if checkpoint:
                out = torch.utils.checkpoint.checkpoint(blk, *args, use_reentrant=False,
                                                        context_fn=checkpoint_context_fn)
            else:
                out = blk(*args)
            if i in self.moe_mlps:
                x, r = out
                routing.append(r)
            else:
                x = out
        if not self.cfg.keep_cls:
            x = x[:, self.num_prefix_tokens:]
        return x, routing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward (expert loads are still counted once per forward)."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ preprocessing
    def image_transform(self):
        """PIL image -> (3, S, S) tensor normalised with this tower's mean/std."""
        from mmoe.data.images import build_image_transform

        return build_image_transform(self.cfg.image_size, self.cfg.image_mean, self.cfg.image_std)


# ------------------------------------------------------------ parameter count
def vision_param_count(cfg: VisionConfig) -> dict[str, int]:
    """Parameters of the encoder `cfg` builds (blocks after feature_layer are not built), on the meta device.

    total: all parameters; active: those one token uses (routed experts scaled by top_k / num_experts,
    shared experts, routers and everything dense in full); dense: the same tower with dense MLPs;
    experts: parameters inside routed experts; moe_layers / blocks: built MoE blocks / all built blocks.
    """
    with torch.device("meta"):
        enc = VisionEncoder(cfg)
    total = sum(p.numel() for p in enc.parameters())
    experts = sum(p.numel() for m in enc.moe_mlps.values() for p in m.moe.experts.parameters())
    routers = sum(p.numel() for m in enc.moe_mlps.values() for p in m.moe.router.parameters())
    shared = sum(p.numel() for m in enc.moe_mlps.values() if m.moe.shared is not None
                 for p in m.moe.shared.parameters())
    active = total - experts
    hidden = int(enc.arch.dim * enc.arch.mlp_ratio)
    dense_mlp = 2 * enc.arch.dim * hidden + hidden + enc.arch.dim  # timm Mlp with biases
    dense = total - experts - routers - shared + dense_mlp * len(enc.moe_mlps)
    if cfg.moe is not None and enc.moe_mlps:
        active += math.ceil(experts * cfg.moe.top_k / cfg.moe.num_experts)
    return dict(total=total, active=active, dense=dense, experts=experts, moe_layers=len(enc.moe_mlps),
                blocks=len(enc.vit.blocks))


__all__ = ["VisionConfig", "VisionConfigError", "VisionEncoder", "VisionMoEBlock", "VisionMoEMlp", "vision_param_count"]

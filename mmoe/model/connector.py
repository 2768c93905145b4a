"""Vision -> LLM connector: linear, LLaVA mlp2x_gelu, or CuMo's MLP-MoE, with optional token pooling.

Pooling (factor `pool`) merges each pool x pool window of the sqrt(P) x sqrt(P) patch grid into one
token *before* the projection, so the projector and its router see the fewer tokens: 'avg' averages the
window, 'concat' stacks its features (space-to-depth, Qwen2-VL's patch merger / InternVL's pixel shuffle),
which keeps where in the window each feature was at pool**2 times the projector's input width.
The MoE connector is upcyclable from a dense mlp connector checkpoint: every expert a copy, router fresh
(CuMo co-upcycling; `mmoe.interop.connector_ckpt`, called by `mmoe.interop.factory`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe.constants import MODALITY_IMAGE

from .layers import GeluMLP
from .moe import MoEConfig, MoEFFN, RoutingResult


class ConnectorConfigError(ValueError):
    """A connector config or input that cannot work; the message names the field."""


@dataclass
class ConnectorConfig:
    """Projector from vision features to LLM embeddings."""

    kind: Literal["linear", "mlp", "moe_mlp"] = "mlp"
    """linear (LLaVA-1), mlp = Linear-GELU-Linear (LLaVA-1.5 mlp2x_gelu), moe_mlp (CuMo MLP-MoE)."""
    hidden: int = 0
    """Hidden width of the MLP / each expert; 0 means the LLM dim (out_dim), as in LLaVA and CuMo."""
    moe: MoEConfig | None = None
    """MoE config for kind == 'moe_mlp' (CuMo: top-2 of 4)."""
    pool: int = 1
    """Merge pool x pool windows of the patch grid before projecting (pool**2 fewer image tokens)."""
    pool_mode: Literal["avg", "concat"] = "avg"
    """How a window becomes one token: 'avg' (mean, projector input stays in_dim) or 'concat' (the window's
    features side by side in row-major order, projector input pool**2 * in_dim: nothing is averaged away)."""
    checkpoint: str | None = None
    """Dense connector state dict (safetensors / torch) that `mmoe.interop.factory.build_model` loads after
    construction; upcycled when kind == 'moe_mlp'."""


class MoEProjector(MoEFFN):
    """CuMo's MLP-MoE: GELU experts mapping in_dim -> out_dim, site "connector"."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, cfg: MoEConfig, activation: str = "gelu",
                 layer: int = 0):
        super().__init__(in_dim, hidden, cfg, activation=activation, bias=True, causal=False,
                         site="connector", layer=layer, out_dim=out_dim)


class Connector(nn.Module):
    """(N, P, in_dim) vision features -> (N, P', out_dim) LLM tokens, plus the MoE routing (if any)."""

    def __init__(self, cfg: ConnectorConfig, in_dim: int, out_dim: int, grid: int | None):
        super().__init__()
        self.cfg, self.in_dim, self.out_dim, self.grid = cfg, in_dim, out_dim, grid
        if cfg.pool < 1:
            raise ConnectorConfigError(f"connector.pool must be >= 1, got {cfg.pool}")
        if cfg.pool_mode not in ("avg", "concat"):
            raise ConnectorConfigError(
                f"connector.pool_mode must be 'avg' or 'concat', got {cfg.pool_mode!r}")
        if grid is not None and cfg.pool > 1 and grid % cfg.pool:
            raise ConnectorConfigError(f"connector.pool: {cfg.pool} does not divide the {grid}x{grid} "
                                       "patch grid")
        hidden = cfg.hidden or out_dim
        self.proj_in_dim = in_dim * cfg.pool**2 if cfg.pool_mode == "concat" else in_dim
        in_dim = self.proj_in_dim
        self.proj: nn.Module
        if cfg.kind == "linear":
            self.proj = nn.Linear(in_dim, out_dim)
        elif cfg.kind == "mlp":
            self.proj = GeluMLP(in_dim, hidden, out_dim=out_dim, activation="gelu", bias=True)
        elif cfg.kind == "moe_mlp":
            if cfg.moe is None:
                raise ConnectorConfigError("connector.moe: kind 'moe_mlp' needs a MoE config")
            cfg.moe.validate(causal=False, site="connector", residual=False)  # no residual: no all-zero tokens
            self.proj = MoEProjector(in_dim, hidden, out_dim, cfg.moe, activation="gelu", layer=0)
        else:
            raise ConnectorConfigError(f"connector.kind must be linear, mlp or moe_mlp, got {cfg.kind!r}")

    # ------------------------------------------------------------------ tokens
    def _grid_side(self, num_patches: int) -> int:
        g = self.grid if self.grid is not None else math.isqrt(num_patches)
        if g * g != num_patches:
            raise ConnectorConfigError(
                f"connector.pool: {num_patches} tokens are not a {g}x{g} patch grid (a CLS token? set "
                f"vision.keep_cls false to pool)")
        if g % self.cfg.pool:
            raise ConnectorConfigError(f"connector.pool: {self.cfg.pool} does not divide the {g}x{g} "
                                       "patch grid")
        return g

    def num_tokens(self, num_patches: int) -> int:
        """Image tokens handed to the LLM for `num_patches` vision tokens."""
        if self.cfg.pool == 1:
            return num_patches
        return (self._grid_side(num_patches) // self.cfg.pool) ** 2

    def pool_tokens(self, feats: Tensor) -> Tensor:
        """(N, g*g, C) -> (N, (g/pool)^2, C or pool^2 C): one token per window (row-major patch order)."""
        p = self.cfg.pool
        if p == 1:
            return feats
        N, P, C = feats.shape
        g = self._grid_side(P)
        if self.cfg.pool_mode == "concat":
            # (N, g/p, p, g/p, p, C) -> windows in row-major order, each window's p x p features row-major
            x = feats.reshape(N, g // p, p, g // p, p, C).permute(0, 1, 3, 2, 4, 5)
            return x.reshape(N, (g // p) ** 2, p * p * C)
        x = feats.transpose(1, 2).reshape(N, C, g, g)
        x = F.avg_pool2d(x, kernel_size=p, stride=p)
        return x.flatten(2).transpose(1, 2)

    def forward(self, feats: Tensor, image_mask: Tensor | None = None) -> tuple[Tensor, list[RoutingResult]]:
        """`image_mask` (N,) bool: images whose tokens are real (see `VisionEncoder.forward`)."""
        x = self.pool_tokens(feats)
        if self.cfg.kind == "moe_mlp":  # (not isinstance: activation checkpointing may wrap the projector)
            modality = torch.full(x.shape[:2], MODALITY_IMAGE, dtype=torch.long, device=x.device)
            mask = None if image_mask is None else image_mask.bool()[:, None].expand(x.shape[:2])
            y, r = self.proj(x, mask, modality)
            return y, [r]
        return self.proj(x), []


__all__ = ["ConnectorConfig", "ConnectorConfigError", "Connector", "MoEProjector"]

"""MoE feed-forward layer: router + dispatcher + packed experts (+ shared experts)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import GeluMLP, SwiGLU
from .config import MoEConfig
from .dispatch import LocalDispatcher
from .experts import GroupedExperts
from .routing import Router, RoutingResult


class MoEFFN(nn.Module):
    """Sparse top-k MLP. Returns (output, RoutingResult); dropped tokens get 0 here and keep the residual.

    `site` and `layer` label the routing result so losses and metrics stay per layer.
    """

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, activation: str = "swiglu", *, bias: bool = False,
                 causal: bool = True, site: str = "ffn", layer: int = -1, out_dim: int | None = None):
        super().__init__()
        self.cfg, self.site, self.layer = cfg, site, layer
        self.out_dim = out_dim or dim  # the connector changes width; FFNs keep it
        if activation == "swiglu" and self.out_dim != dim:
            raise ValueError(f"{site}.{layer}: SwiGLU experts keep the width (out_dim {self.out_dim} != dim {dim})")
        self.router = Router(dim, cfg, causal=causal, site=f"{site}.{layer}")
        expert_hidden = cfg.expert_hidden or hidden
        self.experts = GroupedExperts(cfg.num_experts, dim, expert_hidden, activation, bias, out_dim=self.out_dim)
        self.shared: nn.Module | None = None
        if cfg.num_shared_experts > 0:
            sh = expert_hidden * cfg.num_shared_experts
            self.shared = SwiGLU(dim, sh, bias) if activation == "swiglu" else GeluMLP(
                dim, sh, out_dim=self.out_dim, activation=activation, bias=bias)
        self.dispatcher = LocalDispatcher()

    def forward(self, x: Tensor, token_mask: Tensor | None = None,
                modality: Tensor | None = None) -> tuple[Tensor, RoutingResult]:
        """x: (B, T, D); token_mask: (B, T) bool of real tokens; modality: (B, T) long."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        r = self.router(flat, None if token_mask is None else token_mask.reshape(-1),
                        None if modality is None else modality.reshape(-1), batch_shape=(B, T))
        r.site, r.layer = self.site, self.layer
        plan = self.dispatcher.plan(r)
        xs, counts = self.dispatcher.dispatch(flat, plan)
        y = self.dispatcher.combine(self.experts(xs, counts), plan)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(B, T, self.out_dim), r

    @torch.no_grad()
    def upcycle_(self, dense: nn.Module) -> None:
        """Initialise from a dense MLP: every expert a copy, router fresh, shared experts silent at start.

        With renormalised weights (or top_k = 1 with weight 1) the output equals the dense MLP exactly,
        whatever the router picks; shared experts keep their own initialisation with a zeroed output
        projection, so they start contributing nothing and learn from there. `cfg.upcycle_reinit` > 0 (Drop-Upcycling)
        gives up that exactness to start the experts apart.
        """
        self.experts.upcycle_(dense, self.cfg.upcycle_reinit)
        if self.shared is not None:
            out = self.shared.down_proj if isinstance(self.shared, SwiGLU) else self.shared.fc2
            out.weight.zero_()
            if out.bias is not None:
                out.bias.zero_()

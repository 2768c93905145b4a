"""Mixture of attention heads (MoA: Zhang et al. 2022; JetMoE's layout).

Each expert owns `hpe = n_heads / E` query heads (its own Q and O projections); keys and values are shared
by all experts (`n_kv_heads`, GQA), so the KV cache is exactly the size of a dense GQA layer and routing
happens on the query side only, which keeps it decode-friendly. A token runs
`(top_k + S) * hpe` query heads.

Shared heads (`num_shared_experts = S`, DeepSeek's shared experts applied to heads): S more head groups of
`hpe` heads that every token runs at weight 1, beside its `top_k` routed groups, so `n_heads = (E + S) * hpe`.
Why: a skill that every token needs at one place (e.g. finding an image patch by what a question names) is
otherwise learnt by whichever experts the router happens to pick, each from its share of the tokens.

Head layout. Expert head i (0 <= i < hpe) reads kv head `i // (hpe // n_kv)`. Upcycling keeps that map:
with g = n_heads / n_kv dense heads per kv group and G = E + S groups, expert e takes heads
[e*g/G, (e+1)*g/G) of every kv group and shared group s the ones after the experts', so each dense head lands
in exactly one group with its own kv head, and all groups at unit weight reproduce the dense attention exactly.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from ..attention import AttnMask, sdpa, shared_kv
from ..layers import apply_rope
from .config import MoEConfig, MoEConfigError
from .dispatch import LocalDispatcher
from .experts import GroupedLinear
from .routing import Router, RoutingResult


def moa_heads_per_group(n_heads: int, n_kv_heads: int, cfg: MoEConfig, site: str) -> int:
    """Query heads of each MoA expert / shared head group; the one check that the heads split evenly.

    Every group owns n_heads / (E + S) query heads and reads whole kv heads, so E + S must divide
    n_heads / n_kv_heads. Raises MoEConfigError naming `site` and the fields."""
    E, S = cfg.num_experts, cfg.num_shared_experts
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise MoEConfigError(f"{site}: n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
    g = n_heads // n_kv_heads
    if g % (E + S):
        what = f"num_experts={E}" if not S else f"num_experts+num_shared_experts={E}+{S}"
        raise MoEConfigError(f"{site}.{what} must divide n_heads/n_kv_heads={n_heads}/{n_kv_heads}={g}: each MoA "
                             "expert (and shared head group) owns n_heads/(num_experts+num_shared_experts) query "
                             "heads and n_kv_heads must divide that")
    return n_heads // (E + S)


class MoAAttention(nn.Module):
    """Token-choice mixture of attention heads with shared GQA keys/values. Returns (y, RoutingResult)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, cfg: MoEConfig, *,
                 bias: bool = False, layer: int = -1):
        super().__init__()
        site = f"attention.{layer}"
        E, S = cfg.num_experts, cfg.num_shared_experts
        hpe = moa_heads_per_group(n_heads, n_kv_heads, cfg, site)
        self.cfg, self.layer = cfg, layer
        self.n_heads, self.n_kv_heads, self.head_dim, self.hpe = n_heads, n_kv_heads, head_dim, hpe
        self.num_shared = S
        self.router = Router(dim, cfg, causal=True, site=site)
        self.q_proj = GroupedLinear(E, dim, hpe * head_dim, bias=bias)  # per-expert queries
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)  # shared
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)  # shared
        self.o_proj = GroupedLinear(E, hpe * head_dim, dim, bias=False)  # per-expert outputs
        # shared head groups: every token, weight 1 (S groups of hpe heads, laid out (S, n_kv, hpe/n_kv, hd))
        self.shared_q_proj = nn.Linear(dim, S * hpe * head_dim, bias=bias) if S else None
        self.shared_o_proj = nn.Linear(S * hpe * head_dim, dim, bias=False) if S else None
        self.dispatcher = LocalDispatcher()
        self.force_unit_weights = False
        """Test/analysis hook: combine every kept slot with weight 1 (top_k = E: the upcycling identity)."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttnMask, cache=None, layer_idx: int = 0, *,
                token_mask: Tensor | None = None,
                modality: Tensor | None = None) -> tuple[Tensor, RoutingResult]:
        """x: (B, T, D); cos/sin: (B, T, hd); token_mask, modality: (B, T)."""
        B, T, D = x.shape
        K, hd, n_kv, hpe = self.cfg.top_k, self.head_dim, self.n_kv_heads, self.hpe
        rpk = hpe // n_kv  # expert heads per kv head
        flat = x.reshape(B * T, D)
        r = self.router(flat, None if token_mask is None else token_mask.reshape(-1),
                        None if modality is None else modality.reshape(-1), batch_shape=(B, T))
        r.site, r.layer = "attention", self.layer
        if self.force_unit_weights:
            r.weights = r.kept.to(r.weights.dtype)
        plan = self.dispatcher.plan(r)
        xs, counts = self.dispatcher.dispatch(flat, plan)
        q = self.q_proj(xs, counts)  # (A, hpe*hd) sorted by expert
        q = self.dispatcher.combine(q, plan, per_slot=True)  # (N*K, hpe*hd); zeros for slots not kept
        # (B, T, K, n_kv, rpk, hd) -> GQA layout (B, n_kv * (K + S) * rpk, T, hd): kv head c owns a contiguous block
        q = q.view(B, T, K, n_kv, rpk, hd).permute(0, 3, 2, 4, 1, 5)  # (B, n_kv, K, rpk, T, hd)
        S = self.num_shared
        if S:  # shared groups join every kv head's block after the routed slots: one attention call
            qs = self.shared_q_proj(x).view(B, T, S, n_kv, rpk, hd).permute(0, 3, 2, 4, 1, 5)
            q = torch.cat([q, qs], dim=2)
        q = apply_rope(q.reshape(B, n_kv * (K + S) * rpk, T, hd), cos, sin)
        k, v = shared_kv(self, x, cos, sin, cache, layer_idx)
        o = sdpa(q, k, v, mask).view(B, n_kv, K + S, rpk, T, hd)  # (B, n_kv*(K+S)*rpk, T, hd) before the view
        o_routed = o[:, :, :K].permute(0, 4, 2, 1, 3, 5).reshape(B * T * K, hpe * hd)  # per slot
        os_, counts = self.dispatcher.dispatch(o_routed, plan, per_slot=True)
        y = self.dispatcher.combine(self.o_proj(os_, counts), plan)  # weighted sum over slots -> (N, D)
        if S:
            y = y + self.shared_o_proj(o[:, :, K:].permute(0, 4, 2, 1, 3, 5).reshape(B * T, S * hpe * hd))
        return y.view(B, T, D), r

    @torch.no_grad()
    def upcycle_(self, dense: nn.Module) -> None:
        """Split a dense attention (q_proj/k_proj/v_proj/o_proj linears, same head count) into experts.

        K/V are copied; with g = n_heads/n_kv and G = E + S, expert e takes dense heads [e*g/G, (e+1)*g/G) of every
        kv group, ordered by group, so its head i keeps kv head i // (hpe/n_kv); shared group s takes the block
        of group E + s the same way. The router stays freshly initialised.
        """
        E, S, hd, n_kv = self.cfg.num_experts, self.num_shared, self.head_dim, self.n_kv_heads
        g = self.n_heads // n_kv
        if g % (E + S):
            raise MoEConfigError(f"attention.{self.layer}: upcycling needs num_experts+num_shared_experts="
                                 f"{E + S} to divide the heads per kv group n_heads/n_kv_heads={g}")
        want_q = (self.n_heads * hd, self.k_proj.in_features)
        for name, lin, shape in (("q_proj", dense.q_proj, want_q),
                                 ("k_proj", dense.k_proj, self.k_proj.weight.shape),
                                 ("v_proj", dense.v_proj, self.v_proj.weight.shape),
                                 ("o_proj", dense.o_proj, want_q[::-1])):
            if tuple(lin.weight.shape) != tuple(shape):
                raise ValueError(f"attention.{self.layer}: cannot upcycle {name}: dense weight "
                                 f"{tuple(lin.weight.shape)} != expected {tuple(shape)}")
        if (dense.q_proj.bias is not None) != (self.q_proj.bias is not None):
            raise ValueError(f"attention.{self.layer}: q_proj bias mismatch between dense and MoA "
                             "(attn_bias)")
        if getattr(dense.o_proj, "bias", None) is not None:
            raise ValueError(f"attention.{self.layer}: o_proj bias is not supported by MoA upcycling")
        self.k_proj.load_state_dict(dense.k_proj.state_dict())
        self.v_proj.load_state_dict(dense.v_proj.state_dict())
        per = g // (E + S)

        def columns(group: int) -> Tensor:  # dense q rows / o columns of head group `group`, kv-group major
            heads = torch.tensor([c * g + group * per + m for c in range(n_kv) for m in range(per)])
            return (heads[:, None] * hd + torch.arange(hd)).flatten().to(dense.q_proj.weight.device)

        for e in range(E):
            cols = columns(e)
            self.q_proj.weight[e] = dense.q_proj.weight[cols].t()
            if self.q_proj.bias is not None:
                self.q_proj.bias[e] = dense.q_proj.bias[cols]
            self.o_proj.weight[e] = dense.o_proj.weight[:, cols].t()
        if S:
            cols = torch.cat([columns(E + s) for s in range(S)])
            self.shared_q_proj.weight.copy_(dense.q_proj.weight[cols])
            if self.shared_q_proj.bias is not None:
                self.shared_q_proj.bias.copy_(dense.q_proj.bias[cols])
            self.shared_o_proj.weight.copy_(dense.o_proj.weight[:, cols])

    def extra_repr(self) -> str:
        return (f"experts={self.cfg.num_experts}, top_k={self.cfg.top_k}, shared={self.num_shared}, "
                f"heads_per_expert={self.hpe}, "
                f"n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}")


__all__ = ["MoAAttention", "AttnMask", "shared_kv", "sdpa"]

"""Routers: every routing kind returns one `RoutingResult`.

A result holds K assignment slots per token (K = top_k, or E for expert choice): which expert, with
what weight, whether the router selected it, and whether it survived capacity. Full probabilities and
logits ride along for the balancing losses in `balancing.py`, which are plain functions of this type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig


@dataclass
class RoutingResult:
    """Routing decision of one MoE layer for N = B*T tokens."""

    expert_idx: Tensor  # (N, K) long: expert of each slot
    weights: Tensor  # (N, K) float32 (float64 for float64 inputs): combine weight, 0 where not kept
    selected: Tensor  # (N, K) bool: the router chose this slot (before capacity)
    kept: Tensor  # (N, K) bool: selected and within capacity; only these are computed
    probs: Tensor  # (N, E) float32: full routing distribution (rows sum to 1), for losses
    logits: Tensor  # (N, E) float32: raw expert logits, for the z-loss
    token_mask: Tensor  # (N,) bool: real tokens (padding excluded from losses and compute)
    num_experts: int
    batch_shape: tuple[int, int]  # (B, T) so sequence-wise losses can regroup tokens
    modality: Tensor | None = None  # (N,) long, see mmoe.constants.MODALITY_*
    group_probs: Tensor | None = None  # (N, G) float32 for group-level balance
    group_logits: Tensor | None = None  # (N, G) float32 (two-level gate), for the z-loss
    num_groups: int = 1
    expert_bias: Tensor | None = None  # (E,) aux-loss-free bias used for selection (detached copy)
    site: str = ""  # "vision" | "connector" | "attention" | "ffn"
    layer: int = -1
    extras: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.site}.{self.layer}"

    def expert_counts(self, which: str = "kept") -> Tensor:
        """(E,) number of assignments per expert over real tokens."""
        mask = (self.kept if which == "kept" else self.selected) & self.token_mask[:, None]
        return torch.bincount(self.expert_idx[mask], minlength=self.num_experts)


class Router(nn.Module):
    """Gate of one MoE layer. Runs in float32 for low-precision activations (selective precision), and in
    float64 for float64 inputs (so float64 reference tests are not rounded to float32)."""

    def __init__(self, dim: int, cfg: MoEConfig, causal: bool = False, site: str = "moe"):
        super().__init__()
        cfg.validate(causal=causal, site=site)
        self.cfg, self.dim = cfg, dim
        E = cfg.num_experts
        self.gate = nn.Linear(dim, E, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)
        self.group_gate: nn.Linear | None = None
        if cfg.hierarchy == "two_level":
            self.group_gate = nn.Linear(dim, cfg.num_groups, bias=False)
            nn.init.normal_(self.group_gate.weight, std=0.02)
        self.noise_gate: nn.Linear | None = None
        if cfg.noisy_gating:
            self.noise_gate = nn.Linear(dim, E, bias=False)
            nn.init.zeros_(self.noise_gate.weight)  # Shazeer 2017: W_noise starts at zero
        # Aux-loss-free balancing: bias steers selection only; loads accumulate between optimizer steps.
        self.register_buffer("expert_bias", torch.zeros(E), persistent=True)
        self.register_buffer("load_accum", torch.zeros(E), persistent=False)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, token_mask: Tensor | None = None, modality: Tensor | None = None,
                batch_shape: tuple[int, int] | None = None) -> RoutingResult:
        """Route N tokens. x: (N, D); token_mask: (N,) bool; modality: (N,) long."""
        if torch.is_autocast_enabled(x.device.type):  # selective precision: no bf16 gate under autocast
            with torch.autocast(x.device.type, enabled=False):
                return self._route(x, token_mask, modality, batch_shape)
        return self._route(x, token_mask, modality, batch_shape)

    def _route(self, x: Tensor, token_mask: Tensor | None, modality: Tensor | None,
               batch_shape: tuple[int, int] | None) -> RoutingResult:
        N = x.shape[0]
        cfg = self.cfg
        if token_mask is None:
            token_mask = torch.ones(N, dtype=torch.bool, device=x.device)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.training and cfg.jitter_eps > 0:
            xf = xf * torch.empty_like(xf).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
        logits = F.linear(xf, self.gate.weight.to(xf.dtype))  # (N, E)
        sel_logits = logits
        if self.noise_gate is not None and self.training:
            noise_std = F.softplus(F.linear(xf, self.noise_gate.weight.to(xf.dtype)))
            sel_logits = logits + torch.randn_like(logits) * noise_std

        group_probs = group_logits = None
        if cfg.hierarchy == "two_level":
            idx, w, probs, group_probs, group_logits = self._two_level(xf, logits, sel_logits)
        else:
            scores = self._scores(sel_logits)
            probs = self._probs(logits)
            if cfg.router == "expert_choice":
                idx, w, selected, C = self._expert_choice(scores, token_mask)
                r = self._result(idx, w, selected, selected, probs, logits, token_mask, modality,
                                 batch_shape, None, None)
                r.extras["capacity"] = C  # static rows per expert for the dispatcher's buffer
                return r
            if cfg.router == "top_p":
                idx, w, selected = self._top_p(scores)
                return self._finish(idx, w, selected, probs, logits, token_mask, modality, batch_shape)
            choice = scores + self.expert_bias if cfg.aux_free_bias else scores
            if cfg.hierarchy == "group_limited":
                choice = self._mask_groups(choice)
                if cfg.score_func == "softmax":
                    group_probs = probs.view(N, cfg.num_groups, -1).sum(-1)
            idx = choice.topk(cfg.top_k, dim=-1).indices
            w = scores.gather(1, idx)  # weights come from unbiased scores
            if cfg.renormalize:
                w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
        if group_probs is None and cfg.num_groups > 1:
            group_probs = probs.view(N, cfg.num_groups, -1).sum(-1)
        selected = torch.ones_like(idx, dtype=torch.bool)
        return self._finish(idx, w, selected, probs, logits, token_mask, modality, batch_shape,
                            group_probs, group_logits)

    def _scores(self, logits: Tensor) -> Tensor:
        return logits.softmax(-1) if self.cfg.score_func == "softmax" else logits.sigmoid()

    def _probs(self, logits: Tensor) -> Tensor:
        """Routing distribution for losses: softmax, or sigmoid scores normalised to sum 1."""
        if self.cfg.score_func == "softmax":
            return logits.softmax(-1)
        s = logits.sigmoid()
        return s / s.sum(-1, keepdim=True)

    def _mask_groups(self, choice: Tensor) -> Tensor:
        """DeepSeek-V3 group-limited routing: keep `top_groups` groups, -inf elsewhere."""
        cfg = self.cfg
        N, E = choice.shape
        grouped = choice.view(N, cfg.num_groups, E // cfg.num_groups)
        per_group_top = max(1, min(grouped.shape[-1], cfg.top_k // cfg.top_groups))
        group_score = grouped.topk(per_group_top, dim=-1).values.sum(-1)  # (N, G)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(cfg.top_groups, dim=-1).indices, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)

    def _two_level(self, xf: Tensor, logits: Tensor, sel_logits: Tensor):
        """Group gate, then an expert gate inside each chosen group; weight = product of the two.

        `sel_logits` (noisy in training with noisy gating) drive selection and weights; the clean
        `logits` give the loss distribution `probs`, as in the flat router."""
        cfg = self.cfg
        N, E = logits.shape
        G, per = cfg.num_groups, E // cfg.num_groups
        group_logits = F.linear(xf, self.group_gate.weight.to(xf.dtype))  # (N, G)
        pg = group_logits.softmax(-1)
        pe = sel_logits.view(N, G, per).softmax(-1)  # expert probs within each group
        sel_probs = (pg[..., None] * pe).view(N, E)
        probs = sel_probs
        if sel_logits is not logits:
            probs = (pg[..., None] * logits.view(N, G, per).softmax(-1)).view(N, E)
        gchoice = pg
        echoice = pe
        if cfg.aux_free_bias:
            echoice = pe + self.expert_bias.view(G, per)
        gidx = gchoice.topk(cfg.top_groups, dim=-1).indices  # (N, tg)
        kpg = cfg.top_k // cfg.top_groups
        local = echoice.gather(1, gidx[..., None].expand(-1, -1, per)).topk(kpg, dim=-1).indices  # (N, tg, kpg)
        idx = (gidx[..., None] * per + local).view(N, cfg.top_k)
        w = sel_probs.gather(1, idx)
        if cfg.renormalize:
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
        return idx, w, probs, pg, group_logits

    def _top_p(self, scores: Tensor):
        """Adaptive k: the fewest experts whose mass reaches top_p, at most top_k."""
        cfg = self.cfg
        p = scores / scores.sum(-1, keepdim=True)
        w, idx = p.topk(cfg.top_k, dim=-1)  # sorted descending
        mass_before = w.cumsum(-1) - w
        selected = mass_before < cfg.top_p  # the first slot always has mass_before = 0
        w = w * selected
        if cfg.renormalize:
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
        return idx, w, selected

    def _expert_choice(self, scores: Tensor, token_mask: Tensor):
        """Each expert picks its top-C real tokens (Zhou et al. 2022). Bidirectional sites only."""
        cfg = self.cfg
        N, E = scores.shape
        cf = cfg.capacity_factor if (self.training or cfg.eval_capacity_factor <= 0) else cfg.eval_capacity_factor
        cf = cf if cf > 0 else 1.0
        # Static buffer C from all N tokens; the real capacity min(n_real, ceil(cf*n_real*k/E)) stays on device.
        C = min(N, max(1, math.ceil(cf * N * cfg.top_k / E)))
        n_real = token_mask.sum()
        c_real = (n_real.double() * cf * cfg.top_k / E).ceil().clamp_min(1).minimum(n_real)
        masked = scores.masked_fill(~token_mask[:, None], float("-inf"))
        tok = masked.topk(C, dim=0).indices  # (C, E): tokens chosen by each expert, best first
        take = (torch.arange(C, device=scores.device) < c_real)[:, None].expand(C, E)
        selected = torch.zeros(N, E, dtype=torch.bool, device=scores.device)
        selected.scatter_(0, tok, take)
        idx = torch.arange(E, device=scores.device).expand(N, E).contiguous()
        w = scores * selected
        if cfg.routed_scaling != 1.0:
            w = w * cfg.routed_scaling
        return idx, w, selected, C

    # ------------------------------------------------------------------ capacity + packaging
    def _finish(self, idx, w, selected, probs, logits, token_mask, modality, batch_shape,
                group_probs=None, group_logits=None) -> RoutingResult:
        selected = selected & token_mask[:, None]
        kept = selected
        C = self.cfg.capacity(token_mask.numel(), self.training)  # static buffer bound (all N tokens)
        if C > 0:  # the real capacity counts real tokens only; it stays on device (no host sync)
            cf = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
            c_real = (token_mask.sum().double() * cf * self.cfg.top_k / self.cfg.num_experts).ceil().clamp_min(1)
            kept = selected & within_capacity(idx, w, selected, c_real, self.cfg.num_experts, self.cfg.drop_policy)
        w = w * self.cfg.routed_scaling if self.cfg.routed_scaling != 1.0 else w
        r = self._result(idx, w * kept, selected, kept, probs, logits, token_mask, modality, batch_shape,
                         group_probs, group_logits)
        r.extras["capacity"] = C  # static rows per expert for the dispatcher's buffer (0: dropless)
        return r

    def _result(self, idx, w, selected, kept, probs, logits, token_mask, modality, batch_shape,
                group_probs, group_logits) -> RoutingResult:
        cfg = self.cfg
        if self.training and cfg.aux_free_bias:
            with torch.no_grad():
                counted = (selected & token_mask[:, None]).flatten().to(self.load_accum.dtype)
                self.load_accum.index_add_(0, idx.flatten(), counted)  # static shapes: no boolean indexing
        return RoutingResult(
            expert_idx=idx, weights=w, selected=selected, kept=kept & token_mask[:, None], probs=probs,
            logits=logits, token_mask=token_mask, num_experts=cfg.num_experts,
            batch_shape=batch_shape or (1, idx.shape[0]), modality=modality, group_probs=group_probs,
            group_logits=group_logits, num_groups=cfg.num_groups,
            expert_bias=self.expert_bias.detach().clone() if cfg.aux_free_bias else None,
        )

    # ------------------------------------------------------------------ aux-loss-free bias
    @torch.no_grad()
    def update_bias(self, load: Tensor | None = None) -> None:
        """DeepSeek-V3 bias step from the load observed since the last call (call after optimizer.step).

        `load` overrides the local accumulator (expert parallel code passes the all-reduced load).
        Router weights are untouched: only selection moves.
        """
        if not self.cfg.aux_free_bias:
            return
        load = self.load_accum if load is None else load
        if load.sum() > 0:
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.load_accum.zero_()


def within_capacity(idx: Tensor, w: Tensor, selected: Tensor, capacity: int | Tensor, num_experts: int,
                    policy: str) -> Tensor:
    """(N, K) bool: which selected slots fit in their expert's capacity under the drop policy.

    Sort-based (no tokens x experts x capacity tensor): order assignments by priority, group them by
    expert with a stable sort, and keep the first `capacity` of each expert.
    """
    N, K = idx.shape
    flat_sel = selected.flatten()
    if policy == "position":  # first choices before second choices, then by token position (GShard)
        flat = torch.arange(N * K, device=idx.device)
        order = torch.argsort((flat % K) * N + flat // K)
    elif policy == "score":
        order = torch.argsort(-w.flatten().float(), stable=True)
    else:
        raise ValueError(f"moe.drop_policy must be 'position' or 'score', got {policy!r}")
    # Unselected slots go to a virtual expert E so they never use capacity.
    e = torch.where(flat_sel, idx.flatten(), torch.full_like(idx.flatten(), num_experts))[order]
    e_sorted, perm = torch.sort(e, stable=True)
    starts = torch.searchsorted(e_sorted, torch.arange(num_experts + 1, device=idx.device))  # no bincount sync
    rank_sorted = torch.arange(e_sorted.numel(), device=idx.device) - starts[e_sorted]
    rank = torch.empty_like(rank_sorted)
    rank[order[perm]] = rank_sorted
    return (rank < capacity).view(N, K) & selected

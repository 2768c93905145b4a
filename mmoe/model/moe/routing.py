"""Routers: every routing kind returns one `RoutingResult`.

A result holds K assignment slots per token (K = top_k, or E for expert choice): which expert, with
what weight, whether the router selected it, and whether it survived capacity. Full probabilities and
logits ride along for the balancing losses in `balancing.py`, which are plain functions of this type.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe.constants import MODALITY_IMAGE, MODALITY_TEXT

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
    expert_modality: Tensor | None = None  # (E,) long: the modality each expert serves (hierarchy 'modality')
    site: str = ""  # "vision" | "connector" | "attention" | "ffn"
    layer: int = -1
    extras: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.site}.{self.layer}"

    def expert_counts(self, which: str = "kept") -> Tensor:
        """(E,) number of assignments per expert over real tokens: `which` is 'kept' (after capacity) or
        'selected' (before)."""
        if which not in ("kept", "selected"):
            raise ValueError(f"expert_counts: which must be 'kept' or 'selected', got {which!r}")
        mask = (self.kept if which == "kept" else self.selected) & self.token_mask[:, None]
        return torch.bincount(self.expert_idx[mask], minlength=self.num_experts)


_LOW_PRECISION = (torch.bfloat16, torch.float16)
_recompute_state = threading.local()


@contextmanager
def recomputing() -> Iterator[None]:
    """Mark a forward as an activation-checkpointing recompute: routers then do not count expert loads again
    (the aux-loss-free bias step must see each real forward's loads once; torchtitan notes the pitfall)."""
    depth = getattr(_recompute_state, "depth", 0)
    _recompute_state.depth = depth + 1
    try:
        yield
    finally:
        _recompute_state.depth = depth


def is_recomputing() -> bool:
    return getattr(_recompute_state, "depth", 0) > 0


def checkpoint_context_fn():
    """`context_fn` for `torch.utils.checkpoint.checkpoint` (non-reentrant): plain forward, marked recompute."""
    return nullcontext(), recomputing()


@dataclass
class _Tokens:
    """What the router knows about the N tokens besides their features."""

    mask: Tensor  # (N,) bool: real tokens
    modality: Tensor | None  # (N,) long
    batch_shape: tuple[int, int]  # (B, T) with B * T = N


@dataclass
class _Selection:
    """A router's choice for K slots per token, before capacity."""

    expert_idx: Tensor  # (N, K) long
    weights: Tensor  # (N, K) float: combine weights (0 on unselected slots)
    selected: Tensor  # (N, K) bool
    capacity: int = 0  # static rows per expert the dispatcher's buffer needs (0: dropless)


@dataclass
class _Distribution:
    """What the balancing losses see: full distributions over experts (and groups)."""

    probs: Tensor  # (N, E) rows sum to 1
    logits: Tensor  # (N, E)
    group_probs: Tensor | None = None  # (N, G)
    group_logits: Tensor | None = None  # (N, G), two-level gate only


class Router(nn.Module):
    """Gate of one MoE layer. Runs in float32 for low-precision activations (selective precision), and in
    float64 for float64 inputs (so float64 reference tests are not rounded to float32).

    Its parameters and buffers stay float32 when the model is cast to bf16/fp16 (pure-bf16 training,
    Lightning's `bf16-true`): a bf16 gate weight flips near-tied experts. Like transformers'
    `_keep_in_fp32_modules` for DeepSeek-V3's `e_score_correction_bias`, and torchtitan's fp32 router.

    `causal=False` (ViT, connector): in eval mode capacity and expert choice act on each sequence (image) on its
    own, so one image's features never depend on the other images in the batch."""

    def __init__(self, dim: int, cfg: MoEConfig, causal: bool = False, site: str = "moe"):
        super().__init__()
        cfg.validate(causal=causal, site=site)
        self.cfg, self.dim, self.causal = cfg, dim, causal
        E = cfg.num_experts
        # created in float32 even under a bf16 default dtype (Lightning's bf16-true init context)
        fp32 = torch.float32 if torch.get_default_dtype() in _LOW_PRECISION else None
        self.gate = nn.Linear(dim, E, bias=False, dtype=fp32)
        nn.init.normal_(self.gate.weight, std=0.02)
        self.group_gate: nn.Linear | None = None
        if cfg.hierarchy == "two_level":
            self.group_gate = nn.Linear(dim, cfg.num_groups, bias=False, dtype=fp32)
            nn.init.normal_(self.group_gate.weight, std=0.02)
        self.noise_gate: nn.Linear | None = None
        if cfg.noisy_gating:
            self.noise_gate = nn.Linear(dim, E, bias=False, dtype=fp32)
            nn.init.zeros_(self.noise_gate.weight)  # Shazeer 2017: W_noise starts at zero
        # Aux-loss-free balancing: bias steers selection only; loads accumulate between optimizer steps.
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32), persistent=True)
        self.register_buffer("load_accum", torch.zeros(E, dtype=torch.float32), persistent=False)
        # (E,) long: the modality each expert serves, hierarchy 'modality' only (None otherwise)
        expert_modality = None
        if cfg.hierarchy == "modality":
            expert_modality = torch.where(torch.arange(E) < cfg.image_experts, MODALITY_IMAGE, MODALITY_TEXT)
        self.register_buffer("expert_modality", expert_modality, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """`.to(bf16)` / `.half()` / `.bfloat16()` keep the router's floats at their precision (>= float32);
        device moves and float64 casts apply as usual."""
        def keep_precision(t: Tensor) -> Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype in _LOW_PRECISION and t.dtype not in _LOW_PRECISION:
                return t.to(device=out.device)
            return out
        return super()._apply(keep_precision, recurse)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, token_mask: Tensor | None = None, modality: Tensor | None = None,
                batch_shape: tuple[int, int] | None = None) -> RoutingResult:
        """Route N tokens. x: (N, D); token_mask: (N,) bool; modality: (N,) long; batch_shape (B, T), B*T = N."""
        N = x.shape[0]
        tokens = _Tokens(mask=torch.ones(N, dtype=torch.bool, device=x.device) if token_mask is None
                         else token_mask, modality=modality, batch_shape=batch_shape or (1, N))
        if torch.is_autocast_enabled(x.device.type):  # selective precision: no bf16 gate under autocast
            with torch.autocast(x.device.type, enabled=False):
                return self._route(x, tokens)
        return self._route(x, tokens)

    def _route(self, x_ND: Tensor, tokens: _Tokens) -> RoutingResult:
        cfg = self.cfg
        x_ND = x_ND.to(torch.promote_types(x_ND.dtype, torch.float32))
        if self.training and cfg.jitter_eps > 0:
            x_ND = x_ND * torch.empty_like(x_ND).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
        logits_NE = F.linear(x_ND, self.gate.weight.to(x_ND.dtype))
        sel_logits_NE = logits_NE  # what selection and weights use (noisy in training with noisy gating)
        if self.noise_gate is not None and self.training:
            noise_std_NE = F.softplus(F.linear(x_ND, self.noise_gate.weight.to(x_ND.dtype)))
            sel_logits_NE = logits_NE + torch.randn_like(logits_NE) * noise_std_NE

        if cfg.hierarchy == "two_level":
            sel, dist = self._two_level(x_ND, logits_NE, sel_logits_NE)
            return self._finish(sel, dist, tokens)
        in_group_NE = None
        if cfg.hierarchy == "modality":  # scores and probabilities live inside each token's modality group
            in_group_NE = self._modality_groups(tokens)
            logits_NE = logits_NE.masked_fill(~in_group_NE, float("-inf"))
            sel_logits_NE = sel_logits_NE.masked_fill(~in_group_NE, float("-inf"))
        scores_NE = self._scores(sel_logits_NE)
        dist = _Distribution(probs=self._probs(logits_NE), logits=logits_NE)
        if cfg.num_groups > 1:
            dist.group_probs = dist.probs.view(-1, cfg.num_groups, cfg.num_experts // cfg.num_groups).sum(-1)
        # selection scores: the aux-loss-free bias moves which experts win, never the weights
        choice_NE = scores_NE + self.expert_bias.to(scores_NE.dtype) if cfg.aux_free_bias else scores_NE
        if cfg.router == "expert_choice":  # capacity is built in: no token-choice capacity step
            return self._package(self._expert_choice(scores_NE, tokens), dist, tokens)
        if cfg.router == "top_p":
            return self._finish(self._top_p(scores_NE, choice_NE), dist, tokens)
        if cfg.hierarchy == "group_limited":
            choice_NE = self._mask_groups(choice_NE)
        if in_group_NE is not None:  # (a bias must not lift an expert of the other modality)
            choice_NE = choice_NE.masked_fill(~in_group_NE, float("-inf"))
        idx_NK = choice_NE.topk(cfg.top_k, dim=-1).indices
        w_NK = scores_NE.gather(1, idx_NK)  # weights come from unbiased scores
        if cfg.renormalize:
            w_NK = w_NK / w_NK.sum(-1, keepdim=True).clamp_min(1e-20)
        return self._finish(_Selection(idx_NK, w_NK, torch.ones_like(idx_NK, dtype=torch.bool)), dist, tokens)

    def _scores(self, logits: Tensor) -> Tensor:
        return logits.softmax(-1) if self.cfg.score_func == "softmax" else logits.sigmoid()

    def _probs(self, logits: Tensor) -> Tensor:
        """Routing distribution for losses: softmax, or sigmoid scores normalised to sum 1."""
        if self.cfg.score_func == "softmax":
            return logits.softmax(-1)
        s = logits.sigmoid()
        return s / s.sum(-1, keepdim=True)

    def _modality_groups(self, tokens: _Tokens) -> Tensor:
        """(N, E) bool: the experts of each token's modality group (no modality given: text)."""
        mod_N = tokens.modality if tokens.modality is not None else torch.full_like(tokens.mask, MODALITY_TEXT,
                                                                                   dtype=torch.long)
        image_N = mod_N == MODALITY_IMAGE
        return image_N[:, None] == (self.expert_modality == MODALITY_IMAGE)[None, :]

    def _mask_groups(self, choice_NE: Tensor) -> Tensor:
        """Group-limited routing: score each group (`cfg.group_score`), keep the `top_groups` best, -inf elsewhere.

        topk_sum: sum of the group's top floor(top_k / top_groups) selection scores (DeepSeek-V3 paper §2.1.2
        "sum of the highest K_r/M affinity scores"; Megatron-Core `group_limited_topk`). top2: sum of the top-2
        (DeepSeek-V3 inference code `Gate`, transformers `DeepseekV3TopkRouter`). max: the best expert's score
        (DeepSeek-V2 device-limited routing, transformers `DeepseekV2TopkRouter` `group_limited_greedy`)."""
        cfg = self.cfg
        N, E = choice_NE.shape
        choice_NGP = choice_NE.view(N, cfg.num_groups, E // cfg.num_groups)  # P experts per group
        if cfg.group_score == "max":
            group_score_NG = choice_NGP.amax(-1)
        else:
            n_top = 2 if cfg.group_score == "top2" else cfg.top_k // cfg.top_groups
            n_top = max(1, min(choice_NGP.shape[-1], n_top))
            group_score_NG = choice_NGP.topk(n_top, dim=-1).values.sum(-1)
        keep_NG = torch.zeros_like(group_score_NG, dtype=torch.bool)
        keep_NG.scatter_(1, group_score_NG.topk(cfg.top_groups, dim=-1).indices, True)
        return choice_NGP.masked_fill(~keep_NG[..., None], float("-inf")).view(N, E)

    def _two_level(self, x_ND: Tensor, logits_NE: Tensor, sel_logits_NE: Tensor
                   ) -> tuple[_Selection, _Distribution]:
        """Group gate, then an expert gate inside each chosen group; weight = P(g) * P(e|g).

        `sel_logits` (noisy in training with noisy gating) drive selection and weights; the clean
        `logits` give the loss distribution `probs`, as in the flat router. (renormalize with top_groups = 1
        would cancel P(g) and leave the group gate untrained: the config refuses it.)"""
        cfg = self.cfg
        N, E = logits_NE.shape
        G, P = cfg.num_groups, E // cfg.num_groups
        group_logits_NG = F.linear(x_ND, self.group_gate.weight.to(x_ND.dtype))
        pg_NG = group_logits_NG.softmax(-1)
        pe_NGP = sel_logits_NE.view(N, G, P).softmax(-1)  # expert probs within each group
        sel_probs_NE = (pg_NG[..., None] * pe_NGP).view(N, E)
        probs_NE = sel_probs_NE
        if sel_logits_NE is not logits_NE:
            probs_NE = (pg_NG[..., None] * logits_NE.view(N, G, P).softmax(-1)).view(N, E)
        echoice_NGP = pe_NGP + self.expert_bias.view(G, P).to(pe_NGP.dtype) if cfg.aux_free_bias else pe_NGP
        gidx_Nt = pg_NG.topk(cfg.top_groups, dim=-1).indices  # t = top_groups
        kpg = cfg.top_k // cfg.top_groups  # experts per chosen group
        local_Ntk = echoice_NGP.gather(1, gidx_Nt[..., None].expand(-1, -1, P)).topk(kpg, dim=-1).indices
        idx_NK = (gidx_Nt[..., None] * P + local_Ntk).view(N, cfg.top_k)
        w_NK = sel_probs_NE.gather(1, idx_NK)
        if cfg.renormalize:
            w_NK = w_NK / w_NK.sum(-1, keepdim=True).clamp_min(1e-20)
        sel = _Selection(idx_NK, w_NK, torch.ones_like(idx_NK, dtype=torch.bool))
        return sel, _Distribution(probs_NE, logits_NE, group_probs=pg_NG, group_logits=group_logits_NG)

    def _top_p(self, scores_NE: Tensor, choice_NE: Tensor) -> _Selection:
        """Adaptive k: walking experts in `choice` order (scores + aux-free bias), the fewest whose
        unbiased mass reaches top_p, at most top_k."""
        cfg = self.cfg
        p_NE = scores_NE / scores_NE.sum(-1, keepdim=True)
        idx_NK = choice_NE.topk(cfg.top_k, dim=-1).indices  # sorted by descending selection score
        w_NK = p_NE.gather(1, idx_NK)
        mass_before_NK = w_NK.cumsum(-1) - w_NK
        selected_NK = mass_before_NK < cfg.top_p  # the first slot always has mass_before = 0
        w_NK = w_NK * selected_NK
        if cfg.renormalize:
            w_NK = w_NK / w_NK.sum(-1, keepdim=True).clamp_min(1e-20)
        return _Selection(idx_NK, w_NK, selected_NK)

    def _per_sequence(self) -> bool:
        """Capacity and expert choice per sequence (image): eval at bidirectional sites (batch invariance)."""
        return not self.causal and not self.training

    def _expert_choice(self, scores_NE: Tensor, tokens: _Tokens) -> _Selection:
        """Each expert picks its top-C real tokens (Zhou et al. 2022). Bidirectional sites only.

        Training pools the whole batch; eval picks inside each sequence (image) with C from its length, so an
        image's features do not depend on the rest of the batch."""
        cfg = self.cfg
        N, E = scores_NE.shape
        cf = cfg.capacity_factor if (self.training or cfg.eval_capacity_factor <= 0) else cfg.eval_capacity_factor
        cf = cf if cf > 0 else 1.0
        masked_NE = scores_NE.masked_fill(~tokens.mask[:, None], float("-inf"))
        if self._per_sequence():
            B, T = tokens.batch_shape
            C = min(T, max(1, math.ceil(cf * T * cfg.top_k / E)))
            tok_BCE = masked_NE.view(B, T, E).topk(C, dim=1).indices  # tokens chosen by each expert, per row
            selected_NE = torch.zeros(B, T, E, dtype=torch.bool, device=scores_NE.device)
            selected_NE = selected_NE.scatter_(1, tok_BCE, True).view(N, E)
            rows = B * C  # each expert keeps at most C tokens of each of the B rows
        else:
            # Static buffer C from all N tokens; the real capacity min(n_real, ceil(cf*n_real*k/E)) stays on
            # device, so no host sync and no shape that depends on how many tokens are padding.
            C = min(N, max(1, math.ceil(cf * N * cfg.top_k / E)))
            n_real = tokens.mask.sum()
            c_real = (n_real.double() * cf * cfg.top_k / E).ceil().clamp_min(1).minimum(n_real)
            tok_CE = masked_NE.topk(C, dim=0).indices  # tokens chosen by each expert, best first
            take_CE = (torch.arange(C, device=scores_NE.device) < c_real)[:, None].expand(C, E)
            selected_NE = torch.zeros(N, E, dtype=torch.bool, device=scores_NE.device)
            selected_NE.scatter_(0, tok_CE, take_CE)
            rows = C
        selected_NE = selected_NE & tokens.mask[:, None]  # a short row's picks may include padding
        idx_NE = torch.arange(E, device=scores_NE.device).expand(N, E).contiguous()
        return _Selection(idx_NE, scores_NE * selected_NE, selected_NE, capacity=min(rows, N))

    # ------------------------------------------------------------------ capacity + packaging
    def _finish(self, sel: _Selection, dist: _Distribution, tokens: _Tokens) -> RoutingResult:
        """Token-choice capacity (per sequence in eval at bidirectional sites, else over the batch)."""
        cfg = self.cfg
        token_mask = tokens.mask
        selected_NK = sel.selected & token_mask[:, None]
        kept_NK = selected_NK
        rows = 0  # static rows per expert for the dispatcher's capacity buffer (0: dropless)
        if self._per_sequence():
            B, T = tokens.batch_shape
            C = cfg.capacity(T, self.training)
            if C > 0:  # one virtual expert per (sequence, expert): capacity counts inside each sequence
                row_N1 = torch.arange(B * T, device=token_mask.device)[:, None] // T
                kept_NK = within_capacity(sel.expert_idx + row_N1 * cfg.num_experts, sel.weights, selected_NK, C,
                                          B * cfg.num_experts, cfg.drop_policy)
                rows = min(B * C, B * T)
        else:
            C = cfg.capacity(token_mask.numel(), self.training)  # static buffer bound (all N tokens)
            if C > 0:  # the real capacity counts real tokens only; it stays on device (no host sync)
                cf = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
                c_real = (token_mask.sum().double() * cf * cfg.top_k / cfg.num_experts).ceil().clamp_min(1)
                kept_NK = selected_NK & within_capacity(sel.expert_idx, sel.weights, selected_NK, c_real,
                                                        cfg.num_experts, cfg.drop_policy)
                rows = min(C, token_mask.numel())
        return self._package(_Selection(sel.expert_idx, sel.weights * kept_NK, selected_NK, capacity=rows), dist,
                             tokens, kept=kept_NK)

    def _package(self, sel: _Selection, dist: _Distribution, tokens: _Tokens,
                 kept: Tensor | None = None) -> RoutingResult:
        """Scale weights, count loads for the aux-free bias (once per real forward), build the result."""
        cfg = self.cfg
        selected_NK = sel.selected & tokens.mask[:, None]
        kept_NK = selected_NK if kept is None else kept & tokens.mask[:, None]
        w_NK = sel.weights * cfg.routed_scaling if cfg.routed_scaling != 1.0 else sel.weights
        if self.training and cfg.aux_free_bias and not is_recomputing():
            with torch.no_grad():  # index_add_: static shapes, no boolean indexing (no host sync)
                counted_A = selected_NK.flatten().to(self.load_accum.dtype)
                self.load_accum.index_add_(0, sel.expert_idx.flatten(), counted_A)
        return RoutingResult(
            expert_idx=sel.expert_idx, weights=w_NK, selected=selected_NK, kept=kept_NK, probs=dist.probs,
            logits=dist.logits, token_mask=tokens.mask, num_experts=cfg.num_experts,
            batch_shape=tokens.batch_shape, modality=tokens.modality, group_probs=dist.group_probs,
            group_logits=dist.group_logits, num_groups=cfg.num_groups,
            expert_bias=self.expert_bias.detach().clone() if cfg.aux_free_bias else None,
            expert_modality=self.expert_modality, extras={"capacity": sel.capacity},
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
        if self.expert_modality is not None:  # balance inside each modality group
            for mod in (MODALITY_IMAGE, MODALITY_TEXT):
                group = self.expert_modality == mod
                self.expert_bias[group] += self.cfg.bias_update_rate * torch.sign(load[group].mean() - load[group])
        elif load.sum() > 0:
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

"""Balancing losses and routing-health metrics: plain functions of one layer's RoutingResult.

Every loss is computed per layer (callers sum over layers with per-site coefficients; nothing here
pools tokens across layers). Padding tokens are excluded through `token_mask`. Each balance loss
is normalised to equal 1 at perfect balance, so coefficients mean the same thing at any E or k.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from mmoe.constants import MODALITY_NAMES, MODALITY_TEXT

from .routing import RoutingResult



def _mask(r: RoutingResult, extra: Tensor | None = None) -> Tensor:
    return r.token_mask if extra is None else r.token_mask & extra


def _selected_counts(r: RoutingResult, mask: Tensor) -> Tensor:
    counted = (r.selected & mask[:, None]).flatten().float()  # static shapes: no host sync on a GPU
    return counted.new_zeros(r.num_experts).index_add_(0, r.expert_idx.flatten(), counted)


def _fp_balance(counts: Tensor, mean_probs: Tensor) -> Tensor:
    """n * sum_i f_i P_i with f the assignment fractions: 1 when both are uniform."""
    f = counts / counts.sum().clamp_min(1.0)
    return counts.numel() * (f * mean_probs).sum()


def load_balance_loss(r: RoutingResult, mask: Tensor | None = None) -> Tensor:
    """Switch/GShard loss E * sum_i f_i P_i (f: share of selected assignments, P: mean router prob).

    With modality groups (hierarchy 'modality') it is the mean over modalities of the same loss inside each
    modality's expert group, so it is 1 when every group is balanced."""
    if r.expert_modality is not None:
        return _modality_group_balance(r, mask)
    m = _mask(r, mask)
    n = m.sum().clamp_min(1)
    P = (r.probs * m[:, None]).sum(0) / n
    return _fp_balance(_selected_counts(r, m), P)


def _token_modality(r: RoutingResult) -> Tensor:
    """(N,) long modality per token (text where the router was given none)."""
    return r.modality if r.modality is not None else torch.full_like(r.token_mask, MODALITY_TEXT, dtype=torch.long)


def _modality_group_balance(r: RoutingResult, mask: Tensor | None = None) -> Tensor:
    """Mean over the modalities present of Eg * sum_{i in group} f_i P_i over that modality's tokens."""
    modality = _token_modality(r)
    losses = []
    for mod in MODALITY_NAMES:
        m = _mask(r, mask) & (modality == mod)
        if not bool(m.any()):
            continue
        group = r.expert_modality == mod
        P = (r.probs * m[:, None]).sum(0)[group] / m.sum()
        losses.append(_fp_balance(_selected_counts(r, m)[group], P))
    return torch.stack(losses).mean() if losses else r.probs.new_zeros(())


def z_loss(r: RoutingResult) -> Tensor:
    """ST-MoE router z-loss mean(logsumexp(logits)^2) over real tokens (plus the group gate's, if any)."""
    m = r.token_mask.float()
    n = m.sum().clamp_min(1)
    loss = (torch.logsumexp(r.logits, -1).pow(2) * m).sum() / n
    if r.group_logits is not None:
        loss = loss + (torch.logsumexp(r.group_logits, -1).pow(2) * m).sum() / n
    return loss


def group_balance_loss(r: RoutingResult) -> Tensor:
    """G * sum_g f_g P_g over expert groups; 0 for flat routing with a single group."""
    if r.num_groups <= 1:
        return r.probs.new_zeros(())
    m = r.token_mask
    G = r.num_groups
    per = r.num_experts // G
    counts = _selected_counts(r, m).view(G, per).sum(-1)
    gp = r.group_probs if r.group_probs is not None else r.probs.view(-1, G, per).sum(-1)
    P = (gp * m[:, None]).sum(0) / m.sum().clamp_min(1)
    return _fp_balance(counts, P)


def modality_balance_loss(r: RoutingResult) -> Tensor:
    """Mean over modalities present of the load-balance loss on that modality's tokens alone.

    Pooled balance can hide image tokens crowding a few experts while text tokens fill the rest.
    """
    if r.modality is None or r.expert_modality is not None:  # modality groups: balance is per modality already
        return load_balance_loss(r)
    losses = [load_balance_loss(r, r.modality == mod) for mod in MODALITY_NAMES
              if bool(((r.modality == mod) & r.token_mask).any())]
    return torch.stack(losses).mean() if losses else r.probs.new_zeros(())


def device_balance_loss(r: RoutingResult, num_devices: int,
                        sum_over_ranks: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """D * sum_d f_d P_d with experts split into `num_devices` contiguous shards (DeepSeek-V2).

    With `sum_over_ranks` (an element-wise sum over data-parallel ranks, injected by the training code) f and
    P are those of the global batch: the value is the global loss on every rank, and each rank's gradient is
    W x its own tokens' share, so the data-parallel mean of the gradients is the global loss's gradient."""
    if num_devices <= 1:
        return r.probs.new_zeros(())
    if r.num_experts % num_devices:
        raise ValueError(f"num_experts={r.num_experts} is not divisible by num_devices={num_devices}")
    m = r.token_mask
    S = (r.probs * m[:, None]).sum(0).view(num_devices, -1).sum(-1)
    counts = _selected_counts(r, m).view(num_devices, -1).sum(-1).to(S.dtype)  # f in the probs' precision
    n = m.sum()
    if sum_over_ranks is None:
        return _fp_balance(counts, S / n.clamp_min(1))
    D = num_devices
    stats = torch.cat([counts, S.detach(), n.to(S.dtype).reshape(1), S.new_ones(1)])
    total = sum_over_ranks(stats)  # one collective: counts, prob sums, tokens, world size
    n_all, world = total[2 * D].clamp_min(1), total[2 * D + 1]
    local = world * S / n_all
    P = total[D:2 * D] / n_all + (local - local.detach())  # global value, W x local gradient
    return _fp_balance(total[:D], P)


def sequence_balance_loss(r: RoutingResult) -> Tensor:
    """DeepSeek-V3 sequence-wise balance: the load-balance loss per sequence, averaged over sequences."""
    B, T = r.batch_shape
    K, E = r.expert_idx.shape[1], r.num_experts
    m = r.token_mask.view(B, T)
    sel = (r.selected & r.token_mask[:, None]).view(B, T * K).float()
    counts = torch.zeros(B, E, device=sel.device).scatter_add_(1, r.expert_idx.reshape(B, T * K), sel)
    f = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    P = (r.probs.view(B, T, E) * m[..., None]).sum(1) / m.sum(-1, keepdim=True).clamp_min(1)
    per_seq = E * (f * P).sum(-1)
    has = m.any(-1)
    return per_seq[has].mean() if bool(has.any()) else r.probs.new_zeros(())


BALANCING_LOSSES: dict[str, Callable[..., Tensor]] = {
    "balance": load_balance_loss,
    "z": z_loss,
    "group": group_balance_loss,
    "modality": modality_balance_loss,
    "device": device_balance_loss,  # also takes the number of expert-parallel devices
    "sequence": sequence_balance_loss,
}
"""The one registry of balancing-loss kinds: the training config has one coefficient per kind, the training module
logs `train/balance/<site>/<kind>`."""
LOSS_KINDS = tuple(BALANCING_LOSSES)


def balancing_loss(kind: str, r: RoutingResult, num_devices: int = 1,
                   sum_over_ranks: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """One layer's balancing loss of `kind` (a key of BALANCING_LOSSES); `sum_over_ranks` makes the device
    loss one of the global batch (see `device_balance_loss`)."""
    if kind not in BALANCING_LOSSES:
        raise KeyError(f"unknown balancing-loss kind {kind!r}; known: {list(LOSS_KINDS)}")
    fn = BALANCING_LOSSES[kind]
    return fn(r, num_devices, sum_over_ranks) if kind == "device" else fn(r)


def balancing_losses(r: RoutingResult, num_devices: int = 1) -> dict[str, Tensor]:
    """All balancing losses of one layer, keyed by kind."""
    return {kind: balancing_loss(kind, r, num_devices) for kind in LOSS_KINDS}


# --------------------------------------------------------------------------- health metrics
def _load_stats(load: Tensor, prefix: str) -> dict[str, Tensor]:
    mean = load.mean().clamp_min(1e-9)
    return {
        f"{prefix}load_cv": load.std(unbiased=False) / mean,
        f"{prefix}max_violation": (load.max() - mean) / mean,  # MaxVio (DeepSeek "Auxiliary-Loss-Free")
        f"{prefix}dead_experts": (load == 0).sum().float(),
    }


@torch.no_grad()
def routing_metrics(r: RoutingResult) -> dict[str, float]:
    """Routing health of one layer: load CV, MaxVio, drop rate, entropies, dead experts, bias stats,
    overall and per modality and per group. One host sync for the whole dict."""
    out: dict[str, Tensor] = {}
    m = r.token_mask
    kept = r.expert_counts("kept").float()
    sel = r.expert_counts("selected").float()
    out.update(_load_stats(kept, ""))
    out["drop_rate"] = 1.0 - kept.sum() / sel.sum().clamp_min(1)
    out["experts_per_token"] = (r.kept & m[:, None]).sum() / m.sum().clamp_min(1)
    p = r.probs.clamp_min(1e-12)
    n = m.sum().clamp_min(1)
    log_e = math.log(r.num_experts) if r.num_experts > 1 else 1.0  # entropies normalised to [0, 1]
    out["token_entropy"] = (-(p * p.log()).sum(-1) * m).sum() / n / log_e
    pbar = (r.probs * m[:, None]).sum(0) / n
    out["marginal_entropy"] = -(pbar * pbar.clamp_min(1e-12).log()).sum() / log_e
    if r.expert_bias is not None:
        out["bias_mean"], out["bias_std"] = r.expert_bias.mean(), r.expert_bias.std(unbiased=False)
        out["bias_absmax"] = r.expert_bias.abs().max()
    if r.modality is not None:
        for mod, name in MODALITY_NAMES.items():
            mm = m & (r.modality == mod)
            if not bool(mm.any()):
                continue
            km = torch.bincount(r.expert_idx[r.kept & mm[:, None]], minlength=r.num_experts).float()
            sm = torch.bincount(r.expert_idx[r.selected & mm[:, None]], minlength=r.num_experts).float()
            if r.expert_modality is not None:  # modality groups: that modality's experts only
                km, sm = km[r.expert_modality == mod], sm[r.expert_modality == mod]
            out.update(_load_stats(km, f"{name}/"))
            out[f"{name}/drop_rate"] = 1.0 - km.sum() / sm.sum().clamp_min(1)
        if r.expert_modality is not None:  # each group balances only within itself: the MaxVio its losses act on
            vio = [out[f"{name}/max_violation"] for name in MODALITY_NAMES.values() if f"{name}/max_violation" in out]
            if vio:
                out["in_group_max_violation"] = torch.stack(vio).max()
    if r.num_groups > 1:
        gl = kept.view(r.num_groups, -1).sum(-1)
        out.update({k: v for k, v in _load_stats(gl, "group/").items() if "dead" not in k})
    keys = list(out)
    values = torch.stack([out[k].float().reshape(()) for k in keys]).tolist()
    return dict(zip(keys, values))


def expert_load(r: RoutingResult) -> Tensor:
    """(E,) share of kept assignments per expert (for load-over-time plots)."""
    c = r.expert_counts("kept").float()
    return c / c.sum().clamp_min(1)

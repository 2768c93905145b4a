"""Checkpoints and export of an expert-parallel model: one file, one-process layout.

Lightning writes checkpoints on rank 0 only, and each EP rank holds different experts, so the strategy
gathers every expert shard into the full (E, ...) tensors while the checkpoint dict is built (all ranks take
part), and slices them back on load. The result has exactly the keys and shapes of a one-process run, so a
run can resume with a different ep_size (or none), and `consolidated_model` feeds the ordinary exporter.
Adam moments of experts are gathered/sliced the same way.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmoe.model.moe.dispatch import LocalDispatcher

from .expert_parallel import (SHARD_ATTR, STATE_ATTR, ExpertParallel, ExpertShard, _shard_params, find_state,
                              moe_modules, sharded_linears)


# --------------------------------------------------------------------------- checkpoints
def _gather_experts(t: Tensor, st: ExpertParallel) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(st.mesh.ep_size)]
    dist.all_gather(parts, t.contiguous(), group=st.ep_group)
    return torch.cat(parts, 0)


@torch.no_grad()
def full_state_dict(module: nn.Module, *args, **kwargs) -> dict:
    """`module.state_dict()` with every expert shard gathered over the EP group: the same keys and shapes as
    a one-process model. Collective (all ranks). Extra args go to `state_dict`."""
    st = find_state(module)
    sd = module.state_dict(*args, keep_vars=True, **kwargs)
    shards = _shard_params(module) if st is not None else {}
    out = {}
    for k, v in sd.items():
        if isinstance(v, Tensor) and id(v) in shards:
            out[k] = _gather_experts(v.detach(), st)
        else:
            out[k] = v.detach() if isinstance(v, Tensor) else v
    return out


def shard_state_dict(module: nn.Module, full: Mapping[str, Tensor]) -> dict:
    """Slice a full (one-process-shaped) state dict down to this rank's expert blocks. Local, no collective.
    Tensors that already have the local shape pass through (e.g. a dict made by `module.state_dict()`)."""
    if find_state(module) is None:
        return dict(full)
    shards = _shard_params(module)
    local = module.state_dict(keep_vars=True)
    out = dict(full)
    for k, v in local.items():
        if k in full and id(v) in shards:
            _, sh = shards[id(v)]
            t = full[k]
            if t.shape[0] == sh.num_experts:
                out[k] = t[sh.lo:sh.hi]
            elif tuple(t.shape) != tuple(v.shape):
                raise ValueError(f"{k}: checkpoint shape {tuple(t.shape)} is neither the full "
                                 f"{(sh.num_experts, *v.shape[1:])} nor the local {tuple(v.shape)}")
    return out


def _optimizer_expert_index(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[int, ExpertShard]:
    """state_dict index -> shard of every expert parameter the optimizer holds."""
    shards = _shard_params(module)
    out, i = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in shards:
                out[i] = shards[id(p)][1]
            i += 1
    return out


@torch.no_grad()
def full_optimizer_state_dict(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict:
    """optimizer.state_dict() with expert-shaped state (Adam moments, ...) gathered over the EP group.
    Collective. State tensors whose first dim is the local expert count are gathered; scalars (step) kept."""
    sd = optimizer.state_dict()
    st = find_state(module)
    if st is None:
        return sd
    index = _optimizer_expert_index(optimizer, module)
    state = dict(sd["state"])
    for i in sorted(index):
        if i not in state:
            continue
        sh = index[i]
        entry = dict(state[i])
        for k in sorted(entry):
            v = entry[k]
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == sh.hi - sh.lo:
                entry[k] = _gather_experts(v, st)
        state[i] = entry
    return {**sd, "state": state}


def shard_optimizer_state_dict(optimizer: torch.optim.Optimizer, module: nn.Module, full: dict) -> dict:
    """Inverse of full_optimizer_state_dict for this rank (local slicing, no collective)."""
    if find_state(module) is None:
        return full
    index = _optimizer_expert_index(optimizer, module)
    state = dict(full["state"])
    for i, sh in index.items():
        if i not in state:
            continue
        entry = dict(state[i])
        for k, v in entry.items():
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == sh.num_experts:
                entry[k] = v[sh.lo:sh.hi].clone()
        state[i] = entry
    return {**full, "state": state}


# --------------------------------------------------------------------------- export
def _expert_slots(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(GroupedLinear, 'weight'|'bias') of every sharded expert tensor, in a rank-independent order."""
    return [(g, n) for g in sharded_linears(module) for n in ("weight", "bias") if getattr(g, n) is not None]


@torch.no_grad()
def cache_consolidated(module: nn.Module) -> None:
    """Gather the full experts now (collective; kept on the host) so that a later rank-0-only
    `consolidated_model` needs no collective. Valid until the weights change: the Lightning strategy
    refreshes it at the end of every fit and drops it at every optimizer step (`drop_consolidated`)."""
    st = find_state(module)
    if st is None:
        return
    st._cache = {(id(g), n): _gather_experts(getattr(g, n).detach(), st).cpu() for g, n in _expert_slots(module)}


def drop_consolidated(module: nn.Module) -> None:
    st = find_state(module)
    if st is not None:
        st._cache = None


@torch.no_grad()
def consolidated_model(model: nn.Module) -> nn.Module:
    """A copy of `model` as one process would hold it: full experts, local dispatchers. `model` itself when
    expert parallelism is off. Collective (all ranks) unless `cache_consolidated` ran since the last weight
    update (the Lightning strategy does that at the end of fit, so rank-0-only export works)."""
    fsdp = model.__dict__.get("_mmoe_fsdp")
    if fsdp is not None:  # FSDP2-sharded (fsdp_ep): the strategy gathered a one-process copy at the end of fit
        if fsdp.consolidated is None and fsdp.consolidated_elsewhere:
            return model  # rank > 0 after the gather: rank 0 holds the copy and exports; nothing to return here
        if fsdp.consolidated is None:
            raise RuntimeError("FSDP-sharded model: call mmoe.parallel.fsdp_strategy.cache_consolidated_fsdp "
                               "(collective; rank 0 keeps the copy) before exporting")
        return fsdp.consolidated
    st = find_state(model)
    if st is None:
        return model
    slots = _expert_slots(model)
    cache = st._cache
    if cache is not None and all((id(g), n) in cache for g, n in slots):
        full = {(id(g), n): cache[(id(g), n)] for g, n in slots}
    else:
        full = {(id(g), n): _gather_experts(getattr(g, n).detach(), st) for g, n in slots}
    memo: dict = {id(st): None}
    for g, n in slots:
        p = getattr(g, n)
        memo[id(p)] = nn.Parameter(full[(id(g), n)].to(p.device, p.dtype).clone(), requires_grad=p.requires_grad)
    for _, m in moe_modules(model):
        memo[id(m.dispatcher)] = LocalDispatcher()
    new = copy.deepcopy(model, memo)
    new.__dict__.pop(STATE_ATTR, None)
    for g in sharded_linears(new):
        g.num_experts = getattr(g, SHARD_ATTR).num_experts
        delattr(g, SHARD_ATTR)
    return new


@torch.no_grad()
def gather_experts_locally(module: nn.Module):
    """Give every rank the full experts and local dispatchers (collective); returns `restore()`, which puts
    the shards, their Parameter objects (the optimizer's) and the all-to-all dispatchers back.

    For evaluation/generation: no collective per decode step, and ranks may run different step counts."""
    st = find_state(module)
    if st is None:
        return lambda: None
    saved = []
    for g in sharded_linears(module):
        full = {}
        for name in ("weight", "bias"):
            p = getattr(g, name)
            if p is not None:
                full[name] = nn.Parameter(_gather_experts(p.detach(), st), requires_grad=False)
        saved.append((g, g.weight, g.bias, g.num_experts))
        g.weight = full["weight"]
        if "bias" in full:
            g.bias = full["bias"]
        g.num_experts = getattr(g, SHARD_ATTR).num_experts
    disps = []
    for _, m in moe_modules(module):
        disps.append((m, m.dispatcher))
        m.dispatcher = LocalDispatcher()

    def restore() -> None:
        for g, w, b, n in saved:
            g.weight = w
            if b is not None:
                g.bias = b
            g.num_experts = n
        for m, d in disps:
            m.dispatcher = d

    return restore


__all__ = ["gather_experts_locally", "full_state_dict", "shard_state_dict", "full_optimizer_state_dict",
           "shard_optimizer_state_dict", "cache_consolidated", "drop_consolidated", "consolidated_model"]

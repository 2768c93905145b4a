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

from .expert_parallel import (SHARD_ATTR, STATE_ATTR, ExpertParallel, ExpertShard, _shard_params, expert_parameters,
                              find_state, moe_modules, sharded_linears)


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
def _versions(module: nn.Module) -> tuple:
    return tuple(p._version for p in expert_parameters(module))


@torch.no_grad()
def cache_consolidated(module: nn.Module) -> None:
    """Gather the full experts now (collective) so a later rank-0-only `consolidated_model` needs no
    collective. The cache is used only while the expert weights are unchanged (tensor version counters)."""
    st = find_state(module)
    if st is None:
        return
    full = {id(p): _gather_experts(p.detach(), st) for p in expert_parameters(module)}
    st._cache = (_versions(module), full)


@torch.no_grad()
def consolidated_model(model: nn.Module) -> nn.Module:
    """A copy of `model` as one process would hold it: full experts, local dispatchers. `model` itself when
    expert parallelism is off. Collective unless `cache_consolidated` ran since the last weight update
    (the Lightning strategy does that at the end of fit, so rank-0-only export works)."""
    st = find_state(model)
    if st is None:
        return model
    params = expert_parameters(model)
    if st._cache is not None and st._cache[0] == _versions(model):
        full = st._cache[1]
    else:
        full = {id(p): _gather_experts(p.detach(), st) for p in params}
    memo: dict = {id(st): None}
    for p in params:
        q = nn.Parameter(full[id(p)].clone(), requires_grad=p.requires_grad)
        memo[id(p)] = q
    for _, m in moe_modules(model):
        memo[id(m.dispatcher)] = LocalDispatcher()
    new = copy.deepcopy(model, memo)
    new.__dict__.pop(STATE_ATTR, None)
    for g in sharded_linears(new):
        g.num_experts = getattr(g, SHARD_ATTR).num_experts
        delattr(g, SHARD_ATTR)
    return new


__all__ = ["full_state_dict", "shard_state_dict", "full_optimizer_state_dict",
           "shard_optimizer_state_dict", "cache_consolidated", "consolidated_model"]

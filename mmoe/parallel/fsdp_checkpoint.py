"""Checkpoints of `apply_fsdp_ep` models: sharded save/resume with torch.distributed.checkpoint (DCP), and a
full one-process state dict for export.

Every tensor is written under its one-process name and *global* shape, each rank writing only its shard:
non-expert weights are FSDP DTensors already; an expert tensor (E/ep local experts, dim 1 sharded over EDP)
is re-described as a DTensor of the full (E, ...) tensor on the (edp, ep) mesh, placements
(Shard(1) over edp, Shard(0) over ep). DCP then reshards on load, so a run saved at one world size / EP size
resumes at another. AdamW moments are saved the same way, keyed by parameter name.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from .expert_parallel import _shard_params
from .fsdp import EXPERT_SHARD_DIM, find_fsdp

WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def clean_name(name: str) -> str:
    """Parameter name without activation-checkpoint wrapper prefixes (the state_dict / export name)."""
    return name.replace(WRAPPER_PREFIX, "")


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def _expert_global(t: Tensor, num_experts: int, mesh) -> DTensor:
    """The full (E, ...) expert tensor whose shard this rank holds: dim 0 split over ep, dim 1 over edp."""
    local = t.to_local() if isinstance(t, DTensor) else t
    if t.dim() < 2:
        raise ValueError(f"expert tensor of shape {tuple(t.shape)}: expected (experts, ...) with >= 2 dims")
    shape = torch.Size((num_experts, *t.shape[1:]))
    placements = [Shard(EXPERT_SHARD_DIM), Shard(0)]  # mesh dims (edp, ep)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape,
                              stride=_contiguous_stride(shape))


def _expert_ids(module: nn.Module) -> dict[int, int]:
    """id(expert param) -> global expert count, for EP-sharded experts."""
    return {pid: sh.num_experts for pid, (_, sh) in _shard_params(module).items()}


def sharded_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """{name: global-shaped DTensor (or replicated tensor)} for DCP; values share storage with the model."""
    info = find_fsdp(module)
    experts = _expert_ids(module) if info is not None and info.ep is not None else {}
    out = {}
    for k, v in module.state_dict(keep_vars=True).items():
        if id(v) in experts:
            out[k] = _expert_global(v.detach(), experts[id(v)], info.expert_mesh)
        elif isinstance(v, Tensor):
            out[k] = v.detach()
        else:
            out[k] = v
    return out


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam/AdamW state (step 0, zero moments: exactly a fresh optimizer's) for params that have none,
    so a checkpoint always holds every entry and a load has a template for it."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"sharded optimizer checkpoints support Adam/AdamW, got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and not optimizer.state.get(p):
                optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}
                if group.get("amsgrad"):
                    optimizer.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)


def sharded_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """{param name: {state key: global-shaped tensor}} (optimizer states shaped like their params)."""
    ensure_optimizer_state(optimizer)
    info = find_fsdp(module)
    experts = _expert_ids(module) if info is not None and info.ep is not None else {}
    names = {id(p): clean_name(n) for n, p in module.named_parameters()}
    out: dict[str, dict] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("optimizer holds a parameter that is not in the module")
            entry = {}
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.dim() > 0 and id(p) in experts:
                    entry[k] = _expert_global(v, experts[id(p)], info.expert_mesh)
                else:
                    entry[k] = v
            out[names[id(p)]] = entry
    return out


def _flat_shapes(state: dict, prefix: str = "") -> dict[str, tuple]:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat_shapes(v, f"{prefix}{k}."))
        elif isinstance(v, Tensor):
            out[f"{prefix}{k}"] = tuple(v.shape)
    return out


def check_compatible(path: str | Path, state: dict) -> None:
    """Raise ValueError naming the first tensor the checkpoint lacks or holds with another global shape."""
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for key, shape in _flat_shapes(state).items():
        if key not in meta:
            raise ValueError(f"checkpoint {path} is incompatible with this model: it has no tensor '{key}'")
        got = getattr(meta[key], "size", None)
        if got is not None and tuple(got) != shape:
            raise ValueError(f"checkpoint {path} is incompatible with this model: '{key}' has shape "
                             f"{tuple(got)} there, {shape} here")


def _copy_back(dst: Tensor, src: Tensor) -> None:
    d = dst.to_local() if isinstance(dst, DTensor) else dst
    s = src.to_local() if isinstance(src, DTensor) else src
    if d.data_ptr() != s.data_ptr() or d.shape != s.shape:
        d.copy_(s)


@torch.no_grad()
def load_into(module: nn.Module, optimizers: list, path: str | Path, model_key: str = "state_dict") -> None:
    """DCP-load `path` (written with `sharded_state_dict` / `sharded_optimizer_state`) into `module` and
    `optimizers`, whatever world size / EP size wrote it. Collective."""
    model_sd = sharded_state_dict(module)
    state = {model_key: model_sd}
    opt_sds = [sharded_optimizer_state(module, o) for o in optimizers]
    for i, o in enumerate(opt_sds):
        state[f"optimizer_{i}"] = {"state": o}
    check_compatible(path, state)
    dcp.load(state, checkpoint_id=str(path))
    live = module.state_dict(keep_vars=True)
    for k, v in model_sd.items():
        if isinstance(v, Tensor):
            _copy_back(live[k], v)
    names = {clean_name(n): p for n, p in module.named_parameters()}
    for opt, sd in zip(optimizers, opt_sds):
        for name, entry in sd.items():
            p = names[name]
            for k, v in entry.items():
                if isinstance(v, Tensor):
                    _copy_back(opt.state[p][k], v)


def save(module: nn.Module, optimizers: list, path: str | Path, model_key: str = "state_dict") -> None:
    """DCP-save model (+ optimizer) shards to the directory `path`. Collective."""
    state = {model_key: sharded_state_dict(module)}
    for i, o in enumerate(optimizers):
        state[f"optimizer_{i}"] = {"state": sharded_optimizer_state(module, o)}
    dcp.save(state, checkpoint_id=str(path))


@torch.no_grad()
def full_state_dict(module: nn.Module, rank0_only: bool = True) -> dict[str, Tensor]:
    """The one-process state dict (every expert, full tensors, on the CPU). Collective: tensor by tensor, so no
    rank holds more than one full tensor on the device at a time; ranks other than 0 get {} if rank0_only."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for k, v in sharded_state_dict(module).items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        if isinstance(v, Tensor) and (rank == 0 or not rank0_only):
            out[k] = v.detach().cpu().clone()
    return out


__all__ = [
    "check_compatible",
    "clean_name",
    "ensure_optimizer_state",
    "full_state_dict",
    "load_into",
    "save",
    "sharded_optimizer_state",
    "sharded_state_dict",
]

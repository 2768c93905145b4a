"""FSDP2 + expert parallelism: shard every weight of an (expert-parallel) MoE model across the world.

    state = enable_expert_parallel(model, ep_size)          # experts sliced over EP, all-to-all dispatchers
    info = apply_fsdp_ep(model, world_mesh, state, mp)       # FSDP2 units, after activation checkpointing
    loss.backward()                                          # FSDP reduce-scatters every gradient
    clip_grad_norm_fsdp_(model.parameters(), 1.0)            # one global norm over all FSDP and EP shards

Layout on W = edp x ep ranks (the (edp, ep) mesh of `mmoe.parallel.mesh`):
* non-expert weights: one FSDP unit per ViT block / decoder layer, one for the connector, and the root unit
  (embeddings, head, norms, patch embedding) - each sharded over all W ranks on dim 0. The root never
  reshards after forward (its weights are the first backward needs). FSDP averages their
  gradients over W, the data-parallel mean.
* experts: each rank holds the experts of its EP rank (E/ep of them, sliced by `enable_expert_parallel`);
  that block is a separate FSDP unit sharded over the rank's expert-data-parallel group (edp ranks holding
  the same experts) on dim 1 (the input features: dim 0 is the local expert count, often 1 or 2, too small
  to split evenly). Its gradient is reduce-scattered over EDP and scaled to SUM over EDP / W, not a mean: the
  local expert gradient already sums the contributions of every EP rank's tokens (the all-to-all backward
  brings them home), so SUM over EDP / W is the data-parallel mean (docs/fsdp_ep.md).
So every weight element lives on exactly one rank, and state bytes per rank are ~1/W of the model's.

Mixed precision is FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 master weights and fp32 reductions by
default in the Lightning strategy); the all-to-all dispatcher is unchanged and sees unsharded bf16 experts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from mmoe.model.moe.experts import GroupedExperts
from mmoe.model.moe.routing import checkpoint_context_fn

from .expert_parallel import ExpertParallel, find_state, sharded_linears

FSDP_ATTR = "_mmoe_fsdp"
EXPERT_SHARD_DIM = 1  # FSDP shard dim of expert tensors (E_local, in, out) / (E_local, out)


@dataclass
class FSDPInfo:
    """What `apply_fsdp_ep` did, attached to the model (plain attribute, not in state_dict)."""

    world_mesh: DeviceMesh  # 1-D, all W ranks: non-expert weights
    ep: ExpertParallel | None  # expert-parallel state (None when ep_size == 1: experts are plain weights)
    units: int = 0  # FSDP units created (roots included)
    expert_units: int = 0
    consolidated: nn.Module | None = None  # cached one-process copy for rank-0 export (strategy)
    consolidated_elsewhere: bool = False  # the copy was gathered onto rank 0 (this rank holds none)

    @property
    def world_size(self) -> int:
        return self.world_mesh.size()

    @property
    def expert_mesh(self) -> DeviceMesh | None:
        """(edp, ep) mesh; expert tensors are global DTensors on it in checkpoints."""
        return None if self.ep is None else self.ep.mesh.device_mesh


def find_fsdp(module: nn.Module) -> FSDPInfo | None:
    for m in module.modules():
        info = m.__dict__.get(FSDP_ATTR)
        if info is not None:
            return info
    return None


def mixed_precision(param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reductions is `mixed_precision(torch.bfloat16, torch.float32)`; None
    keeps the parameters' own dtype (CPU tests run fp32/fp64 end to end)."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def _block_lists(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Containers of transformer blocks: the decoder's `layers` ModuleList, timm's `blocks` Sequential."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.ModuleList, nn.Sequential)) and n.split(".")[-1] in ("layers", "blocks")]


def expert_units(model: nn.Module) -> list[nn.Module]:
    """One FSDP unit per expert bank: a GroupedExperts whose linears are EP-sharded, or a lone sharded
    GroupedLinear (MoA projections)."""
    linears = sharded_linears(model)
    ids = {id(g) for g in linears}
    units, covered = [], set()
    for m in model.modules():
        if isinstance(m, GroupedExperts) and id(m.w_in) in ids:
            units.append(m)
            covered |= {id(m.w_in), id(m.w_out)}
    units += [g for g in linears if id(g) not in covered]
    return units


def _scale_(factor: float, reduced: Tensor) -> None:
    reduced.mul_(factor)


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing (non-reentrant) for every ViT block and decoder layer not yet wrapped;
    returns how many were wrapped. Applied inside the FSDP units (recompute needs no extra all-gather
    beyond the one FSDP issues in backward anyway)."""
    n = 0
    for _, blocks in _block_lists(model):
        for i, b in enumerate(blocks):
            if not hasattr(b, "_checkpoint_wrapped_module"):
                # the ViT's token mask and every block's routing results travel through the call, so a
                # recompute in backward routes exactly as the forward did
                blocks[i] = checkpoint_wrapper(b, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                               context_fn=checkpoint_context_fn)  # loads counted once
                n += 1
    return n


def apply_fsdp_ep(model: nn.Module, world_mesh: DeviceMesh, mp: MixedPrecisionPolicy | None = None,
                  reshard_after_forward: bool = True, activation_checkpointing: bool = False) -> FSDPInfo:
    """Shard `model` in place with FSDP2 (see the module docstring). Collective; call after
    `enable_expert_parallel` (if any) and activation checkpointing, before the optimizer is built.

    `world_mesh` is 1-D over every rank (data parallel = all ranks; EP is carved out of them);
    `reshard_after_forward` applies to the block and expert units (the root keeps its weights)."""
    if find_fsdp(model) is not None:
        return find_fsdp(model)
    if world_mesh.ndim != 1:
        raise ValueError(f"apply_fsdp_ep needs a 1-D mesh over all ranks, got {world_mesh}")
    mp = mp or MixedPrecisionPolicy()
    if activation_checkpointing:
        checkpoint_blocks(model)
    st = find_state(model)
    info = FSDPInfo(world_mesh=world_mesh, ep=st)
    W = world_mesh.size()
    if st is not None:
        if st.mesh.dims.world_size != W:
            raise ValueError(f"expert-parallel mesh spans {st.mesh.dims.world_size} ranks, FSDP mesh {W}")
        edp_mesh = st.mesh.device_mesh["edp"]
        for unit in expert_units(model):
            fully_shard(unit, mesh=edp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                        shard_placement_fn=lambda p: Shard(min(EXPERT_SHARD_DIM, p.ndim - 1)))
            # FSDP averages over EDP (sums when edp == 1); x edp/W = 1/ep makes it SUM over EDP / W. A hook on
            # the reduced shard, not set_gradient_divide_factor: torch 2.14 divides twice on a 1-rank mesh
            # (edp == 1) for fp64/fp16 and needs PREMUL_SUM, which gloo lacks.
            unit.set_all_reduce_hook(functools.partial(_scale_, 1.0 / st.mesh.ep_size))
            info.expert_units += 1
        st.grad_sync = "fsdp"
    units = [b for _, blocks in _block_lists(model) for b in blocks]
    connector = getattr(model, "connector", None)
    if isinstance(connector, nn.Module):
        units.append(connector)
    for u in units:
        fully_shard(u, mesh=world_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root (embeddings, head, norms, patch embedding) keeps its weights after forward: backward needs them
    # first, and FSDP2 does not look inside the dataclass VLMOutput to register the root's pre-backward
    # unshard, so a resharded root would meet backward without its weights (bf16 on CUDA fails there).
    fully_shard(model, mesh=world_mesh, mp_policy=mp, reshard_after_forward=False)
    info.units = len(units) + info.expert_units + 1
    if hasattr(model, "always_encode_images"):  # every rank must run every FSDP unit (text-only batches too)
        model.always_encode_images = True
    model.__dict__[FSDP_ATTR] = info
    return info


# --------------------------------------------------------------------------- gradient norm / clipping
def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def fsdp_grad_norm(parameters: Iterable[Tensor], norm_type: float = 2.0) -> Tensor:
    """Global gradient norm of an `apply_fsdp_ep` model, the same value on every rank.

    Every FSDP-managed element (DTensor) lives on exactly one rank - non-expert weights sharded over the
    world, experts over EP x EDP - so the global sum of |g|^p is one all-reduce of the local shard sums.
    A plain-tensor gradient is replicated: each rank adds 1/W of it."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    world = dist.get_world_size() if dist.is_initialized() else 1
    dev = _local(grads[0]).device if grads else torch.device("cpu")
    sharded = [_local(g) for g in grads if isinstance(g, DTensor)]
    replicated = [g for g in grads if not isinstance(g, DTensor)]

    def part(gs: list[Tensor]) -> Tensor:
        if not gs:
            return torch.zeros((), dtype=torch.float64, device=dev)
        norms = torch.stack([n.to(dev, torch.float64) for n in torch._foreach_norm(gs, norm_type)])
        return norms.max() if math.isinf(norm_type) else norms.pow(norm_type).sum()

    if math.isinf(norm_type):
        total = torch.maximum(part(sharded), part(replicated))
        if world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MAX)
        return total
    total = part(sharded) + part(replicated) / world
    if world > 1:
        dist.all_reduce(total)
    return total.pow(1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_fsdp_(parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0,
                         error_if_nonfinite: bool = False) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` for `apply_fsdp_ep` models: one global norm (`fsdp_grad_norm`), so
    every shard is scaled by the same coefficient. Returns the total norm."""
    params = [p for p in parameters if p.grad is not None]
    total = fsdp_grad_norm(params, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} for gradients is non-finite")
    coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
    by_kind: dict[tuple, list[Tensor]] = {}
    for p in params:
        g = _local(p.grad)
        by_kind.setdefault((g.dtype, g.device), []).append(g)
    for (dtype, dev), gs in by_kind.items():
        torch._foreach_mul_(gs, coef.to(dev, dtype))
    return total


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


__all__ = [
    "FSDP_ATTR",
    "FSDPInfo",
    "apply_fsdp_ep",
    "clip_grad_norm_fsdp_",
    "expert_units",
    "find_fsdp",
    "fsdp_grad_norm",
    "fsdp_modules",
    "mixed_precision",
]

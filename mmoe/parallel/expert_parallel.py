"""Expert parallelism for any model built from mmoe's MoE modules: shard experts, swap dispatchers,
reduce expert gradients, clip with one global norm (checkpoints and export: `mmoe.parallel.checkpoint`).

    state = enable_expert_parallel(model, ep_size)     # collective; after init_process_group, before DDP
    ddp = wrap_ddp(root)                               # plain torch: DDP that leaves the experts alone
    loss.backward(); finalize_expert_grads(root)       # EDP sum / W (the strategy does this for Lightning)
    clip_grad_norm_(root.parameters(), 1.0, module=root)
    sd = full_state_dict(root)                         # every expert, same keys/shapes as a 1-process run
    root.load_state_dict(shard_state_dict(root, sd))
    full = consolidated_model(model)                   # single-process copy for export

What gets sharded: every module with a `.dispatcher` (MoEFFN, MoAAttention, whatever the vision/connector
code builds from them) has its GroupedLinear weights (E, in, out) [+ bias (E, out)] sliced to the local block
[ep_rank*E/ep, (ep_rank+1)*E/ep) and its LocalDispatcher replaced by an AllToAllDispatcher. Routers, shared
experts, K/V projections and everything else stay replicated (plain data parallel).

Gradient rule (DeepSpeed `_reduce_expert_gradients`, Megatron `expert_gradient_scaling_factor`, verified in
the notes): with L = (1/W) sum_r L_r over the W data-parallel ranks, shared params are averaged over all W
ranks (DDP), and an expert's local gradient already sums the contributions of every EP rank's loss (the
all-to-all backward brings them home), so expert grads are SUMmed over the expert-data-parallel group and
divided by W (not by the EDP size).

Expert parameters are recognised by their module (a GroupedLinear carrying `_mmoe_ep_shard`), which survives
`.to()`/precision conversion; the parameters are also tagged `p._mmoe_expert = True` for other code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from mmoe.model.moe.dispatch import LocalDispatcher
from mmoe.model.moe.experts import GroupedLinear

from .dispatcher import AllToAllDispatcher
from .mesh import ExpertParallelMesh, build_mesh

EXPERT_ATTR = "_mmoe_expert"
STATE_ATTR = "_mmoe_ep_state"
SHARD_ATTR = "_mmoe_ep_shard"


@dataclass
class ExpertShard:
    """Which experts a sharded GroupedLinear holds: [lo, hi) of `num_experts` (global)."""

    num_experts: int
    lo: int
    hi: int
    owner: str  # name of the MoE module (for messages)


@dataclass
class ExpertParallel:
    """Per-process EP state, attached to the model passed to `enable_expert_parallel`."""

    mesh: ExpertParallelMesh
    moe_modules: list[str] = field(default_factory=list)
    grad_sync: str | None = None
    """Who reduces expert gradients: 'strategy' (Lightning), 'ddp' (wrap_ddp), 'manual'; None raises on the
    first training forward so experts never train silently unreduced (e.g. under the plain 'ddp' strategy)."""
    _cache: dict | None = None  # {(id(GroupedLinear), 'weight'|'bias'): full tensor} from cache_consolidated

    @property
    def ep_group(self):
        return self.mesh.ep_group

    @property
    def edp_group(self):
        return self.mesh.edp_group


class _GuardedDispatcher(AllToAllDispatcher):
    """AllToAllDispatcher that refuses to train when nobody will reduce the expert gradients."""

    def __init__(self, *args, state: ExpertParallel, **kwargs):
        super().__init__(*args, **kwargs)
        self._state = state

    def plan(self, routing):
        if self._state.grad_sync is None and torch.is_grad_enabled() and routing.logits.requires_grad:
            raise RuntimeError(
                "expert-parallel training step, but nothing reduces the expert gradients and the experts are not "
                "protected from DDP's start-up broadcast: under Lightning use --trainer.strategy ddp_ep "
                "(mmoe.parallel.strategy.ExpertParallelStrategy); with plain torch use mmoe.parallel.wrap_ddp(root) "
                "and finalize_expert_grads(root) after backward, or set state.grad_sync = 'manual'")
        return super().plan(routing)

    def __deepcopy__(self, memo):  # process groups cannot be copied: copies of the model run locally
        return LocalDispatcher()


# --------------------------------------------------------------------------- discovery
def find_state(module: nn.Module) -> ExpertParallel | None:
    """The EP state of `module` or of any submodule (e.g. the model inside a LightningModule)."""
    for m in module.modules():
        st = m.__dict__.get(STATE_ATTR)
        if st is not None:
            return st
    return None


def moe_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every MoE site: modules with a `.dispatcher` (MoEFFN, MoAAttention, ...)."""
    return [(n, m) for n, m in module.named_modules()
            if isinstance(getattr(m, "dispatcher", None), (LocalDispatcher, AllToAllDispatcher))]


def sharded_linears(module: nn.Module) -> list[GroupedLinear]:
    return [m for m in module.modules() if isinstance(m, GroupedLinear) and hasattr(m, SHARD_ATTR)]


def _shard_params(module: nn.Module) -> dict[int, tuple[nn.Parameter, ExpertShard]]:
    out = {}
    for gl in sharded_linears(module):
        for p in (gl.weight, gl.bias):
            if p is not None:
                out[id(p)] = (p, getattr(gl, SHARD_ATTR))
    return out


def expert_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The sharded expert parameters under `module` (empty without EP)."""
    return [p for p, _ in _shard_params(module).values()]


def is_expert_param(p: Tensor) -> bool:
    return bool(getattr(p, EXPERT_ATTR, False))


def ddp_ignore_names(root: nn.Module) -> list[str]:
    """Names DDP must leave alone under `root` (the module DDP wraps): the expert shards (different on every
    EP rank: DDP's start-up broadcast would overwrite them with rank 0's and its all-reduce would average
    different experts) and the routers' per-rank `load_accum` buffers (DDP's per-forward buffer broadcast
    would replace every rank's load with rank 0's before the aux-loss-free bias all-reduce)."""
    ids = set(_shard_params(root))
    names = [n for n, p in root.named_parameters(remove_duplicate=False) if id(p) in ids]
    names += [n for n, _ in root.named_buffers(remove_duplicate=False) if n.endswith("load_accum")]
    bad = [n for n in names if "." not in n]
    if bad:
        # DDP matches reducer params as f"{module_name}.{param_name}": params on the root itself never match.
        raise ValueError(f"expert params {bad} sit on the DDP root module; wrap the model in a parent module")
    return names


def set_ddp_ignore(root: nn.Module) -> list[str]:
    """Register `ddp_ignore_names(root)` with DDP (must happen before DistributedDataParallel(root))."""
    names = ddp_ignore_names(root)
    prev = list(getattr(root, "_ddp_params_and_buffers_to_ignore", []))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        root, sorted(set(prev) | set(names)))
    return names


def wrap_ddp(root: nn.Module, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """Plain-torch DDP over `root` with the experts excluded; call finalize_expert_grads(root) after backward."""
    set_ddp_ignore(root)
    st = find_state(root)
    if st is not None:
        st.grad_sync = st.grad_sync or "ddp"
    return nn.parallel.DistributedDataParallel(root, **ddp_kwargs)


# --------------------------------------------------------------------------- enabling
def enable_expert_parallel(model: nn.Module, ep_size: int, mesh: ExpertParallelMesh | None = None
                           ) -> ExpertParallel | None:
    """Shard every MoE site's experts over the EP group and swap in all-to-all dispatchers (in place).

    Collective (all ranks, same model). Call after the process group exists and before DDP wrapping and
    optimizer creation (Lightning: `configure_model`). Every rank must hold the same full model (same seed or
    same checkpoint): each keeps its block, and EDP replicas are re-broadcast so they agree exactly.
    Returns the state (also found later with `find_state(model)`); None when ep_size == 1.
    """
    if ep_size <= 1:
        return None
    prev = find_state(model)
    if prev is not None:  # Lightning calls configure_model again for every fit/validate/test
        if prev.mesh.ep_size != ep_size:
            raise RuntimeError(f"model is already expert-parallel with ep_size={prev.mesh.ep_size}, not {ep_size}")
        return prev
    mesh = mesh or build_mesh(ep_size)
    ep, r = mesh.ep_size, mesh.ep_rank
    sites = moe_modules(model)
    if not sites:
        raise ValueError(f"model.parallel.ep_size={ep_size} but the model has no MoE layer to shard")
    state = ExpertParallel(mesh=mesh, moe_modules=[n for n, _ in sites])
    if hasattr(model, "always_encode_images"):  # MMoEVLM: text-only batches still join the vision all-to-alls
        model.always_encode_images = True
    for name, m in sites:
        linears = [g for g in m.modules() if isinstance(g, GroupedLinear)]
        if not linears:
            raise ValueError(f"{name}: MoE module without GroupedLinear experts cannot be expert-parallel")
        E = linears[0].num_experts
        cfg = getattr(m, "cfg", None)
        if cfg is not None and getattr(cfg, "num_experts", E) != E:
            raise ValueError(f"{name}: config has {cfg.num_experts} experts but its GroupedLinear {E}")
        if E % ep:
            raise ValueError(f"{name}: num_experts={E} is not divisible by model.parallel.ep_size={ep}")
        El = E // ep
        lo, hi = r * El, (r + 1) * El
        for g in linears:
            if g.num_experts != E:
                raise ValueError(f"{name}: GroupedLinears with different expert counts ({g.num_experts} vs {E})")
            g.weight = _local(g.weight, lo, hi)
            if g.bias is not None:
                g.bias = _local(g.bias, lo, hi)
            g.num_experts = El
            setattr(g, SHARD_ATTR, ExpertShard(E, lo, hi, name))
        m.dispatcher = _GuardedDispatcher(mesh.ep_group, E, ep, r, state=state)
    if mesh.edp_size > 1:  # replicas of a shard must start identical (DeepSpeed broadcasts over EDP too)
        src = dist.get_process_group_ranks(mesh.edp_group)[0]
        with torch.no_grad():
            for p in expert_parameters(model):
                dist.broadcast(p.data, src=src, group=mesh.edp_group)
    model.__dict__[STATE_ATTR] = state  # plain attribute, invisible to state_dict / named_modules
    return state


def _local(p: nn.Parameter, lo: int, hi: int) -> nn.Parameter:
    q = nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad)
    setattr(q, EXPERT_ATTR, True)
    return q


# --------------------------------------------------------------------------- gradients
@torch.no_grad()
def finalize_expert_grads(module: nn.Module) -> None:
    """Expert grads := SUM over the EDP group / W (call once per optimizer step, after the last backward).

    Params without a gradient are skipped (presence is structural, hence the same on every rank)."""
    st = find_state(module)
    if st is None:
        return
    grads = [p.grad for p in expert_parameters(module) if p.grad is not None]
    if not grads:
        return
    W = st.mesh.dp_size
    torch._foreach_div_(grads, float(W))
    if st.mesh.edp_size > 1:
        _all_reduce_coalesced(grads, st.edp_group)


@torch.no_grad()
def sync_nonfinite_expert_grads(module: nn.Module) -> bool:
    """Make an overflow in any rank's expert grads visible to every rank (fp16 GradScaler): experts differ
    across EP ranks, so one rank may overflow alone and skip its step while the others step, desynchronising
    the replicated weights. One scalar all-reduce over the world; on overflow every rank's expert grads are
    set to inf, so every GradScaler skips the step and lowers the scale identically. Returns the flag."""
    if find_state(module) is None:
        return False
    grads = [p.grad for p in expert_parameters(module) if p.grad is not None]
    dev = grads[0].device if grads else next(module.parameters()).device
    bad = torch.zeros((), device=dev)
    if grads:
        bad = torch.stack([torch.isfinite(g).all() for g in grads]).logical_not().any().float()
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bool(bad):
        for g in grads:
            g.fill_(float("inf"))
        return True
    return False


def _all_reduce_coalesced(tensors: list[Tensor], group) -> None:
    by_dtype: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(ts)
        dist.all_reduce(flat, group=group)
        for t, f in zip(ts, torch._utils._unflatten_dense_tensors(flat, ts)):
            t.copy_(f)


@torch.no_grad()
def grad_norm(parameters: Iterable[Tensor], norm_type: float = 2.0, module: nn.Module | None = None) -> Tensor:
    """Global gradient norm of a model whose experts are sharded: shared grads (identical on every rank after
    DDP) counted once, expert shards combined over the EP group. The same value on every rank."""
    params = [p for p in parameters if p.grad is not None]
    if any(isinstance(p.grad, DTensor) for p in params):  # FSDP-sharded (fsdp_ep): every shard once
        from .fsdp import fsdp_grad_norm
        return fsdp_grad_norm(params, norm_type)
    if module is None and any(is_expert_param(p) for p in params):
        # without the model there is no EP group to combine the shards' norms over: a rank-local norm
        raise ValueError("grad_norm / clip_grad_norm_: the parameters include expert shards; pass "
                         "module=<the expert-parallel model> so that their norms are combined over the EP group")
    st = find_state(module) if module is not None else None
    ex = set(_shard_params(module)) if module is not None else set()
    shared = [p.grad for p in params if id(p) not in ex]
    expert = [p.grad for p in params if id(p) in ex]
    device = params[0].grad.device if params else torch.device("cpu")
    norm_type = float(norm_type)

    def part(gs: list[Tensor]) -> Tensor:
        if not gs:
            return torch.zeros((), dtype=torch.float64, device=device)
        norms = torch.stack([n.to(device, torch.float64) for n in torch._foreach_norm(gs, norm_type)])
        return norms.max() if math.isinf(norm_type) else norms.pow(norm_type).sum()

    s, e = part(shared), part(expert)
    group = st.ep_group if st is not None else None
    if st is not None and st.mesh.ep_size > 1:
        dist.all_reduce(e, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM, group=group)
    if math.isinf(norm_type):
        return torch.maximum(s, e)
    return (s + e).pow(1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0,
                    module: nn.Module | None = None, error_if_nonfinite: bool = False) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` with one global norm on every rank (see `grad_norm`), so every rank
    applies the same coefficient and replicated weights stay identical. Returns the total norm."""
    params = [p for p in parameters if p.grad is not None]
    total = grad_norm(params, norm_type, module)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} for gradients is non-finite")
    coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
    grads = [p.grad for p in params]
    if grads:
        by_dtype: dict[tuple, list[Tensor]] = {}
        for g in grads:
            by_dtype.setdefault((g.dtype, g.device), []).append(g)
        for (dtype, dev), gs in by_dtype.items():
            torch._foreach_mul_(gs, coef.to(dev, dtype))
    return total


# --------------------------------------------------------------------------- metrics
@torch.no_grad()
def ep_load_metrics(module: nn.Module) -> dict[str, float]:
    """Per-rank load of the last step, from the real shards: tokens each EP rank *received* per MoE layer,
    its max/mean imbalance, and the all-to-all bytes this rank sent to other ranks. Collective (EP group)."""
    st = find_state(module)
    if st is None:
        return {}
    names, recv = [], []
    for name, m in moe_modules(module):
        d = m.dispatcher
        if isinstance(d, AllToAllDispatcher) and d.last_recv_tokens_per_expert is not None:
            site, layer = getattr(m, "site", None), getattr(m, "layer", None)
            if site is None and type(m).__name__ == "MoAAttention":
                site = "attention"
            names.append(f"{site}.{layer}" if site is not None and layer is not None else name)
            recv.append(d.last_recv_tokens_per_expert.sum())
    if not recv:
        return {}
    mine = torch.stack(recv).to(torch.float64)
    parts = [torch.empty_like(mine) for _ in range(st.mesh.ep_size)]
    dist.all_gather(parts, mine, group=st.ep_group)
    table = torch.stack(parts).cpu()  # (ep, layers)
    out: dict[str, float] = {}
    for j, n in enumerate(names):
        col = table[:, j]
        for r in range(st.mesh.ep_size):
            out[f"ep/{n}/recv_tokens_rank{r}"] = float(col[r])
        out[f"ep/{n}/recv_imbalance"] = float(col.max() / col.mean().clamp_min(1e-9))
    out["ep/a2a_sent_bytes_remote"] = float(sum(m.dispatcher.stats["sent_bytes_remote"]
                                                for _, m in moe_modules(module)
                                                if isinstance(m.dispatcher, AllToAllDispatcher)))
    return out


def dispatchers(module: nn.Module) -> list[AllToAllDispatcher]:
    return [m.dispatcher for _, m in moe_modules(module) if isinstance(m.dispatcher, AllToAllDispatcher)]


__all__ = [
    "ExpertParallel", "ExpertShard", "enable_expert_parallel", "find_state", "moe_modules", "expert_parameters",
    "is_expert_param", "ddp_ignore_names", "set_ddp_ignore", "wrap_ddp", "finalize_expert_grads",
    "sync_nonfinite_expert_grads", "grad_norm", "clip_grad_norm_", "ep_load_metrics", "dispatchers",
]

"""Expert parallelism (EP) + data parallelism for mmoe's MoE models.

* `mesh`            - (edp x ep) DeviceMesh carved out of the data-parallel world (DeepSpeed layout).
* `dispatcher`      - AllToAllDispatcher: drop-in for LocalDispatcher (uneven all-to-all with autograd).
* `expert_parallel` - enable_expert_parallel (shard experts, swap dispatchers), DDP ignore list, expert-grad
                      reduction (SUM over EDP / W), global-norm clipping, per-rank load metrics.
* `collectives`     - sum_over_ranks: the global-batch reducer training code injects into balancing losses.
* `checkpoint`      - gather/shard model and optimizer state, consolidated model for export.
* `fsdp`            - apply_fsdp_ep: FSDP2 over all ranks for dense blocks, over EDP for expert banks; global-norm
                      clipping over every shard.
* `fsdp_checkpoint`  - sharded DCP save/resume at any world/EP size, full one-process state dict for export.
* `fsdp_strategy`   - Lightning: FSDPExpertParallelStrategy ("fsdp_ep", a ModelParallelStrategy).
* `strategy`        - Lightning: ExpertParallelStrategy (DDP with experts excluded); importing it registers
                      the strategy names "ddp_ep" / "ddp_ep_spawn".

Names are resolved lazily so that the torch-level API does not import Lightning (seconds per process).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AllToAllDispatcher": "dispatcher",
    "ExpertParallelMesh": "mesh", "ParallelDims": "mesh", "build_mesh": "mesh",
    "ExpertParallel": "expert_parallel", "enable_expert_parallel": "expert_parallel",
    "find_state": "expert_parallel", "expert_parameters": "expert_parallel", "wrap_ddp": "expert_parallel",
    "finalize_expert_grads": "expert_parallel", "grad_norm": "expert_parallel",
    "clip_grad_norm_": "expert_parallel", "ep_load_metrics": "expert_parallel",
    "sum_over_ranks": "collectives",
    "full_state_dict": "checkpoint", "shard_state_dict": "checkpoint", "consolidated_model": "checkpoint",
    "gather_experts_locally": "checkpoint",
    "apply_fsdp_ep": "fsdp", "clip_grad_norm_fsdp_": "fsdp", "fsdp_grad_norm": "fsdp", "find_fsdp": "fsdp",
    "FSDPExpertParallelStrategy": "fsdp_strategy",
    "ExpertParallelStrategy": "strategy", "require_expert_parallel_strategy": "strategy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

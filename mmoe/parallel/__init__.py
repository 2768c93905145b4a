"""Expert parallelism (EP) + data parallelism for mmoe's MoE models.

* `mesh`            - (edp x ep) DeviceMesh carved out of the data-parallel world (DeepSpeed layout).
* `dispatcher`      - AllToAllDispatcher: drop-in for LocalDispatcher (uneven all-to-all with autograd).
* `expert_parallel` - enable_expert_parallel (shard experts, swap dispatchers), DDP ignore list, expert-grad
                      reduction (SUM over EDP / W), global-norm clipping, per-rank load metrics.
* `checkpoint`      - gather/shard model and optimizer state, consolidated model for export.
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
    "full_state_dict": "checkpoint", "shard_state_dict": "checkpoint", "consolidated_model": "checkpoint",
    "gather_experts_locally": "checkpoint",
    "ExpertParallelStrategy": "strategy", "require_expert_parallel_strategy": "strategy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

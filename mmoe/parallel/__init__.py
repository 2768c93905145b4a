"""Expert parallelism (EP) + data parallelism for mmoe's MoE models.

* `mesh`            - (edp x ep) DeviceMesh carved out of the data-parallel world (DeepSpeed layout).
* `dispatcher`      - AllToAllDispatcher: drop-in for LocalDispatcher (uneven all-to-all with autograd).
* `expert_parallel` - enable_expert_parallel (shard experts, swap dispatchers), DDP ignore list, expert-grad
                      reduction (SUM over EDP / W), global-norm clipping, per-rank load metrics.
* `checkpoint`      - gather/shard model and optimizer state, consolidated model for export.
* `strategy`        - Lightning: ExpertParallelStrategy (DDP with experts excluded), registered as "ddp_ep".
"""

from .dispatcher import AllToAllDispatcher
from .expert_parallel import (ExpertParallel, clip_grad_norm_, consolidated_model, enable_expert_parallel,
                              ep_load_metrics, expert_parameters, finalize_expert_grads, find_state,
                              full_state_dict, grad_norm, shard_state_dict, wrap_ddp)
from .mesh import ExpertParallelMesh, ParallelDims, build_mesh

try:  # registers the Lightning strategy names "ddp_ep" / "ddp_ep_spawn"
    from .strategy import ExpertParallelStrategy
except ImportError:  # lightning not installed: the torch-level API still works
    ExpertParallelStrategy = None

__all__ = [
    "ExpertParallelStrategy", "AllToAllDispatcher", "ExpertParallel", "ExpertParallelMesh", "ParallelDims", "build_mesh",
    "enable_expert_parallel", "find_state", "expert_parameters", "wrap_ddp", "finalize_expert_grads", "grad_norm",
    "clip_grad_norm_", "full_state_dict", "shard_state_dict", "consolidated_model", "ep_load_metrics",
]

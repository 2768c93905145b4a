"""Process topology for expert parallelism: a 2-D (edp x ep) device mesh carved out of the data-parallel world.

Every rank is a data-parallel rank (it reads its own batch: Lightning's DistributedSampler spans the whole
world). Expert parallelism groups `ep_size` *contiguous* ranks that shard the expert set between them and
exchange tokens with an all-to-all; the ranks holding the same expert shard form a *strided*
expert-data-parallel (EDP) group (DeepSpeed's layout, `deepspeed/utils/groups.py`):

    world 8, ep_size 2:  EP groups  [0,1] [2,3] [4,5] [6,7]      (all-to-all)
                         EDP groups [0,2,4,6] [1,3,5,7]          (expert-gradient all-reduce)

With row-major ranks on a mesh of shape (edp, ep) that is exactly `init_device_mesh(dev, (edp, ep))`:
rank = edp_rank * ep_size + ep_rank. On a multi-node job with ep_size <= GPUs per node the all-to-all stays
inside a node (NVLink) and only the EDP all-reduce crosses nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelDims:
    """World size split into data parallel (all ranks) x expert parallel (`ep_size` contiguous ranks)."""

    world_size: int
    ep_size: int = 1

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"model.parallel.ep_size must be >= 1, got {self.ep_size}")
        if self.world_size % self.ep_size:
            raise ValueError(f"model.parallel.ep_size={self.ep_size} must divide the world size {self.world_size} "
                             "(devices x nodes)")

    @property
    def dp_size(self) -> int:
        """Data-parallel size: every rank reads a different batch (EP is carved out of the DP ranks)."""
        return self.world_size

    @property
    def edp_size(self) -> int:
        """Replicas of each expert shard (size of an expert-data-parallel group)."""
        return self.world_size // self.ep_size

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep_size

    def edp_rank(self, rank: int) -> int:
        return rank // self.ep_size

    def ep_group_ranks(self, rank: int) -> list[int]:
        start = rank - rank % self.ep_size
        return list(range(start, start + self.ep_size))

    def edp_group_ranks(self, rank: int) -> list[int]:
        return list(range(rank % self.ep_size, self.world_size, self.ep_size))


@dataclass
class ExpertParallelMesh:
    """The live groups of one process. `ep_group` / `edp_group` are torch ProcessGroups (None when size 1)."""

    dims: ParallelDims
    rank: int
    ep_group: dist.ProcessGroup | None
    edp_group: dist.ProcessGroup | None
    device_mesh: object | None = None  # torch DeviceMesh (edp, ep), for DTensor/DCP users

    @property
    def ep_size(self) -> int:
        return self.dims.ep_size

    @property
    def ep_rank(self) -> int:
        return self.dims.ep_rank(self.rank)

    @property
    def edp_size(self) -> int:
        return self.dims.edp_size

    @property
    def dp_size(self) -> int:
        return self.dims.dp_size

    def __repr__(self) -> str:
        d = self.dims
        return (f"ExpertParallelMesh(world={d.world_size}, ep={d.ep_size}, edp={d.edp_size}, rank={self.rank}, "
                f"ep_ranks={d.ep_group_ranks(self.rank)}, edp_ranks={d.edp_group_ranks(self.rank)})")


def _device_type() -> str:
    backend = dist.get_backend()
    return "cuda" if "nccl" in str(backend) and torch.cuda.is_available() else "cpu"


def build_mesh(ep_size: int) -> ExpertParallelMesh:
    """Create the (edp, ep) mesh from the initialised default process group. Collective: every rank calls it.

    Uses `torch.distributed.device_mesh.init_device_mesh`, so the groups are the same objects DTensor/DCP
    would use; the EP group of a mesh spanning the whole world is the WORLD group itself.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"expert parallelism (ep_size={ep_size}) needs torch.distributed initialised first; under "
                           "Lightning call it from configure_model (after process-group init, before DDP wrapping)")
    world, rank = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims(world, ep_size)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(_device_type(), (dims.edp_size, dims.ep_size), mesh_dim_names=("edp", "ep"))
    ep_group = mesh.get_group("ep")
    edp_group = mesh.get_group("edp") if dims.edp_size > 1 else None
    # The mesh must follow DeepSpeed's layout (contiguous EP, strided EDP): check instead of assuming.
    got = dist.get_process_group_ranks(ep_group)
    if got != dims.ep_group_ranks(rank):
        raise RuntimeError(f"unexpected EP group {got} for rank {rank}, expected {dims.ep_group_ranks(rank)}")
    if edp_group is not None and dist.get_process_group_ranks(edp_group) != dims.edp_group_ranks(rank):
        raise RuntimeError(f"unexpected EDP group for rank {rank}")
    return ExpertParallelMesh(dims, rank, ep_group, edp_group, mesh)


__all__ = ["ParallelDims", "ExpertParallelMesh", "build_mesh"]

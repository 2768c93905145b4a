"""Expert parallelism in one process: each rank is a thread, each collective an exchange between threads.

`ThreadWorld(world).patch(monkeypatch)` replaces the collectives mmoe.parallel calls (the dispatcher's
all-to-all `_a2a`, and `torch.distributed.all_gather` / `all_reduce` / `broadcast` / `get_rank` /
`get_world_size` / `get_process_group_ranks`); `world.run(fn)` calls fn(rank) on one thread per rank. A process
group is a tuple of global ranks (None: the whole world) and `world.mesh(rank, ep_size)` builds the
ExpertParallelMesh of that rank with such groups (DeepSpeed layout, as `build_mesh` does). Rows travel by
`torch.cat` of slices of the other threads' tensors, so autograd runs through the all-to-all and one backward
from the main thread reaches every rank.

What this checks is everything around the collectives (splits, permutations, sharding, gradient reduction,
gathering); the gloo collectives themselves are checked by the multi-process tests (test_expert_parallel.py,
test_fsdp_ep.py), which pay a process start-up of seconds per job.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

import mmoe.parallel.dispatcher as dispatcher_module
from mmoe.parallel.mesh import ExpertParallelMesh, ParallelDims


class ThreadWorld:
    """`world` thread ranks and the collectives between them."""

    def __init__(self, world: int):
        self.world = world
        self._local = threading.local()
        self._lock = threading.Lock()
        self._groups: dict[tuple[int, ...], tuple[threading.Barrier, dict]] = {}
        self.calls: Counter = Counter()  # collective name -> calls (counted once per group-wide call)
        self.a2a_splits: dict[int, list[list[int]]] = {r: [] for r in range(world)}  # rows received per source

    # ------------------------------------------------------------------ ranks and groups
    @property
    def rank(self) -> int:
        return self._local.rank

    def members(self, group) -> tuple[int, ...]:
        return tuple(range(self.world)) if group is None else tuple(group)

    def _exchange(self, name: str, group, value) -> tuple[list, int]:
        """Post `value`, wait for every member of `group`; returns (the members' values in group order, the
        caller's index in the group)."""
        members = self.members(group)
        assert self.rank in members, (name, self.rank, members)
        with self._lock:
            if members not in self._groups:
                self._groups[members] = (threading.Barrier(len(members), timeout=20), {})  # a failure: no hang
            barrier, posts = self._groups[members]
        posts[self.rank] = value
        barrier.wait()
        got = [posts[m] for m in members]
        if self.rank == members[0]:
            self.calls[name] += 1
        barrier.wait()  # every member has read the posts before the next call overwrites them
        return got, members.index(self.rank)

    def mesh(self, rank: int, ep_size: int) -> ExpertParallelMesh:
        dims = ParallelDims(self.world, ep_size)
        edp = tuple(dims.edp_group_ranks(rank))
        return ExpertParallelMesh(dims=dims, rank=rank, ep_group=tuple(dims.ep_group_ranks(rank)),
                                  edp_group=edp if len(edp) > 1 else None)

    def run(self, fn) -> list:
        """fn(rank) on one thread per rank; the results in rank order (a rank's exception is re-raised)."""
        def call(r: int):
            self._local.rank = r
            return fn(r)

        with ThreadPoolExecutor(self.world) as pool:
            futures = [pool.submit(call, r) for r in range(self.world)]
            return [f.result() for f in futures]

    # ------------------------------------------------------------------ collectives
    def all_to_all(self, x, output_splits, input_splits, group):
        """The dispatcher's `_a2a`: rows x split by destination; differentiable."""
        assert sum(input_splits) == x.shape[0], (self.rank, input_splits, x.shape)
        got, i = self._exchange("all_to_all", group, (x, list(input_splits)))
        parts = [rows[sum(splits[:i]):sum(splits[:i]) + splits[i]] for rows, splits in got]
        received = [p.shape[0] for p in parts]
        assert received == list(output_splits), (self.rank, received, output_splits)
        self.a2a_splits[self.rank].append(received)
        return torch.cat(parts)

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        assert not async_op
        got, _ = self._exchange("all_gather", group, tensor.detach().clone())
        for out, t in zip(tensor_list, got, strict=True):
            out.copy_(t)

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        assert not async_op
        got = torch.stack(self._exchange("all_reduce", group, tensor.detach().clone())[0])
        if op == dist.ReduceOp.SUM:
            tensor.copy_(got.sum(0))
        elif op == dist.ReduceOp.MAX:
            tensor.copy_(got.amax(0))
        else:
            raise NotImplementedError(op)

    def broadcast(self, tensor, src, group=None, async_op=False):
        assert not async_op
        got, _ = self._exchange("broadcast", group, (src, tensor.detach().clone()))
        assert len({s for s, _ in got}) == 1, f"broadcast over {self.members(group)} with different sources {got}"
        tensor.copy_(got[self.members(group).index(src)][1])

    def barrier(self, group=None) -> None:
        self._exchange("barrier", group, None)

    def patch(self, monkeypatch) -> ThreadWorld:
        monkeypatch.setattr(dispatcher_module, "_a2a", self.all_to_all)
        for name in ("all_gather", "all_reduce", "broadcast"):
            monkeypatch.setattr(dist, name, getattr(self, name))
        monkeypatch.setattr(dist, "get_rank", lambda group=None: self.members(group).index(self.rank))
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: len(self.members(group)))
        monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: list(self.members(group)))
        return self

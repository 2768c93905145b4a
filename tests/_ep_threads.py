"""Expert parallelism in one process: each EP rank is a thread, the all-to-all an exchange between threads.

`ThreadedAllToAll(world)` replaces `mmoe.parallel.dispatcher._a2a` (monkeypatch it); the process-group
argument the dispatcher passes through carries the calling thread's rank, so a mesh or dispatcher built for
"rank r" is given `ep_group=r`. Rows travel by `torch.cat` of slices of the other threads' tensors, so autograd
runs through the exchange and one backward from the main thread reaches every rank. What this checks is
everything around the collective (splits, permutations, sharding, gradient flow); the gloo collective itself
is checked by the multi-process tests (test_expert_parallel.py, test_fsdp_ep.py).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch


class ThreadedAllToAll:
    """`_a2a(x, output_splits, input_splits, group)` among `world` threads; `group` is the caller's rank."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=20)  # a rank that fails breaks it: no hang
        self.posted: dict[int, tuple[torch.Tensor, list[int]]] = {}
        self.received_splits: dict[int, list[list[int]]] = {r: [] for r in range(world)}

    def __call__(self, x, output_splits, input_splits, group):
        rank = group
        assert sum(input_splits) == x.shape[0], (rank, input_splits, x.shape)
        self.posted[rank] = (x, list(input_splits))
        self.barrier.wait()
        parts = []
        for src in range(self.world):
            rows, splits = self.posted[src]
            start = sum(splits[:rank])
            parts.append(rows[start:start + splits[rank]])
        self.received_splits[rank].append([p.shape[0] for p in parts])
        self.barrier.wait()  # every rank has read the posts before the next call overwrites them
        return torch.cat(parts)


def run_ranks(world: int, fn):
    """fn(rank) on `world` threads at once; the results in rank order (a rank's exception is re-raised)."""
    with ThreadPoolExecutor(world) as pool:
        futures = [pool.submit(fn, r) for r in range(world)]
        return [f.result() for f in futures]

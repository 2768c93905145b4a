"""Reductions over the data-parallel world that training code hands to model code (which stays free of
torch.distributed): `sum_over_ranks` is the `sum_over_ranks` argument of `balancing.device_balance_loss` and
what the training module sums aux-free router loads with."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(t: Tensor) -> Tensor:
    """Element-wise sum of `t` over every rank (a new tensor, no autograd; collective: every rank calls it in
    the same order)."""
    out = t.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out)
    return out


__all__ = ["sum_over_ranks", "world_size"]

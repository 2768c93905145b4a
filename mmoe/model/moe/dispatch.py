"""Token dispatch: the one seam expert parallelism replaces.

`plan` flattens a RoutingResult's kept slots and sorts them by expert; `dispatch` gathers the
inputs of those assignments into one contiguous (A, D) block with per-expert counts; `combine`
scatters expert outputs back (weighted sum per token, or raw per slot for MoA's query path).
An all-to-all dispatcher (mmoe.parallel) keeps this interface and moves the block across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .routing import RoutingResult


@dataclass
class DispatchPlan:
    """Assignments sorted by expert: A = number of kept (token, slot) pairs."""

    token_idx: Tensor  # (A,) token of each assignment
    slot_idx: Tensor  # (A,) flat slot index n*K + j
    weights: Tensor  # (A,) combine weight (float32)
    tokens_per_expert: Tensor  # (E,) long, sums to A
    num_tokens: int
    num_slots: int  # K


class LocalDispatcher:
    """Single-process dispatch: sort by expert, gather, scatter back. No (T x E x C) tensors."""

    def plan(self, routing: RoutingResult) -> DispatchPlan:
        N, K = routing.expert_idx.shape
        slots = routing.kept.flatten().nonzero().squeeze(1)  # (A,) ascending = token order
        experts = routing.expert_idx.flatten()[slots]
        experts, order = torch.sort(experts, stable=True)
        slots = slots[order]
        return DispatchPlan(
            token_idx=slots // K, slot_idx=slots, weights=routing.weights.flatten()[slots],
            tokens_per_expert=torch.bincount(experts, minlength=routing.num_experts),
            num_tokens=N, num_slots=K)

    def dispatch(self, x: Tensor, plan: DispatchPlan, per_slot: bool = False) -> tuple[Tensor, Tensor]:
        """x: (N, D) per token, or (N*K, D) per slot -> ((A, D) sorted by expert, tokens_per_expert)."""
        # index_select: its backward is one index_add (x[idx] would use a slower accumulating index_put)
        return x.index_select(0, plan.slot_idx if per_slot else plan.token_idx), plan.tokens_per_expert

    def combine(self, y: Tensor, plan: DispatchPlan, per_slot: bool = False) -> Tensor:
        """(A, D) expert outputs -> (N, D) weighted sum per token, or (N*K, D) unweighted per slot."""
        N, K, D = plan.num_tokens, plan.num_slots, y.shape[-1]
        if per_slot:
            return y.new_zeros(N * K, D).index_copy(0, plan.slot_idx, y)
        w = plan.weights.to(y.dtype)
        if 2 * y.shape[0] >= N * K:
            # Most slots kept (dropless top-k): put outputs back in slot layout and reduce over K.
            # Deterministic, and avoids index_add, whose CPU kernel opens a thread team even for a
            # few rows and can stall for milliseconds right after an MKL matmul at decode sizes.
            ws = w.new_zeros(N * K).index_copy(0, plan.slot_idx, w)
            ys = y.new_zeros(N * K, D).index_copy(0, plan.slot_idx, y)
            return torch.bmm(ws.view(N, 1, K), ys.view(N, K, D)).view(N, D)
        return y.new_zeros(N, D).index_add(0, plan.token_idx, y * w[:, None])

"""Token dispatch: the one seam expert parallelism replaces.

Static shapes, no host synchronisation: the plan depends on routing *values*, never on routing
*outcomes* as shapes or Python branches, so a block compiles once (fullgraph) and a GPU never waits.

Dropless layout (no capacity): every one of the A = N*K slots is a row. Rows are sorted by expert with
a stable argsort; slots that must not count (padding tokens, top-p slots not selected) sort after all
experts and keep their (zero) combine weight, so the shape never changes with routing. Per-expert
counts come from a `searchsorted` on device and feed `torch._grouped_mm` offsets (experts.py).
Capacity layout (token dropping, expert choice): rows are a static (E, C) buffer, C fixed by the
token count; a slot's row is its expert's block plus its rank in it; unused buffer rows weigh 0.

Combine: weighted rows are copied back into slot order and reduced over each token's K slots
(dropless), or index-added by token (capacity buffers: expert choice has K = E slots per token).
An all-to-all dispatcher (mmoe.parallel) keeps this interface and moves the rows across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .routing import RoutingResult


@dataclass
class DispatchPlan:
    """R expert-input rows: R = N*K sorted by expert (dropless), or E*capacity (capacity buffers)."""

    token_idx: Tensor  # (R,) token of each row
    slot_idx: Tensor  # (R,) flat slot index n*K + j of each row
    weights: Tensor  # (R,) combine weight (float32; 0 for rows that must not count)
    tokens_per_expert: Tensor  # (E,) long: counted rows per expert (dropless: rows beyond their sum weigh 0)
    num_tokens: int
    num_slots: int  # K
    slot_row: Tensor | None = None  # capacity plans: (N*K,) buffer row of each slot (E*capacity = dropped)
    row_valid: Tensor | None = None  # (R,) bool: the row holds a kept slot
    capacity: int = 0  # > 0: rows form an (E, capacity) buffer


class LocalDispatcher:
    """Single-process dispatch: sort by expert, gather, reduce back. No (T x E x C) tensors, no syncs."""

    def plan(self, routing: RoutingResult) -> DispatchPlan:
        N, K = routing.expert_idx.shape
        E, A = routing.num_experts, N * K
        dev = routing.expert_idx.device
        C = int(routing.extras.get("capacity", 0))  # static: set by the router from the token count
        key = torch.where(routing.kept.flatten(), routing.expert_idx.flatten(), E)  # (A,) E = not counted
        order = torch.argsort(key, stable=True)  # (A,) slot of each sorted row
        sorted_key = key.index_select(0, order)
        bounds = torch.searchsorted(sorted_key, torch.arange(E + 1, device=dev))  # (E+1,) first row of each key
        starts, ends = bounds[:-1], bounds[1:]
        counts = ends - starts  # (E,) counted rows per expert, on device
        w = routing.weights.flatten()
        if C <= 0:
            return DispatchPlan(token_idx=order // K, slot_idx=order, weights=w.index_select(0, order),
                                tokens_per_expert=counts, num_tokens=N, num_slots=K, row_valid=sorted_key < E)
        # Capacity buffer: row = expert * C + rank of the slot among its expert's kept slots.
        rank = torch.arange(A, device=dev) - starts.index_select(0, sorted_key.clamp_max(E - 1))
        valid = (sorted_key < E) & (rank < C)  # the router keeps at most C per expert; guard anyway
        buf_row = torch.where(valid, sorted_key * C + rank, E * C)  # (A,) E*C = a trash row
        slot_row = torch.empty_like(order).scatter_(0, order, buf_row)
        # buffer row -> slot; unused rows point at slot 0 and weigh 0 (the trash row is cut off)
        row_slot = torch.zeros(E * C + 1, dtype=order.dtype, device=dev).scatter_(0, buf_row, order)[:E * C]
        row_valid = torch.zeros(E * C + 1, dtype=torch.bool, device=dev).scatter_(0, buf_row, valid)[:E * C]
        weights = w.index_select(0, row_slot) * row_valid
        return DispatchPlan(token_idx=row_slot // K, slot_idx=row_slot, weights=weights,
                            tokens_per_expert=counts, num_tokens=N, num_slots=K, slot_row=slot_row,
                            row_valid=row_valid, capacity=C)

    def dispatch(self, x: Tensor, plan: DispatchPlan, per_slot: bool = False) -> tuple[Tensor, Tensor]:
        """x: (N, D) per token, or (N*K, D) per slot -> (rows, tokens_per_expert); rows are (R, D) sorted by
        expert, or (E, capacity, D) for a capacity plan."""
        # index_select: its backward is one index_add (x[idx] would use a slower accumulating index_put)
        xs = x.index_select(0, plan.slot_idx if per_slot else plan.token_idx)
        if plan.capacity > 0:
            xs = xs.view(-1, plan.capacity, x.shape[-1])  # (E, C, D)
        return xs, plan.tokens_per_expert

    def combine(self, y: Tensor, plan: DispatchPlan, per_slot: bool = False) -> Tensor:
        """Expert outputs (R, D) or (E, C, D) -> (N, D) weighted sum per token, or (N*K, D) per slot
        (unweighted; slots dropped by capacity are 0, others not kept carry values that weigh 0 later)."""
        N, K, D = plan.num_tokens, plan.num_slots, y.shape[-1]
        y = y.reshape(-1, D)  # (R, D)
        if plan.capacity > 0:
            if per_slot:
                return torch.cat([y, y.new_zeros(1, D)]).index_select(0, plan.slot_row)  # trash row = 0
            yw = y * plan.weights.to(y.dtype)[:, None]
            return y.new_zeros(N, D).index_add(0, plan.token_idx, yw)
        # Back to slot order with index_copy (unique rows; its backward is a gather), then reduce over K.
        if per_slot:
            return y.new_zeros(N * K, D).index_copy(0, plan.slot_idx, y)
        yw = y * plan.weights.to(y.dtype)[:, None]
        return y.new_zeros(N * K, D).index_copy(0, plan.slot_idx, yw).view(N, K, D).sum(1)

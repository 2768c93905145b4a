"""All-to-all token dispatcher: the expert-parallel drop-in for `mmoe.model.moe.dispatch.LocalDispatcher`.

Same seam, same interface (`plan` / `dispatch` / `combine`, `per_slot` included), so every MoE site that owns
a `.dispatcher` and GroupedLinear experts (ViT MoEFFN, connector MoEFFN, MoA query/output projections,
decoder MoEFFN) runs expert-parallel without a line changed. Dropless, uneven splits (Megatron/torchtitan
style, no capacity padding):

plan      local sort of the kept assignments by *global* expert (that is also by destination EP rank, since
          rank d owns experts [d*El, (d+1)*El)); token-count exchange with one all-to-all of the (ep, El)
          count matrix; split sizes go to the host (one device->host sync per layer and step, unavoidable
          for an uneven all-to-all); the rank-major -> local-expert-major permutation of the received block.
dispatch  gather rows (per token, or per slot for MoA's output path), all-to-all them to their expert's
          rank, permute rank-major (src0: e0 e1 .., src1: e0 e1 ..) -> expert-major (e0: src0 src1 .., e1: ..)
          so the local GroupedLinear sees one contiguous block per local expert.
combine   inverse permutation, all-to-all back with the splits swapped, then the same weighted index_add
          (or per-slot copy) as the local dispatcher.

Autograd goes through `torch.distributed._functional_collectives.all_to_all_single`, which has a registered
backward in torch 2.14 (an all-to-all with the splits swapped). Works on gloo (CPU) and NCCL.

Byte accounting: every forward all-to-all adds the bytes it sends to *other* ranks to `self.stats`, the
quantity the theory 2*k*T*H*(1-1/ep) elements per layer and step predicts under uniform routing (the
backward moves the same amount again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from mmoe.model.moe.dispatch import DispatchPlan
from mmoe.model.moe.routing import RoutingResult


@dataclass
class EPDispatchPlan(DispatchPlan):
    """A local DispatchPlan (assignments sorted by global expert) plus the all-to-all bookkeeping."""

    input_splits: list[int] | None = None  # rows this rank sends to each EP rank
    output_splits: list[int] | None = None  # rows this rank receives from each EP rank
    recv_counts: Tensor | None = None  # (ep, El) rows received per (source rank, local expert)
    local_tokens_per_expert: Tensor | None = None  # (El,) rows per local expert after the exchange
    perm: Tensor | None = None  # (R,) rank-major position of each expert-major row
    inv_perm: Tensor | None = None  # (R,) expert-major position of each rank-major row


def _a2a(x: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    """Uneven all-to-all with autograd (functional collective), waited on."""
    out = funcol.all_to_all_single(x.contiguous(), output_splits, input_splits, group)
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


def rank_major_to_expert_major(recv_counts: Tensor, total: int | None = None) -> Tensor:
    """Permutation `perm` such that block[perm] is grouped by local expert (then by source rank).

    recv_counts: (ep, El) rows received from source rank r for local expert j, laid out rank-major
    (r0: e0 e1 .., r1: e0 e1 ..). perm[i] is the rank-major index of the i-th expert-major row.
    """
    ep, El = recv_counts.shape
    flat = recv_counts.reshape(-1)
    start_rm = (flat.cumsum(0) - flat).view(ep, El)  # start of segment (r, j) in the rank-major block
    lengths = recv_counts.t().reshape(-1)  # expert-major segment order (j, r)
    starts = start_rm.t().reshape(-1)
    total = int(flat.sum()) if total is None else total  # pass it to avoid a device->host sync
    start_em = lengths.cumsum(0) - lengths  # where each segment starts in the expert-major block
    offset = torch.repeat_interleave(starts - start_em, lengths, output_size=total)
    return torch.arange(total, device=recv_counts.device) + offset


class AllToAllDispatcher:
    """Expert-parallel dispatcher for one MoE layer: experts [ep_rank*El, (ep_rank+1)*El) live on this rank."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int, ep_size: int | None = None,
                 ep_rank: int | None = None):
        self.group = group
        self.ep_size = ep_size if ep_size is not None else dist.get_world_size(group)
        self.ep_rank = ep_rank if ep_rank is not None else dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by model.parallel.ep_size={self.ep_size}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.stats = {"a2a_calls": 0, "sent_rows": 0, "sent_rows_remote": 0, "sent_bytes": 0,
                      "sent_bytes_remote": 0}
        self.last_recv_tokens_per_expert: Tensor | None = None  # (El,) detached, for per-rank load metrics
        self.last_send_tokens_per_expert: Tensor | None = None  # (E,) detached

    @property
    def local_experts(self) -> range:
        El = self.num_local_experts
        return range(self.ep_rank * El, (self.ep_rank + 1) * El)

    def reset_stats(self) -> None:
        for k in self.stats:
            self.stats[k] = 0

    # ------------------------------------------------------------------ plan
    def plan(self, routing: RoutingResult) -> EPDispatchPlan:
        if routing.num_experts != self.num_experts:
            raise ValueError(f"routing has {routing.num_experts} experts, dispatcher {self.num_experts}")
        N, K = routing.expert_idx.shape
        slots = routing.kept.flatten().nonzero().squeeze(1)
        experts = routing.expert_idx.flatten()[slots]
        experts, order = torch.sort(experts, stable=True)
        slots = slots[order]
        tokens_per_expert = torch.bincount(experts, minlength=self.num_experts)
        ep, El = self.ep_size, self.num_local_experts
        with torch.no_grad():
            send = tokens_per_expert.view(ep, El)
            recv = _a2a(send.reshape(-1), [El] * ep, [El] * ep, self.group).view(ep, El)
            splits = torch.cat([send.sum(1), recv.sum(1)]).tolist()  # one host sync for both split lists
            perm = rank_major_to_expert_major(recv, total=sum(splits[ep:]))
            inv_perm = torch.empty_like(perm)
            inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
            local_counts = recv.sum(0)
        self.last_send_tokens_per_expert = tokens_per_expert.detach()
        self.last_recv_tokens_per_expert = local_counts.detach()
        return EPDispatchPlan(
            token_idx=slots // K, slot_idx=slots, weights=routing.weights.flatten()[slots],
            tokens_per_expert=tokens_per_expert, num_tokens=N, num_slots=K,
            input_splits=splits[:ep], output_splits=splits[ep:], recv_counts=recv,
            local_tokens_per_expert=local_counts, perm=perm, inv_perm=inv_perm)

    # ------------------------------------------------------------------ dispatch / combine
    def _count(self, x: Tensor, splits: list[int]) -> None:
        row = math.prod(x.shape[1:]) * x.element_size()
        rows = sum(splits)
        remote = rows - splits[self.ep_rank]
        s = self.stats
        s["a2a_calls"] += 1
        s["sent_rows"] += rows
        s["sent_rows_remote"] += remote
        s["sent_bytes"] += rows * row
        s["sent_bytes_remote"] += remote * row

    def dispatch(self, x: Tensor, plan: EPDispatchPlan, per_slot: bool = False) -> tuple[Tensor, Tensor]:
        """x: (N, D) per token or (N*K, D) per slot -> ((R, D) rows for the local experts, expert-major;
        (El,) rows per local expert)."""
        xs = x[plan.slot_idx if per_slot else plan.token_idx]  # sorted by global expert = by destination
        self._count(xs, plan.input_splits)
        recv = _a2a(xs, plan.output_splits, plan.input_splits, self.group)
        return recv[plan.perm], plan.local_tokens_per_expert

    def combine(self, y: Tensor, plan: EPDispatchPlan, per_slot: bool = False) -> Tensor:
        """(R, D) local expert outputs (expert-major) -> (N, D) weighted sum per token, or (N*K, D) per slot."""
        y = y[plan.inv_perm]  # back to rank-major: one contiguous segment per source rank
        self._count(y, plan.output_splits)
        back = _a2a(y, plan.input_splits, plan.output_splits, self.group)  # (A, D) in plan order
        if per_slot:
            out = back.new_zeros(plan.num_tokens * plan.num_slots, back.shape[-1])
            return out.index_copy(0, plan.slot_idx, back)
        out = back.new_zeros(plan.num_tokens, back.shape[-1])
        return out.index_add(0, plan.token_idx, back * plan.weights.to(back.dtype)[:, None])

    def __repr__(self) -> str:
        return (f"AllToAllDispatcher(ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"experts={self.num_experts}, local={list(self.local_experts)})")


__all__ = ["AllToAllDispatcher", "EPDispatchPlan", "rank_major_to_expert_major"]

"""The all-to-all dispatcher's bookkeeping at ep 2 and 4, in one process, against a float64 per-token loop.

The multi-process tests (test_expert_parallel.py) check the dispatcher through gloo in whole layers, at a few
seconds per start-up. Here each EP rank is a thread with its own `AllToAllDispatcher` and the all-to-all is
an exchange between the threads (tests/_ep_threads.py, autograd through `torch.cat` of slices). What is
tested is everything around the collective - the sort by global expert, the count exchange, the split lists,
the rank-major -> expert-major permutation and its inverse, the weighted combine, per-slot rows and the byte
counters - fast enough to run every dispatcher mutant against (docs/mutation.md).
"""

from __future__ import annotations

import pytest
import torch

from _ep_threads import ThreadWorld
from mmoe.model.moe.routing import RoutingResult
from mmoe.parallel.dispatcher import AllToAllDispatcher


def _routing(N: int, K: int, E: int, g: torch.Generator, drop: float = 0.25) -> RoutingResult:
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]) if N else torch.zeros(0, K).long()
    kept = torch.rand(N, K, generator=g) > drop
    w = (torch.rand(N, K, generator=g, dtype=torch.float64) * kept).requires_grad_()
    probs = torch.full((N, E), 1.0 / E, dtype=torch.float64)
    return RoutingResult(expert_idx=idx, weights=w, selected=kept, kept=kept, probs=probs, logits=probs.log(),
                         token_mask=torch.ones(N, dtype=torch.bool), num_experts=E, batch_shape=(1, N))


def _local_experts(rows: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rows (R, D) grouped by local expert with `counts` (El,) -> (R, H): segment j through weights[j]."""
    out = [seg @ w for seg, w in zip(rows.split(counts.tolist()), weights, strict=True)]
    return torch.cat(out) if out else rows.new_zeros(0, weights.shape[-1])


@pytest.mark.parametrize("world, tokens", [(2, [9, 6]), (4, [7, 0, 5, 11])], ids=["ep2", "ep4-rank1-empty"])
@pytest.mark.parametrize("per_slot", [False, True], ids=["per-token", "per-slot"])
def test_threaded_all_to_all_dispatch_equals_a_per_token_loop(monkeypatch, world, tokens, per_slot):
    """Each rank's output and every gradient (tokens, router weights, expert weights) equal a float64 loop
    over tokens and kept slots with all experts in one place; the bookkeeping agrees with the routing."""
    E, K, D, H = 8, 2, 5, 3
    El = E // world
    tw = ThreadWorld(world).patch(monkeypatch)
    g = torch.Generator().manual_seed(world)
    routings = [_routing(n, K, E, g) for n in tokens]
    xs = [torch.randn(n * K if per_slot else n, D, generator=g, dtype=torch.float64, requires_grad=True)
          for n in tokens]
    expert_w = torch.randn(E, D, H, generator=g, dtype=torch.float64, requires_grad=True)

    def rank_step(r: int):
        d = AllToAllDispatcher(None, E)  # EP size and rank from the (whole-world) group
        assert (d.ep_size, d.ep_rank, list(d.local_experts)) == (world, r, list(range(r * El, (r + 1) * El)))
        plan = d.plan(routings[r])
        rows, counts = d.dispatch(xs[r], plan, per_slot=per_slot)
        y = _local_experts(rows, counts, expert_w[r * El:(r + 1) * El])
        return d.combine(y, plan, per_slot=per_slot), plan, d

    outs, plans, dispatchers = zip(*tw.run(rank_step), strict=True)
    gys = [torch.randn_like(o) for o in outs]
    inputs = (*xs, expert_w, *[r.weights for r in routings])
    grads = torch.autograd.grad(sum((o * gy).sum() for o, gy in zip(outs, gys, strict=True)), inputs,
                                allow_unused=True)

    # reference: float64 loop over tokens and slots, every expert in one place; per-slot rows come back
    # unweighted (MoA's output path weighs them itself), per-token rows are summed with the router weights
    zero = torch.zeros(H, dtype=torch.float64)
    ref_outs = []
    for r, n in enumerate(tokens):
        idx, kept, w = routings[r].expert_idx, routings[r].kept, routings[r].weights
        if per_slot:
            rows_out = [xs[r][t * K + k] @ expert_w[idx[t, k]] if kept[t, k] else zero
                        for t in range(n) for k in range(K)]
        else:
            rows_out = [sum((w[t, k] * (xs[r][t] @ expert_w[idx[t, k]]) for k in range(K) if kept[t, k]), zero)
                        for t in range(n)]
        ref_outs.append(torch.stack(rows_out) if rows_out else zero.new_zeros(0, H))
    ref_loss = sum((o * gy).sum() for o, gy in zip(ref_outs, gys, strict=True))  # an empty rank adds a constant
    ref_grads = torch.autograd.grad(ref_loss, inputs, allow_unused=True)
    for r in range(world):
        torch.testing.assert_close(outs[r], ref_outs[r], rtol=0, atol=1e-12)
    for got, ref in zip(grads, ref_grads, strict=True):
        if ref is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)

    # bookkeeping: what each rank sends per global expert and receives per local expert, the split lists
    sent = [torch.bincount(ro.expert_idx[ro.kept], minlength=E) for ro in routings]  # (E,) per source rank
    for r, (d, plan) in enumerate(zip(dispatchers, plans, strict=True)):
        assert d.last_send_tokens_per_expert.tolist() == plan.tokens_per_expert.tolist() == sent[r].tolist()
        local = sum(s[r * El:(r + 1) * El] for s in sent)
        assert d.last_recv_tokens_per_expert.tolist() == local.tolist()
        assert plan.input_splits == [int(sent[r][q * El:(q + 1) * El].sum()) for q in range(world)]
        assert plan.output_splits == [int(sent[q][r * El:(r + 1) * El].sum()) for q in range(world)]
        assert plan.recv_counts.tolist() == [sent[q][r * El:(r + 1) * El].tolist() for q in range(world)]
        # three exchanges per rank (counts, rows out, rows back), the last two with the plan's splits
        assert tw.a2a_splits[r][1:] == [plan.output_splits, plan.input_splits]


def test_threaded_all_to_all_byte_counters(monkeypatch):
    """`stats` counts the rows and bytes each rank sends, split into the part that leaves the rank."""
    world, E, K, D = 2, 4, 2, 6
    tw = ThreadWorld(world).patch(monkeypatch)
    g = torch.Generator().manual_seed(3)
    routings = [_routing(n, K, E, g) for n in (10, 4)]
    xs = [torch.randn(n, D, generator=g, dtype=torch.float32) for n in (10, 4)]
    dispatchers = [AllToAllDispatcher((0, 1), E, ep_size=world, ep_rank=r) for r in range(world)]

    def rank_step(r: int):
        d = dispatchers[r]
        plan = d.plan(routings[r])
        rows, _ = d.dispatch(xs[r], plan)
        d.combine(rows, plan)
        return dict(d.stats)

    stats = tw.run(rank_step)
    for r in range(world):
        kept_experts = routings[r].expert_idx[routings[r].kept]
        out_rows = int(kept_experts.numel())  # every kept slot is one row out
        out_remote = int(((kept_experts // (E // world)) != r).sum())  # owned by the other rank
        back_rows = sum(int((ro.expert_idx[ro.kept] // (E // world) == r).sum()) for ro in routings)
        back_remote = sum(int((ro.expert_idx[ro.kept] // (E // world) == r).sum())
                          for q, ro in enumerate(routings) if q != r)
        assert stats[r] == {"a2a_calls": 2, "sent_rows": out_rows + back_rows,
                            "sent_rows_remote": out_remote + back_remote,
                            "sent_bytes": (out_rows + back_rows) * D * 4,
                            "sent_bytes_remote": (out_remote + back_remote) * D * 4}
        dispatchers[r].reset_stats()
        assert set(dispatchers[r].stats.values()) == {0}


def test_dispatcher_takes_its_size_and_rank_from_its_group(monkeypatch):
    tw = ThreadWorld(4).patch(monkeypatch)
    got = tw.run(lambda r: AllToAllDispatcher(tw.mesh(r, 2).ep_group, 8))  # ep 2 inside a world of 4
    assert [(d.ep_size, d.ep_rank, list(d.local_experts)) for d in got] == [
        (2, 0, [0, 1, 2, 3]), (2, 1, [4, 5, 6, 7]), (2, 0, [0, 1, 2, 3]), (2, 1, [4, 5, 6, 7])]


def test_dispatcher_layout_and_refusals():
    d = AllToAllDispatcher(None, 8, ep_size=4, ep_rank=2)
    assert (d.num_local_experts, list(d.local_experts)) == (2, [4, 5])
    assert repr(d) == "AllToAllDispatcher(ep_size=4, ep_rank=2, experts=8, local=[4, 5])"
    with pytest.raises(ValueError, match=r"^num_experts=6 is not divisible by model.parallel.ep_size=4$"):
        AllToAllDispatcher(None, 6, ep_size=4, ep_rank=0)
    with pytest.raises(ValueError, match=r"^routing has 4 experts, dispatcher 8$"):
        d.plan(_routing(3, 2, 4, torch.Generator().manual_seed(0)))

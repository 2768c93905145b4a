"""Expert parallelism of whole models in one process (thread ranks, tests/_ep_threads.py) against one
process holding every expert, float64: `enable_expert_parallel` (ep 2 and 4, and ep 2 x edp 2), expert-gradient
reduction, global-norm clipping, overflow sync, per-rank load metrics, checkpoint gathering/slicing and export.

The multi-process tests (test_expert_parallel.py) check the same through gloo at a few seconds per job; these
take a few seconds in all, so every mutant of this code can be run against them (docs/mutation.md).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from _ep_models import (
    TOL,
    Connector,
    assert_grads_equal_reference,
    assert_same_state,
    assert_shards_equal_reference,
    connector_inputs,
    ddp_average,
    decoder,
    ep_ranks,
    expert_shards,
    forward_backward,
    output_of,
)
from _ep_threads import ThreadWorld
from mmoe.model.moe import MoEConfig
from mmoe.model.moe.dispatch import LocalDispatcher
from mmoe.model.moe.experts import GroupedLinear
from mmoe.parallel.checkpoint import (
    cache_consolidated,
    consolidated_model,
    drop_consolidated,
    full_optimizer_state_dict,
    full_state_dict,
    gather_experts_locally,
    shard_optimizer_state_dict,
    shard_state_dict,
)
from mmoe.parallel.expert_parallel import (
    SHARD_ATTR,
    _GuardedDispatcher,
    clip_grad_norm_,
    dispatchers,
    enable_expert_parallel,
    ep_load_metrics,
    expert_parameters,
    finalize_expert_grads,
    find_state,
    grad_norm,
    sync_nonfinite_expert_grads,
)


def _mesh(world: int, rank: int):
    return ThreadWorld(world).mesh(rank, world)


def _check_against_reference(tw: ThreadWorld, ref: nn.Module, ranks: list[nn.Module], inputs: list) -> None:
    """ep = world: expert shards carry their rows of the reference gradient (the all-to-all backward brings every
    rank's contribution home), replicated params sum over the ranks to the reference's."""
    forward_backward(tw, ref, ranks, inputs)
    sharded = set()
    for r, m in enumerate(ranks):
        assert all(p.requires_grad for _, p, *_ in expert_shards(ref, m, r, tw.world))
        sharded |= assert_shards_equal_reference(ref, m, r, tw.world, rtol=0)
    for name, q in ref.named_parameters():
        if name not in sharded:
            total = sum(dict(m.named_parameters())[name].grad for m in ranks)
            torch.testing.assert_close(total, q.grad, rtol=0, atol=TOL, msg=name)


@pytest.mark.parametrize("world", [2, 4])
def test_threaded_expert_parallel_decoder_equals_one_process(monkeypatch, world):
    tw = ThreadWorld(world).patch(monkeypatch)
    ref = decoder()
    ranks = [copy.deepcopy(ref) for _ in range(world)]
    sites = [n for n, m in ref.named_modules() if hasattr(m, "dispatcher")]
    for r, m in enumerate(ranks):
        state = enable_expert_parallel(m, world, mesh=tw.mesh(r, world))
        assert find_state(m) is state and state.moe_modules == sites and len(sites) == 3
        for name in sites:
            d = m.get_submodule(name).dispatcher
            assert isinstance(d, _GuardedDispatcher) and (d.ep_size, d.ep_rank, d.group) == (world, r, tuple(range(world)))
        state.grad_sync = "manual"
        assert enable_expert_parallel(m, world, mesh=tw.mesh(r, world)) is state  # Lightning calls it again
        assert dispatchers(m) == [m.get_submodule(name).dispatcher for name in sites]
    ids = [torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
    _check_against_reference(tw, ref, ranks, ids)


def test_threaded_expert_parallel_connector_with_biases_equals_one_process(monkeypatch):
    tw = ThreadWorld(2).patch(monkeypatch)
    ref = Connector()
    ranks = ep_ranks(tw, ref, 2)
    assert all(len(expert_parameters(m)) == 4 for m in ranks)  # w_in/w_out weight + bias
    _check_against_reference(tw, ref, ranks, connector_inputs(2))


def test_frozen_experts_stay_frozen_when_sharded():
    m = Connector()
    m.moe.experts.requires_grad_(False)
    enable_expert_parallel(m, 2, mesh=_mesh(2, 1))
    assert [p.requires_grad for p in expert_parameters(m)] == [False] * 4
    assert m.moe.router.gate.weight.requires_grad


def test_unguarded_expert_parallel_training_is_refused():
    m = Connector()
    enable_expert_parallel(m, 2, mesh=_mesh(2, 0))
    x = torch.randn(1, 3, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError) as info:
        m(x)  # refused in the dispatcher's plan, before any collective
    assert str(info.value) == (
        "expert-parallel training step, but nothing reduces the expert gradients and the experts are not protected "
        "from DDP's start-up broadcast: under Lightning use --trainer.strategy ddp_ep "
        "(mmoe.parallel.strategy.ExpertParallelStrategy); with plain torch use mmoe.parallel.wrap_ddp(root) and "
        "finalize_expert_grads(root) after backward, or set state.grad_sync = 'manual'")


def test_enable_expert_parallel_refusals():
    assert enable_expert_parallel(Connector(), 1) is None  # ep 1: nothing to do, no process group needed
    m = Connector()
    enable_expert_parallel(m, 2, mesh=_mesh(2, 0))
    with pytest.raises(RuntimeError, match=r"^model is already expert-parallel with ep_size=2, not 4$"):
        enable_expert_parallel(m, 4, mesh=_mesh(4, 0))
    with pytest.raises(ValueError, match=r"^model.parallel.ep_size=2 but the model has no MoE layer to shard$"):
        enable_expert_parallel(nn.Linear(2, 2), 2, mesh=_mesh(2, 0))
    with pytest.raises(ValueError, match=r"^moe: num_experts=4 is not divisible by model.parallel.ep_size=3$"):
        enable_expert_parallel(Connector(), 3, mesh=_mesh(3, 0))

    m = Connector()
    m.moe.cfg = MoEConfig(num_experts=8, top_k=2)
    with pytest.raises(ValueError, match=r"^moe: config has 8 experts but its GroupedLinear 4$"):
        enable_expert_parallel(m, 2, mesh=_mesh(2, 0))
    m = Connector()
    m.moe.experts.w_out = GroupedLinear(2, 10, 5)
    with pytest.raises(ValueError, match=r"^moe: GroupedLinears with different expert counts \(2 vs 4\)$"):
        enable_expert_parallel(m, 2, mesh=_mesh(2, 0))
    m = Connector()
    m.moe.experts = nn.Identity()
    with pytest.raises(ValueError, match=r"^moe: MoE module without GroupedLinear experts cannot be expert-parallel$"):
        enable_expert_parallel(m, 2, mesh=_mesh(2, 0))


class _BareSite(nn.Module):
    """Any module with a `.dispatcher` and GroupedLinear experts is a MoE site, with or without a `cfg`."""

    def __init__(self, cfg=None):
        super().__init__()
        self.dispatcher = LocalDispatcher()
        self.proj = GroupedLinear(4, 3, 2)
        if cfg is not None:
            self.cfg = cfg


def test_any_module_with_a_dispatcher_and_grouped_experts_is_sharded(monkeypatch):
    from types import SimpleNamespace

    import mmoe.parallel.expert_parallel as ep_module

    built = []
    monkeypatch.setattr(ep_module, "build_mesh", lambda ep_size: built.append(ep_size) or _mesh(ep_size, 1))
    for site in (_BareSite(), _BareSite(cfg=SimpleNamespace(top_k=1))):  # no cfg; a cfg without num_experts
        root = nn.Sequential(site)
        state = enable_expert_parallel(root, 2)  # no mesh given: built from the process group
        assert state.moe_modules == ["0"] and site.proj.num_experts == 2
        assert getattr(site.proj, SHARD_ATTR).lo == 2 and isinstance(site.dispatcher, _GuardedDispatcher)
    assert built == [2, 2]


class _RecordingDDP(nn.parallel.DistributedDataParallel):
    """DistributedDataParallel's class-level ignore-list helper, with a constructor that only records (the
    real one needs a process group; the multi-process tests use it)."""

    def __init__(self, module, **kwargs):
        nn.Module.__init__(self)
        self.wrapped, self.kwargs = module, kwargs


def test_wrap_ddp_excludes_the_expert_shards_and_marks_who_reduces_them(monkeypatch):
    import mmoe.parallel.expert_parallel as ep_module

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", _RecordingDDP)
    root = nn.Sequential(Connector())
    root._ddp_params_and_buffers_to_ignore = ["already.ignored"]
    state = enable_expert_parallel(root, 2, mesh=_mesh(2, 0))
    ddp = ep_module.wrap_ddp(root, find_unused_parameters=True)
    assert isinstance(ddp, _RecordingDDP) and ddp.wrapped is root and ddp.kwargs == {"find_unused_parameters": True}
    ignored = ["0.moe.experts.w_in.weight", "0.moe.experts.w_in.bias", "0.moe.experts.w_out.weight",
               "0.moe.experts.w_out.bias", "0.moe.router.load_accum"]  # shards, the router's per-rank load
    assert sorted(root._ddp_params_and_buffers_to_ignore) == sorted(["already.ignored", *ignored])
    assert state.grad_sync == "ddp"  # the caller reduces expert grads with finalize_expert_grads
    state.grad_sync = "strategy"
    assert ep_module.set_ddp_ignore(root) == ignored and ep_module.wrap_ddp(root) is not None
    assert state.grad_sync == "strategy"  # a sync already arranged is kept
    plain = nn.Sequential(Connector())  # no EP: nothing to ignore, no state to mark
    assert ep_module.wrap_ddp(plain).wrapped is plain
    assert plain._ddp_params_and_buffers_to_ignore == ["0.moe.router.load_accum"]


def test_a_vlm_keeps_encoding_images_under_expert_parallel():
    m = Connector()
    m.always_encode_images = False  # the MMoEVLM attribute: text-only batches must still join the all-to-alls
    enable_expert_parallel(m, 2, mesh=_mesh(2, 0))
    assert m.always_encode_images is True


# --------------------------------------------------------------------------- gradients, clipping, metrics


def test_threaded_edp2_ep2_replicas_agree_and_expert_grads_are_summed_over_edp_over_world(monkeypatch):
    """4 ranks as (edp 2) x (ep 2): the EDP replicas of a shard are re-broadcast from the first one at enable
    time, and after finalize_expert_grads every expert gradient is the reference gradient of the data-parallel
    loss (1/W) sum_r L_r (SUM over the EDP group / W); DDP-averaged replicated grads match it too."""
    tw = ThreadWorld(4).patch(monkeypatch)
    ref = decoder()
    ranks = [copy.deepcopy(ref) for _ in range(4)]
    with torch.no_grad():
        for gl in ranks[2].modules():
            if isinstance(gl, GroupedLinear):
                gl.weight.add_(1.0)  # rank 2 (edp rank 1 of shard 0) starts from different experts: the broadcast fixes it
    tw.run(lambda r: setattr(enable_expert_parallel(ranks[r], 2, mesh=tw.mesh(r, 2)), "grad_sync", "manual"))
    assert tw.calls["broadcast"] > 0
    for full in tw.run(lambda r: full_state_dict(ranks[r])):  # gathered over the EP group, not the world
        assert_same_state(full, ref.state_dict())
    ids = [torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(20 + r)) for r in range(4)]
    forward_backward(tw, ref, ranks, ids)  # each rank backpropagates its L_r; the reference sum_r L_r
    for q in ref.parameters():
        q.grad /= 4  # reference: grad of (1/W) sum_r L_r
    tw.run(lambda r: finalize_expert_grads(ranks[r]))
    ddp_average(ref, ranks)
    for r, m in enumerate(ranks):
        assert find_state(m).mesh.edp_group == (r % 2, r % 2 + 2)
        assert_grads_equal_reference(ref, m, r % 2, 2, rtol=0)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_threaded_global_norm_and_clipping_equal_one_process(monkeypatch, norm_type):
    """Every rank computes the one global norm (replicated grads once, expert shards over the EP group) and
    clips by the same coefficient: the shards then hold the rows of torch's clip on the reference."""
    tw = ThreadWorld(2).patch(monkeypatch)
    ref = decoder()
    ranks = ep_ranks(tw, ref, 2)
    forward_backward(tw, ref, ranks, [torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(r))
                                       for r in range(2)])
    for q in ref.parameters():
        q.grad /= 2  # reference: grad of (1/W) sum_r L_r
    tw.run(lambda r: finalize_expert_grads(ranks[r]))
    ddp_average(ref, ranks)
    want = torch.linalg.vector_norm(torch.cat([q.grad.flatten() for q in ref.parameters()]), norm_type)
    norms = tw.run(lambda r: grad_norm(ranks[r].parameters(), norm_type, module=ranks[r]))
    for n in norms:
        torch.testing.assert_close(n, want.to(n.dtype), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="include expert shards; pass module="):  # no group: a rank-local norm
        grad_norm(ranks[0].parameters(), norm_type)
    torch.testing.assert_close(grad_norm(ref.parameters(), norm_type), want, rtol=1e-12, atol=0)  # no EP: no module
    max_norm = float(want) / 3
    totals = tw.run(lambda r: clip_grad_norm_(ranks[r].parameters(), max_norm, norm_type, module=ranks[r]))
    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)
    for r, m in enumerate(ranks):
        torch.testing.assert_close(totals[r], want.to(totals[r].dtype), rtol=1e-12, atol=0)
        assert_grads_equal_reference(ref, m, r, 2, rtol=1e-9)


def _connector_ranks_with_unit_grads(tw: ThreadWorld) -> list[nn.Module]:
    ranks = ep_ranks(tw, Connector(), tw.world)
    for m in ranks:
        for p in m.parameters():
            p.grad = torch.ones_like(p)
    return ranks


def test_threaded_clipping_refuses_a_nonfinite_norm_when_asked(monkeypatch):
    tw = ThreadWorld(2).patch(monkeypatch)
    ranks = _connector_ranks_with_unit_grads(tw)
    expert_parameters(ranks[1])[0].grad[0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="^the total norm of order 2.0 for gradients is non-finite$"):
        tw.run(lambda r: clip_grad_norm_(ranks[r].parameters(), 1.0, module=ranks[r], error_if_nonfinite=True))


def test_threaded_overflow_on_one_rank_is_seen_by_every_rank(monkeypatch):
    tw = ThreadWorld(2).patch(monkeypatch)
    ranks = _connector_ranks_with_unit_grads(tw)
    assert tw.run(lambda r: sync_nonfinite_expert_grads(ranks[r])) == [False, False]
    assert all(bool(torch.isfinite(p.grad).all()) for m in ranks for p in m.parameters())
    expert_parameters(ranks[1])[2].grad[0, 1] = float("inf")
    assert tw.run(lambda r: sync_nonfinite_expert_grads(ranks[r])) == [True, True]
    for m in ranks:  # every rank's expert grads are inf (so every GradScaler skips); replicated ones untouched
        assert all(bool(torch.isinf(p.grad).all()) for p in expert_parameters(m))
        assert bool(torch.isfinite(m.moe.router.gate.weight.grad).all())
    assert sync_nonfinite_expert_grads(Connector()) is False  # not expert-parallel: nothing to sync


def test_threaded_load_metrics_report_every_ranks_received_tokens(monkeypatch):
    tw = ThreadWorld(2).patch(monkeypatch)
    ref = decoder()
    ranks = ep_ranks(tw, ref, 2)
    ids = [torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(30 + r)) for r in range(2)]
    assert ep_load_metrics(ranks[0]) == {}  # before the first step: nothing routed yet, no collective
    with torch.no_grad():
        tw.run(lambda r: ranks[r](ids[r]))
    metrics = tw.run(lambda r: ep_load_metrics(ranks[r]))
    paths = find_state(ranks[0]).moe_modules
    sites = {f"{ref.get_submodule(n).site if hasattr(ref.get_submodule(n), 'site') else 'attention'}."
             f"{ref.get_submodule(n).layer}": n for n in paths}
    assert sorted(sites) == ["attention.1", "ffn.0", "ffn.1"]
    for r, got in enumerate(metrics):
        want = {}
        for site, path in sites.items():
            recv = [float(m.get_submodule(path).dispatcher.last_recv_tokens_per_expert.sum()) for m in ranks]
            want.update({f"ep/{site}/recv_tokens_rank{q}": recv[q] for q in range(2)})
            want[f"ep/{site}/recv_imbalance"] = max(recv) / (sum(recv) / 2)
        want["ep/a2a_sent_bytes_remote"] = float(sum(ranks[r].get_submodule(path).dispatcher.stats[
            "sent_bytes_remote"] for path in sites.values()))
        assert got == pytest.approx(want, rel=1e-12)
    assert ep_load_metrics(decoder()) == {}  # not expert-parallel


# --------------------------------------------------------------------------- checkpoints and export


@pytest.mark.parametrize("build", [decoder, Connector], ids=["decoder", "connector"])
def test_threaded_full_state_dict_and_shard_round_trip(monkeypatch, build):
    """The gathered state dict is the one-process one (keys, order, shapes, values); slicing it gives each rank
    its own block back, a local-shaped dict passes through, and any other shape is refused by name."""
    world = 2
    tw = ThreadWorld(world).patch(monkeypatch)
    ref = build()
    ranks = ep_ranks(tw, ref, world)
    want = ref.state_dict()
    fulls = tw.run(lambda r: full_state_dict(ranks[r]))
    for r, m in enumerate(ranks):
        assert_same_state(fulls[r], want)
        local = m.state_dict()
        assert_same_state(shard_state_dict(m, fulls[r]), local)
        assert_same_state(shard_state_dict(m, local), local)
    m = ranks[1]
    key = next(k for k in want if k.endswith("w_out.weight"))
    bad = {**want, key: want[key][:3]}
    E, *rest = want[key].shape
    with pytest.raises(ValueError, match=rf"^{key}: checkpoint shape \(3, {rest[0]}, {rest[1]}\) is neither the full "
                                         rf"\({E}, {rest[0]}, {rest[1]}\) nor the local \({E // 2}, {rest[0]}, "
                                         rf"{rest[1]}\)$"):
        shard_state_dict(m, bad)
    plain = build()  # not expert-parallel: every function is the identity
    assert shard_state_dict(plain, want) == want
    assert_same_state(full_state_dict(plain), want)


def test_threaded_consolidated_model_cache_and_local_gather(monkeypatch):
    world = 2
    tw = ThreadWorld(world).patch(monkeypatch)
    ref = Connector()
    ranks = ep_ranks(tw, ref, world)
    x = torch.randn(2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want_out = ref(x)

    cons = tw.run(lambda r: consolidated_model(ranks[r]))
    for r, c in enumerate(cons):
        assert_same_state(c.state_dict(), ref.state_dict())
        assert find_state(c) is None and type(c.moe.dispatcher) is LocalDispatcher
        assert c.moe.experts.w_in.num_experts == 4 and not hasattr(c.moe.experts.w_in, SHARD_ATTR)
        torch.testing.assert_close(c(x), want_out, rtol=0, atol=TOL)
        assert find_state(ranks[r]) is not None and ranks[r].moe.experts.w_in.num_experts == 2  # original intact

    tw.run(lambda r: cache_consolidated(ranks[r]))
    calls = tw.calls["all_gather"]
    c1 = consolidated_model(ranks[1])  # one rank alone: served from the cache, no collective
    assert tw.calls["all_gather"] == calls
    assert_same_state(c1.state_dict(), ref.state_dict())
    drop_consolidated(ranks[1])
    assert find_state(ranks[1])._cache is None

    weights = [(m.moe.experts.w_in.weight, m.moe.experts.w_out.bias, m.moe.dispatcher) for m in ranks]
    restores = tw.run(lambda r: gather_experts_locally(ranks[r]))
    for r, m in enumerate(ranks):
        assert m.moe.experts.w_in.num_experts == 4 and type(m.moe.dispatcher) is LocalDispatcher
        torch.testing.assert_close(m(x), want_out, rtol=0, atol=TOL)  # local: no collective per step
        restores[r]()
        assert (m.moe.experts.w_in.weight, m.moe.experts.w_out.bias, m.moe.dispatcher) == weights[r]
        assert m.moe.experts.w_in.num_experts == 2


def test_threaded_optimizer_state_gathers_and_slices_expert_moments(monkeypatch):
    """AdamW moments of every expert, gathered over the EP ranks, equal the one-process optimizer's (the
    expert gradients agree with it exactly); slicing them back gives each rank its own moments."""
    world = 2
    tw = ThreadWorld(world).patch(monkeypatch)
    ref = Connector()
    ranks = ep_ranks(tw, ref, world)
    xs = connector_inputs(world)
    outs = tw.run(lambda r: ranks[r](xs[r]))
    sum(o.square().sum() for o in outs).backward()
    sum(ref(x).square().sum() for x in xs).backward()
    for m in (*ranks, ref):
        m.moe.experts.w_in.bias.grad = None  # no state for this expert tensor: the ones after it still count
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1) for m in ranks]
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    for o in (*opts, ref_opt):
        o.step()
    names = [n for n, _ in ref.named_parameters()]
    expert_idx = [i for i, n in enumerate(names) if ".experts." in n and n != "moe.experts.w_in.bias"]
    assert len(expert_idx) == 3 and names.index("moe.experts.w_in.bias") < max(expert_idx)
    fulls = tw.run(lambda r: full_optimizer_state_dict(opts[r], ranks[r]))
    want = ref_opt.state_dict()["state"]
    for r in range(world):
        own = opts[r].state_dict()["state"]
        for i in expert_idx:
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(fulls[r]["state"][i][k], want[i][k], rtol=0, atol=TOL)
            assert fulls[r]["state"][i]["step"] == own[i]["step"]
        assert names.index("moe.experts.w_in.bias") not in fulls[r]["state"]
        for i in set(own) - set(expert_idx):  # replicated params: the rank's own state, as is
            assert fulls[r]["state"][i]["exp_avg"] is own[i]["exp_avg"]
        back = shard_optimizer_state_dict(opts[r], ranks[r], fulls[r])["state"]
        for i in expert_idx:
            torch.testing.assert_close(back[i]["exp_avg"], own[i]["exp_avg"], rtol=0, atol=0)
            assert back[i]["exp_avg"].data_ptr() != fulls[r]["state"][i]["exp_avg"].data_ptr()  # a copy
        opts[r].load_state_dict({**fulls[r], "state": back})
    plain = Connector()
    plain_opt = torch.optim.AdamW(plain.parameters())
    assert full_optimizer_state_dict(plain_opt, plain) == plain_opt.state_dict()
    assert shard_optimizer_state_dict(plain_opt, plain, want) is want


def test_threaded_sum_over_ranks_reduces_a_copy(monkeypatch):
    """The reducer training code hands to the balancing losses: a new tensor summed over every rank; without a
    process group a copy of the input."""
    from mmoe.parallel.collectives import sum_over_ranks, world_size

    t = torch.tensor([1.0, 2.0])
    assert world_size() == 1
    out = sum_over_ranks(t)
    assert out is not t and out.tolist() == [1.0, 2.0]
    tw = ThreadWorld(2).patch(monkeypatch)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    inputs = [torch.tensor([float(r), 2.0], requires_grad=True) for r in range(2)]
    outs = tw.run(lambda r: (world_size(), sum_over_ranks(inputs[r])))
    for r, (size, o) in enumerate(outs):
        assert size == 2 and o.tolist() == [1.0, 4.0] and not o.requires_grad
        assert inputs[r].tolist() == [float(r), 2.0]  # the input is left alone


class _FakeDeviceMesh:
    """init_device_mesh's (edp, ep) mesh for one rank: row-major as torch lays it out, or wrongly."""

    def __init__(self, shape, rank: int, layout: str = "torch"):
        edp, ep = shape
        ranks = torch.arange(edp * ep)
        grid = ranks.view(ep, edp).t() if layout == "transposed" else ranks.view(edp, ep)  # (edp, ep)
        row, col = [int(i) for i in (grid == rank).nonzero()[0]]
        edp_ranks = grid[:, col].tolist()
        self.groups = {"ep": tuple(grid[row].tolist()),
                       "edp": tuple(reversed(edp_ranks) if layout == "edp_reversed" else edp_ranks)}

    def get_group(self, name):
        return self.groups[name]


@pytest.mark.parametrize("backend, cuda, device", [("gloo", False, "cpu"), ("nccl", False, "cpu"),
                                                   ("nccl", True, "cuda"), ("gloo", True, "cpu")])
def test_build_mesh_lays_out_ep_contiguous_and_edp_strided(monkeypatch, backend, cuda, device):
    """build_mesh's own logic around init_device_mesh (faked here; the real one runs in the multi-process
    tests): the sizes, the groups, the device type from the backend, and its layout check."""
    import torch.distributed as dist
    import torch.distributed.device_mesh as device_mesh_module

    from mmoe.parallel.mesh import build_mesh

    with pytest.raises(RuntimeError, match=r"^expert parallelism \(ep_size=2\) needs torch.distributed "
                                           r"initialised first; under Lightning call it from configure_model"):
        build_mesh(2)
    calls, layout = [], "torch"

    def fake_init(device_type, shape, mesh_dim_names):
        calls.append((device_type, shape, mesh_dim_names))
        return _FakeDeviceMesh(shape, dist.get_rank(), layout)

    monkeypatch.setattr(device_mesh_module, "init_device_mesh", fake_init)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 8)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: list(group))
    for rank in range(8):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, r=rank: r)
        mesh = build_mesh(2)
        assert (mesh.rank, mesh.ep_size, mesh.edp_size, mesh.ep_rank) == (rank, 2, 4, rank % 2)
        assert mesh.ep_group == (rank - rank % 2, rank - rank % 2 + 1)
        assert mesh.edp_group == tuple(range(rank % 2, 8, 2)) and isinstance(mesh.device_mesh, _FakeDeviceMesh)
    assert calls[-1] == (device, (4, 2), ("edp", "ep"))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    assert build_mesh(8).edp_group is None  # one replica per shard: no EDP group
    layout = "transposed"  # a mesh laid out another way than DeepSpeed's is refused, not used
    with pytest.raises(RuntimeError, match=r"^unexpected EP group \[0, 4\] for rank 0, expected \[0, 1\]$"):
        build_mesh(2)
    layout = "edp_reversed"
    with pytest.raises(RuntimeError, match=r"^unexpected EDP group for rank 0$"):
        build_mesh(2)
    layout = "torch"
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    assert build_mesh(2).edp_group == (0, 2)  # two replicas per shard

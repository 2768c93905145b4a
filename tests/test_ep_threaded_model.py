"""`enable_expert_parallel` at ep 2 and 4 in one process (thread ranks, tests/_ep_threads.py) against one
process holding every expert, float64: outputs, expert-shard and replicated gradients, and its refusals.

The multi-process tests (test_expert_parallel.py) check the same through gloo, a few seconds per start-up;
these run in about a second, so every mutant of the sharding code can be run against them (docs/mutation.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mmoe.parallel.dispatcher as dispatcher_module
from _ep_threads import ThreadedAllToAll, run_ranks
from mmoe.model.decoder import Decoder, DecoderConfig
from mmoe.model.moe import MoEConfig
from mmoe.model.moe.experts import GroupedLinear
from mmoe.model.moe.ffn import MoEFFN
from mmoe.parallel.expert_parallel import (
    SHARD_ATTR,
    _GuardedDispatcher,
    enable_expert_parallel,
    expert_parameters,
    find_state,
    is_expert_param,
)
from mmoe.parallel.mesh import ExpertParallelMesh, ParallelDims

TOL = 1e-12


def _mesh(world: int, rank: int) -> ExpertParallelMesh:
    return ExpertParallelMesh(dims=ParallelDims(world, world), rank=rank, ep_group=rank, edp_group=None)


def _decoder() -> Decoder:
    """MoA (4 experts) in layer 1, MoE FFN (8 experts + 1 shared) in both layers."""
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=40, dim=16, n_layers=2, n_heads=8, n_kv_heads=2, hidden=24, max_seq_len=32,
                        tie_embeddings=True, attn_moe=MoEConfig(num_experts=4, top_k=2), attn_moe_layers="1",
                        ffn_moe=MoEConfig(num_experts=8, top_k=2, num_shared_experts=1), ffn_moe_layers="all")
    m = Decoder(cfg).double()
    m.reset_parameters(std=0.2)
    return m


class _Connector(nn.Module):
    """A connector-like MoE site: GELU experts with biases, no causal routing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.moe = MoEFFN(6, 10, MoEConfig(num_experts=4, top_k=2), activation="gelu", bias=True, causal=False,
                          site="connector", layer=0, out_dim=5).double()
        with torch.no_grad():
            for p in self.moe.parameters():
                p.normal_(0, 0.3)  # biases nonzero too, so a bias left unsharded or misplaced shows

    def forward(self, x):
        return self.moe(x)[0]


def _check_against_reference(ref: nn.Module, ranks: list[nn.Module], inputs: list, world: int) -> None:
    """Forward on each rank's inputs vs `ref` on the same; then one backward of sum_r <out_r, gy_r> on both:
    expert shards carry their rows of the reference gradient, replicated params sum to the reference's."""
    outs = run_ranks(world, lambda r: ranks[r](inputs[r]))
    ref_outs = [ref(x) for x in inputs]
    get = (lambda o: o.logits) if hasattr(outs[0], "logits") else (lambda o: o)
    gys = [torch.randn_like(get(o), generator=torch.Generator().manual_seed(5)) for o in ref_outs]
    for o, ro in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(get(o), get(ro), rtol=0, atol=TOL)
    sum((get(o) * gy).sum() for o, gy in zip(outs, gys, strict=True)).backward()
    sum((get(o) * gy).sum() for o, gy in zip(ref_outs, gys, strict=True)).backward()
    ref_params = dict(ref.named_parameters())
    ref_modules = dict(ref.named_modules())
    sharded = set()
    for r, m in enumerate(ranks):
        for name, gl in m.named_modules():
            shard = getattr(gl, SHARD_ATTR, None)
            if shard is None:
                continue
            full = ref_modules[name]
            El = full.num_experts // world
            assert (shard.num_experts, shard.lo, shard.hi, gl.num_experts) == (full.num_experts, r * El,
                                                                                  (r + 1) * El, El)
            for pname in ("weight", "bias"):
                p, q = getattr(gl, pname), getattr(full, pname)
                assert (p is None) == (q is None), (name, pname)
                if p is None:
                    continue
                assert is_expert_param(p) and p.requires_grad
                torch.testing.assert_close(p.detach(), q.detach()[r * El:(r + 1) * El], rtol=0, atol=0)
                torch.testing.assert_close(p.grad, q.grad[r * El:(r + 1) * El], rtol=0, atol=TOL)
                sharded.add(f"{name}.{pname}")
    for name, q in ref_params.items():
        if name in sharded:
            continue
        total = sum(dict(m.named_parameters())[name].grad for m in ranks)
        torch.testing.assert_close(total, q.grad, rtol=0, atol=TOL, msg=name)
    assert sharded, "no expert parameter was sharded"


@pytest.mark.parametrize("world", [2, 4])
def test_threaded_expert_parallel_decoder_equals_one_process(monkeypatch, world):
    monkeypatch.setattr(dispatcher_module, "_a2a", ThreadedAllToAll(world))
    ref = _decoder()
    ranks = [copy.deepcopy(ref) for _ in range(world)]
    sites = [n for n, m in ref.named_modules() if hasattr(m, "dispatcher")]
    for r, m in enumerate(ranks):
        state = enable_expert_parallel(m, world, mesh=_mesh(world, r))
        assert find_state(m) is state and state.moe_modules == sites and len(sites) == 3
        for name in sites:
            d = m.get_submodule(name).dispatcher
            assert isinstance(d, _GuardedDispatcher) and (d.ep_size, d.ep_rank, d.group) == (world, r, r)
        state.grad_sync = "manual"
        assert enable_expert_parallel(m, world, mesh=_mesh(world, r)) is state  # Lightning calls it again
    ids = [torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
    _check_against_reference(ref, ranks, ids, world)


def test_threaded_expert_parallel_connector_with_biases_equals_one_process(monkeypatch):
    world = 2
    monkeypatch.setattr(dispatcher_module, "_a2a", ThreadedAllToAll(world))
    ref = _Connector()
    ranks = [copy.deepcopy(ref) for _ in range(world)]
    for r, m in enumerate(ranks):
        enable_expert_parallel(m, world, mesh=_mesh(world, r)).grad_sync = "manual"
        assert len(expert_parameters(m)) == 4  # w_in/w_out weight + bias
    xs = [torch.randn(2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    _check_against_reference(ref, ranks, xs, world)


def test_frozen_experts_stay_frozen_when_sharded():
    m = _Connector()
    m.moe.experts.requires_grad_(False)
    enable_expert_parallel(m, 2, mesh=_mesh(2, 1))
    assert [p.requires_grad for p in expert_parameters(m)] == [False] * 4
    assert m.moe.router.gate.weight.requires_grad


def test_unguarded_expert_parallel_training_is_refused(monkeypatch):
    monkeypatch.setattr(dispatcher_module, "_a2a", ThreadedAllToAll(1))
    m = _Connector()
    enable_expert_parallel(m, 2, mesh=ExpertParallelMesh(dims=ParallelDims(2, 2), rank=0, ep_group=0,
                                                          edp_group=None))
    x = torch.randn(1, 3, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="nothing reduces the expert gradients.*--trainer.strategy ddp_ep"):
        m(x)


def test_enable_expert_parallel_refusals():
    assert enable_expert_parallel(_Connector(), 1) is None  # ep 1: nothing to do, no process group needed
    m = _Connector()
    enable_expert_parallel(m, 2, mesh=_mesh(2, 0))
    with pytest.raises(RuntimeError, match=r"^model is already expert-parallel with ep_size=2, not 4$"):
        enable_expert_parallel(m, 4, mesh=_mesh(4, 0))
    with pytest.raises(ValueError, match=r"^model.parallel.ep_size=2 but the model has no MoE layer to shard$"):
        enable_expert_parallel(nn.Linear(2, 2), 2, mesh=_mesh(2, 0))
    with pytest.raises(ValueError, match=r"^moe: num_experts=4 is not divisible by model.parallel.ep_size=3$"):
        enable_expert_parallel(_Connector(), 3, mesh=_mesh(3, 0))

    m = _Connector()
    m.moe.cfg = MoEConfig(num_experts=8, top_k=2)
    with pytest.raises(ValueError, match=r"^moe: config has 8 experts but its GroupedLinear 4$"):
        enable_expert_parallel(m, 2, mesh=_mesh(2, 0))
    m = _Connector()
    m.moe.experts.w_out = GroupedLinear(2, 10, 5)
    with pytest.raises(ValueError, match=r"^moe: GroupedLinears with different expert counts \(2 vs 4\)$"):
        enable_expert_parallel(m, 2, mesh=_mesh(2, 0))
    m = _Connector()
    m.moe.experts = nn.Identity()
    with pytest.raises(ValueError, match=r"^moe: MoE module without GroupedLinear experts cannot be expert-parallel$"):
        enable_expert_parallel(m, 2, mesh=_mesh(2, 0))


def test_a_vlm_keeps_encoding_images_under_expert_parallel():
    m = _Connector()
    m.always_encode_images = False  # the MMoEVLM attribute: text-only batches must still join the all-to-alls
    enable_expert_parallel(m, 2, mesh=_mesh(2, 0))
    assert m.always_encode_images is True

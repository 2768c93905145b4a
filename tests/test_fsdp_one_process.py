"""FSDP2 wrapping (`mmoe.parallel.fsdp`) and the `fsdp_ep` Lightning strategy (`mmoe.parallel.fsdp_strategy`) in
this process, on a one-rank gloo group, float64, against the unsharded model: which modules become FSDP units,
what each unit's policy is, activation checkpointing, the refusals, the global gradient norm and clipping (also at
two thread ranks, tests/_ep_threads.py), and the strategy's hooks - dtypes, mesh size, sharding in `setup`, DCP
checkpoints written and read back, the generation refusals and the export copy gathered at the end of fit.

What needs more than one process (sharding across ranks, the expert banks' EDP units and their gradient scaling,
resuming at another world size) is in test_fsdp_ep.py, seconds per job; these take seconds in all, so every
mutant of the wrapping and the strategy can be run against them (docs/mutation.md).
"""

from __future__ import annotations

import dataclasses
import math
import re

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor, Shard

from _ep_models import Connector, Holder, assert_same_state, decoder
from _ep_threads import ThreadWorld
from mmoe.model.vlm import MMoEVLM
from mmoe.parallel.expert_parallel import enable_expert_parallel
from mmoe.parallel.fsdp import (
    apply_fsdp_ep,
    checkpoint_blocks,
    clip_grad_norm_fsdp_,
    expert_units,
    find_fsdp,
    fsdp_grad_norm,
    fsdp_modules,
    mixed_precision,
)
from mmoe.parallel.fsdp_checkpoint import clean_name
from mmoe.parallel.fsdp_strategy import FSDPExpertParallelStrategy, cache_consolidated_fsdp
from test_fsdp_ep import _batch, _loss, _model

TOL = 1e-12


@pytest.fixture
def one_rank():
    """A one-rank gloo group in this process and its 1-D mesh (destroyed after the test)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _units(model) -> dict[str, FSDPModule]:
    return {clean_name(n): m for n, m in model.named_modules() if isinstance(m, FSDPModule)}


def _policy(unit: FSDPModule) -> MixedPrecisionPolicy:
    return unit._get_fsdp_state()._fsdp_param_group.mp_policy


def _grads(model) -> dict[str, torch.Tensor]:
    return {clean_name(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
            for n, p in model.named_parameters() if p.grad is not None}


def _total_norm(grads: dict[str, torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """torch's norm of all the gradients as one vector (the reference for the global norm)."""
    return torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.values()]), norm_type)


def _reference_grads(batches) -> tuple[float, dict[str, torch.Tensor]]:
    ref = _model()
    loss = sum(_loss(ref, b) for b in batches)
    loss.backward()
    return float(loss), {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------- wrapping
@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp_one_unit_per_block_connector_and_root_and_the_root_keeps_its_weights(one_rank, reshard):
    model = _model()
    mp = mixed_precision(None, torch.float64)
    info = apply_fsdp_ep(model, one_rank, mp, reshard_after_forward=reshard)
    units = _units(model)
    assert set(units) == {"", "connector", "vision.vit.blocks.0", "vision.vit.blocks.1", "decoder.layers.0",
                          "decoder.layers.1"}
    assert (info.units, info.expert_units, info.world_size, info.ep, info.expert_mesh) == (6, 0, 1, None, None)
    assert find_fsdp(model) is info and apply_fsdp_ep(model, one_rank) is info  # applied once
    assert fsdp_modules(model) == list(units.values()) and model.always_encode_images
    assert all(_policy(u) == mp for u in units.values())

    batches = [_batch(0, 0), _batch(0, 1, images=False)]
    loss = sum(_loss(model, b) for b in batches)
    root = [p for p in model.parameters() if not isinstance(p, DTensor)]
    assert root and {n.split(".")[0] for n, p in model.named_parameters() if not isinstance(p, DTensor)} >= {
        "decoder", "vision"}  # the root unit's weights stay gathered after forward (backward needs them first)
    layer = [isinstance(p, DTensor) for p in model.decoder.layers[0].parameters()]
    assert all(layer) if reshard else not any(layer)
    loss.backward()
    want_loss, want = _reference_grads(batches)
    assert math.isclose(float(loss), want_loss, rel_tol=0, abs_tol=TOL)
    got = _grads(model)
    assert set(got) == set(want)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-10, atol=TOL, msg=n)


def test_fsdp_activation_checkpointing_wraps_every_block_once_and_keeps_the_gradients(one_rank):
    plain = _model()
    assert checkpoint_blocks(plain) == 4 and checkpoint_blocks(plain) == 0
    assert all(hasattr(b, "_checkpoint_wrapped_module") for b in (*plain.vision.vit.blocks, *plain.decoder.layers))
    model = _model()
    apply_fsdp_ep(model, one_rank, activation_checkpointing=True)
    assert all(hasattr(b, "_checkpoint_wrapped_module") for b in (*model.vision.vit.blocks, *model.decoder.layers))
    assert _policy(_units(model)[""]) == MixedPrecisionPolicy()  # no policy given: the parameters' own dtype
    batch = _batch(1, 0)
    loss = _loss(model, batch)
    assert all(isinstance(p, DTensor) for p in model.decoder.layers[0].parameters())  # resharded by default
    loss.backward()
    want_loss, want = _reference_grads([batch])
    assert math.isclose(float(loss), want_loss, rel_tol=0, abs_tol=TOL)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, want[n], rtol=1e-10, atol=TOL, msg=n)
    unwrapped = _model()
    apply_fsdp_ep(unwrapped, one_rank)
    assert not any(hasattr(b, "_checkpoint_wrapped_module") for b in unwrapped.decoder.layers)


def test_fsdp_activation_checkpointing_counts_the_aux_free_loads_once(one_rank):
    """The recompute in backward routes again; the routers' aux-free load counters must count the forward only."""
    from mmoe.model.vlm import MMoEVLM
    from test_fsdp_ep import _arch

    def build():
        torch.manual_seed(0)
        return MMoEVLM(_arch(aux_free=True)).double().train()

    model, ref = build(), build()
    apply_fsdp_ep(model, one_rank, activation_checkpointing=True)
    for m in (model, ref):
        _loss(m, _batch(4, 0)).backward()
    loads = {clean_name(n): b for n, b in model.named_buffers() if n.endswith("load_accum")}
    want = {n: b for n, b in ref.named_buffers() if n.endswith("load_accum")}
    assert set(loads) == set(want) and len(want) == 6 and all(float(b.sum()) > 0 for b in want.values())
    for n, b in want.items():
        torch.testing.assert_close(loads[n], b, rtol=0, atol=0, msg=n)


def test_fsdp_block_containers_are_the_layers_and_blocks_lists_only():
    """Activation checkpointing and the per-block units take the entries of ModuleLists / Sequentials named
    `layers` or `blocks`; another list (a connector's projector) or a single module called `layers` is not one."""
    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
            self.tower = torch.nn.Module()
            self.tower.blocks = torch.nn.Sequential(torch.nn.Linear(2, 2))
            self.proj = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GELU())
            self.head = torch.nn.Module()
            self.head.layers = torch.nn.Linear(2, 2)  # named like a list, is not one

    m = Stack()
    assert checkpoint_blocks(m) == 3
    wrapped = [n for n, b in m.named_modules() if hasattr(b, "_checkpoint_wrapped_module")]
    assert wrapped == ["layers.0", "layers.1", "tower.blocks.0"]


def test_fsdp_refuses_a_mesh_that_is_not_the_world_or_not_the_expert_parallel_one(one_rank):
    with pytest.raises(ValueError) as err:
        apply_fsdp_ep(_model(), init_device_mesh("cpu", (1, 1)))
    assert str(err.value).startswith("apply_fsdp_ep needs a 1-D mesh over all ranks, got DeviceMesh(")
    model = _model()
    enable_expert_parallel(model, 2, mesh=ThreadWorld(2).mesh(0, 2))
    with pytest.raises(ValueError) as err:
        apply_fsdp_ep(model, one_rank)
    assert str(err.value) == "expert-parallel mesh spans 2 ranks, FSDP mesh 1"


def test_fsdp_expert_units_are_the_sharded_banks_and_lone_moa_projections():
    m = decoder()
    assert expert_units(m) == []  # not expert-parallel: no expert unit
    enable_expert_parallel(m, 2, mesh=ThreadWorld(2).mesh(0, 2))
    want = [m.layers[0].mlp.experts, m.layers[1].mlp.experts, m.layers[1].self_attn.q_proj,
            m.layers[1].self_attn.o_proj]
    assert [id(u) for u in expert_units(m)] == [id(u) for u in want]


def test_mixed_precision_policy_holds_the_two_dtypes():
    assert mixed_precision(torch.bfloat16, torch.float32) == MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- norm and clipping
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_fsdp_global_norm_and_clipping_equal_torch_on_the_unsharded_grads(one_rank, norm_type):
    model = _model()
    apply_fsdp_ep(model, one_rank)
    _loss(model, _batch(2, 0)).backward()
    _, want = _reference_grads([_batch(2, 0)])
    total = _total_norm(want, norm_type)
    torch.testing.assert_close(fsdp_grad_norm(model.parameters(), norm_type), total, rtol=1e-12, atol=0)
    got = clip_grad_norm_fsdp_(model.parameters(), float(total) / 4, norm_type)
    torch.testing.assert_close(got, total, rtol=1e-12, atol=0)
    ref = _model()
    _loss(ref, _batch(2, 0)).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), float(total) / 4, norm_type)
    clipped = _grads(model)
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(clipped[n], p.grad, rtol=1e-10, atol=TOL, msg=n)


def test_fsdp_clipping_defaults_to_the_2_norm_and_refuses_a_nonfinite_norm_when_asked(one_rank):
    model = _model()
    apply_fsdp_ep(model, one_rank)
    _loss(model, _batch(3, 0)).backward()
    _, want = _reference_grads([_batch(3, 0)])
    total = _total_norm(want)
    torch.testing.assert_close(clip_grad_norm_fsdp_(model.parameters(), 1e9), total, rtol=1e-12, atol=0)
    torch.testing.assert_close(fsdp_grad_norm(model.parameters()), total, rtol=1e-12, atol=0)
    for n, g in _grads(model).items():  # far above the norm: nothing clipped
        torch.testing.assert_close(g, want[n], rtol=1e-10, atol=TOL, msg=n)
    next(p for p in model.parameters() if p.grad is not None).grad.to_local().view(-1)[0] = float("nan")
    clip_grad_norm_fsdp_(model.parameters(), 1.0)  # not asked: no error
    with pytest.raises(RuntimeError, match=r"^the total norm of order 2.0 for gradients is non-finite$"):
        clip_grad_norm_fsdp_(model.parameters(), 1.0, error_if_nonfinite=True)
    assert float(fsdp_grad_norm([torch.nn.Parameter(torch.ones(2))])) == 0.0  # no gradient at all


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_fsdp_global_norm_at_two_ranks_counts_shards_once_and_replicated_grads_once(one_rank, monkeypatch, norm_type):
    """Two thread ranks: each holds half of a sharded gradient (DTensor) and the whole of a replicated one (plain
    tensor, the same on both); the global norm is the norm of the full gradients on every rank, and clipping
    scales every piece by one coefficient."""
    g = torch.Generator().manual_seed(4)
    sharded = torch.randn(6, 3, dtype=torch.float64, generator=g)
    replicated = torch.randn(5, dtype=torch.float64, generator=g)
    single = torch.randn(4, generator=g)  # a float32 gradient too: clipped in its own dtype
    ranks = []
    for r in range(2):
        a = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))
        b, c = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(4))
        a.grad = DTensor.from_local(sharded[3 * r:3 * r + 3].clone(), one_rank, [Shard(0)], run_check=False)
        b.grad, c.grad = replicated.clone(), single.clone()
        ranks.append([a, b, c])
    tw = ThreadWorld(2).patch(monkeypatch)
    want = torch.linalg.vector_norm(torch.cat([sharded.flatten(), replicated, single.double()]), norm_type)
    for n in tw.run(lambda r: fsdp_grad_norm(ranks[r], norm_type)):
        torch.testing.assert_close(n, want, rtol=1e-7, atol=0)  # the float32 piece's norm is taken in float32
    tw.run(lambda r: clip_grad_norm_fsdp_(ranks[r], float(want) / 2, norm_type))
    coef = float(want) / 2 / (float(want) + 1e-6)
    for r, (a, b, c) in enumerate(ranks):
        torch.testing.assert_close(a.grad.to_local(), sharded[3 * r:3 * r + 3] * coef, rtol=1e-7, atol=0)
        torch.testing.assert_close(b.grad, replicated * coef, rtol=1e-7, atol=0)
        torch.testing.assert_close(c.grad, single * coef, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------- the fsdp_ep strategy
def _fsdp_strategy(module, mesh=None, **kwargs) -> FSDPExpertParallelStrategy:
    s = FSDPExpertParallelStrategy(**kwargs)
    s.parallel_devices = [torch.device("cpu")]
    s.precision_plugin = Precision()
    if mesh is not None:
        s._device_mesh = mesh
    s.connect(module)
    return s


def test_fsdp_strategy_dtypes_are_checked_and_auto_is_bf16_on_cuda_only(monkeypatch):
    s = FSDPExpertParallelStrategy()
    s.parallel_devices = [torch.device("cpu")]
    assert (s.param_dtype, s._reduce_dtype, s._reshard_after_forward) == (None, torch.float32, True)
    for name, dtype in (("bf16", torch.bfloat16), ("float16", torch.float16), ("float64", torch.float64),
                        (None, None), ("none", None), ("None", None)):
        assert FSDPExpertParallelStrategy(param_dtype=name, reduce_dtype=name).param_dtype == dtype
        assert FSDPExpertParallelStrategy(reduce_dtype=name)._reduce_dtype == dtype
    for field in ("param_dtype", "reduce_dtype"):
        with pytest.raises(ValueError) as err:
            FSDPExpertParallelStrategy(**{field: "fp8"})
        assert str(err.value) == (f"strategy.{field}='fp8': expected one of ['bf16', 'bfloat16', 'float16', "
                                  "'float32', 'float64'], 'auto' or None")
    monkeypatch.setattr(FSDPExpertParallelStrategy, "root_device", property(lambda self: torch.device("cuda", 0)))
    assert FSDPExpertParallelStrategy().param_dtype == torch.bfloat16
    assert FSDPExpertParallelStrategy(param_dtype="float32").param_dtype == torch.float32


def test_fsdp_strategy_data_parallel_size_spans_every_process_of_every_node(monkeypatch):
    seen = []
    monkeypatch.setattr(ModelParallelStrategy, "setup_environment", lambda self: seen.append(
        (self._data_parallel_size, self._tensor_parallel_size)))
    for kwargs, want in (({}, (6, 1)), ({"data_parallel_size": 2}, (2, 1))):
        s = FSDPExpertParallelStrategy(**kwargs)
        s.parallel_devices, s.num_nodes = [torch.device("cpu")] * 3, 2
        s.setup_environment()
        assert seen[-1] == want


@pytest.mark.parametrize("checkpointing, reshard, dtype", [(False, True, None), (True, False, "float64"),
                                                          (None, True, None)])
def test_fsdp_strategy_setup_shards_the_model_with_its_policy_and_routes_clipping(one_rank, monkeypatch, caplog,
                                                                                 checkpointing, reshard, dtype):
    seen = []
    monkeypatch.setattr(ModelParallelStrategy, "setup", lambda self, trainer: seen.append(trainer))
    module = Holder(_model(), activation_checkpointing=checkpointing)
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    s = _fsdp_strategy(module, mesh, param_dtype=dtype, reduce_dtype="float64", reshard_after_forward=reshard)
    with caplog.at_level("INFO", logger="mmoe.parallel.fsdp_strategy"):
        s.setup("trainer")
    info = find_fsdp(module.model)
    assert seen == ["trainer"] and info is not None and info.world_mesh == mesh["data_parallel"]
    assert [r.getMessage() for r in caplog.records if r.name == "mmoe.parallel.fsdp_strategy"] == [
        "fsdp_ep: 6 FSDP units (0 expert banks), EP off"]
    units = _units(module.model)
    assert all(_policy(u) == MixedPrecisionPolicy(param_dtype=None if dtype is None else torch.float64,
                                                  reduce_dtype=torch.float64) for u in units.values())
    assert all(hasattr(b, "_checkpoint_wrapped_module") == bool(checkpointing) for b in module.model.decoder.layers)
    loss = _loss(module.model, _batch(0, 0))
    assert all(isinstance(p, DTensor) == reshard for p in module.model.decoder.layers[0].parameters())
    loss.backward()
    plugin = s.precision_plugin
    assert plugin._mmoe_fsdp_clip
    clip = plugin.clip_grad_by_norm
    s._patch_clipping()
    assert plugin.clip_grad_by_norm is clip  # not wrapped twice
    _, want = _reference_grads([_batch(0, 0)])
    total = _total_norm(want)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    clip(opt, float(total) / 5)  # Lightning's call: optimizer, value; the 2-norm by default
    for n, g in _grads(module.model).items():
        torch.testing.assert_close(g, want[n] / 5, rtol=1e-5, atol=TOL, msg=n)
    total_1 = _total_norm(want, 1.0)
    clip(opt, float(total_1) / 10, norm_type=1.0)  # now at a fifth of the 1-norm: halved
    for n, g in _grads(module.model).items():
        torch.testing.assert_close(g, want[n] / 10, rtol=1e-5, atol=TOL, msg=n)
    s.setup("again")  # already sharded: not sharded twice
    assert find_fsdp(module.model) is info

    with pytest.raises(TypeError, match="^fsdp_ep shards the LightningModule's `model` attribute; _Bare has none$"):
        _fsdp_strategy(type("_Bare", (pl.LightningModule,), {})(), mesh).setup("trainer")


def test_fsdp_strategy_checkpoint_round_trips_weights_and_moments_through_dcp(one_rank, monkeypatch, tmp_path):
    monkeypatch.setattr(ModelParallelStrategy, "setup", lambda self, trainer: None)
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))

    def build():
        module = Holder(_model())
        s = _fsdp_strategy(module, mesh)
        s.setup(None)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
        s.optimizers = [opt]
        return module, s, opt

    module, s, opt = build()
    for step in range(2):
        opt.zero_grad()
        _loss(module.model, _batch(step, 0)).backward()
        opt.step()
    arch = module.model.cfg  # Lightning's metadata holds arbitrary objects (hyper-parameters: config dataclasses)
    ckpt = {"state_dict": s.lightning_module_state_dict(), "optimizer_states": [s.optimizer_state(opt)], "epoch": 3,
            "hyper_parameters": {"arch": arch}}
    s.save_checkpoint(ckpt, tmp_path / "ck")
    fresh, s2, opt2 = build()
    meta = s2.load_checkpoint(tmp_path / "ck")
    assert meta["epoch"] == 3 and meta["hyper_parameters"]["arch"] == arch and "state_dict" not in meta
    s2.load_model_state_dict({"state_dict": {}})  # load_checkpoint restored the shards already: nothing to do
    for (n, p), q in zip(module.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(q.full_tensor(), p.full_tensor(), rtol=0, atol=0, msg=n)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt2.state[q][k].full_tensor() if k != "step" else opt2.state[q][k],
                                       opt.state[p][k].full_tensor() if k != "step" else opt.state[p][k],
                                       rtol=0, atol=0, msg=f"{n} {k}")

    with pytest.raises(TypeError, match="does not support storage_options|is not supported"):
        s.save_checkpoint({"state_dict": {}}, tmp_path / "other", storage_options={"bucket": "x"})
    one_file = _fsdp_strategy(Holder(_model()), mesh, save_distributed_checkpoint=False)
    with pytest.raises(ValueError) as err:
        one_file.save_checkpoint({}, tmp_path / "x.ckpt")
    assert str(err.value) == ("fsdp_ep writes sharded (DCP) checkpoints only; the one-process export comes from "
                              "--export_dir after fit")
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing.ckpt"):
        with pytest.raises(ValueError) as err:
            s2.load_checkpoint(path)
        assert str(err.value) == f"{path} is not a fsdp_ep (sharded DCP) checkpoint directory"


def test_fsdp_checkpoint_copy_back_writes_what_dcp_did_not_load_in_place(one_rank):
    """`load_into` copies each loaded tensor into the live one (plain or DTensor shard) unless DCP loaded it in
    place (same storage, same shape): a tensor DCP handed back as a new one must land in the model."""
    from mmoe.parallel.fsdp_checkpoint import _copy_back
    live, loaded = torch.zeros(2, 3), torch.arange(6.0).view(2, 3)
    _copy_back(live, loaded)
    assert torch.equal(live, loaded) and live.data_ptr() != loaded.data_ptr()
    _copy_back(live.view(6), torch.full((6,), 7.0))  # the same storage seen with another shape: still copied
    assert torch.equal(live, torch.full((2, 3), 7.0))
    shard = DTensor.from_local(torch.zeros(2, 3), one_rank, [Shard(0)])
    _copy_back(shard, DTensor.from_local(torch.ones(2, 3), one_rank, [Shard(0)]))
    assert torch.equal(shard.to_local(), torch.ones(2, 3))


@pytest.mark.parametrize("stage", ["validation", "test", "predict"])
def test_fsdp_strategy_refuses_generation_naming_the_stage(stage):
    with pytest.raises(RuntimeError) as err:
        getattr(FSDPExpertParallelStrategy(), f"on_{stage}_start")()
    assert str(err.value) == (f"fsdp_ep does not run {stage}: generation stops at different steps on different "
                              "ranks while every FSDP unit all-gathers on all of them; set --trainer.limit_val_batches"
                              " 0 and evaluate the exported model")


def test_fsdp_strategy_gathers_a_one_process_export_copy_at_the_end_of_fit(one_rank):
    model = _model()
    apply_fsdp_ep(model, one_rank)
    module = Holder(model)
    _fsdp_strategy(module).on_train_end()
    info = find_fsdp(model)
    copy = info.consolidated
    assert not info.consolidated_elsewhere and type(copy) is MMoEVLM and not copy.training
    want = _model().state_dict()
    got = copy.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    loads = [b for n, b in copy.named_buffers() if n.endswith("load_accum")]
    assert loads and all(not b.is_meta and not b.any() for b in loads)  # not in the state dict: zeros, not meta
    ids, mask, labels, pix = _batch(0, 0)
    torch.testing.assert_close(copy(ids, mask, pix).logits, _model().eval()(ids, mask, pix).logits, rtol=0, atol=0)

    cache_consolidated_fsdp(Holder(_model()))  # not sharded: nothing to gather
    cache_consolidated_fsdp(pl.LightningModule())  # no `model` at all
    bare = Connector()  # sharded, but no .cfg to rebuild it from
    apply_fsdp_ep(bare, one_rank)
    with pytest.raises(TypeError, match="^cannot rebuild Connector for export \\(no .cfg\\)$"):
        cache_consolidated_fsdp(Holder(bare))


def test_fsdp_strategy_registers_its_name_once():
    registry = _StrategyRegistry()
    FSDPExpertParallelStrategy.register_strategies(registry)
    FSDPExpertParallelStrategy.register_strategies(registry)
    assert {n: (e["strategy"], e["init_params"], e["description"]) for n, e in registry.items()} == {
        "fsdp_ep": (FSDPExpertParallelStrategy, {}, "FSDP2 over all ranks + expert parallelism")}


# ---------------------------------------------------------------------------------------------- sharded init
def test_fsdp_sharded_init_streams_an_hf_decoder_and_an_upcycled_vit_in_one_process(one_rank, tmp_path,
                                                                                    monkeypatch, caplog):
    """`model.parallel.sharded_init` at one rank through the strategy's `setup`: the model built on meta,
    sharded, filled by replaying its initialisation and streaming the tiny Llama and timm ViT into the shards
    (dense FFNs / MLPs upcycled into every expert), equals the ordinary unsharded load with the same seed,
    exactly."""
    from mmoe.parallel.fsdp_checkpoint import full_state_dict
    from mmoe.parallel.sharded_load import fill_sharded_module
    from mmoe.training.config import ParallelConfig, StageConfig
    from mmoe.training.module import MMoEModule
    from test_fsdp_ep import _stream_arch, _write_dense_checkpoints
    llama, vit = _write_dense_checkpoints(tmp_path)
    torch.manual_seed(0)
    want = MMoEModule(arch=_stream_arch(vit), stage=StageConfig(hf_decoder=llama)).model.state_dict()
    torch.manual_seed(0)
    module = MMoEModule(arch=_stream_arch(vit), stage=StageConfig(hf_decoder=llama),
                        parallel=ParallelConfig(sharded_init=True))
    assert all(p.is_meta for p in module.model.parameters())
    module.configure_model()
    monkeypatch.setattr(ModelParallelStrategy, "setup", lambda self, trainer: None)
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    with caplog.at_level("INFO", logger="mmoe.parallel.fsdp_strategy"):
        _fsdp_strategy(module, mesh).setup(None)
    logged = [r.getMessage() for r in caplog.records if r.name == "mmoe.parallel.fsdp_strategy"]
    assert len(logged) == 2 and logged[0].startswith("fsdp_ep: 6 FSDP units"), logged
    assert re.fullmatch(r"fsdp_ep: sharded init filled \d+ tensors \(replay peak \d+\.\d MiB\), streamed "
                        r"\{'vision': \{'copied': 20, 'upcycled': 4\}, 'decoder': \{'copied': 15, 'upcycled': 6\}\}",
                        logged[1]), logged[1]
    assert fill_sharded_module(module, "cpu") is None  # filled once
    assert_same_state(full_state_dict(module.model), want)


def test_fsdp_sharded_init_streams_an_open_clip_tower_in_one_process(one_rank, tmp_path):
    """An open_clip .safetensors (OpenAI-CLIP layout, text tower ignored) streamed into the sharded model at one
    rank: its MLPs upcycled into every expert, the shared expert's output projection (weight and bias) silenced,
    equal to the ordinary upcycled load exactly."""
    pytest.importorskip("open_clip")
    from mmoe.parallel.fsdp_checkpoint import full_state_dict
    from mmoe.parallel.sharded_load import fill_sharded_module
    from mmoe.training.config import ParallelConfig
    from mmoe.training.module import MMoEModule
    from test_fsdp_ep import _open_clip_arch, _write_open_clip
    path = _write_open_clip(tmp_path)

    def arch():
        a = _open_clip_arch(path)
        a.vision.moe = dataclasses.replace(a.vision.moe, num_shared_experts=1)  # a GELU MLP with biases too
        return a

    torch.manual_seed(0)
    want = MMoEModule(arch=arch()).model.state_dict()
    assert torch.equal(want["vision.vit.blocks.0.mlp.moe.shared.fc2.bias"], torch.zeros(64))
    torch.manual_seed(0)
    module = MMoEModule(arch=arch(), parallel=ParallelConfig(sharded_init=True))
    module.configure_model()
    apply_fsdp_ep(module.model, one_rank)
    stats = fill_sharded_module(module, "cpu")
    tower = [k for k in want if k.startswith("vision.") and ".moe." not in k]  # each copied once
    assert stats["loaded"] == {"vision": {"copied": len(tower), "upcycled": 6}}  # 3 blocks x c_fc, c_proj
    assert_same_state(full_state_dict(module.model), want)

"""`ExpertParallelStrategy` (mmoe.parallel.strategy) on thread ranks (tests/_ep_threads.py), float64, against one
process holding every expert: what the strategy adds to Lightning's DDPStrategy - the DDP ignore list, expert
gradients reduced inside the optimizer closure, overflow sync under a GradScaler, one global clipping norm through
the precision plugin, full (gathered) checkpoints sliced back on load, experts gathered for evaluation and
restored after, the consolidated copy cached at the end of fit, its registry names.

Lightning's own machinery around these hooks (the trainer loop, DDP's reducer, the launcher) is not replaced
here; `test_ep_lightning.py` runs the strategy inside real gloo processes (seconds per job), these in a few
seconds, so every mutant of the strategy can be run against them (docs/mutation.md).
"""

from __future__ import annotations

import types

import pytest
import torch
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import nn

import mmoe.parallel.strategy as strategy_module
from _ep_models import (
    TOL,
    Connector,
    Holder,
    assert_grads_equal_reference,
    assert_same_state,
    connector_inputs,
    ddp_average,
    ep_ranks,
    forward_backward,
)
from _ep_threads import ThreadWorld
from mmoe.model.moe.dispatch import LocalDispatcher
from mmoe.parallel.checkpoint import cache_consolidated, consolidated_model
from mmoe.parallel.expert_parallel import ddp_ignore_names, expert_parameters, find_state
from mmoe.parallel.fsdp_strategy import FSDPExpertParallelStrategy
from mmoe.parallel.strategy import ExpertParallelStrategy, require_expert_parallel_strategy


class _ClosurePrecision(Precision):
    """Lightning's default precision plugin with `optimizer_step` cut down to the strategy's contract: it runs
    the closure the strategy hands it (recorded) and returns the closure's result."""

    def __init__(self, scaler=None):
        super().__init__()
        if scaler is not None:
            self.scaler = scaler
        self.calls: list[tuple] = []

    def optimizer_step(self, optimizer, model, closure, **kwargs):
        self.calls.append((optimizer, model, closure, kwargs))
        return closure()


def _strategy(module: nn.Module, plugin: Precision | None = None, **kwargs) -> ExpertParallelStrategy:
    s = ExpertParallelStrategy(parallel_devices=[torch.device("cpu")], precision_plugin=plugin or Precision(),
                               **kwargs)
    s.connect(module)
    return s


def _connector_modules(tw: ThreadWorld):
    ref = Connector()
    return ref, [Holder(m) for m in ep_ranks(tw, ref, tw.world)]


# ---------------------------------------------------------------------------------------------- wrapping
def test_strategy_wraps_ddp_with_the_expert_shards_and_load_buffers_ignored(monkeypatch, caplog):
    tw = ThreadWorld(2)
    module = Holder(ep_ranks(tw, Connector(), 2)[1])
    wrapped = []

    def recording_ddp(module, device_ids, **kwargs):
        wrapped.append((module, device_ids, list(getattr(module, "_ddp_params_and_buffers_to_ignore", [])), kwargs))
        return "ddp"

    monkeypatch.setattr("lightning.pytorch.strategies.ddp.DistributedDataParallel", recording_ddp)
    s = _strategy(module, find_unused_parameters=True)
    with caplog.at_level("INFO", logger="mmoe.parallel.strategy"):
        assert s._setup_model(module) == "ddp"
    names = ddp_ignore_names(module)
    logged = [r.getMessage() for r in caplog.records if r.name == "mmoe.parallel.strategy"]
    assert logged == [f"expert parallel: {find_state(module).mesh}; DDP ignores {len(names)} expert params/buffers"]
    assert {n for n in names if n.endswith("load_accum")} and len(names) > 4
    assert wrapped == [(module, None, sorted(names), {"find_unused_parameters": True})]
    assert find_state(module).grad_sync == "strategy"  # the strategy reduces the experts, not DDP or the user

    plain = Holder(Connector())  # no expert parallelism: plain DDPStrategy wrapping
    _strategy(plain)._setup_model(plain)
    assert not hasattr(plain, "_ddp_params_and_buffers_to_ignore") and wrapped[-1][0] is plain


def test_strategy_setup_sets_the_ignore_list_before_ddp_setup_and_routes_clipping(monkeypatch):
    """Outside fit DDPStrategy.setup broadcasts every param from rank 0 without wrapping: the ignore list must be
    in place before it runs; after it, the precision plugin's norm clipping is the EP-aware one."""
    seen = []
    monkeypatch.setattr(DDPStrategy, "setup", lambda self, trainer: seen.append(
        (trainer, list(getattr(self.model, "_ddp_params_and_buffers_to_ignore", [])))))
    module = Holder(ep_ranks(ThreadWorld(2), Connector(), 2)[0])
    plugin = Precision()
    s = _strategy(module, plugin)
    s.setup("trainer")
    assert seen == [("trainer", sorted(ddp_ignore_names(module)))]
    assert plugin._mmoe_ep_clip and plugin.clip_grad_by_norm is not Precision.clip_grad_by_norm

    plain, plain_plugin = Holder(Connector()), Precision()
    _strategy(plain, plain_plugin).setup("trainer")
    assert seen[-1] == ("trainer", []) and not hasattr(plain_plugin, "_mmoe_ep_clip")


# ---------------------------------------------------------------------------------------------- gradients
def _loss_closure(tw: ThreadWorld, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, poison: bool = False):
    """Forward and backward of this rank's loss. Rank graphs share the all-to-all's nodes here (rows are slices of
    the other threads' tensors), hence retain_graph; the barrier stands for the all-to-all backward, which holds
    every rank until its expert gradients have every rank's contribution."""
    def closure():
        loss = (module(x) * gy).sum()
        loss.backward(retain_graph=True)
        tw.barrier()
        if poison:  # an fp16 overflow in this rank's experts only
            expert_parameters(module)[0].grad[0, 0, 0] = float("inf")
        return loss
    return closure


def test_strategy_optimizer_step_reduces_expert_grads_inside_the_closure(monkeypatch):
    """After the closure (forward + backward) and before the step, expert grads are SUM over EDP / W: the
    reference gradient of (1/W) sum_r L_r; the closure's loss comes back; a cached export copy is dropped."""
    world = 2
    tw = ThreadWorld(world).patch(monkeypatch)
    ref, modules = _connector_modules(tw)
    xs = connector_inputs(world)
    gys = [torch.randn(2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9 + r))
           for r in range(world)]
    plugins = [_ClosurePrecision() for _ in range(world)]
    strategies = [_strategy(m, p) for m, p in zip(modules, plugins, strict=True)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in modules]
    tw.run(lambda r: cache_consolidated(modules[r]))
    assert all(find_state(m)._cache is not None for m in modules)

    others = [Holder(Connector()) for _ in range(world)]  # a model given to optimizer_step is passed on
    losses = tw.run(lambda r: strategies[r].optimizer_step(opts[r], _loss_closure(tw, modules[r], xs[r], gys[r]),
                                                           others[r], foo=1))
    sum((ref(x) * gy).sum() for x, gy in zip(xs, gys, strict=True)).backward()
    for q in ref.parameters():
        q.grad /= world
    ddp_average(ref, [m.model for m in modules])  # DDP's part (not running here): replicated grads averaged
    for r, m in enumerate(modules):
        torch.testing.assert_close(losses[r], (ref(xs[r]) * gys[r]).sum(), rtol=0, atol=TOL)
        assert_grads_equal_reference(ref, m.model, r, world, rtol=1e-12)
        assert find_state(m)._cache is None  # weights are about to change: the gathered copy is stale
        (opt, model, _, kwargs), = plugins[r].calls
        assert opt is opts[r] and model is others[r] and kwargs == {"foo": 1}


@pytest.mark.parametrize("scaler", [None, "grad_scaler"])
def test_strategy_an_overflow_on_one_rank_skips_every_ranks_step_only_under_a_scaler(monkeypatch, scaler):
    world = 2
    tw = ThreadWorld(world).patch(monkeypatch)
    _, modules = _connector_modules(tw)
    xs = connector_inputs(world)
    strategies = [_strategy(m, _ClosurePrecision(scaler)) for m in modules]
    tw.run(lambda r: strategies[r].optimizer_step(
        None, _loss_closure(tw, modules[r], xs[r], torch.ones(2, 5, 5, dtype=torch.float64), poison=r == 1)))
    rank0 = expert_parameters(modules[0])
    if scaler is None:  # bf16 / fp32: nothing to skip, rank 0's grads stay as they are
        assert all(bool(torch.isfinite(p.grad).all()) for p in rank0)
    else:
        assert all(bool(torch.isinf(p.grad).all()) for p in rank0)


def test_strategy_without_expert_parallelism_steps_like_ddp():
    module, other = Holder(Connector()), Holder(Connector())
    plugin = _ClosurePrecision(scaler="grad_scaler")

    def closure():
        return "loss"

    s = _strategy(module, plugin)
    assert s.optimizer_step("opt", closure) == "loss"
    assert s.optimizer_step("opt", closure, other, foo=1) == "loss"
    # the closure itself (not a wrapper), the model and step arguments as given
    assert plugin.calls == [("opt", module, closure, {}), ("opt", other, closure, {"foo": 1})]


@pytest.mark.parametrize("norm_type", [None, 1.0])
def test_strategy_clipping_uses_one_global_norm(monkeypatch, norm_type):
    """The patched `clip_grad_by_norm` (Lightning calls it with the optimizer and clip value) clips every rank
    by the norm over all experts and replicated weights: torch's clip on the reference, 2-norm by default."""
    world = 2
    tw = ThreadWorld(world).patch(monkeypatch)
    ref, modules = _connector_modules(tw)
    forward_backward(tw, ref, [m.model for m in modules], connector_inputs(world))
    for q in ref.parameters():
        q.grad /= world
    tw.run(lambda r: strategy_module.finalize_expert_grads(modules[r]))
    ddp_average(ref, [m.model for m in modules])
    plugins = [Precision() for _ in range(world)]
    strategies = [_strategy(m, p) for m, p in zip(modules, plugins, strict=True)]
    for s in strategies:
        s._patch_clipping()
    patched = [p.clip_grad_by_norm for p in plugins]
    for s in strategies:
        s._patch_clipping()  # idempotent: not wrapped twice
    assert [p.clip_grad_by_norm for p in plugins] == patched
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in modules]
    kwargs = {} if norm_type is None else {"norm_type": norm_type}
    total = torch.linalg.vector_norm(torch.cat([q.grad.flatten() for q in ref.parameters()]), norm_type or 2.0)
    tw.run(lambda r: plugins[r].clip_grad_by_norm(opts[r], float(total) / 3, **kwargs))
    torch.nn.utils.clip_grad_norm_(ref.parameters(), float(total) / 3, norm_type or 2.0)
    for r, m in enumerate(modules):
        assert_grads_equal_reference(ref, m.model, r, world, rtol=1e-9)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_strategy_checkpoint_holds_every_expert_and_loads_back_each_ranks_own(monkeypatch):
    world = 2
    tw = ThreadWorld(world).patch(monkeypatch)
    ref, modules = _connector_modules(tw)
    strategies = [_strategy(m) for m in modules]
    want = Holder(ref).state_dict()
    fulls = tw.run(lambda r: strategies[r].lightning_module_state_dict())
    own = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    for r, m in enumerate(modules):
        assert_same_state(fulls[r], want)
        saved = {k: v.clone() for k, v in fulls[r].items()}  # as written to disk (replicated tensors alias the model)
        with torch.no_grad():
            for p in m.parameters():
                p.zero_()
        strategies[r].load_model_state_dict({"state_dict": saved})
        assert_same_state(m.state_dict(), own[r])
    extra = {"state_dict": {**fulls[0], "model.unknown": torch.zeros(1)}}
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "model.unknown"'):
        strategies[0].load_model_state_dict(extra)  # strict by default
    strategies[0].load_model_state_dict(extra, strict=False)
    assert_same_state(modules[0].state_dict(), own[0])


def test_strategy_optimizer_state_holds_every_experts_moments_and_loads_back_each_ranks_own(monkeypatch):
    world = 2
    tw = ThreadWorld(world).patch(monkeypatch)
    ref, modules = _connector_modules(tw)
    forward_backward(tw, ref, [m.model for m in modules], connector_inputs(world))
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1) for m in modules]
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    for o in (*opts, ref_opt):
        o.step()
    strategies = [_strategy(m) for m in modules]
    fulls = tw.run(lambda r: strategies[r].optimizer_state(LightningOptimizer(opts[r])))
    plain_calls = tw.run(lambda r: strategies[r].optimizer_state(opts[r]))  # Lightning's wrapper or not
    want = ref_opt.state_dict()["state"]
    expert = [i for i, (n, _) in enumerate(ref.named_parameters()) if ".experts." in n]
    assert len(expert) == 4
    for r in range(world):
        assert plain_calls[r]["state"].keys() == fulls[r]["state"].keys()
        own = {i: {k: v.clone() for k, v in s.items()} for i, s in opts[r].state_dict()["state"].items()}
        for i in expert:
            torch.testing.assert_close(fulls[r]["state"][i]["exp_avg_sq"], want[i]["exp_avg_sq"], rtol=0, atol=TOL)
        saved = {**fulls[r], "state": {i: {k: v.clone() for k, v in s.items()} for i, s in fulls[r]["state"].items()}}
        for state in opts[r].state.values():
            state["exp_avg"].zero_()
        strategies[r].optimizers = [opts[r]]
        strategies[r].load_optimizer_state_dict({"optimizer_states": [saved]})
        for i, s in opts[r].state_dict()["state"].items():
            torch.testing.assert_close(s["exp_avg"], own[i]["exp_avg"], rtol=0, atol=0)
    plain = Holder(Connector())
    plain_opt = torch.optim.AdamW(plain.parameters())
    assert _strategy(plain).optimizer_state(LightningOptimizer(plain_opt)) == plain_opt.state_dict()


# ---------------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("stage", ["validation", "test", "predict"])
def test_strategy_evaluation_holds_every_expert_locally_and_restores_the_shards(monkeypatch, stage):
    world = 2
    tw = ThreadWorld(world).patch(monkeypatch)
    ref, modules = _connector_modules(tw)
    strategies = [_strategy(m) for m in modules]
    x = torch.randn(2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before = [(m.model.moe.experts.w_in.weight, m.model.moe.dispatcher) for m in modules]
    tw.run(lambda r: getattr(strategies[r], f"on_{stage}_start")())
    gathers = tw.calls["all_gather"]
    tw.run(lambda r: getattr(strategies[r], f"on_{stage}_start")())  # a second start gathers nothing more
    assert tw.calls["all_gather"] == gathers > 0
    for m in modules:
        assert m.model.moe.experts.w_in.num_experts == 4 and type(m.model.moe.dispatcher) is LocalDispatcher
        torch.testing.assert_close(m(x), ref(x), rtol=0, atol=TOL)  # each rank alone: no collective per step
    for r, s in enumerate(strategies):
        getattr(s, f"on_{stage}_end")()
        assert (modules[r].model.moe.experts.w_in.weight, modules[r].model.moe.dispatcher) == before[r]
        assert modules[r].model.moe.experts.w_in.num_experts == 2 and s._eval_restore is None
        getattr(s, f"on_{stage}_end")()  # nothing left to restore

    kept = [_strategy(m, gather_experts_for_eval=False) for m in modules]
    tw.run(lambda r: getattr(kept[r], f"on_{stage}_start")())
    assert tw.calls["all_gather"] == gathers and modules[0].model.moe.experts.w_in.num_experts == 2
    plain = Holder(Connector())
    _strategy(plain).on_validation_start()
    assert plain.model.moe.experts.w_in.num_experts == 4


def test_strategy_gathers_the_export_copy_at_the_end_of_fit(monkeypatch):
    world = 2
    tw = ThreadWorld(world).patch(monkeypatch)
    ref, modules = _connector_modules(tw)
    strategies = [_strategy(m) for m in modules]
    tw.run(lambda r: strategies[r].on_train_end())
    gathers = tw.calls["all_gather"]
    copy = consolidated_model(modules[1])  # rank 1 alone: no collective left to run
    assert tw.calls["all_gather"] == gathers
    assert_same_state(copy.state_dict(), Holder(ref).state_dict())
    _strategy(Holder(Connector())).on_train_end()  # not expert-parallel: nothing to gather


# ---------------------------------------------------------------------------------------------- names
def test_strategy_names_register_popen_and_spawn_once():
    registry = _StrategyRegistry()
    ExpertParallelStrategy.register_strategies(registry)
    ExpertParallelStrategy.register_strategies(registry)  # a second import registers nothing twice
    assert {n: (e["strategy"], e["init_params"]) for n, e in registry.items()} == {
        "ddp_ep": (ExpertParallelStrategy, {"start_method": "popen"}),
        "ddp_ep_spawn": (ExpertParallelStrategy, {"start_method": "spawn"})}
    assert registry["ddp_ep_spawn"]["description"] == ("DDP with expert parallelism (start_method 'spawn'): experts "
                                                       "sharded, excluded from DDP")
    assert {"ddp_ep", "ddp_ep_spawn", "fsdp_ep"} <= set(StrategyRegistry)
    assert ExpertParallelStrategy(parallel_devices=[torch.device("cpu")]).gather_experts_for_eval is True
    positional = ExpertParallelStrategy(None, [torch.device("cpu")] * 2)  # DDPStrategy's (accelerator, devices)
    assert positional.parallel_devices == [torch.device("cpu")] * 2


def test_expert_parallel_needs_one_of_the_two_strategies():
    for ok in (ExpertParallelStrategy(), FSDPExpertParallelStrategy()):
        require_expert_parallel_strategy(types.SimpleNamespace(strategy=ok))
    for trainer, name in ((types.SimpleNamespace(strategy=DDPStrategy()), "DDPStrategy"), (object(), "NoneType")):
        with pytest.raises(ValueError) as err:
            require_expert_parallel_strategy(trainer)
        assert str(err.value) == ("model.parallel.ep_size > 1 needs --trainer.strategy ddp_ep or fsdp_ep "
                                  f"(mmoe.parallel.strategy.ExpertParallelStrategy), got {name}")

"""Lightning integration: `ExpertParallelStrategy`, Lightning's DDPStrategy with the experts excluded.

    python train.py fit --config configs/default.yaml --trainer.devices 2 --trainer.strategy ddp_ep \\
        --model.parallel.ep_size 2

Why DDP with experts excluded, not ModelParallelStrategy + DTensor experts (both were tried):
* DDPStrategy is Lightning's stable, default multi-GPU path: bucketed all-reduce overlapped with backward
  for every replicated weight, NCCL on GPUs and gloo on CPU, torchrun / SLURM / multi-node environments, all
  unchanged. Parameters stay plain tensors, so optimizers, param groups, `p._mmoe_expert` tags, grad hooks,
  safetensors export and the rest of mmoe keep working. ModelParallelStrategy is marked experimental, needs
  FSDP2 (or hand-made replication) for the dense weights, turns params into DTensors (tags and hooks set in
  configure_model were lost by `strategy.setup()` in our probe, expert grads came out 2x) and writes DCP
  directories instead of the one-file checkpoint a one-process run writes.
* The price: DDP's private-but-long-standing `_set_params_and_buffers_to_ignore_for_model` (Tutel and
  Swin-MoE use it) and doing three things DDP would otherwise do wrong, all here:
  1. ignore list (set right before wrapping, i.e. after configure_model sharded the experts): DDP's start-up
     broadcast would overwrite rank>0's expert shards with rank 0's, and its all-reduce would average
     different experts; routers' per-rank `load_accum` buffers are excluded from DDP's buffer broadcast too;
  2. expert gradients: SUM over the expert-data-parallel group, divided by the data-parallel world size W,
     once per optimizer step after the last backward of an accumulation window (closure wrapper);
  3. gradient clipping with one global norm (expert-shard norms all-reduced over the EP group) on every rank,
     through the precision plugin, so `--trainer.gradient_clip_val` keeps replicated weights identical.
* Checkpoints: Lightning writes on rank 0 only, so the model and optimizer state handed to it are the full,
  gathered ones (one file, the layout of a one-process run; resumable with any ep_size) and are sliced back
  to the local experts on load. The full experts are also gathered at the end of fit so the rank-0-only
  export (`module.consolidated_model()`) needs no collective.
Every rank still reads a different batch: Lightning's DistributedSampler spans the whole world, and EP is
carved out of the data-parallel ranks.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch.nn import Module

from .checkpoint import (cache_consolidated, drop_consolidated, full_optimizer_state_dict, full_state_dict,
                         gather_experts_locally, shard_optimizer_state_dict, shard_state_dict)
from .expert_parallel import (clip_grad_norm_, finalize_expert_grads, find_state, set_ddp_ignore,
                              sync_nonfinite_expert_grads)

log = logging.getLogger(__name__)

STRATEGY_NAME = "ddp_ep"


class ExpertParallelStrategy(DDPStrategy):
    """DDPStrategy for models made expert-parallel in `configure_model` (`enable_expert_parallel`).

    Without expert parallelism (ep_size 1, no EP state found) it behaves exactly like DDPStrategy.
    """

    strategy_name = STRATEGY_NAME

    def __init__(self, *args, gather_experts_for_eval: bool = True, **kwargs):
        """
        Args:
            gather_experts_for_eval: during validation / test / predict, hold the full experts on every rank
                and dispatch locally (restored afterwards). Generation stops when *its own* rows are done, so
                ranks run different numbers of decode steps, which would deadlock the all-to-all; local
                experts also make decoding collective-free. Costs the full expert memory during evaluation;
                turn off for models whose experts only fit sharded (then generation must stop in lockstep).
            *args, **kwargs: DDPStrategy's.
        """
        super().__init__(*args, **kwargs)
        self.gather_experts_for_eval = gather_experts_for_eval
        self._eval_restore = None

    # ------------------------------------------------------------------ wrapping
    def _setup_model(self, model: Module):
        st = find_state(model)
        if st is not None:
            names = set_ddp_ignore(model)
            st.grad_sync = "strategy"
            log.info(f"expert parallel: {st.mesh}; DDP ignores {len(names)} expert params/buffers")
        return super()._setup_model(model)

    def setup(self, trainer) -> None:
        if self.model is not None and find_state(self.model) is not None:
            # before super().setup: outside fit, DDPStrategy broadcasts every param from rank 0 instead of
            # wrapping in DDP (`_sync_module_states`), which honours the same ignore list
            set_ddp_ignore(self.model)
        super().setup(trainer)
        if find_state(self.lightning_module) is not None:
            self._patch_clipping()

    def _patch_clipping(self) -> None:
        """Route the precision plugin's norm clipping through the EP-aware global norm (same signature)."""
        plugin = self.precision_plugin
        if getattr(plugin, "_mmoe_ep_clip", False):
            return
        module = self.lightning_module

        def clip_grad_by_norm(optimizer, clip_val, norm_type: float = 2.0):
            params = plugin.main_params(optimizer)
            clip_grad_norm_(params, clip_val, norm_type=norm_type, module=module)

        plugin.clip_grad_by_norm = clip_grad_by_norm
        plugin._mmoe_ep_clip = True

    # ------------------------------------------------------------------ gradients
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        module = self.lightning_module
        if module is None or find_state(module) is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        drop_consolidated(module)  # weights change: a gathered export copy would be stale

        scaler = getattr(self.precision_plugin, "scaler", None)  # fp16 GradScaler (16-mixed)

        def closure_then_reduce_experts():
            out = closure()  # forward + backward (DDP all-reduces the replicated grads inside)
            finalize_expert_grads(module)  # then, before clipping and the step: experts SUM(EDP) / W
            if scaler is not None:  # an overflow in one rank's experts must make every rank skip the step
                sync_nonfinite_expert_grads(module)
            return out

        return super().optimizer_step(optimizer, closure_then_reduce_experts, model, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # called on every rank while the checkpoint dict is built; rank 0 writes it
        return full_state_dict(self.lightning_module)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        module.load_state_dict(shard_state_dict(module, checkpoint["state_dict"]), strict=strict)

    def optimizer_state(self, optimizer) -> dict:
        from lightning.pytorch.core.optimizer import LightningOptimizer
        opt = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        if find_state(self.lightning_module) is None:
            return super().optimizer_state(optimizer)
        return full_optimizer_state_dict(opt, self.lightning_module)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        module = self.lightning_module
        if find_state(module) is not None:
            checkpoint = dict(checkpoint)
            checkpoint["optimizer_states"] = [
                shard_optimizer_state_dict(getattr(opt, "_optimizer", opt), module, s)
                for opt, s in zip(self.optimizers, checkpoint["optimizer_states"])]
        super().load_optimizer_state_dict(checkpoint)

    # ------------------------------------------------------------------ evaluation
    def _eval_start(self) -> None:
        module = self.lightning_module
        if self.gather_experts_for_eval and self._eval_restore is None and module is not None \
                and find_state(module) is not None:
            self._eval_restore = gather_experts_locally(module)

    def _eval_end(self) -> None:
        if self._eval_restore is not None:
            self._eval_restore()
            self._eval_restore = None

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._eval_start()

    def on_validation_end(self) -> None:
        self._eval_end()
        super().on_validation_end()

    def on_test_start(self) -> None:
        super().on_test_start()
        self._eval_start()

    def on_test_end(self) -> None:
        self._eval_end()
        super().on_test_end()

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._eval_start()

    def on_predict_end(self) -> None:
        self._eval_end()
        super().on_predict_end()

    # ------------------------------------------------------------------ export
    def on_train_end(self) -> None:
        super().on_train_end()
        module = self.lightning_module
        if module is not None and find_state(module) is not None:
            cache_consolidated(module)  # collective now, so rank 0 alone can export after fit

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        for name, start in ((STRATEGY_NAME, "popen"), (f"{STRATEGY_NAME}_spawn", "spawn")):
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=f"DDP with expert parallelism (start_method "
                                           f"'{start}'): experts sharded, excluded from DDP", start_method=start)


def require_expert_parallel_strategy(trainer) -> None:
    """Raise unless `trainer` runs ExpertParallelStrategy (call from configure_model when ep_size > 1)."""
    from .fsdp_strategy import FSDPExpertParallelStrategy
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, (ExpertParallelStrategy, FSDPExpertParallelStrategy)):
        raise ValueError(f"model.parallel.ep_size > 1 needs --trainer.strategy {STRATEGY_NAME} or fsdp_ep "
                         f"(mmoe.parallel.strategy.ExpertParallelStrategy), got {type(strategy).__name__}")


ExpertParallelStrategy.register_strategies(StrategyRegistry)
from . import fsdp_strategy  # noqa: E402,F401  registers "fsdp_ep" too (the CLI imports this module)

__all__ = ["ExpertParallelStrategy", "require_expert_parallel_strategy", "STRATEGY_NAME"]

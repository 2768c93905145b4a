"""Lightning integration of FSDP2 + expert parallelism: `--trainer.strategy fsdp_ep`.

    python train.py fit --config configs/cumo_large.yaml                 # strategy fsdp_ep, ep_size from the config
    python train.py fit ... --trainer.strategy fsdp_ep --trainer.devices 2 --model.parallel.ep_size 2

A ModelParallelStrategy (Lightning's FSDP2 / DeviceMesh / DCP strategy) whose mesh is data-parallel over all
ranks; after the module's `configure_model` (which makes the model expert-parallel when
`model.parallel.ep_size > 1`), `setup` applies `mmoe.parallel.fsdp.apply_fsdp_ep` to the module's `model`:
per-block FSDP units over the world, expert banks over their EDP group, activation checkpointing per block
(ViT included) when `model.activation_checkpointing`, and a bf16/fp32-reduce mixed-precision policy on GPUs.
Gradient clipping uses one global norm over every FSDP and EP shard. Checkpoints are DCP directories that
resume at another world size or EP size (`mmoe.parallel.fsdp_checkpoint`); the export after fit is the
ordinary one-process format (the full weights are gathered tensor by tensor at the end of fit).

With `model.parallel.sharded_init` the module's model is built on the meta device and filled shard by shard
after sharding (`mmoe.parallel.sharded_init`), then the vision checkpoint and HF decoder the config names are
streamed into the shards (`mmoe.parallel.sharded_load`): no rank ever holds the whole model.

Validation by generation is refused: ranks stop decoding at different steps, and every FSDP unit needs all
ranks in its all-gather (set `--trainer.limit_val_batches 0`; evaluate the export instead).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

log = logging.getLogger(__name__)

STRATEGY_NAME = "fsdp_ep"
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "float32": torch.float32, "float64": torch.float64}


def _dtype(name: str | None, field: str) -> torch.dtype | None:
    if name in (None, "none", "None"):
        return None
    if name not in _DTYPES:
        raise ValueError(f"{field}={name!r}: expected one of {sorted(_DTYPES)}, 'auto' or None")
    return _DTYPES[name]


class FSDPExpertParallelStrategy(ModelParallelStrategy):
    """FSDP2 over all ranks + expert parallelism (EP from `model.parallel.ep_size`)."""

    strategy_name = STRATEGY_NAME

    def __init__(self, param_dtype: str | None = "auto", reduce_dtype: str | None = "float32",
                 reshard_after_forward: bool = True, **kwargs: Any):
        """
        Args:
            param_dtype: compute dtype of the all-gathered weights: 'auto' = bfloat16 on CUDA, the parameters'
                own dtype elsewhere (CPU tests); 'bfloat16', 'float32', ... or None (= own dtype).
            reduce_dtype: gradient reduce-scatter dtype (fp32 by default: bf16 compute, fp32 reductions).
            reshard_after_forward: free all-gathered weights after each block unit's forward (ZeRO-3); False
                keeps them until backward (ZeRO-2-like: more memory, fewer all-gathers). The root unit
                (embeddings, head, norms) never reshards after forward (`apply_fsdp_ep`).
            **kwargs: ModelParallelStrategy's (process_group_backend, timeout).
        """
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)
        self._param_dtype = param_dtype
        self._reduce_dtype = _dtype(reduce_dtype, "strategy.reduce_dtype")
        if param_dtype != "auto":
            _dtype(param_dtype, "strategy.param_dtype")
        self._reshard_after_forward = reshard_after_forward

    @property
    def param_dtype(self) -> torch.dtype | None:
        if self._param_dtype == "auto":
            return torch.bfloat16 if self.root_device.type == "cuda" else None
        return _dtype(self._param_dtype, "strategy.param_dtype")

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()

    # ------------------------------------------------------------------ sharding
    def setup(self, trainer) -> None:
        from .fsdp import apply_fsdp_ep, find_fsdp, mixed_precision

        module = self.lightning_module
        inner = getattr(module, "model", None)
        if inner is None:
            raise TypeError(f"{STRATEGY_NAME} shards the LightningModule's `model` attribute; "
                            f"{type(module).__name__} has none")
        if find_fsdp(inner) is None:
            info = apply_fsdp_ep(inner, self.device_mesh["data_parallel"],
                                 mixed_precision(self.param_dtype, self._reduce_dtype),
                                 reshard_after_forward=self._reshard_after_forward,
                                 activation_checkpointing=bool(getattr(module, "activation_checkpointing", False)))
            log.info(f"{STRATEGY_NAME}: {info.units} FSDP units ({info.expert_units} expert banks), "
                     f"EP {info.ep.mesh if info.ep else 'off'}")
        from .sharded_load import fill_sharded_module
        stats = fill_sharded_module(module, self.root_device)  # model.parallel.sharded_init: still on meta
        if stats is not None:
            log.info(f"{STRATEGY_NAME}: sharded init filled {stats['filled']} tensors (replay peak "
                     f"{stats['peak_bytes'] / 2**20:.1f} MiB), streamed {stats['loaded'] or 'no checkpoints'}")
        super().setup(trainer)
        self._patch_clipping()

    def _patch_clipping(self) -> None:
        """Norm clipping with one global norm over every shard (same coefficient on every rank)."""
        plugin = self.precision_plugin
        if getattr(plugin, "_mmoe_fsdp_clip", False):
            return
        from .fsdp import clip_grad_norm_fsdp_

        def clip_grad_by_norm(optimizer, clip_val, norm_type: float = 2.0):
            clip_grad_norm_fsdp_(plugin.main_params(optimizer), clip_val, norm_type=norm_type)

        plugin.clip_grad_by_norm = clip_grad_by_norm
        plugin._mmoe_fsdp_clip = True

    # ------------------------------------------------------------------ checkpoints (DCP)
    def lightning_module_state_dict(self) -> dict[str, Any]:
        from .fsdp_checkpoint import sharded_state_dict
        return sharded_state_dict(self.lightning_module)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        from .fsdp_checkpoint import sharded_optimizer_state
        opt = getattr(optimizer, "_optimizer", optimizer)
        return {"state": sharded_optimizer_state(self.lightning_module, opt)}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            raise ValueError(f"{STRATEGY_NAME} writes sharded (DCP) checkpoints only; the one-process export "
                             "comes from --export_dir after fit")
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        from .fsdp_checkpoint import load_into
        path = Path(self.broadcast(checkpoint_path))
        if not (path.is_dir() and (path / _METADATA_FILENAME).is_file()):
            raise ValueError(f"{path} is not a {STRATEGY_NAME} (sharded DCP) checkpoint directory")
        load_into(self.lightning_module, [getattr(o, "_optimizer", o) for o in self.optimizers], path)
        return torch.load(path / _METADATA_FILENAME, weights_only=False)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # load_checkpoint already restored the shards

    # ------------------------------------------------------------------ evaluation / export
    def _refuse_generation(self, what: str) -> None:
        raise RuntimeError(f"{STRATEGY_NAME} does not run {what}: generation stops at different steps on "
                           "different ranks while every FSDP unit all-gathers on all of them; set "
                           "--trainer.limit_val_batches 0 and evaluate the exported model")

    def on_validation_start(self) -> None:
        self._refuse_generation("validation")

    def on_test_start(self) -> None:
        self._refuse_generation("test")

    def on_predict_start(self) -> None:
        self._refuse_generation("predict")

    def on_train_end(self) -> None:
        super().on_train_end()
        cache_consolidated_fsdp(self.lightning_module)

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        if STRATEGY_NAME not in strategy_registry:
            strategy_registry.register(STRATEGY_NAME, cls, description="FSDP2 over all ranks + expert parallelism")


def cache_consolidated_fsdp(module) -> None:
    """Gather the one-process model now (collective) so rank 0 alone exports after fit: a fresh MMoEVLM
    built on the meta device and filled with the full tensors (kept on rank 0 only)."""
    from torch.distributed.fsdp import FSDPModule

    from .fsdp import find_fsdp
    from .fsdp_checkpoint import full_state_dict
    inner = getattr(module, "model", None)
    info = find_fsdp(inner) if inner is not None else None
    if info is None:
        return
    if not hasattr(inner, "cfg"):  # on every rank, before the collective
        own_class = next(c for c in type(inner).__mro__ if not issubclass(c, FSDPModule))  # not FSDP's subclass
        raise TypeError(f"cannot rebuild {own_class.__name__} for export (no .cfg)")
    full = full_state_dict(inner, rank0_only=True)
    info.consolidated_elsewhere = not full
    if full:
        with torch.device("meta"):
            copy = type(inner)(inner.cfg)  # FSDPModule.__new__ builds the module's own class
        copy.load_state_dict(full, assign=True, strict=True)
        for m in copy.modules():  # non-persistent buffers (router load counters) are not in the state dict
            for name, b in m._buffers.items():
                if b is not None and b.is_meta:
                    m._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
        info.consolidated = copy.eval()


FSDPExpertParallelStrategy.register_strategies(StrategyRegistry)

__all__ = ["STRATEGY_NAME", "FSDPExpertParallelStrategy", "cache_consolidated_fsdp"]

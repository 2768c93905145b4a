"""Faults users hit in long runs: non-finite values (named by the layer that made them), checkpoint
files half-written by a kill, and a scheduler's SIGTERM (a resumable checkpoint is saved first)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn


class NonFiniteError(FloatingPointError):
    """A NaN or Inf appeared; the message names the first module whose output held it."""


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))


def locate_nonfinite(model: nn.Module, run: Callable[[], Any]) -> str | None:
    """Re-run `run` with forward hooks; return the name of the first module (in execution order) whose
    floating-point output is not finite, or None."""
    first: list[str] = []
    handles = []

    def hook(name):
        def fn(_mod, _inp, out):
            if not first and any(t.is_floating_point() and not bool(torch.isfinite(t).all())
                                 for t in _tensors(out)):
                first.append(name)
        return fn

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return first[0] if first else None


class NonFiniteGuard(Callback):
    """Stops training at the first non-finite loss, before backward touches the weights, and names the
    layer: the batch is replayed with hooks to find the first module whose output went non-finite."""

    def __init__(self):
        self._batch: tuple[Any, int] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = (batch, batch_idx)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        where = None
        if self._batch is not None:
            batch, idx = self._batch
            where = locate_nonfinite(pl_module, lambda: pl_module.training_step(batch, idx))
        raise NonFiniteError(f"non-finite loss ({loss.item()}) at global step {trainer.global_step}; "
                             + (f"first non-finite output in module '{where}'" if where else
                                "no module output was non-finite on replay (check the data / loss)"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same directory, fsyncs, then renames it over
    the target: a kill mid-write leaves the previous checkpoint intact and never a truncated one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended


def checkpoint_dir(trainer) -> Path:
    """Where ModelCheckpoint writes (its dirpath), else <default_root_dir>/checkpoints."""
    cb = getattr(trainer, "checkpoint_callback", None)
    if cb is not None and getattr(cb, "dirpath", None):
        return Path(cb.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


class CheckpointOnSigterm(Callback):
    """On SIGTERM (Lightning stops after the current batch and raises SIGTERMException), save a resumable
    checkpoint (`last.ckpt` in the checkpoint directory, the one `--ckpt_path` resumes from) before the
    process exits; `mmoe.training.cli.cli_main` then exits with code 143 instead of Lightning's 0."""

    def __init__(self, filename: str = "last.ckpt"):
        self.filename = filename
        self.saved: Path | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = checkpoint_dir(trainer) / self.filename
        trainer.save_checkpoint(str(path))
        self.saved = path
        if trainer.is_global_zero:
            print(f"[mmoe] SIGTERM at step {trainer.global_step}: saved {path}; resume with the same command plus "
                  f"--ckpt_path {path}", flush=True)

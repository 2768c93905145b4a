"""Progress for every kind of output: a bar on a terminal, plain lines in a log.

Lightning's default bar (Rich when installed) writes carriage-return updates that a redirected stdout never
shows as lines, and titles step-based runs "Epoch 2/-2" (max_epochs is -1 when max_steps sets the length).
`choose_progress_bar` gives a TQDM bar on a terminal and `LineProgressBar` otherwise.
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def total_steps(trainer) -> int | None:
    """Optimizer steps the fit will take: max_steps, else Lightning's estimate (None if unbounded)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        est = trainer.estimated_stepping_batches
    except Exception:  # no dataloader length (iterable dataset)
        return None
    return int(est) if est != float("inf") else None


class LineProgressBar(ProgressBar):
    """One line every `every` optimizer steps (default: trainer.log_every_n_steps) with the step, the
    progress-bar metrics, seconds per step and the ETA; one line per validation run; flushed at once."""

    def __init__(self, every: int | None = None, stream=None):
        super().__init__()
        self.every, self.stream = every, stream
        self._enabled = True
        self._t0: float | None = None
        self._step0 = 0
        self._last_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(text, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._step0 = time.time(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        every = self.every or max(1, trainer.log_every_n_steps)
        if step == self._last_step or step % every:
            return
        self._last_step = step
        total = total_steps(trainer)
        done = step - self._step0
        per_step = (time.time() - (self._t0 or time.time())) / max(1, done)
        parts = [f"[mmoe] step {step}" + (f"/{total} ({100 * step / total:.1f} %)" if total else "")]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                  for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"]
        parts.append(f"{per_step:.2f} s/step")
        if total:
            parts.append(f"eta {_fmt_duration(per_step * (total - step))}")
        self._print(trainer, " | ".join(parts))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        vals = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        if vals:
            text = " | ".join(f"{k} {float(v):.4g}" for k, v in vals.items())
            self._print(trainer, f"[mmoe] validation at step {trainer.global_step}: {text}")

    def on_train_end(self, trainer, pl_module) -> None:
        elapsed = time.time() - (self._t0 or time.time())
        self._print(trainer, f"[mmoe] training done at step {trainer.global_step} in {_fmt_duration(elapsed)}")


def choose_progress_bar(stream=None) -> ProgressBar:
    """A TQDM bar when stdout is a terminal (titled "Epoch N", never Rich's "Epoch 2/-2" for a step-based
    run), else `LineProgressBar` (lines that land in a log file)."""
    out = stream or sys.stdout
    return TQDMProgressBar() if getattr(out, "isatty", lambda: False)() else LineProgressBar()

"""Export at the end of fit, and PNG plots of the training curves and expert load per layer."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import lightning as L


def run_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir)


def export_after_fit(trainer: L.Trainer, module, datamodule, export_dir: str | None) -> Path | None:
    """Export (rank 0) and write plots beside the run; returns the export directory."""
    from mmoe.interop.export import export_model
    run = run_dir(trainer)  # Trainer.log_dir broadcasts: every rank must call it
    model = module.consolidated_model() if hasattr(module, "consolidated_model") else module.model
    if not trainer.is_global_zero:
        return None
    from .lora import has_lora, merge_lora
    if has_lora(model):  # LoRA: fold the adapters into a copy, so the export is the plain format
        model = merge_lora(model)
    out = Path(export_dir) if export_dir else run / "export"
    tok = getattr(datamodule, "tokenizer", None)
    export_model(model, out, tokenizer=tok, extra={"global_step": int(trainer.global_step)})
    history = getattr(module, "expert_load_history", [])
    if history:
        (run / "expert_load.json").write_text(json.dumps(history))
    try:
        write_plots(run, history)
    except Exception as e:  # plotting must never lose a trained model
        print(f"[mmoe] plots skipped: {e}")
    print(f"[mmoe] exported model to {out}")
    return out


def _read_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    path = run / "metrics.csv"
    if not path.exists():
        return series
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for k, v in row.items():
                if k in ("step", "epoch") or v in (None, ""):
                    continue
                series[k].append((step, float(v)))
    return series


def write_plots(run: Path, history: list[dict]) -> list[Path]:
    """training_curves.png (losses, val accuracy) and expert_load.png (load share per expert over time,
    one panel per MoE layer)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    series = _read_metrics(run)
    keys = [k for k in ("train/lm_loss", "train/aux_loss", "val/vqa_acc") if k in series]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
        for ax, k in zip(axes[0], keys):
            xs, ys = zip(*series[k])
            ax.plot(xs, ys)
            ax.set_title(k)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(run / "training_curves.png", dpi=90)
        plt.close(fig)
        written.append(run / "training_curves.png")
    if history:
        layers = sorted({h["layer"] for h in history}, key=lambda s: (s.split(".")[0], int(s.split(".")[1])))
        cols = 4
        rows = (len(layers) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
        for ax, name in zip(axes.flat, layers):
            hs = [h for h in history if h["layer"] == name]
            steps = [h["step"] for h in hs]
            loads = list(zip(*[h["load"] for h in hs]))
            ax.stackplot(steps, *loads)
            ax.set_ylim(0, 1)
            ax.set_title(name, fontsize=9)
        for ax in list(axes.flat)[len(layers):]:
            ax.axis("off")
        fig.suptitle("expert load share per MoE layer over training steps")
        fig.tight_layout()
        fig.savefig(run / "expert_load.png", dpi=80)
        plt.close(fig)
        written.append(run / "expert_load.png")
    return written

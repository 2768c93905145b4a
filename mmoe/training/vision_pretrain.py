"""Stage 0: pretrain a dense ViT on object labels, then upcycle it into the VLM's MoE tower (CuMo-style).

    python -m mmoe.training.vision_pretrain fit --config configs/stages/stage0_vision.yaml

Why: CuMo and MoE-LLaVA start from a pretrained CLIP tower and upcycle its MLPs into experts. With no tower to
download (offline, or the synthetic world) a from-scratch tower learns to see far more slowly through the
LLM's answer loss than from direct labels, so this stage trains it on multi-label classification of the
objects in each image (COCO instances, `mmoe.data.instances`) for a few minutes. When fit ends it writes
``<export_dir>/vision.safetensors`` (timm ViT layout) and ``vision_config.json``; a VLM config loads it with
``model.arch.vision.checkpoint`` (MoE layers upcycled: every expert a copy of the dense MLP).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse import set_parsing_settings
from torch import Tensor, nn

from mmoe.data.instances import ImageLabelsDataModule
from mmoe.interop.factory import build_vision_encoder
from mmoe.model.vision import VisionConfig

from .cli import MMoECLI
from .config import OptimConfig
from .module import lr_multiplier, skips_weight_decay

set_parsing_settings(docstring_parse_attribute_docstrings=True)
VISION_FILE = "vision.safetensors"
VISION_CONFIG_FILE = "vision_config.json"


class LabelHead(nn.Module):
    """Mean- and max-pooled patch features -> MLP -> one logit per class (max pooling lets a class that fills
    a few patches still fire)."""

    def __init__(self, dim: int, num_classes: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.fc1, self.fc2 = nn.Linear(2 * dim, hidden), nn.Linear(hidden, num_classes)

    def forward(self, feats: Tensor) -> Tensor:
        pooled = torch.cat([feats.mean(1), feats.amax(1)], dim=-1)
        return self.fc2(F.gelu(self.fc1(self.norm(pooled))))


def shared_name_words(class_names: list[str]) -> list[str]:
    """Words (lowercased, whitespace-split) that occur in at least two class names, sorted: "red circle" and
    "red square" share "red". A word owned by one class only repeats that class's own label, so it is left out."""
    counts: dict[str, int] = {}
    for name in class_names:
        for word in set(name.lower().split()):
            counts[word] = counts.get(word, 0) + 1
    return sorted(w for w, n in counts.items() if n >= 2)


def class_word_matrix(class_names: list[str], words: list[str]) -> Tensor:
    """(num_classes, num_words) 0/1: which of `words` occur in each class name."""
    index = {w: i for i, w in enumerate(words)}
    out = torch.zeros(len(class_names), len(words))
    for c, name in enumerate(class_names):
        for word in name.lower().split():
            if word in index:
                out[c, index[word]] = 1.0
    return out


def token_probe(dim: int, out: int) -> nn.Module:
    """A linear read-out of every token (kept linear so what it finds must be in the tokens themselves)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, out))


class VisionPretrainModule(L.LightningModule):
    """Dense ViT + label head trained with binary cross-entropy; logs label-set accuracy and micro F1 (over
    classes, or over shared words with `labels="words"`)."""

    def __init__(self, vision: VisionConfig = VisionConfig(), num_classes: int = 0, *,
                 optim: OptimConfig = OptimConfig(), head_hidden: int = 256, patch_loss: float = 0.0,
                 box_loss: float = 0.0, word_loss: float = 0.0, class_names: list[str] | None = None,
                 labels: str = "classes"):
        """
        Args:
            vision: the tower to pretrain (dense: `moe` is ignored; the VLM upcycles it). Use the VLM's values.
            num_classes: number of object classes (linked from the data's categories by the CLI).
            optim: optimiser and LR schedule.
            head_hidden: hidden width of the label head (dropped after pretraining).
            patch_loss: weight of a per-token loss: a linear probe on every patch token must name the objects whose
                boxes cover that patch, so each token states which object it shows (what the LLM reads); needs
                boxes and `data.patch_grid` (linked by the CLI). 0 = image-level labels only.
            box_loss: weight of a per-token box regression (smooth L1 on centre and size, in image fractions, on the
                patches an object covers): tokens then also state where their object is and how big (the LLM
                compares positions and sizes from them). Needs boxes and `data.patch_grid`, like `patch_loss`.
            word_loss: weight of a per-token loss on the words that class names share ("red", "circle" from
                "red circle", "red square", "blue circle"...): a linear probe on every patch token must name the
                shared words of the objects covering it. Class labels alone let a token encode "red circle" as one
                of 30 unrelated classes; this gives every shared attribute one direction across classes, so a
                question that names one attribute ("the circle") could find it with one attention key. Needs
                `class_names` (linked from the data by the CLI) with at least one shared word.
            class_names: category names in the data's order (linked from the data by the CLI).
            labels: what the image-level head predicts. "classes": which categories are in the image (one logit
                per class name, "red circle"). "words": which shared words of the class names are ("red",
                "circle"), so no loss names a colour-shape pair as one class and a pair missing from training is
                not taught as "never present"; set `patch_loss` 0 too for a tower with no pair identity at all
                (`word_loss` keeps colour and shape bound by location). Needs `class_names`, like `word_loss`.
        """
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1, got {num_classes}")
        neutral_scales = {"vision_lr_scale": 1.0, "router_lr_scale": 1.0, "vision_router_lr_scale": None}
        for field, neutral in neutral_scales.items():  # one dense tower: no tower/rest or router split
            if getattr(optim, field) != neutral:
                raise ValueError(f"model.optim.{field} has no effect in stage 0 (a dense tower only); leave it {neutral}")
        vision = replace(vision, moe=None)  # a new config: the caller's is not touched
        self.save_hyperparameters()
        self.vision_cfg, self.optim_cfg = vision, optim
        optim.validate()  # a bad schedule fails here, naming the field
        self.encoder = build_vision_encoder(vision)
        if labels not in ("classes", "words"):
            raise ValueError(f"model.labels must be 'classes' or 'words', got {labels!r}")
        self.labels = labels
        if word_loss > 0 or labels == "words":
            field = "model.word_loss > 0" if word_loss > 0 else "model.labels='words'"
            if not class_names or len(class_names) != num_classes:
                raise ValueError(f"{field} needs model.class_names with num_classes={num_classes} "
                                 f"names (the CLI links them from the data), got {class_names!r}")
            self.words = shared_name_words(class_names)
            if not self.words:
                raise ValueError(f"{field} but no word occurs in two class names (model.class_names): "
                                 "there is no shared attribute to learn")
            self.register_buffer("class_words", class_word_matrix(class_names, self.words), persistent=False)
        self.head = LabelHead(self.encoder.out_dim, len(self.words) if labels == "words" else num_classes,
                              head_hidden)
        self.patch_loss = float(patch_loss)
        self.patch_head = token_probe(self.encoder.out_dim, num_classes) if patch_loss > 0 else None
        self.box_loss = float(box_loss)
        self.box_head = token_probe(self.encoder.out_dim, 4) if box_loss > 0 else None
        self.word_loss = float(word_loss)
        self.word_head = token_probe(self.encoder.out_dim, len(self.words)) if word_loss > 0 else None
        self._val: list[Tensor] = []

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(image logits (B, C), per-token outputs of the switched-on probes by name: "patch" (B, P, C),
        "boxes" (B, P, 4), "words" (B, P, W))."""
        feats, _ = self.encoder(pixel_values)
        heads = {"patch": self.patch_head, "boxes": self.box_head, "words": self.word_head}
        return self.head(feats), {k: h(feats) for k, h in heads.items() if h is not None}

    @staticmethod
    def _dense_targets(batch: dict, key: str, field: str, shape: tuple[int, ...]) -> Tensor:
        targets = batch.get(key)
        if targets is None:
            raise ValueError(f"{field} > 0 needs per-patch targets: set data.patch_grid (the CLI links it from "
                             "model.vision) and boxes in the instances file")
        if tuple(targets.shape) != shape:
            raise ValueError(f"{key} {tuple(targets.shape)} do not match the tower's tokens {shape}: "
                             "data.patch_grid must be image_size // patch_size")
        return targets

    def _label_targets(self, batch: dict) -> Tensor:
        """(B, C) class labels, or (B, W) shared words of the classes present when `labels` is "words"."""
        targets = batch["targets"].float()
        if self.labels == "words":
            targets = (targets @ self.class_words).clamp(max=1.0)
        return targets

    def _dense_terms(self, tokens: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """The per-token losses that are switched on, by name."""
        terms = {}
        if "patch" in tokens:
            patch_logits = tokens["patch"]
            targets = self._dense_targets(batch, "patch_targets", "model.patch_loss", tuple(patch_logits.shape))
            terms["patch_loss"] = F.binary_cross_entropy_with_logits(patch_logits.float(), targets.float())
        if "words" in tokens:
            words = tokens["words"]
            b, p, _ = words.shape
            classes = self._dense_targets(batch, "patch_targets", "model.word_loss", (b, p, self.class_words.shape[0]))
            targets = (classes.float() @ self.class_words).clamp(max=1.0)  # a patch shows the words of its objects
            terms["word_loss"] = F.binary_cross_entropy_with_logits(words.float(), targets)
        if "boxes" in tokens:
            boxes = tokens["boxes"]
            b, p, _ = boxes.shape
            targets = self._dense_targets(batch, "patch_boxes", "model.box_loss", (b, p, 5)).float()
            mask = targets[..., 4]
            per_patch = F.smooth_l1_loss(boxes.float(), targets[..., :4], beta=0.05, reduction="none").sum(-1)
            terms["box_loss"] = (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits, tokens = self(batch["pixel_values"])
        loss = F.binary_cross_entropy_with_logits(logits.float(), self._label_targets(batch))
        for name, term in self._dense_terms(tokens, batch).items():
            self.log(f"train/{name}", term, batch_size=logits.shape[0])
            loss = loss + getattr(self, name) * term
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits, tokens = self(batch["pixel_values"])
        for name, term in self._dense_terms(tokens, batch).items():
            self.log(f"val/{name}", term, batch_size=logits.shape[0])
        targets = self._label_targets(batch)
        self.log("val/loss", F.binary_cross_entropy_with_logits(logits.float(), targets), batch_size=logits.shape[0])
        self._val.append(torch.stack([logits.detach().float() > 0, targets > 0.5]).cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        pred, true = torch.cat(self._val, dim=1)
        self._val.clear()
        tp = (pred & true).sum().item()
        f1 = 2 * tp / max(1, pred.sum().item() + true.sum().item())
        self.log("val/label_set_acc", 100.0 * (pred == true).all(1).float().mean().item(), prog_bar=True)
        self.log("val/micro_f1", 100.0 * f1, prog_bar=True)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (no_decay if skips_weight_decay(name, p) else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, out_dir: str | Path) -> Path:
        """Write the tower as a timm-layout checkpoint the VLM's `vision.checkpoint` loads; returns its path."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.encoder.vit.state_dict().items()}
        tmp = out / f".{VISION_FILE}.tmp"
        save_file(sd, str(tmp))
        os.replace(tmp, out / VISION_FILE)
        (out / VISION_CONFIG_FILE).write_text(json.dumps(asdict(self.vision_cfg), indent=2, sort_keys=True))
        return out / VISION_FILE


class VisionPretrainCLI(MMoECLI):
    """train.py's CLI (same loggers, atomic checkpoints, no abbreviations) for the stage-0 module."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="Write vision.safetensors + vision_config.json here when fit ends; default: "
                                 "<default_root_dir>/export")
        parser.link_arguments("data", "model.num_classes", compute_fn=lambda dm: dm.num_classes,
                              apply_on="instantiate")
        parser.link_arguments("data", "model.class_names", compute_fn=lambda dm: dm.class_names,
                              apply_on="instantiate")
        parser.link_arguments(("model.vision.image_size", "model.vision.patch_size"), "data.patch_grid",
                              compute_fn=lambda size, patch: size // patch)
        for f in ("image_size", "image_mean", "image_std"):
            parser.link_arguments(f"model.vision.{f}", f"data.{f}")

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            cfg = self.config.get(self.subcommand, {})
            out = cfg.get("export_dir") or str(Path(self.trainer.default_root_dir) / "export")
            path = self.model.export(out)
            print(f"[mmoe] vision tower exported to {path}", flush=True)


def cli_main(args: list[str] | None = None, run: bool = True) -> VisionPretrainCLI:
    """Like train.py's: a SIGTERM during fit saves last.ckpt (CheckpointOnSigterm) and exits with 143."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from .reliability import SIGTERM_EXIT_CODE

    try:
        return VisionPretrainCLI(VisionPretrainModule, ImageLabelsDataModule, args=args, run=run,
                                 seed_everything_default=0, save_config_kwargs={"overwrite": True},
                                 parser_kwargs={"allow_abbrev": False})
    except SIGTERMException as e:
        raise SystemExit(SIGTERM_EXIT_CODE) from e


if __name__ == "__main__":
    cli_main()

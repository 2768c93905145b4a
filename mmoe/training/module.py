"""LightningModule: LM loss on answer tokens + per-layer, per-site balancing losses.

Model code stays in mmoe.model; this file owns the objective, optimisation, the aux-loss-free bias
step after each optimizer step, routing-health logging and generation-based validation (VQA accuracy).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from mmoe.constants import IGNORE_INDEX
from mmoe.model.moe import Router, RoutingResult, balancing_loss, expert_load, routing_metrics
from mmoe.interop.factory import build_model
from mmoe.model.vlm import MMoEVLM, VLMConfig

from .config import BalanceConfig, OptimConfig, ParallelConfig, StageConfig
from .stage_init import apply_freeze, load_hf_decoder, load_stage_weights
from .lora import PACKED_TARGETS, LoraSettings, apply_lora

LOSS_REDUCTIONS = {"token": 0.0, "sqrt": 0.5, "turn": 1.0}  # exponent p of the per-token weight len(turn)^-p


def answer_spans(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(span id, span length) per position of the shifted labels: a span is one supervised answer turn.

    Answers are maximal runs of non-ignored labels, so turns are found from the labels alone; -1 marks
    ignored positions."""
    mask = labels != IGNORE_INDEX
    prev = torch.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    starts = (mask & ~prev).flatten()
    ids = torch.cumsum(starts.long(), 0) - 1
    ids = torch.where(mask.flatten(), ids, torch.full_like(ids, -1))
    n_spans = int(starts.sum())
    lengths = torch.zeros(n_spans, dtype=torch.long, device=labels.device)
    valid = ids >= 0
    lengths.index_add_(0, ids[valid], torch.ones_like(ids[valid]))
    return ids.view_as(labels), lengths


def lm_loss(logits: Tensor, labels: Tensor, reduction: str = "token") -> Tensor:
    """Next-token cross-entropy on positions whose label is not IGNORE_INDEX (answers only).

    `logits` is (B, T, V), or (N, V) holding only the N positions that predict a supervised label, in row-major
    order (``MMoEVLM(..., logits_at_labels=True)``: the LM head and softmax skip every other position).
    `reduction` weights every token by len(its answer turn)^-p and normalises by the weights: 'token'
    (p=0, the plain mean: long answers such as captions dominate), 'turn' (p=1, every answer turn counts
    the same, so one-word VQA answers are not drowned by captions) or 'sqrt' (p=1/2, InternVL 2.5's
    square averaging, in between)."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {sorted(LOSS_REDUCTIONS)}, got {reduction!r}")
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    if logits.dim() == 3:
        logits = logits[:, :-1][supervised]
    elif logits.shape[0] != int(supervised.sum()):
        raise ValueError(f"logits for {logits.shape[0]} positions, but the labels supervise "
                         f"{int(supervised.sum())}")
    # at least float32 (bf16 logits), but float64 stays float64: a float64 run's loss is not rounded to float32
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets[supervised],
                         reduction="none")
    if reduction == "token" or ce.numel() == 0:
        return ce.mean()  # nothing supervised: nan, so an all-ignored batch is not silently zero
    ids, lengths = answer_spans(targets)
    w = lengths[ids[supervised]].to(ce.dtype).pow(-LOSS_REDUCTIONS[reduction])
    return (w * ce).sum() / w.sum()


class MMoEModule(L.LightningModule):
    """Trains an MMoEVLM. Every constructor argument is a typed config (YAML: `model.*`)."""

    def __init__(
        self,
        *,
        arch: VLMConfig = VLMConfig(),
        optim: OptimConfig = OptimConfig(),
        balance: BalanceConfig = BalanceConfig(),
        stage: StageConfig = StageConfig(),
        parallel: ParallelConfig = ParallelConfig(),
        activation_checkpointing: bool = False,
        compile: bool = False,
        val_max_new_tokens: int = 6,
        log_routing_every: int = 25,
        loss_reduction: Literal["token", "sqrt", "turn"] = "token",
        lora: LoraSettings = LoraSettings(),
    ):
        """
        Args:
            arch: model architecture (vision, connector, decoder, special token ids).
            optim: optimiser and LR schedule.
            balance: balancing-loss coefficients per MoE site and kind.
            stage: previous-stage checkpoint to start from (upcycled into MoE) and what to freeze.
            parallel: expert-parallel size.
            activation_checkpointing: recompute each ViT / decoder block in backward to save memory (also
                with compile and with LoRA).
            compile: torch.compile every ViT block, the connector and every decoder block (fullgraph=True;
                MoE blocks included: their dispatch has static shapes). With LoRA only the nn.Linear targets
                (attention, mlp): adapters on packed weights (moa, experts) are refused.
            val_max_new_tokens: answer length generated during validation.
            log_routing_every: log per-layer routing health every N training steps.
            loss_reduction: how answer tokens are averaged: 'token' (plain mean), 'turn' (each answer turn
                weighs the same) or 'sqrt' (InternVL's square averaging); see `lm_loss`.
            lora: low-rank adapters (peft) on the decoder instead of full fine-tuning (r > 0); the export merges
                them into plain weights. See `mmoe.training.lora`.
        """
        super().__init__()
        # defaults are shared instances: copy so nothing mutates them
        arch, optim, balance, stage, parallel = copy.deepcopy((arch, optim, balance, stage, parallel))
        self.save_hyperparameters()
        self.arch, self.optim_cfg, self.balance_cfg = arch, optim, balance
        optim.validate()  # a bad schedule fails here, naming the field, not at the first optimizer step
        self.stage_cfg, self.parallel_cfg = stage, parallel
        self.activation_checkpointing, self.compile_blocks = activation_checkpointing, compile
        self.val_max_new_tokens, self.log_routing_every = val_max_new_tokens, log_routing_every
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"model.loss_reduction must be one of {sorted(LOSS_REDUCTIONS)}, "
                             f"got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        refuse_idle_upcycle_reinit(arch, stage)
        self._sharded_init = None  # the recorded meta build (parallel.sharded_init) until the strategy shards it
        if parallel.sharded_init:
            from mmoe.parallel.sharded_init import record_build
            refuse_sharded_init(arch, stage, lora)
            self._sharded_init = record_build(lambda: MMoEVLM(arch))
            self.model = self._sharded_init.model  # on the meta device
        else:
            self.model = build_model(arch)  # + the vision / connector checkpoints the arch names
        if stage.hf_decoder and not parallel.sharded_init:  # sharded: streamed by the strategy after sharding
            load_hf_decoder(self.model, stage.hf_decoder)
        if stage.init_from:
            load_stage_weights(self.model, stage.init_from, strict=stage.strict_init)
        apply_freeze(self.model, stage.freeze)
        self.lora_cfg = copy.deepcopy(lora)
        self.lora_cfg.validate()
        if self.lora_cfg.r and parallel.ep_size > 1:
            raise ValueError("model.lora.r > 0 with model.parallel.ep_size > 1: LoRA on sharded experts is not "
                             "supported; fine-tune with LoRA on one expert-parallel group (ep_size 1)")
        packed = sorted(set(self.lora_cfg.targets) & set(PACKED_TARGETS))
        if self.lora_cfg.r and compile and packed:
            raise ValueError(
                f"model.compile=true with model.lora.targets {packed}: peft adapts packed weights (MoA and MoE "
                "experts) by registering a parametrization in every forward, which torch.compile(fullgraph=True) "
                "cannot trace; with model.compile use model.lora.targets from [attention, mlp], or set "
                "model.compile=false")
        if self.lora_cfg.r:
            apply_lora(self.model, self.lora_cfg)  # after the weights are loaded: adapters start at zero
        self._val_results: list[dict] = []
        # element-wise sum over data-parallel ranks (None: resolved from the process group, `_rank_sum`)
        self.sum_over_ranks: Callable[[Tensor], Tensor] | None = None
        self.expert_load_history: list[dict] = []  # (step, layer name, load vector) for plots

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            check_tokenizer(tok, self.arch)
        max_len = getattr(getattr(dm, "hparams", None), "max_len", None)
        if max_len is not None:
            longest = int(max_len) + self.model.num_image_tokens - 1  # the <image> token becomes P tokens
            if longest > self.arch.decoder.max_seq_len:
                raise ValueError(f"data.max_len={max_len} text tokens + {self.model.num_image_tokens - 1} more per "
                                 f"image can reach {longest} positions > model.arch.decoder.max_seq_len="
                                 f"{self.arch.decoder.max_seq_len}; lower data.max_len or raise max_seq_len")

    def configure_model(self) -> None:
        if self._trainer is not None and self.trainer.world_size > 1:
            self.model.always_encode_images = True  # text-only batches must not skip collectives on one rank
        if self._sharded_init is not None and self._trainer is not None:
            from mmoe.parallel.fsdp_strategy import FSDPExpertParallelStrategy
            if not isinstance(self.trainer.strategy, FSDPExpertParallelStrategy):
                raise ValueError("model.parallel.sharded_init=true needs --trainer.strategy fsdp_ep (it initialises "
                                 f"the FSDP shards), got {type(self.trainer.strategy).__name__}")
        if self.parallel_cfg.ep_size > 1:
            from mmoe.parallel.expert_parallel import enable_expert_parallel
            if self._trainer is not None:  # experts need the EP-aware DDP (ignore list, grads, checkpoints)
                from mmoe.parallel.strategy import require_expert_parallel_strategy
                require_expert_parallel_strategy(self.trainer)
            enable_expert_parallel(self.model, self.parallel_cfg.ep_size)
        if self.activation_checkpointing:
            from .block_wrappers import apply_activation_checkpointing
            apply_activation_checkpointing(self.model, compiled=self.compile_blocks)
        if self.compile_blocks:
            from .compile import compile_blocks
            compile_blocks(self.model)

    def consolidated_model(self):
        """The model with every expert shard gathered (one-process layout) for export; `self.model` without EP."""
        from mmoe.parallel.checkpoint import consolidated_model
        return consolidated_model(self.model)

    # ------------------------------------------------------------------ objective
    def _rank_sum(self) -> Callable[[Tensor], Tensor] | None:
        """The reducer that makes expert loads and the device balance loss global-batch quantities: the
        injected `sum_over_ranks`, else mmoe.parallel's whenever several processes train, else None."""
        if self.sum_over_ranks is not None:
            return self.sum_over_ranks
        from mmoe.parallel.collectives import sum_over_ranks, world_size
        return sum_over_ranks if world_size() > 1 else None

    def balancing_loss(self, routing: list[RoutingResult]) -> tuple[Tensor, dict[str, Tensor]]:
        """Sum over layers of coef[site][kind] * loss_kind(layer); also per-site-kind totals for logging."""
        total = torch.zeros((), device=self.device)
        parts: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        reduce = self._rank_sum() if self.parallel_cfg.ep_size > 1 else None
        for r in routing:
            coefs = getattr(self.balance_cfg, r.site, None)
            if coefs is None:
                continue
            for kind, coef in asdict(coefs).items():
                if coef == 0:
                    continue
                if kind == "device" and self.parallel_cfg.ep_size <= 1:
                    continue  # one device: nothing to balance across
                value = balancing_loss(kind, r, self.parallel_cfg.ep_size, reduce if kind == "device" else None)
                total = total + coef * value
                parts[f"{r.site}/{kind}"] = parts[f"{r.site}/{kind}"] + value.detach()
        return total, dict(parts)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch["labels"],
                         segment_ids=batch.get("segment_ids"), logits_at_labels=True)
        ce = lm_loss(out.logits, out.labels, self.loss_reduction)
        aux, parts = self.balancing_loss(out.routing)
        loss = ce + aux
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/lm_loss", ce, prog_bar=True, batch_size=bs)
        self.log("train/aux_loss", aux, batch_size=bs)
        for k, v in parts.items():
            self.log(f"train/balance/{k}", v, batch_size=bs)
        if self.log_routing_every and self.global_step % self.log_routing_every == 0:
            self._log_routing(out.routing, bs)
        return loss

    def _log_routing(self, routing: list[RoutingResult], bs: int) -> None:
        """Per-layer (and per-modality, per-group) routing health; never one pooled number."""
        metrics = {}
        for r in routing:
            if not bool(r.token_mask.any()):  # a masked placeholder image (text-only batch): nothing to measure
                continue
            for k, v in routing_metrics(r).items():
                metrics[f"routing/{r.name}/{k}"] = v
            self.expert_load_history.append(
                {"step": int(self.global_step), "layer": r.name,
                 "load": expert_load(r).tolist()})
        if self.parallel_cfg.ep_size > 1:  # a collective: runs at the same steps on every rank
            from mmoe.parallel import ep_load_metrics
            metrics.update(ep_load_metrics(self.model))
        self.log_dict(metrics, batch_size=bs)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log the global gradient L2 norm before clipping (Lightning clips after this hook), so a run shows how
        often `trainer.gradient_clip_val` binds; with sharded experts it is the norm clipping uses (all shards)."""
        from mmoe.parallel.expert_parallel import grad_norm

        if any(p.grad is not None for p in self.parameters()):
            self.log("train/grad_norm", grad_norm(self.parameters(), module=self.model).float(), batch_size=1)

    # ------------------------------------------------------------------ aux-loss-free bias
    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_router_biases()

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """DeepSeek-V3 bias step for every trainable router, from the load seen since the last optimizer step
        (summed over data-parallel ranks so every rank applies the same update). Routers inside modules frozen
        by `stage.freeze` (gate weight not trainable) keep their bias, so a frozen tower's routing stays put."""
        routers = []
        for m in self.model.modules():
            if isinstance(m, Router) and m.cfg.aux_free_bias:
                if m.gate.weight.requires_grad:
                    routers.append(m)
                else:
                    m.load_accum.zero_()
        if not routers:
            return
        loads = torch.cat([r.load_accum for r in routers])
        reduce = self._rank_sum()
        if reduce is not None:  # the global batch's loads: every rank applies the same update
            loads = reduce(loads)
        for r, load in zip(routers, loads.split([r.cfg.num_experts for r in routers])):
            r.update_bias(load)

    # ------------------------------------------------------------------ validation: VQA accuracy
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        tok = self.trainer.datamodule.tokenizer
        new = self.model.generate(batch["prompt_ids"], batch["attention_mask"], batch.get("pixel_values"),
                                  max_new_tokens=self.val_max_new_tokens,
                                  static=self.compile_blocks)  # compiled blocks: fixed-shape decode steps
        answers = tok.batch_decode(new, skip_special_tokens=True)
        for qid, ans in zip(batch["question_ids"], answers):
            self._val_results.append({"question_id": int(qid), "answer": ans.strip()})

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._score_vqa("test", self.trainer.datamodule.test_annotations_path)

    def on_validation_epoch_end(self) -> None:
        self._score_vqa("val", self.trainer.datamodule.val_annotations_path)

    def _score_vqa(self, prefix: str, annotations_path) -> None:
        """Score the union of every rank's answers on every rank (ranks may hold different answer types,
        so per-rank logging with sync_dist would issue mismatched collectives)."""
        import json

        from mmoe.metrics.vqa import vqa_accuracy

        results, self._val_results = self._val_results, []
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, results)
            results = list({r["question_id"]: r for part in parts for r in part}.values())  # sampler pads repeats
        if not results:
            return
        with open(annotations_path) as f:
            ann = json.load(f)
        wanted = {r["question_id"] for r in results}
        ann = dict(ann, annotations=[a for a in ann["annotations"] if a["question_id"] in wanted])
        acc = vqa_accuracy(results, ann)
        self.log(f"{prefix}/vqa_acc", float(acc["overall"]), prog_bar=True)
        for k, v in acc.get("per_answer_type", {}).items():
            self.log(f"{prefix}/vqa_acc/{k}", float(v))
        for k, v in acc.get("per_question_type", {}).items():
            self.log(f"{prefix}/vqa_acc_qtype/{k}", float(v))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        cfg = self.optim_cfg
        by_kind: dict[tuple[str, bool], list] = {}  # (kind, in the vision tower) -> params
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if ".router." in name or name.startswith("router."):
                kind = "router"
            elif skips_weight_decay(name, p):
                kind = "no_decay"
            else:
                kind = "decay"
            by_kind.setdefault((kind, name.startswith("vision.")), []).append(p)
        if cfg.vision_router_lr_scale is not None and ("router", True) not in by_kind:
            raise ValueError(f"model.optim.vision_router_lr_scale={cfg.vision_router_lr_scale} has no effect: the "
                             "vision tower has no trainable router (no MoE blocks, or the tower is frozen)")
        groups = [
            {"params": params,
             "weight_decay": cfg.weight_decay if kind == "decay" else 0.0,
             "lr": cfg.lr * lr_scale(cfg, kind, in_vision)}
            for (kind, in_vision), params in sorted(by_kind.items())
        ]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def refuse_idle_upcycle_reinit(arch: VLMConfig, stage: StageConfig) -> None:
    """`moe.upcycle_reinit` acts only when a site is upcycled from dense weights: refuse it where nothing is."""
    sites = (("vision.moe", arch.vision.moe, arch.vision.checkpoint, "model.arch.vision.checkpoint"),
             ("connector.moe", arch.connector.moe if arch.connector.kind == "moe_mlp" else None,
              arch.connector.checkpoint, "model.arch.connector.checkpoint"),
             ("decoder.ffn_moe", arch.decoder.ffn_moe, stage.hf_decoder, "model.stage.hf_decoder"))
    for site, moe, source, source_field in sites:
        if moe is not None and moe.upcycle_reinit and not (source or stage.init_from):
            raise ValueError(f"model.arch.{site}.upcycle_reinit={moe.upcycle_reinit} has no effect: nothing upcycles "
                             f"this site from dense weights (set {source_field} or model.stage.init_from)")


def refuse_sharded_init(arch: VLMConfig, stage: StageConfig, lora: LoraSettings) -> None:
    """parallel.sharded_init initialises the shards from the model's own random init and streams the vision
    checkpoint and HF decoder into them (`mmoe.parallel.sharded_load`); anything else is refused here, naming
    the field."""
    from mmoe.parallel.sharded_load import check_streamable
    for value, name in ((stage.init_from, "model.stage.init_from"), (lora.r, "model.lora.r")):
        if value:
            raise ValueError(f"model.parallel.sharded_init=true does not support {name} (set to {value!r}): "
                             "sharded init fills the shards from the model's own initialisation and streams only "
                             "model.arch.vision.checkpoint and model.stage.hf_decoder")
    check_streamable(arch, stage)


def lr_scale(cfg: OptimConfig, kind: str, in_vision: bool) -> float:
    """LR multiplier of one parameter group: the router and vision-tower scales stack, unless the ViT's routers
    have their own (`vision_router_lr_scale`)."""
    if kind == "router" and in_vision and cfg.vision_router_lr_scale is not None:
        return cfg.vision_router_lr_scale
    return (cfg.router_lr_scale if kind == "router" else 1.0) * (cfg.vision_lr_scale if in_vision else 1.0)


def skips_weight_decay(name: str, p: Tensor) -> bool:
    """Norms, biases, position / class embeddings and token embeddings are not decayed (decay would only
    shrink them towards zero without regularising anything)."""
    return (p.ndim < 2 or "norm" in name or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name
            or "embed_tokens" in name)


def lr_multiplier(cfg: OptimConfig, total: int):
    """The LR multiplier of `cfg.schedule` over `total` optimizer steps."""
    cfg.validate()
    if cfg.schedule == "wsd":
        return warmup_stable_decay(cfg.warmup_steps, total, cfg.decay_fraction, cfg.min_lr_ratio)
    return warmup_cosine(cfg.warmup_steps, total, cfg.min_lr_ratio)


def warmup_stable_decay(warmup: int, total: int, decay_fraction: float, min_ratio: float):
    """LR multiplier: linear warmup to 1, hold 1, then linear down to min_ratio over the last
    `decay_fraction * total` steps (Hu et al. 2024, MiniCPM; Hägele et al. 2024 find it matches cosine)."""
    decay_start = max(warmup, total - max(1, round(decay_fraction * total)))
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if step < decay_start:
            return 1.0
        t = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return 1.0 - (1.0 - min_ratio) * t
    return fn


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear warmup to 1, cosine down to min_ratio at `total` steps."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return fn


def check_tokenizer(tok, arch: VLMConfig) -> None:
    """Fail early, naming the field, when the tokenizer and the model config disagree."""
    vocab = len(tok)
    if vocab > arch.decoder.vocab_size:
        raise ValueError(f"model.arch.decoder.vocab_size={arch.decoder.vocab_size} is smaller than the "
                         f"tokenizer's {vocab} tokens")
    img = tok.convert_tokens_to_ids("<image>")
    checks = {"image_token_id": img, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    for name, tid in checks.items():
        if tid is not None and getattr(arch, name) != tid:
            raise ValueError(f"model.arch.{name}={getattr(arch, name)} but the tokenizer says {tid}")

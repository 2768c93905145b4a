"""Training-side configs (flat dataclasses; every field becomes a CLI/YAML option)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from mmoe.model.moe.balancing import LOSS_KINDS


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then cosine decay or warmup-stable-decay (WSD)."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.05
    """Decoupled weight decay (not applied to norms, biases, embeddings' positions or routers)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak at the end of the schedule."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """"cosine": decay from the end of warmup to the last step. "wsd" (warmup-stable-decay, MiniCPM / DeepSeek-V3):
    hold the peak, then decay linearly over the last `decay_fraction` of the steps; keeps the LR high for longer."""
    decay_fraction: float = 0.2
    """WSD only: fraction of all steps spent decaying to `min_lr_ratio`."""
    router_lr_scale: float = 1.0
    """Multiplier on the LR of router (gate) weights."""
    vision_lr_scale: float = 1.0
    """Multiplier on the LR of the vision tower (a pretrained tower is usually tuned gently or frozen)."""
    vision_router_lr_scale: float | None = None
    """Multiplier on the LR of the ViT's MoE routers in place of `vision_lr_scale` x `router_lr_scale` (None: that
    product). Upcycled routers are new even when the tower arrives pretrained and is tuned gently."""

    def validate(self) -> None:
        """Raise ValueError naming the field (the Python API bypasses the CLI's Literal check)."""
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"model.optim.schedule={self.schedule!r}: expected 'cosine' or 'wsd'")
        if self.schedule == "wsd" and not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"model.optim.decay_fraction={self.decay_fraction} must be in (0, 1]")


@dataclass
class LossCoefs:
    """Coefficients of the balancing losses of one MoE site (each loss is ~1 at perfect balance)."""

    balance: float = 0.01
    """Switch/GShard expert-level load balance."""
    z: float = 0.001
    """ST-MoE router z-loss."""
    group: float = 0.0
    """Group-level balance (hierarchical routing)."""
    modality: float = 0.0
    """Per-modality balance (image tokens and text tokens separately)."""
    device: float = 0.0
    """Device-level balance over expert-parallel shards."""
    sequence: float = 0.0
    """DeepSeek-V3 sequence-wise balance."""


if tuple(f.name for f in fields(LossCoefs)) != LOSS_KINDS:  # one coefficient per registered kind
    raise TypeError(f"LossCoefs fields {[f.name for f in fields(LossCoefs)]} must be the balancing-loss kinds "
                    f"{list(LOSS_KINDS)} of mmoe.model.moe.balancing.BALANCING_LOSSES, in order")


@dataclass
class BalanceConfig:
    """Balancing-loss coefficients per MoE site."""

    vision: LossCoefs = field(default_factory=LossCoefs)
    """MoE blocks of the ViT."""
    connector: LossCoefs = field(default_factory=LossCoefs)
    """MoE connector."""
    attention: LossCoefs = field(default_factory=LossCoefs)
    """MoA attention layers of the decoder."""
    ffn: LossCoefs = field(default_factory=LossCoefs)
    """MoE FFN layers of the decoder."""


@dataclass
class StageConfig:
    """What this stage starts from and what it trains (CuMo / MoE-LLaVA style recipes)."""

    init_from: str | None = None
    """Previous stage: a Lightning .ckpt or an exported model directory. Dense weights are upcycled into
    the MoE layers of this stage's architecture (every expert a copy of the dense MLP / heads)."""
    hf_decoder: str | None = None
    """A Hugging Face Llama / Mistral / Qwen2 / Mixtral checkpoint directory for the decoder (dense MLPs
    and attentions upcycled into this config's MoE / MoA layers). Applied before `init_from`."""
    freeze: list[str] = field(default_factory=list)
    """Parameter-name prefixes to freeze, e.g. ['vision', 'decoder'] for stage 1 (connector only)."""
    strict_init: bool = True
    """Fail when the previous stage lacks a tensor this stage needs (other than fresh routers)."""


@dataclass
class ParallelConfig:
    """Expert parallelism; the data-parallel size is derived as world_size / ep_size."""

    ep_size: int = 1
    """Ranks an expert set is sharded across (all-to-all dispatch among them)."""
    sharded_init: bool = False
    """Build the model on the meta device and initialise it shard by shard after FSDP sharding, so no rank
    ever holds the whole model (`--trainer.strategy fsdp_ep` only); the values equal the ordinary build's."""

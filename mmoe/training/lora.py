"""LoRA fine-tuning through peft: attention projections, MoA expert projections and packed expert weights.

Where adapters go (`LoraSettings.targets`):
  attention  every nn.Linear of the decoder's attention (q/k/v/o of dense layers; the shared k/v and shared-head
             projections of MoA layers) through peft's `target_modules`;
  moa        MoA's per-expert query/output projections, packed (E, in, out) `GroupedLinear` weights, through
             peft's `target_parameters` (one low-rank pair per expert);
  experts    the packed (E, in, out) weights of the decoder's MoE FFN experts, through `target_parameters`;
  mlp        the dense SwiGLU MLPs of the decoder (nn.Linear).
Everything else is frozen except the routers when `train_routers` is set. With `model.compile` only the
nn.Linear targets (attention, mlp) are allowed: peft's ParamWrapper registers a parametrization on every
forward, which fullgraph compilation cannot trace, so the training module refuses moa / experts there.
Activation checkpointing works with every target. The model stays single-device
model code: adapters are injected from here (the training module calls `apply_lora`), and `merge_lora` folds
them back into plain weights so the export has the ordinary format and names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from mmoe.model.moe.experts import GroupedLinear

TARGETS = ("attention", "moa", "experts", "mlp")
PACKED_TARGETS = ("moa", "experts")  # peft target_parameters (ParamWrapper): eager only, torch.compile cannot trace


@dataclass
class LoraSettings:
    """Low-rank adapters (peft LoRA) instead of full fine-tuning; r = 0 turns LoRA off."""

    r: int = 0
    """Adapter rank (0: no LoRA, every parameter trains as configured)."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter input of nn.Linear targets (packed expert weights take none)."""
    targets: list[str] = field(default_factory=lambda: ["attention", "moa", "experts"])
    """Where adapters go: attention (decoder attention linears), moa (MoA per-expert q/o projections), experts
    (packed MoE FFN expert weights), mlp (dense decoder MLPs)."""
    train_routers: bool = False
    """Also train the router (gate) weights of every MoE / MoA layer; False keeps them frozen."""
    trainable: list[str] = field(default_factory=list)
    """Parameter-name prefixes trained in full besides the adapters, e.g. ['connector']."""

    def validate(self) -> None:
        if self.r < 0:
            raise ValueError(f"model.lora.r={self.r} must be >= 0")
        bad = sorted(set(self.targets) - set(TARGETS))
        if bad:
            raise ValueError(f"model.lora.targets: unknown {bad}; choose from {list(TARGETS)}")
        if self.r and not self.targets:
            raise ValueError("model.lora.targets is empty: LoRA with r > 0 needs at least one target")


def lora_targets(model: nn.Module, targets: list[str]) -> tuple[list[str], list[str]]:
    """(module names for target_modules, parameter names for target_parameters) inside `model.decoder`."""
    modules, params = [], []
    for name, mod in model.named_modules():
        if not name.startswith("decoder.layers."):
            continue
        in_attn = ".self_attn." in name + "."
        in_mlp = ".mlp." in name + "."
        if isinstance(mod, nn.Linear):
            if in_attn and "attention" in targets and ".router" not in name:
                modules.append(name)
            elif in_mlp and "mlp" in targets and ".router" not in name and ".experts" not in name:
                modules.append(name)
        elif isinstance(mod, GroupedLinear):
            if in_attn and "moa" in targets:
                params.append(f"{name}.weight")
            elif in_mlp and "experts" in targets and ".experts." in name + ".":
                params.append(f"{name}.weight")
    return modules, params


def apply_lora(model: nn.Module, cfg: LoraSettings) -> nn.Module:
    """Inject peft LoRA adapters into `model` in place and freeze everything else (see module docstring)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg.validate()
    modules, params = lora_targets(model, cfg.targets)
    if not modules and not params:
        raise ValueError(f"model.lora.targets={cfg.targets} matches nothing in this decoder (e.g. 'moa' needs "
                         "attn_moe layers, 'experts' needs ffn_moe layers)")
    # exact names: peft matches a target name or a suffix after '.'; full names are unambiguous
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=modules or None, target_parameters=params or None, bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        trainable = "lora_" in name
        if cfg.train_routers and (".router." in name or name.startswith("router.")):
            trainable = True
        if any(name == t or name.startswith(t + ".") for t in cfg.trainable):
            trainable = True
        p.requires_grad_(trainable)
    missing = [t for t in cfg.trainable if not any(n == t or n.startswith(t + ".")
                                                   for n, _ in model.named_parameters())]
    if missing:
        raise ValueError(f"model.lora.trainable: {missing} match no parameter")
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merge_lora(model: nn.Module, copy_model: bool = True) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back (same names as without LoRA)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if copy_model:
        model = copy.deepcopy(model)
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, m in wrapped:
        if "." in name and any(name.startswith(o + ".") for o, _ in wrapped):
            continue  # nested wrapper: merged through its outermost one
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.get_base_layer())
    if has_lora(model):
        raise RuntimeError("merge_lora: adapters remain after merging (nested peft wrappers?)")
    return model


__all__ = ["PACKED_TARGETS", "LoraSettings", "apply_lora", "merge_lora", "has_lora", "lora_targets"]

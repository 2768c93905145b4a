"""The one home of routing, experts, dispatch and balancing. No Lightning, no torch.distributed."""

from .balancing import (BALANCING_LOSSES, LOSS_KINDS, balancing_loss, balancing_losses, device_balance_loss,
                        expert_load, group_balance_loss, load_balance_loss, modality_balance_loss, routing_metrics,
                        sequence_balance_loss, z_loss)
from .config import MoEConfig, MoEConfigError, select_layers
from .dispatch import DispatchPlan, LocalDispatcher
from .experts import GroupedExperts, GroupedLinear
from .ffn import MoEFFN
from .attention import MoAAttention
from .routing import Router, RoutingResult, within_capacity

__all__ = [
    "MoEConfig", "MoEConfigError", "select_layers", "Router", "RoutingResult", "within_capacity", "LocalDispatcher", "DispatchPlan",
    "GroupedExperts", "GroupedLinear", "MoEFFN", "MoAAttention", "BALANCING_LOSSES", "LOSS_KINDS", "balancing_loss", "balancing_losses", "load_balance_loss", "z_loss",
    "group_balance_loss", "modality_balance_loss", "device_balance_loss", "sequence_balance_loss",
    "routing_metrics", "expert_load",
]

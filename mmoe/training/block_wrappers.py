"""Scale knobs: activation checkpointing per block and torch.compile of dense blocks."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from mmoe.model.moe import MoEFFN
from mmoe.model.moe.routing import checkpoint_context_fn


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    return [mod for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "blocks")]


def checkpointed_blocks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every block activation checkpointing wraps: each ViT block (timm keeps them in an
    nn.Sequential), each decoder layer (nn.ModuleList) and the connector's projector."""
    from mmoe.model.connector import Connector

    slots = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and name.split(".")[-1] in ("layers", "blocks"):
            slots += [(mod, str(i)) for i in range(len(mod))]
        elif isinstance(mod, Connector):
            slots.append((mod, "proj"))
    return slots


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every ViT block, the connector projector and every decoder layer in backward (non-reentrant,
    so dataclass outputs pass). Routers do not count expert loads again during the recompute.

    torch's checkpoint_wrapper strips its prefix from state-dict keys, so checkpoints and exports keep the
    unwrapped names. Returns how many blocks were wrapped.
    """
    n = 0
    for parent, attr in checkpointed_blocks(model):
        block = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
        if hasattr(block, "_checkpoint_wrapped_module"):
            continue
        wrapped = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                     context_fn=checkpoint_context_fn)
        if attr.isdigit():
            parent[int(attr)] = wrapped
        else:
            setattr(parent, attr, wrapped)
        n += 1
    return n


def compile_dense_blocks(model: nn.Module) -> int:
    """torch.compile each block without MoE (MoE routing has data-dependent shapes); returns the count."""
    n = 0
    for blocks in _block_lists(model):
        for b in blocks:
            if not any(isinstance(m, MoEFFN) or type(m).__name__ == "MoAAttention" for m in b.modules()):
                b.compile(dynamic=True)
                n += 1
    return n

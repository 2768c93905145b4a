"""Activation checkpointing per block (ViT blocks, connector projector, decoder layers), applied from outside
the model. Per-block torch.compile lives in compile.py."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from mmoe.model.moe.routing import checkpoint_context_fn


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


def apply_activation_checkpointing(model: nn.Module, compiled: bool = False) -> int:
    """Recompute every ViT block, the connector projector and every decoder layer in backward (non-reentrant,
    so dataclass outputs pass). Routers do not count expert loads again during the recompute.

    `compiled`: the blocks are compiled afterwards (compile_blocks). torch.compile takes the checkpointed
    region into one graph and its partitioner recomputes the region's pure ops in backward, so no Python
    forward runs twice and the eager marker (a context_fn, which compile rejects) is left out.

    torch's checkpoint_wrapper strips its prefix from state-dict keys, so checkpoints and exports keep the
    unwrapped names. Returns how many blocks were wrapped.
    """
    extra = {} if compiled else {"context_fn": checkpoint_context_fn}
    n = 0
    for parent, attr in checkpointed_blocks(model):
        block = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
        if hasattr(block, "_checkpoint_wrapped_module"):
            continue
        wrapped = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **extra)
        if attr.isdigit():
            parent[int(attr)] = wrapped
        else:
            setattr(parent, attr, wrapped)
        n += 1
    return n

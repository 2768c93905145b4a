"""Scale knobs: activation checkpointing per block and torch.compile of dense blocks."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from mmoe.model.moe import MoEFFN


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    return [mod for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "blocks")]


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every ViT block and decoder layer in backward (non-reentrant, so dataclass outputs pass).

    torch's checkpoint_wrapper strips its prefix from state-dict keys, so checkpoints and exports keep the
    unwrapped names. Returns how many blocks were wrapped.
    """
    n = 0
    for blocks in _block_lists(model):
        for i, b in enumerate(blocks):
            if not hasattr(b, "_checkpoint_wrapped_module"):
                blocks[i] = checkpoint_wrapper(b, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
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

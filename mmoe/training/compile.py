"""torch.compile per block (torchtitan's pattern): every ViT block, the connector, every decoder block.

MoE blocks compile like dense ones since the dispatch has static shapes and no host synchronisation
(mmoe.model.moe.dispatch), so every block is compiled with fullgraph=True: a graph break is an error,
not a silent slowdown. Routing outcomes never change shapes, so a new batch of the same shape reuses
the graph; `dynamic=False` keeps shapes static (CUDA graphs need that too).
"""

from __future__ import annotations

from torch import nn


def compiled_block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """ViT `blocks` (timm: a Sequential) and decoder `layers`: the repeated blocks, compiled one by one."""
    return [mod for name, mod in model.named_modules()
            if isinstance(mod, (nn.ModuleList, nn.Sequential)) and name.split(".")[-1] in ("layers", "blocks")]


def compile_blocks(model: nn.Module, fullgraph: bool = True, mode: str | None = None, backend: str = "inductor",
                   dynamic: bool | None = False) -> int:
    """Compile every block in place (state-dict keys unchanged) and the connector; returns the count.

    Blocks of one class share a code object, and dynamo keeps one cache entry per block there (a block's
    layer index is a static int it guards on; under activation checkpointing every block runs through the same
    wrapper forward), so the per-code-object recompile limit is raised to cover all blocks in training and
    eval mode and two input shapes each: the default limit (8) is a hard error under fullgraph for deep models.
    """
    import torch

    blocks = [b for bl in compiled_block_lists(model) for b in bl]
    needed = 4 * (len(blocks) + 1)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           4 * needed)
    n = 0
    for blocks in compiled_block_lists(model):
        for b in blocks:
            b.compile(fullgraph=fullgraph, mode=mode, backend=backend, dynamic=dynamic)
            n += 1
    connector = getattr(model, "connector", None)
    if isinstance(connector, nn.Module):
        connector.compile(fullgraph=fullgraph, mode=mode, backend=backend, dynamic=dynamic)
        n += 1
    return n


__all__ = ["compile_blocks", "compiled_block_lists"]

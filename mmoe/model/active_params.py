"""Active-parameter accounting and the dense model with the same active parameters as an MoE model.

Used by the MoE-versus-dense benchmarks: the dense twin keeps every dimension and replaces each MoE
site by a dense layer whose width makes the total *activated* parameters per token equal (routed experts
count top_k/E, shared experts in full; MoA layers count top_k of E head groups).
"""

from __future__ import annotations

import copy

from torch import nn

from .moe.attention import MoAAttention
from .moe.experts import GroupedLinear
from .moe.ffn import MoEFFN
from .vlm import VLMConfig


def active_param_count(model: nn.Module) -> int:
    """Parameters a token touches: routed expert weights scaled by top_k / E, everything else in full."""
    scaled: dict[int, float] = {}
    for mod in model.modules():
        if isinstance(mod, (MoEFFN, MoAAttention)):
            frac = mod.cfg.top_k / mod.cfg.num_experts
            for sub in mod.modules():
                if isinstance(sub, GroupedLinear):
                    for p in sub.parameters(recurse=False):
                        scaled[id(p)] = frac
    return int(sum(p.numel() * scaled.get(id(p), 1.0) for p in model.parameters()))


def _active_hidden(hidden: int, moe) -> int:
    """Width of the dense MLP that a top-k MoE MLP activates per token (routed + shared experts)."""
    eh = moe.expert_hidden or hidden
    return eh * (moe.top_k + moe.num_shared_experts)


def dense_equivalent_config(cfg: VLMConfig) -> VLMConfig:
    """Same dims, no MoE anywhere, per-site widths chosen so active parameters match on average over layers."""
    from .moe.config import select_layers

    d = copy.deepcopy(cfg)
    v = d.vision
    if v.moe is not None:
        n = len(select_layers(v.moe_layers, v.depth))
        hidden = v.dim * v.mlp_ratio
        avg = ((v.depth - n) * hidden + n * _active_hidden(int(hidden), v.moe)) / v.depth
        v.mlp_ratio, v.moe = avg / v.dim, None
    c = d.connector
    if c.kind == "moe_mlp":
        hidden = c.hidden or cfg.decoder.dim
        c.kind, c.hidden, c.moe = "mlp", _active_hidden(hidden, c.moe), None
    dec = d.decoder
    if dec.ffn_moe is not None:
        n = len(dec.moe_ffn_layer_ids())
        avg = ((dec.n_layers - n) * dec.hidden + n * _active_hidden(dec.hidden, dec.ffn_moe)) / dec.n_layers
        dec.hidden, dec.ffn_moe = int(round(avg)), None
    if dec.attn_moe is not None:
        n = len(dec.moa_layer_ids())
        hd = dec.head_size
        moa = dec.attn_moe
        S = moa.num_shared_experts
        active_heads = dec.n_heads // (moa.num_experts + S) * (moa.top_k + S)
        avg = ((dec.n_layers - n) * dec.n_heads + n * active_heads) / dec.n_layers
        heads = max(dec.n_kv_heads, int(round(avg / dec.n_kv_heads)) * dec.n_kv_heads)  # GQA needs a multiple
        dec.head_dim, dec.n_heads, dec.attn_moe = hd, heads, None
    return d


__all__ = ["active_param_count", "dense_equivalent_config"]

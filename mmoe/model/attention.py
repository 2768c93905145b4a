"""Dense attention pieces shared by the decoder's GQA attention and MoA: mask, shared K/V with RoPE, SDPA."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import apply_rope


@dataclass
class AttnMask:
    """What SDPA needs: a bool mask (B, 1, T, S) with True = may attend, or the is_causal fast path."""

    mask: Tensor | None
    is_causal: bool


def shared_kv(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, cache,
              layer_idx: int) -> tuple[Tensor, Tensor]:
    """K/V of `attn.k_proj`/`attn.v_proj` with RoPE; appended to `cache` when given -> (B, n_kv, S, hd)."""
    B, T, _ = x.shape
    k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
    v = attn.v_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    k = apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)  # (B, n_kv, past + T, hd) views of the preallocated buffers
    return k, v


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
    """q: (B, H, T, hd); k, v: (B, n_kv, S, hd) with n_kv | H (query head h reads kv head h // (H / n_kv))."""
    B, H, T, hd = q.shape
    if T == 1 and not q.is_cuda:
        # CPU decode step: two small matmuls per kv group beat the CPU flash kernel (which does not
        # parallelise a single query) and need no repeat of K/V.
        n_kv = k.shape[1]
        qg = q.view(B, n_kv, H // n_kv, hd)  # the H / n_kv query heads of each kv head as rows
        s = (qg @ k.transpose(-1, -2)).float() * hd ** -0.5  # (B, n_kv, H/n_kv, S)
        if mask.mask is not None:
            s = s.masked_fill(~mask.mask, float("-inf"))  # (B, 1, 1, S) broadcasts
        return (s.softmax(-1).to(v.dtype) @ v).view(B, H, 1, hd)
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        if mask.mask is None and q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v, is_causal=mask.is_causal, enable_gqa=True)
        # Explicit masks (and CPU) take the repeat path: every SDPA backend accepts it.
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal)


__all__ = ["AttnMask", "sdpa", "shared_kv"]

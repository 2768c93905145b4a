"""Llama-style decoder with per-layer MoA attention and MoE FFN, and a preallocated KV cache.

Block: x + attn(norm(x)); x + ffn(norm(x)). Each layer picks dense `Attention` or `MoAAttention`, and dense
`SwiGLU` or `MoEFFN`. Module names follow Hugging Face Llama (`embed_tokens`, `layers.i.self_attn.q_proj`,
`layers.i.mlp.gate_proj`, `input_layernorm`, `post_attention_layernorm`, `norm`, `lm_head`), so dense
checkpoints load by name (see `mmoe.interop.hf`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttnMask, sdpa, shared_kv
from .layers import RMSNorm, SwiGLU, apply_rope, init_linear_
from .moe.attention import MoAAttention, moa_heads_per_group
from .moe.config import MoEConfig, MoEConfigError, select_layers
from .moe.experts import GroupedLinear
from .moe.ffn import MoEFFN
from .moe.routing import Router, RoutingResult


@dataclass
class DecoderConfig:
    """Shape of the language decoder and where its MoE layers sit."""

    vocab_size: int = 512
    """Vocabulary size (rows of the embedding and the LM head)."""
    dim: int = 128
    """Model width d_model."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads of a dense attention layer (MoA: total over all experts)."""
    n_kv_heads: int = 2
    """Key/value heads (GQA); must divide n_heads. MoA shares these across experts."""
    hidden: int = 344
    """Hidden width of the dense SwiGLU FFN (and of each expert unless ffn_moe.expert_hidden is set)."""
    max_seq_len: int = 512
    """Longest sequence (prompt + generated tokens) the model accepts."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the LM head weight with the token embedding."""
    init_std: float | None = None
    """Std of the N(0, std) init of linears and embeddings trained from scratch (checkpoints overwrite it). None:
    sqrt(2 / (5 dim)), the width-aware "small init" of litgpt and GPT-NeoX (0.056 at dim 128). GPT-2's fixed 0.02
    is 2.8x smaller at dim 128: attention logits start near uniform and query/key gradients (each proportional
    to the other's weights) near zero, so attention learns to look things up late or never."""
    attn_bias: bool = False
    """Biases on the q/k/v projections (Qwen2); o_proj never has one."""
    ffn_moe: MoEConfig | None = None
    """MoE config of the FFN layers; None keeps every FFN dense."""
    ffn_moe_layers: str = "every_2"
    """Layers with a MoE FFN when ffn_moe is set: 'none', 'all', 'every_N', 'last_N', 'first_N', '0,3'."""
    attn_moe: MoEConfig | None = None
    """Mixture-of-attention-heads config; None: dense. num_experts (+ num_shared_experts: head groups every token
    runs at weight 1) must divide n_heads / n_kv_heads."""
    attn_moe_layers: str = "none"
    """Which layers get MoA when attn_moe is set (same syntax as ffn_moe_layers)."""
    head_dim: int = 0
    """Per-head width; 0 means dim // n_heads (set it for checkpoints such as Mistral-Nemo)."""

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def moe_ffn_layer_ids(self) -> list[int]:
        if self.ffn_moe is None:
            return []
        return select_layers(self.ffn_moe_layers, self.n_layers, "ffn_moe_layers")

    def moa_layer_ids(self) -> list[int]:
        if self.attn_moe is None:
            return []
        return select_layers(self.attn_moe_layers, self.n_layers, "attn_moe_layers")

    def validate(self) -> "DecoderConfig":
        """Raise ValueError (MoEConfigError for MoE fields) naming the field when the shape cannot work."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"decoder.{name} must be >= 1, got {getattr(self, name)}")
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"decoder.init_std must be > 0 (or None for sqrt(2 / (5 dim))), got {self.init_std}")
        if not self.head_dim and self.dim % self.n_heads:
            raise ValueError(f"decoder.dim={self.dim} must be divisible by n_heads={self.n_heads} "
                             "(or set head_dim)")
        if self.head_size % 2:
            raise ValueError(f"decoder.head_dim={self.head_size} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"decoder.n_heads={self.n_heads} must be divisible by "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.ffn_moe is not None:
            self.ffn_moe.validate(causal=True, site="decoder.ffn_moe")
            self.moe_ffn_layer_ids()
        if self.attn_moe is not None:
            self.attn_moe.validate(causal=True, site="decoder.attn_moe")
            if self.attn_moe.expert_hidden:
                raise MoEConfigError("decoder.attn_moe.expert_hidden is not used by mixture-of-attention (an expert "
                                     "is a group of heads of head_dim); leave it 0")
            if self.attn_moe.upcycle_reinit:
                raise MoEConfigError("decoder.attn_moe.upcycle_reinit is not used by mixture-of-attention (upcycling "
                                     "splits the dense heads among the experts: nothing is copied twice); leave it 0")
            self.moa_layer_ids()
            moa_heads_per_group(self.n_heads, self.n_kv_heads, self.attn_moe, "decoder.attn_moe")
        return self


@dataclass
class DecoderOutput:
    logits: Tensor  # (B, T, vocab)
    routing: list[RoutingResult]  # one per MoA / MoE layer, in layer order (attention before ffn)
    cache: "KVCache | None"
    hidden: Tensor  # (B, T, D) final hidden states after the last norm


class KVCache:
    """Preallocated per-layer keys/values (B, n_kv_heads, max_len, head_dim) and the filled length.

    MoA layers cache only their shared K/V, so a MoA cache has exactly the size of a dense GQA cache.
    Layers write at [length, length + T); the decoder advances `length` once all layers ran.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, *, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len, self.length, self.batch = max_len, 0, batch

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_kv, T, hd) after the current length -> filled views (B, n_kv, length+T, hd)."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def __repr__(self) -> str:
        return f"KVCache(layers={len(self.k)}, shape={tuple(self.k[0].shape)}, length={self.length})"


class StepCache:
    """A KVCache seen by one static-shape decode step: writes at `cache_position` (a device tensor) and
    returns the whole preallocated buffers, so no shape depends on how much is filled (CUDA graphs)."""

    def __init__(self, cache: KVCache, cache_position: Tensor):
        self.cache, self.pos = cache, cache_position  # pos: (T,) long positions written by this step

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, n_kv, T, hd) -> the full (B, n_kv, max_len, hd) buffers; masks hide unwritten keys."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        ck.index_copy_(2, self.pos, k.to(ck.dtype))
        cv.index_copy_(2, self.pos, v.to(cv.dtype))
        return ck, cv


class Attention(nn.Module):
    """Dense GQA attention with RoPE; projection names match Hugging Face Llama."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttnMask, cache=None, layer_idx: int = 0,
                **_) -> tuple[Tensor, None]:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k, v = shared_kv(self, x, cos, sin, cache, layer_idx)
        o = sdpa(q, k, v, mask)  # (B, H, T, hd)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)), None


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, moa: bool, moe: bool):
        super().__init__()
        hd = cfg.head_size
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        if moa:
            self.self_attn = MoAAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, hd, cfg.attn_moe,
                                          bias=cfg.attn_bias, layer=layer)
        else:
            self.self_attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, hd, cfg.attn_bias)
        if moe:
            self.mlp = MoEFFN(cfg.dim, cfg.hidden, cfg.ffn_moe, "swiglu", causal=True, site="ffn",
                              layer=layer)
        else:
            self.mlp = SwiGLU(cfg.dim, cfg.hidden)
        self.layer = layer

    def forward(self, x, cos, sin, mask, cache, *, token_mask, modality) -> tuple[Tensor, list[RoutingResult]]:
        """-> (x, this block's routing results). Results come back through the call (no list argument to append
        to), so an activation-checkpointing recompute adds nothing to the forward's results."""
        routing: list[RoutingResult] = []
        h, r = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer,
                              token_mask=token_mask, modality=modality)
        if r is not None:
            routing.append(r)
        x = x + h
        if isinstance(self.mlp, MoEFFN):
            h, r = self.mlp(self.post_attention_layernorm(x), token_mask, modality)
            routing.append(r)
        else:
            h = self.mlp(self.post_attention_layernorm(x))
        return x + h, routing


class Decoder(nn.Module):
    """Causal LM: token embedding, blocks, final RMSNorm, LM head (tied to the embedding by default)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        moa, moe = set(cfg.moa_layer_ids()), set(cfg.moe_ffn_layer_ids())
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i, i in moa, i in moe) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """N(0, std) for linears, embeddings and packed experts (default: `cfg.init_std`, or sqrt(2 / (5 dim))
        when that is None); noisy-gating weights stay zero."""
        if std is None:
            std = self.cfg.init_std if self.cfg.init_std is not None else math.sqrt(2.0 / (5.0 * self.cfg.dim))
        init_linear_(self, std)
        for m in self.modules():
            if isinstance(m, GroupedLinear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Router) and m.noise_gate is not None:
                nn.init.zeros_(m.noise_gate.weight)

    # ------------------------------------------------------------------ helpers
    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                  device=None) -> KVCache:
        """Empty KV cache for `batch` sequences of up to `max_len` (default max_seq_len) positions."""
        cfg = self.cfg
        max_len = max_len or cfg.max_seq_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KV cache length {max_len} exceeds decoder.max_seq_len={cfg.max_seq_len}")
        w = self.layers[0].self_attn.k_proj.weight
        return KVCache(cfg.n_layers, batch, max_len, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_size,
                       dtype=dtype or w.dtype, device=device or w.device)

    def rope(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (B, T, hd) in float32 for integer positions (computed on the fly: no table to outgrow)."""
        hd = self.cfg.head_size
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, device=position_ids.device,
                                                               dtype=torch.float32) / hd))
        freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    @staticmethod
    def build_mask(attention_mask: Tensor | None, B: int, T: int, past: int, device,
                   segment_ids: Tensor | None = None) -> AttnMask:
        """Causal + padding mask over keys [0, past + T); is_causal fast path without padding or cache.
        With `segment_ids` (no cache) a token of segment k > 0 also cannot see other segments k' > 0."""
        if segment_ids is not None:
            seg = segment_ids
            allowed = torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))[None, None]
            allowed = allowed & ((seg[:, None, None, :] == 0) | (seg[:, None, None, :] == seg[:, None, :, None]))
            if attention_mask is not None:
                allowed = allowed & attention_mask.bool()[:, None, None, :]
            eye = torch.eye(T, dtype=torch.bool, device=device)[None, None]
            return AttnMask(allowed | eye, False)  # padding queries see themselves (finite, unused)
        if attention_mask is None or bool(attention_mask.all()):
            if past == 0:
                return AttnMask(None, T > 1)
            if T == 1:
                return AttnMask(None, False)
        elif past == 0 and T > 1 and is_right_padded(attention_mask):
            # Training batches: every padding key comes after every real query, so the causal mask alone
            # keeps real queries off it and SDPA skips the masked blocks. Padding queries also see earlier
            # padding (finite; their outputs reach only later padding, which MoE layers skip and no loss reads).
            return AttnMask(None, True)
        S = past + T
        kpos = torch.arange(S, device=device)
        qpos = past + torch.arange(T, device=device)
        allowed = kpos[None, :] <= qpos[:, None]  # (T, S)
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
            # A padding query sees no real key; let it see itself so SDPA stays finite (its output is unused).
            allowed = allowed | (kpos[None, :] == qpos[:, None])[None, None]
        return AttnMask(allowed.expand(B, 1, T, S) if allowed.shape[0] == 1 else allowed, False)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None, *, position_ids: Tensor | None = None,
                modality: Tensor | None = None, cache: KVCache | None = None,
                segment_ids: Tensor | None = None, logits_mask: Tensor | None = None) -> DecoderOutput:
        """input_ids (B, T) or inputs_embeds (B, T, D); attention_mask (B, past + T), 1 = real token;
        position_ids (B, T), default cumsum(mask) - 1 (left padding works); modality (B, T) long.

        segment_ids (B, T) long, training without a cache: shared-prefix packing. Segment 0 is a prefix every
        token sees; each segment k > 0 sees only the prefix and itself, and its positions restart right after
        the prefix, so it computes exactly what it would as the only continuation of the prefix.

        logits_mask (B, T) bool: logits only where True, as (N, V) in row-major order (training needs them only
        where a label is supervised; the LM head and its softmax are a large share of a small model's step)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if cache is not None and S > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; cannot add {T} tokens after {past}")
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds decoder.max_seq_len={self.cfg.max_seq_len}")
        token_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask must be (batch, past + new) = {(B, S)} (HF convention), "
                                 f"got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.bool()
            token_mask = attention_mask[:, past:]
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (shared-prefix packing) is for training forwards without a KV cache")
            if segment_ids.shape != (B, T):
                raise ValueError(f"segment_ids must be (batch, tokens) = {(B, T)}, got {tuple(segment_ids.shape)}")
            if position_ids is None:
                position_ids = segment_positions(segment_ids, attention_mask)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
            else:
                position_ids = torch.arange(past, S, device=x.device).expand(B, T)
        cos, sin = self.rope(position_ids)
        mask = self.build_mask(attention_mask, B, T, past, x.device, segment_ids)
        routing: list[RoutingResult] = []
        for block in self.layers:
            x, block_routing = block(x, cos, sin, mask, cache, token_mask=token_mask, modality=modality)
            routing += block_routing
        if cache is not None:
            cache.advance(T)
        h = self.norm(x)
        if logits_mask is not None:
            if logits_mask.shape != (B, T):
                raise ValueError(f"logits_mask must be (batch, tokens) = {(B, T)}, got {tuple(logits_mask.shape)}")
            return DecoderOutput(logits=self.lm_head(h[logits_mask]), routing=routing, cache=cache, hidden=h)
        return DecoderOutput(logits=self.lm_head(h), routing=routing, cache=cache, hidden=h)


    def decode_step(self, input_ids: Tensor, cache: KVCache, cache_position: Tensor, key_mask: Tensor,
                    position_ids: Tensor, modality: Tensor | None = None) -> Tensor:
        """One cached decode step with static shapes, no host reads (compile with mode="reduce-overhead" to
        replay it as a CUDA graph) -> (B, V) logits of the last new token.

        input_ids (B, T) new tokens; cache_position (T,) long: cache slots they fill (the cache's `length` is
        not used or advanced); key_mask (B, cache.max_len) bool: keys each row may see, the new slots included
        (for T > 1 the caller also keeps later new tokens out, e.g. T = 1); position_ids (B, T) RoPE positions.
        """
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids)
        mask = AttnMask(key_mask[:, None, None, :], False)  # (B, 1, 1, max_len) broadcast over queries
        step = StepCache(cache, cache_position)
        for block in self.layers:
            x, _ = block(x, cos, sin, mask, step, token_mask=None, modality=modality)  # routing unused in decode
        return self.lm_head(self.norm(x[:, -1]))


def is_right_padded(attention_mask: Tensor) -> bool:
    """True when no row has a real token after a padding one (B, S)."""
    am = attention_mask.bool()
    return not bool((am[:, 1:] & ~am[:, :-1]).any())


def segment_positions(segment_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """(B, T) positions for shared-prefix packing: the prefix (segment 0) counts 0, 1, ...; every later
    segment restarts at the prefix length. Padding (mask 0) gets position 0."""
    real = torch.ones_like(segment_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    seg = segment_ids.long().clamp_min(0)
    n_seg = int(seg.max()) + 1 if seg.numel() else 1
    onehot = F.one_hot(seg, n_seg) * real[..., None]  # (B, T, K)
    rank = onehot.cumsum(1).gather(2, seg[..., None]).squeeze(-1) - 1  # index within its own segment
    prefix_len = (real & (seg == 0)).sum(1, keepdim=True)
    pos = torch.where(seg == 0, rank, prefix_len + rank)
    return pos.masked_fill(~real, 0).clamp_min(0)


@torch.no_grad()
def upcycle_decoder(dense: Decoder, cfg: DecoderConfig) -> Decoder:
    """A decoder with `cfg`'s MoA/MoE layers initialised from a dense decoder of the same shape.

    MoE FFNs copy the dense MLP into every expert (exact with renormalised routing); MoA splits the dense
    heads into experts (exact with all experts at unit weight); routers stay freshly initialised; every
    other tensor is copied.
    """
    dc = dense.cfg
    for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden", "head_size", "attn_bias",
              "tie_embeddings", "rope_theta", "norm_eps"):
        if getattr(dc, f) != getattr(cfg, f):
            raise ValueError(f"upcycle: decoder.{f} differs: dense {getattr(dc, f)} vs target "
                             f"{getattr(cfg, f)}")
    if cfg.ffn_moe is not None and cfg.ffn_moe.expert_hidden not in (0, dc.hidden):
        raise MoEConfigError(f"upcycle: ffn_moe.expert_hidden={cfg.ffn_moe.expert_hidden} must be 0 or the "
                             f"dense hidden width {dc.hidden} to copy the dense MLP into each expert")
    w = dense.embed_tokens.weight
    model = Decoder(cfg).to(device=w.device, dtype=w.dtype)
    model.embed_tokens.load_state_dict(dense.embed_tokens.state_dict())
    model.norm.load_state_dict(dense.norm.state_dict())
    if not cfg.tie_embeddings:
        model.lm_head.weight.copy_(dense.lm_head.weight)
    for new, old in zip(model.layers, dense.layers):
        new.input_layernorm.load_state_dict(old.input_layernorm.state_dict())
        new.post_attention_layernorm.load_state_dict(old.post_attention_layernorm.state_dict())
        for name in ("self_attn", "mlp"):
            n, o = getattr(new, name), getattr(old, name)
            if type(n) is type(o):
                n.load_state_dict(o.state_dict())
            elif isinstance(o, (Attention, SwiGLU)):
                n.upcycle_(o)
            else:
                raise ValueError(f"upcycle: layers.{new.layer}.{name} is {type(o).__name__} in the source; "
                                 f"cannot turn it into {type(n).__name__}")
    return model


__all__ = ["DecoderConfig", "DecoderOutput", "Decoder", "DecoderBlock", "Attention", "KVCache", "StepCache",
           "upcycle_decoder"]

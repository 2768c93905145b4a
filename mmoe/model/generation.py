"""Batched generation with the decoder's KV cache: one prefill, then one token per step.

Greedy when temperature == 0, else temperature + nucleus (top-p) sampling. Each row stops at its first
stop token (which is returned; later positions hold pad_token_id), and the loop ends once every row stopped.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from mmoe.constants import MODALITY_TEXT

from .decoder import Decoder


def sample_next(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits -> (B,) tokens: argmax at temperature 0, else top-p sampling of softmax(logits / T)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = (sp.cumsum(-1) - sp) >= top_p  # mass before this token reaches top_p; top-1 always kept
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(decoder: Decoder, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
             attention_mask: Tensor | None = None, modality: Tensor | None = None, *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
             pad_token_id: int = 0, stream_callback: Callable[[int, Tensor], None] | None = None,
             generator: torch.Generator | None = None, static: bool = False,
             step_fn: Callable[..., Tensor] | None = None) -> Tensor:
    """Generate up to `max_new_tokens` tokens after a (left-padded) prompt -> (B, n_new) long.

    The prompt is `input_ids` (B, T) or `inputs_embeds` (B, T, D) (the VLM's spliced image + text
    embeddings) with `attention_mask` (B, T), 1 = real token; `modality` (B, T) labels prompt tokens for
    the routers (generated tokens are text). `stream_callback(step, tokens)` sees each step's (B,) tokens.
    The decoder runs in eval mode (restored afterwards).

    static=True decodes with `Decoder.decode_step`: fixed shapes (the whole preallocated cache, a key mask,
    device-side positions), so `step_fn` -- the same call compiled, e.g.
    `torch.compile(decoder.decode_step, fullgraph=True, mode="reduce-overhead")` -- replays one CUDA graph per
    step. Giving `step_fn` implies static.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    prompt = input_ids if input_ids is not None else inputs_embeds
    B, T = prompt.shape[:2]
    limit = decoder.cfg.max_seq_len
    if T > limit:
        raise ValueError(f"prompt length {T} exceeds the decoder context limit max_seq_len={limit}")
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} = {T + max_new_tokens} "
                         f"exceeds the decoder context limit max_seq_len={limit}")
    device = prompt.device
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
    attention_mask = attention_mask.bool()
    stops = torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=device)
    was_training = decoder.training
    decoder.eval()
    try:
        dtype = inputs_embeds.dtype if inputs_embeds is not None else None
        cache = decoder.new_cache(B, max_len=T + max_new_tokens, dtype=dtype, device=device)
        out = decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      modality=modality, cache=cache)
        logits = out.logits[:, -1]
        text = None if modality is None else torch.full((B, 1), MODALITY_TEXT, dtype=torch.long,
                                                           device=device)
        static = static or step_fn is not None
        if static:
            step_fn = step_fn or decoder.decode_step
            if step_fn is not decoder.decode_step:  # compiled: the cache is mutated in place, never copied
                for t in cache.k + cache.v:
                    torch._dynamo.mark_static_address(t)
            max_len = cache.max_len
            key_mask = torch.zeros(B, max_len, dtype=torch.bool, device=device)
            key_mask[:, :T] = attention_mask
            next_pos = attention_mask.long().sum(-1, keepdim=True)  # (B, 1) RoPE position of the next token
            slot = torch.full((1,), T, dtype=torch.long, device=device)  # cache slot of the next token
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        ones = torch.ones(B, 1, dtype=torch.bool, device=device)
        tokens: list[Tensor] = []
        for step in range(max_new_tokens):
            sampled = sample_next(logits, temperature, top_p, generator)
            nxt = torch.where(finished, torch.full_like(sampled, pad_token_id), sampled)
            tokens.append(nxt)
            if stream_callback is not None:
                stream_callback(step, nxt)
            if stops.numel():
                finished |= torch.isin(nxt, stops)
                if bool(finished.all()):
                    break
            if step == max_new_tokens - 1:
                break
            # finished rows are fed their sampled token (pad_token_id may not be a valid id); output is padded
            if static:
                key_mask = key_mask.index_fill(1, slot, True)
                if step_fn is not decoder.decode_step:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are consumed
                logits = step_fn(sampled[:, None], cache, slot, key_mask, next_pos, text)
                slot, next_pos = slot + 1, next_pos + 1
                continue
            attention_mask = torch.cat([attention_mask, ones], dim=1)
            logits = decoder(input_ids=sampled[:, None], attention_mask=attention_mask, modality=text,
                             cache=cache).logits[:, -1]
    finally:
        decoder.train(was_training)
    if not tokens:
        return torch.zeros(B, 0, dtype=torch.long, device=device)
    return torch.stack(tokens, dim=1)


__all__ = ["generate", "sample_next"]

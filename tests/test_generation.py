"""generate(): greedy equals step-by-step recompute, stop tokens, sampling, streaming, limits."""

from __future__ import annotations

import pytest
import torch

from mmoe.model.decoder import Decoder, DecoderConfig
from mmoe.model.generation import generate
from mmoe.model.moe import MoEConfig

V = 96


def make(**kw) -> Decoder:
    cfg = dict(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=96, max_seq_len=48,
               attn_moe=MoEConfig(num_experts=2, top_k=1), attn_moe_layers="all",
               ffn_moe=MoEConfig(num_experts=4, top_k=2), ffn_moe_layers="1")
    cfg.update(kw)
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(**cfg)).eval()
    m.reset_parameters(std=0.1)
    return m


def greedy_by_recompute(m: Decoder, prompt: torch.Tensor, n: int) -> torch.Tensor:
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.shape[1]:]


def left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):], mask[b, T - len(s):] = s, 1
    return ids, mask


def test_greedy_equals_argmax_of_full_recompute():
    m = make()
    prompt = torch.randint(0, V, (2, 7))
    out = generate(m, prompt, max_new_tokens=12)
    assert out.shape == (2, 12)
    assert torch.equal(out, greedy_by_recompute(m, prompt, 12))


def test_left_padded_batch_and_inputs_embeds_equal_each_prompt_alone():
    m = make()
    seqs = [torch.randint(1, V, (n,)) for n in (9, 3, 6)]
    ids, mask = left_pad(seqs)
    out = generate(m, ids, attention_mask=mask, max_new_tokens=8)
    with torch.no_grad():
        emb = m.embed_tokens(ids)
    out_emb = generate(m, inputs_embeds=emb, attention_mask=mask, modality=torch.zeros_like(ids), max_new_tokens=8)
    for b, s in enumerate(seqs):
        alone = greedy_by_recompute(m, s[None], 8)[0]
        assert torch.equal(out[b], alone), b
        assert torch.equal(out_emb[b], alone), b


def counting_decoder() -> Decoder:
    """A decoder whose next token is always current + 1: blocks output 0, one-hot embeddings, shifted head."""
    m = Decoder(DecoderConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=32,
                              max_seq_len=64, tie_embeddings=False)).eval()
    with torch.no_grad():
        for lyr in m.layers:
            lyr.self_attn.o_proj.weight.zero_()
            lyr.mlp.down_proj.weight.zero_()
        m.embed_tokens.weight.copy_(torch.eye(64))
        m.lm_head.weight.copy_(torch.eye(64).roll(1, dims=0))  # logit of token j = embedding of j - 1
    return m


def test_stop_tokens_pad_and_early_exit():
    m = counting_decoder()
    prompt = torch.tensor([[5, 10], [7, 20]])
    free = generate(m, prompt, max_new_tokens=6)
    assert free.tolist() == [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26]]
    # row 0 hits stop token 13 at step 3; row 1 keeps going until 25 (step 5), then the loop ends early
    out = generate(m, prompt, max_new_tokens=20, stop_token_ids=(13, 25), pad_token_id=-1)
    assert out.tolist() == [[11, 12, 13, -1, -1], [21, 22, 23, 24, 25]]
    # one row never stops: runs to max_new_tokens
    out = generate(m, prompt, max_new_tokens=6, stop_token_ids=(13,), pad_token_id=0)
    assert out.tolist() == [[11, 12, 13, 0, 0, 0], [21, 22, 23, 24, 25, 26]]


def test_stream_callback_sees_every_step():
    m = make()
    seen = []
    out = generate(m, torch.randint(0, V, (2, 4)), max_new_tokens=5,
                   stream_callback=lambda step, tok: seen.append((step, tok.clone())))
    assert [s for s, _ in seen] == list(range(5))
    assert torch.equal(torch.stack([t for _, t in seen], 1), out)


def test_sampling_reproducible_and_tiny_top_p_is_greedy():
    m = make()
    prompt = torch.randint(0, V, (3, 5))
    a = generate(m, prompt, max_new_tokens=10, temperature=1.5, generator=torch.Generator().manual_seed(1))
    b = generate(m, prompt, max_new_tokens=10, temperature=1.5, generator=torch.Generator().manual_seed(1))
    c = generate(m, prompt, max_new_tokens=10, temperature=1.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(m, prompt, max_new_tokens=10)
    assert not torch.equal(a, greedy)
    tiny = generate(m, prompt, max_new_tokens=10, temperature=1.0, top_p=1e-6,
                    generator=torch.Generator().manual_seed(3))
    assert torch.equal(tiny, greedy)


def test_context_limit_errors():
    m = make()  # max_seq_len 48
    with pytest.raises(ValueError, match=r"prompt length 50 exceeds .*max_seq_len=48"):
        generate(m, torch.zeros(1, 50, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"prompt length 40 \+ max_new_tokens 10 = 50 exceeds .*max_seq_len=48"):
        generate(m, torch.zeros(1, 40, dtype=torch.long), max_new_tokens=10)
    assert generate(m, torch.zeros(1, 40, dtype=torch.long), max_new_tokens=8).shape == (1, 8)


def test_generate_restores_training_mode():
    m = make().train()
    generate(m, torch.randint(0, V, (1, 3)), max_new_tokens=2)
    assert m.training

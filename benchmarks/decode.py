"""Decode latency of a small MoA + MoE decoder with the KV cache.

Measures (1) per-token decode latency after a 64- and a 1024-token context (should be nearly flat: each
step attends over the cache but recomputes nothing), and (2) the speed-up of cached over uncached greedy
generation of 64 tokens after a 512-token prompt. The last stdout line is one JSON object.

    python benchmarks/decode.py [--device cuda] [--dtype bfloat16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mmoe.model.decoder import Decoder, DecoderConfig
from mmoe.model.generation import generate
from mmoe.model.moe import MoEConfig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(device, dtype) -> Decoder:
    cfg = DecoderConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, hidden=688,
                        max_seq_len=1536, attn_moe=MoEConfig(num_experts=4, top_k=2), attn_moe_layers="all",
                        ffn_moe=MoEConfig(num_experts=4, top_k=2), ffn_moe_layers="every_2")
    torch.manual_seed(0)
    return Decoder(cfg).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def per_token_latency(m: Decoder, context: int, steps: int, device) -> float:
    """Median seconds per decoded token after a `context`-token prefill (batch 1)."""
    ids = torch.randint(0, m.cfg.vocab_size, (1, context), device=device)
    cache = m.new_cache(1, max_len=context + steps + 4)
    logits = m(ids, cache=cache).logits[:, -1]
    tok = logits.argmax(-1, keepdim=True)
    for _ in range(3):  # warm-up steps
        tok = m(tok, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        tok = m(tok, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)  # median: robust to a noisy shared CPU


@torch.no_grad()
def uncached_greedy(m: Decoder, prompt: torch.Tensor, n: int) -> torch.Tensor:
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.shape[1]:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per context length")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch default). 1 by default: a decode step is ~100 tiny "
                         "ops, and on a shared VM every OpenMP barrier can stall on a descheduled core")
    args = ap.parse_args()
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    m = build(device, dtype)

    lat = {c: per_token_latency(m, c, args.steps, device) for c in (64, 1024)}
    for c, s in lat.items():
        print(f"decode latency @ context {c:5d}: {s * 1e3:7.2f} ms/token")

    prompt = torch.randint(0, m.cfg.vocab_size, (1, 512), device=device)
    generate(m, prompt[:, :16], max_new_tokens=4)  # warm-up
    t_cached = float("inf")
    for _ in range(3):  # best of 3: the cached run is short and a shared CPU is noisy
        sync(device)
        t0 = time.perf_counter()
        cached = generate(m, prompt, max_new_tokens=64)
        sync(device)
        t_cached = min(t_cached, time.perf_counter() - t0)
    t0 = time.perf_counter()
    uncached = uncached_greedy(m, prompt, 64)
    sync(device)
    t_uncached = time.perf_counter() - t0
    agree = float((cached == uncached).float().mean())
    print(f"64 tokens after a 512-token prompt: cached {t_cached:.2f} s, uncached {t_uncached:.2f} s, "
          f"speed-up {t_uncached / t_cached:.1f}x (token agreement {agree:.2f})")
    print(json.dumps({
        "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "model": "dim256 x 4 layers, MoA 4 experts top-2 (all layers) + MoE FFN 4 experts top-2 (every_2)",
        "decode_ms_per_token_ctx64": round(lat[64] * 1e3, 3),
        "decode_ms_per_token_ctx1024": round(lat[1024] * 1e3, 3),
        "latency_ratio_1024_over_64": round(lat[1024] / lat[64], 3),
        "cached_gen64_after512_s": round(t_cached, 3), "uncached_gen64_after512_s": round(t_uncached, 3),
        "cached_speedup": round(t_uncached / t_cached, 2), "greedy_token_agreement": agree,
    }))


if __name__ == "__main__":
    main()

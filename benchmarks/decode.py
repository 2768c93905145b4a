"""Decode latency of a small MoA + MoE decoder with the KV cache.

Measures (1) per-token decode latency after a short and a long context (should be nearly flat: each step
attends over the cache but recomputes nothing), and (2) the speed-up of cached over uncached greedy generation
of N tokens after a P-token prompt. Cached and uncached generation are timed the same way: one untimed warm-up
call each, then `--repeats` rounds *interleaved* (cached, uncached, cached, ...), median of each, so machine
noise and warm caches hit both alike. The last stdout line is one JSON object, also written with date, commit
and machine to benchmarks/results/decode-<cpu|cuda>.json.

    python benchmarks/decode.py [--device cuda] [--dtype bfloat16] [--threads 1]
    python benchmarks/decode.py --tiny            # seconds: the schema check the test suite runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _util import finish, measure, sync  # noqa: E402

from mmoe.model.decoder import Decoder, DecoderConfig  # noqa: E402
from mmoe.model.generation import generate  # noqa: E402
from mmoe.model.moe import MoEConfig  # noqa: E402

FULL = dict(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, hidden=688, max_seq_len=1536)
TINY = dict(vocab_size=128, dim=32, n_layers=2, n_heads=8, n_kv_heads=2, hidden=64, max_seq_len=128)


def build(device, dtype, tiny: bool = False) -> Decoder:
    cfg = DecoderConfig(**(TINY if tiny else FULL), attn_moe=MoEConfig(num_experts=4, top_k=2),
                        attn_moe_layers="all", ffn_moe=MoEConfig(num_experts=4, top_k=2), ffn_moe_layers="every_2")
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per context length")
    ap.add_argument("--contexts", default="64,1024", help="short,long context lengths for the latency ratio")
    ap.add_argument("--prompt", type=int, default=512, help="prompt length of the cached/uncached comparison")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated in the cached/uncached comparison")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds of cached and uncached")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer dim-32 model and short lengths (schema check)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch default). 1 by default: a decode step is ~100 tiny "
                         "ops, and on a shared VM every OpenMP barrier can stall on a descheduled core")
    args = ap.parse_args(argv)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    m = build(device, dtype, args.tiny)
    short, long = (int(c) for c in args.contexts.split(","))
    if long + args.steps + 4 > m.cfg.max_seq_len or args.prompt + args.new_tokens > m.cfg.max_seq_len:
        raise SystemExit(f"--contexts/--prompt/--new-tokens exceed the model's max_seq_len={m.cfg.max_seq_len}")

    lat = {c: per_token_latency(m, c, args.steps, device) for c in (short, long)}
    for c, s in lat.items():
        print(f"decode latency @ context {c:5d}: {s * 1e3:7.2f} ms/token")

    prompt = torch.randint(0, m.cfg.vocab_size, (1, args.prompt), device=device)
    n = args.new_tokens
    out: dict[str, torch.Tensor] = {}

    def cached():
        out["cached"] = generate(m, prompt, max_new_tokens=n)

    def uncached():
        out["uncached"] = uncached_greedy(m, prompt, n)

    t = measure({"cached": cached, "uncached": uncached}, repeats=args.repeats, warmup=1, device=device)
    t_cached, t_uncached = t["cached"]["median"], t["uncached"]["median"]
    agree = float((out["cached"] == out["uncached"]).float().mean())
    print(f"{n} tokens after a {args.prompt}-token prompt (median of {args.repeats} interleaved rounds each): "
          f"cached {t_cached:.3f} s, uncached {t_uncached:.3f} s, speed-up {t_uncached / t_cached:.1f}x "
          f"(token agreement {agree:.2f})")
    cfg = m.cfg
    return finish("decode" + ("_tiny" if args.tiny else ""), {
        "benchmark": "decode", "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "model": f"dim{cfg.dim} x {cfg.n_layers} layers, MoA 4 experts top-2 (all layers) + MoE FFN 4 experts "
                 "top-2 (every_2)",
        "contexts": [short, long], "prompt_tokens": args.prompt, "new_tokens": n, "repeats": args.repeats,
        "decode_ms_per_token_short": round(lat[short] * 1e3, 3),
        "decode_ms_per_token_long": round(lat[long] * 1e3, 3),
        "latency_ratio_long_over_short": round(lat[long] / lat[short], 3),
        "cached_gen_s": round(t_cached, 4), "uncached_gen_s": round(t_uncached, 4),
        "cached_gen_s_min": round(t["cached"]["min"], 4), "uncached_gen_s_min": round(t["uncached"]["min"], 4),
        "cached_speedup": round(t_uncached / t_cached, 2), "greedy_token_agreement": agree,
    }, device)


if __name__ == "__main__":
    main()

"""Expert-parallel benchmark on CPU: all-to-all bytes vs theory, step time at ep=1 vs ep=2 (2 gloo processes).

    python benchmarks/expert_parallel.py [--tokens 1024] [--dim 256] [--layers 4] [--steps 6]

Model: a residual stack of MoE FFN layers (mmoe MoEFFN, SwiGLU experts, top-k of E, dropless), fp32. Both
runs use 2 processes and the same per-rank batch (T tokens per rank), so the global batch is identical:
* ep=1: plain data parallel (every rank holds all E experts; DDP all-reduces every gradient);
* ep=2: experts sharded (E/2 per rank) with the AllToAllDispatcher, experts excluded from DDP, expert grads
  reduced with the EP rule.

Bytes: the dispatcher counts what each forward all-to-all sends to *other* ranks. The theory for uniform
routing is 2*k*T*H*(1-1/ep) elements per MoE layer per rank (dispatch + combine; each of the k*T assignments
leaves the rank with probability 1-1/ep); the backward moves the same amount again. The last stdout line is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402


class Stack(nn.Module):
    def __init__(self, dim: int, hidden: int, layers: int, E: int, k: int):
        super().__init__()
        from mmoe.model.moe import MoEConfig, MoEFFN

        cfg = MoEConfig(num_experts=E, top_k=k)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.moes = nn.ModuleList(MoEFFN(dim, hidden, cfg, "swiglu", causal=False, site="ffn", layer=i)
                                  for i in range(layers))
        for m in self.moes:
            nn.init.normal_(m.router.gate.weight, std=0.002)  # near-uniform routing, as the theory assumes

    def forward(self, x):
        for n, m in zip(self.norms, self.moes):
            x = x + m(n(x))[0]
        return x


class Root(nn.Module):
    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, x):
        return self.stack(x).pow(2).mean()


def _worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    import mmoe.parallel.dispatcher as D
    from mmoe.parallel import enable_expert_parallel, finalize_expert_grads, wrap_ddp
    from mmoe.parallel.expert_parallel import dispatchers

    a2a_time = [0.0]
    raw_a2a = D._a2a

    def timed_a2a(*a, **kw):
        t0 = time.perf_counter()
        out = raw_a2a(*a, **kw)
        a2a_time[0] += time.perf_counter() - t0
        return out

    D._a2a = timed_a2a
    results = {}
    B, S = args.tokens // 128 or 1, min(128, args.tokens)
    for ep in (1, 2):
        torch.manual_seed(0)
        root = Root(Stack(args.dim, args.hidden, args.layers, args.experts, args.top_k))
        if ep > 1:
            enable_expert_parallel(root.stack, ep)
            model = wrap_ddp(root)
        else:
            model = nn.parallel.DistributedDataParallel(root)
        opt = torch.optim.AdamW(root.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(B, S, args.dim, generator=g)
        times = []
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                for d in dispatchers(root):
                    d.reset_stats()
                a2a_time[0] = 0.0
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = model(x)
            loss.backward()
            finalize_expert_grads(root)
            opt.step()
            times.append(time.perf_counter() - t0)
        steps = args.steps
        res = {"step_s": sum(times[args.warmup:]) / steps,
               "params_per_rank": sum(p.numel() for p in root.parameters())}
        ds = dispatchers(root)
        if ds:
            remote_bytes = sum(d.stats["sent_bytes_remote"] for d in ds) / steps
            remote_rows = sum(d.stats["sent_rows_remote"] for d in ds) / steps
            res.update(a2a_fwd_remote_bytes_per_step=remote_bytes,
                       a2a_fwd_remote_elements_per_step=remote_rows * args.dim,
                       a2a_fwd_seconds_per_step=a2a_time[0] / steps,
                       recv_tokens_per_layer=[int(d.last_recv_tokens_per_expert.sum()) for d in ds])
        results[f"ep{ep}"] = res
        del model, root, opt
    torch.save(results, f"{out_path}.{rank}")
    dist.destroy_process_group()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank per step (T)")
    ap.add_argument("--dim", type=int, default=256, help="hidden size H")
    ap.add_argument("--hidden", type=int, default=512, help="expert FFN width")
    ap.add_argument("--layers", type=int, default=4, help="MoE layers")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res")
        mp.spawn(_worker, args=(world, port, args, out), nprocs=world, join=True)
        per_rank = [torch.load(f"{out}.{r}") for r in range(world)]
    T, H, k, ep, L = args.tokens, args.dim, args.top_k, 2, args.layers
    theory_elems = 2 * k * T * H * (1 - 1 / ep) * L  # per rank per step, forward
    meas_elems = sum(r["ep2"]["a2a_fwd_remote_elements_per_step"] for r in per_rank) / world
    meas_bytes = sum(r["ep2"]["a2a_fwd_remote_bytes_per_step"] for r in per_rank) / world
    step1 = max(r["ep1"]["step_s"] for r in per_rank)
    step2 = max(r["ep2"]["step_s"] for r in per_rank)
    summary = {
        "benchmark": "expert_parallel", "device": "cpu", "backend": "gloo", "world": world,
        "tokens_per_rank": T, "hidden": H, "top_k": k, "experts": args.experts, "moe_layers": L, "dtype": "float32",
        "a2a_theory_elements_per_rank_step_fwd": theory_elems,
        "a2a_measured_elements_per_rank_step_fwd": meas_elems,
        "a2a_measured_bytes_per_rank_step_fwd": meas_bytes,
        "a2a_measured_over_theory": meas_elems / theory_elems,
        "a2a_bytes_per_rank_step_fwd_plus_bwd": 2 * meas_bytes,
        "a2a_fwd_seconds_per_step": max(r["ep2"]["a2a_fwd_seconds_per_step"] for r in per_rank),
        "step_s_ep1": step1, "step_s_ep2": step2, "ep2_over_ep1_step_time": step2 / step1,
        "params_per_rank_ep1": per_rank[0]["ep1"]["params_per_rank"],
        "params_per_rank_ep2": per_rank[0]["ep2"]["params_per_rank"],
        "recv_tokens_per_layer_rank0": per_rank[0]["ep2"]["recv_tokens_per_layer"],
        "recv_tokens_per_layer_rank1": per_rank[1]["ep2"]["recv_tokens_per_layer"],
        "wall_s": round(time.time() - t0, 1),
    }
    print(f"a2a forward: measured {meas_elems:.4g} elements/rank/step vs theory 2kTH(1-1/ep)*L = "
          f"{theory_elems:.4g} (ratio {meas_elems / theory_elems:.3f}); {meas_bytes / 2**20:.2f} MiB fwd "
          f"(+ the same in backward)")
    print(f"step time (2 gloo processes): ep=1 {step1 * 1e3:.0f} ms, ep=2 {step2 * 1e3:.0f} ms; params/rank "
          f"{summary['params_per_rank_ep1']} -> {summary['params_per_rank_ep2']}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

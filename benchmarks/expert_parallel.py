"""Expert-parallel benchmark on CPU: all-to-all bytes vs theory, step time at ep=1 vs ep=2 (2 gloo processes).

    python benchmarks/expert_parallel.py [--tokens 1024] [--dim 256] [--layers 4] [--steps 6]

Model: a residual stack of MoE FFN layers (mmoe MoEFFN, SwiGLU experts, top-k of E, dropless), fp32. Both
runs use 2 processes and the same per-rank batch (T tokens per rank), so the global batch is identical:
* ep=1: plain data parallel (every rank holds all E experts; DDP all-reduces every gradient);
* ep=2: experts sharded (E/2 per rank) with the AllToAllDispatcher, experts excluded from DDP, expert grads
  reduced with the EP rule.

Bytes: every forward all-to-all is intercepted and the bytes of the rows it is handed for *other* ranks are
added up from the tensor itself (the dispatcher's own counter is reported beside it as a cross-check). The theory
for uniform routing is 2*k*T*H*(1-1/ep) elements per MoE layer per rank (dispatch + combine; each of the k*T
assignments leaves the rank with probability 1-1/ep); the backward moves the same amount again.
Time: both models are built first and their steps run interleaved (ep=1, ep=2, then ep=2, ep=1, ...), so machine
noise hits both alike; the median step of the slowest rank is reported. The last stdout line is one JSON object,
also written with date, commit and machine to benchmarks/results/expert_parallel-cpu.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _util import finish  # noqa: E402
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


def _count_sent_bytes(counter: dict) -> None:
    """Wrap the all-to-all the dispatcher calls (functional collectives) to add up, from the tensors actually
    passed in, the bytes each call sends to *other* ranks (its rows outside this rank's own input split).
    Independent of the dispatcher's own counters, which are reported beside it as a cross-check."""
    import torch.distributed._functional_collectives as funcol

    raw = funcol.all_to_all_single

    def counting(x, output_split_sizes, input_split_sizes, group, *a, **kw):
        if counter["on"]:
            me = dist.get_rank(group) if not isinstance(group, (list, tuple)) else dist.get_rank()
            rows = x.shape[0]
            row_bytes = x[0].numel() * x.element_size() if rows else 0
            splits = list(input_split_sizes) if input_split_sizes is not None else [rows // dist.get_world_size(group)] * dist.get_world_size(group)
            counter["bytes"] += (rows - splits[me]) * row_bytes
            counter["calls"] += 1
        return raw(x, output_split_sizes, input_split_sizes, group, *a, **kw)

    funcol.all_to_all_single = counting


def _worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    from mmoe.parallel import enable_expert_parallel, finalize_expert_grads, wrap_ddp
    from mmoe.parallel.expert_parallel import dispatchers

    sent = {"on": False, "bytes": 0, "calls": 0}
    _count_sent_bytes(sent)
    B, S = args.tokens // 128 or 1, min(128, args.tokens)
    runs = {}
    for ep in (1, 2):  # both built up front: their steps are timed interleaved below
        torch.manual_seed(0)
        root = Root(Stack(args.dim, args.hidden, args.layers, args.experts, args.top_k))
        if ep > 1:
            enable_expert_parallel(root.stack, ep)
            model = wrap_ddp(root)
        else:
            model = nn.parallel.DistributedDataParallel(root)
        runs[ep] = (root, model, torch.optim.AdamW(root.parameters(), lr=1e-3))
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(B, S, args.dim, generator=g)

    def step(ep: int) -> float:
        root, model, opt = runs[ep]
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(x)
        loss.backward()
        finalize_expert_grads(root)
        opt.step()
        return time.perf_counter() - t0

    times: dict[int, list[float]] = {1: [], 2: []}
    for i in range(args.warmup + args.steps):
        timed = i >= args.warmup
        if i == args.warmup:
            for d in dispatchers(runs[2][0]):
                d.reset_stats()
        order = (1, 2) if i % 2 == 0 else (2, 1)  # alternate which runs first: neither always follows the other
        for ep in order:
            sent["on"] = timed and ep == 2
            dt = step(ep)
            if timed:
                times[ep].append(dt)
        sent["on"] = False
    steps = args.steps
    results = {}
    for ep in (1, 2):
        root = runs[ep][0]
        res = {"step_s": statistics.median(times[ep]), "step_s_all": times[ep],
               "params_per_rank": sum(p.numel() for p in root.parameters())}
        ds = dispatchers(root)
        if ds:
            res.update(a2a_fwd_remote_bytes_sent_per_step=sent["bytes"] / steps, a2a_calls_per_step=sent["calls"] / steps,
                       dispatcher_counter_remote_bytes_per_step=sum(d.stats["sent_bytes_remote"] for d in ds) / steps,
                       recv_tokens_per_layer=[int(d.last_recv_tokens_per_expert.sum()) for d in ds])
        results[f"ep{ep}"] = res
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
    bytes_per_elem = 4  # float32
    theory_bytes = 2 * k * T * H * (1 - 1 / ep) * L * bytes_per_elem  # per rank per step, forward
    meas_bytes = sum(r["ep2"]["a2a_fwd_remote_bytes_sent_per_step"] for r in per_rank) / world
    counter_bytes = sum(r["ep2"]["dispatcher_counter_remote_bytes_per_step"] for r in per_rank) / world
    step1 = max(r["ep1"]["step_s"] for r in per_rank)
    step2 = max(r["ep2"]["step_s"] for r in per_rank)
    summary = {
        "benchmark": "expert_parallel", "device": "cpu", "backend": "gloo", "world": world,
        "tokens_per_rank": T, "hidden": H, "top_k": k, "experts": args.experts, "moe_layers": L, "dtype": "float32",
        "steps": args.steps, "warmup": args.warmup, "timing": "ep=1 and ep=2 steps interleaved, order alternating; "
                                                           "median per run, slowest rank",
        "a2a_theory_bytes_per_rank_step_fwd": theory_bytes,
        "a2a_sent_bytes_per_rank_step_fwd": meas_bytes,
        "a2a_sent_over_theory": meas_bytes / theory_bytes,
        "a2a_calls_per_rank_step_fwd": per_rank[0]["ep2"]["a2a_calls_per_step"],
        "dispatcher_counter_bytes_per_rank_step_fwd": counter_bytes,
        "step_s_ep1": step1, "step_s_ep2": step2, "ep2_over_ep1_step_time": step2 / step1,
        "params_per_rank_ep1": per_rank[0]["ep1"]["params_per_rank"],
        "params_per_rank_ep2": per_rank[0]["ep2"]["params_per_rank"],
        "recv_tokens_per_layer_rank0": per_rank[0]["ep2"]["recv_tokens_per_layer"],
        "recv_tokens_per_layer_rank1": per_rank[1]["ep2"]["recv_tokens_per_layer"],
        "wall_s": round(time.time() - t0, 1),
    }
    print(f"a2a forward: {meas_bytes / 2**20:.3f} MiB/rank/step sent to the other rank (summed from the tensors "
          f"passed to all_to_all_single) vs theory 2kTH(1-1/ep)*L*4 B = {theory_bytes / 2**20:.3f} MiB "
          f"(ratio {meas_bytes / theory_bytes:.3f}); the dispatcher's own counter says {counter_bytes / 2**20:.3f} MiB")
    print(f"step time (2 gloo processes, interleaved): ep=1 {step1 * 1e3:.0f} ms, ep=2 {step2 * 1e3:.0f} ms; "
          f"params/rank {summary['params_per_rank_ep1']} -> {summary['params_per_rank_ep2']}")
    finish("expert_parallel", summary)
    return summary


if __name__ == "__main__":
    main()

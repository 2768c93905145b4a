"""FSDP2 + EP vs DDP + EP: per-rank training-state bytes and step time, 2 and 4 gloo processes (or GPUs).

    python benchmarks/fsdp_ep.py [--dim 64] [--layers 4] [--steps 4] [--worlds 2 4] [--ep 2]

Model: an all-MoE MMoEVLM (ViT, connector, decoder FFN MoE, 4 experts top-2) at width --dim, AdamW, fp32.
For each world size W and strategy, every rank runs the same per-rank batch; measured per rank after the
steps: parameter + gradient + optimizer-state bytes it really holds (local shards), and the median step
time (forward + backward + clip + AdamW). ddp_ep = experts sharded over EP, every other weight replicated
(DDP); fsdp_ep = `mmoe.parallel.fsdp.apply_fsdp_ep` (everything sharded). The last stdout line is one JSON
object with state_ratio_fsdp_vs_ddp_{W} (max-rank fsdp bytes / max-rank ddp bytes: lower is better) and
step_time_ratio_fsdp_vs_ddp_{W}. Uses NCCL + one GPU per rank when CUDA has >= W devices, else gloo on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _arch(dim: int, layers: int):
    from mmoe.model.connector import ConnectorConfig
    from mmoe.model.decoder import DecoderConfig
    from mmoe.model.moe import MoEConfig
    from mmoe.model.vision import VisionConfig
    from mmoe.model.vlm import VLMConfig
    moe = MoEConfig(num_experts=4, top_k=2)
    return VLMConfig(
        vision=VisionConfig(image_size=32, patch_size=8, dim=dim, depth=layers, n_heads=4, mlp_ratio=4.0, moe=moe,
                            moe_layers="all", feature_layer=-1),
        connector=ConnectorConfig(kind="moe_mlp", moe=moe, pool=1),
        decoder=DecoderConfig(vocab_size=512, dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2, hidden=4 * dim,
                              max_seq_len=128, ffn_moe=moe, ffn_moe_layers="all"),
        image_token_id=4, pad_token_id=0, eos_token_id=2)


class _Holder(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *args, **kwargs):
        return self.m(*args, **kwargs)


def _nbytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _worker(rank: int, world: int, port: int, args, strategy: str, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    from torch.distributed.device_mesh import init_device_mesh

    from mmoe.model.moe import balancing
    from mmoe.model.vlm import MMoEVLM
    from mmoe.parallel.expert_parallel import (
        clip_grad_norm_,
        enable_expert_parallel,
        finalize_expert_grads,
        wrap_ddp,
    )
    from mmoe.parallel.fsdp import apply_fsdp_ep, clip_grad_norm_fsdp_
    from mmoe.training.module import lm_loss

    torch.manual_seed(0)
    model = MMoEVLM(_arch(args.dim, args.layers)).to(dev)
    enable_expert_parallel(model, args.ep)
    if strategy == "fsdp_ep":
        apply_fsdp_ep(model, init_device_mesh(dev.type, (world,)))
        net = model
    else:
        net = wrap_ddp(_Holder(model), find_unused_parameters=True)  # experts must not sit on the DDP root
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    B, T = args.batch, args.seq
    ids = torch.randint(5, 512, (B, T), generator=g)
    ids[:, 1] = 4
    labels = ids.clone()
    labels[:, :4] = -100
    pix = torch.randn(B, 3, 32, 32, generator=g)
    batch = [t.to(dev) for t in (ids, torch.ones(B, T, dtype=torch.bool), pix, labels)]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = net(*batch[:3], batch[3], logits_at_labels=True)
        loss = lm_loss(out.logits, out.labels) + 0.01 * sum(balancing.load_balance_loss(r) for r in out.routing)
        loss.backward()
        if strategy == "fsdp_ep":
            clip_grad_norm_fsdp_(model.parameters(), 1.0)
        else:
            finalize_expert_grads(model)
            clip_grad_norm_(model.parameters(), 1.0, module=model)
        opt.step()

    times = []
    for i in range(args.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i:  # first step: warm-up (optimizer state allocation)
            times.append(time.perf_counter() - t0)
    params = list(model.parameters())
    state = {"params": sum(_nbytes(p) for p in params),
             "grads": sum(_nbytes(p.grad) for p in params if p.grad is not None),
             "optimizer": sum(_nbytes(v) for p in params for v in opt.state[p].values() if v.dim() > 0)}
    state["total"] = sum(state.values())
    torch.save({"state": state, "step_s": statistics.median(times), "device": dev.type}, f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, strategy: str, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r")
        mp.start_processes(_worker, args=(world, _free_port(), args, strategy, out), nprocs=world,
                           start_method="spawn")
        return [torch.load(f"{out}.{r}") for r in range(world)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args(argv)
    result: dict = {"dim": args.dim, "layers": args.layers, "ep": args.ep}
    for w in args.worlds:
        per = {s: run(w, s, args) for s in ("ddp_ep", "fsdp_ep")}
        for s, ranks in per.items():
            result[f"{s}_{w}_state_bytes_max_rank"] = max(r["state"]["total"] for r in ranks)
            result[f"{s}_{w}_step_s"] = max(r["step_s"] for r in ranks)
            print(f"W={w} {s:8s} state/rank " + " ".join(f"{k}={max(r['state'][k] for r in ranks) / 2**20:.2f}MiB"
                                                        for k in ("params", "grads", "optimizer", "total"))
                  + f"  step {result[f'{s}_{w}_step_s'] * 1e3:.0f} ms ({ranks[0]['device']})")
        result[f"state_ratio_fsdp_vs_ddp_{w}"] = (result[f"fsdp_ep_{w}_state_bytes_max_rank"]
                                                  / result[f"ddp_ep_{w}_state_bytes_max_rank"])
        result[f"step_time_ratio_fsdp_vs_ddp_{w}"] = result[f"fsdp_ep_{w}_step_s"] / result[f"ddp_ep_{w}_step_s"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

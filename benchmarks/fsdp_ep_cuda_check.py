"""bf16 check of the fsdp_ep path on one device (world 1): FSDP2 with bf16 compute / fp32 reduce vs the same
model trained without FSDP under bf16 autocast, 3 AdamW steps with clipping and activation checkpointing.
Prints one JSON line (per-step losses of both, the max relative loss gap, peak memory on CUDA), then `ok`
when every loss is finite and the gap is below --max-gap (exit status 1 otherwise).

    python benchmarks/fsdp_ep_cuda_check.py [--dim 256] [--layers 4]       # CUDA, NCCL
    python benchmarks/fsdp_ep_cuda_check.py --device cpu --dim 32 --layers 2   # rehearsal: CPU, gloo
    python benchmarks/fsdp_ep_cuda_check.py --sharded-init     # the FSDP model filled shard by shard on the GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--max-gap", type=float, default=0.05, help="largest relative loss gap that passes")
    ap.add_argument("--sharded-init", action="store_true",
                    help="build the FSDP model on the meta device and fill its shards on the device "
                         "(model.parallel.sharded_init); its weights must equal the reference's exactly")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA"}))
        return {}
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    from benchmarks.fsdp_ep import _arch
    from mmoe.model.moe import balancing
    from mmoe.model.vlm import MMoEVLM
    from mmoe.parallel.fsdp import apply_fsdp_ep, clip_grad_norm_fsdp_, mixed_precision
    from mmoe.training.module import lm_loss

    dev = torch.device(args.device)
    torch.manual_seed(0)
    ref = MMoEVLM(_arch(args.dim, args.layers)).to(dev)
    res = {"fsdp_losses": [], "autocast_losses": []}
    if args.sharded_init:
        from mmoe.parallel.fsdp_checkpoint import full_state_dict
        from mmoe.parallel.sharded_init import materialize_sharded, record_build
        torch.manual_seed(0)
        record = record_build(lambda: MMoEVLM(_arch(args.dim, args.layers)))
        model = record.model
    else:
        model = copy.deepcopy(ref)
    apply_fsdp_ep(model, init_device_mesh(args.device, (1,)), mixed_precision(torch.bfloat16, torch.float32),
                  activation_checkpointing=True)
    if args.sharded_init:
        materialize_sharded(model, record, dev)
        full, want = full_state_dict(model), ref.state_dict()
        res["sharded_init_equal"] = all(torch.equal(full[k], v.cpu()) for k, v in want.items())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 512, (4, 64), generator=g)
    ids[:, 1] = 4
    labels = ids.clone()
    labels[:, :8] = -100
    batch = [t.to(dev) for t in (ids, torch.ones_like(ids, dtype=torch.bool), torch.randn(4, 3, 32, 32, generator=g))]
    labels = labels.to(dev)

    def loss_of(m):
        out = m(*batch, labels, logits_at_labels=True)
        return lm_loss(out.logits, out.labels) + 0.01 * sum(balancing.load_balance_loss(r) for r in out.routing)

    opt, ropt = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, ref))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        res["fsdp_grad_norm"] = float(clip_grad_norm_fsdp_(model.parameters(), 1.0))
        opt.step()
        res["fsdp_losses"].append(float(loss))
        ropt.zero_grad()
        with torch.autocast(dev.type, torch.bfloat16):
            rloss = loss_of(ref)
        rloss.backward()
        res["autocast_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0))
        ropt.step()
        res["autocast_losses"].append(float(rloss))
    res["max_rel_loss_gap"] = max(abs(a - b) / abs(b) for a, b in zip(res["fsdp_losses"], res["autocast_losses"]))
    res["master_dtype"] = str(next(model.parameters()).dtype)
    if dev.type == "cuda":
        res["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    dist.destroy_process_group()
    print(json.dumps(res))
    losses = res["fsdp_losses"] + res["autocast_losses"]
    res["ok"] = all(math.isfinite(x) for x in losses) and res["max_rel_loss_gap"] < args.max_gap \
        and res.get("sharded_init_equal", True)
    if res["ok"]:
        print("ok")
    return res


if __name__ == "__main__":
    sys.exit(0 if main().get("ok", True) else 1)

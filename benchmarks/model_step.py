"""Training-step time and peak memory: the default MoE VLM against a dense VLM with the same active parameters.

    .venv/bin/python benchmarks/model_step.py [--config configs/default.yaml] [--repeats 8] [--batch 32]

The dense twin (mmoe.model.active_params.dense_equivalent_config) keeps every dimension and replaces each
MoE site by a dense layer whose width gives the same activated parameters per token. Both models train
on the same synthetic batch shaped like the default data (one 64x64 image + ~110 tokens per sample);
steps (forward, backward, AdamW) are timed interleaved and compared by medians. Peak memory is the
resident-set high-water mark of a fresh process per model running three steps (CPU) or
torch.cuda.max_memory_allocated (GPU). Last stdout line: JSON with step_ratio_vs_dense (target <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _util import env_info, finish, measure, print_table, setup_threads  # noqa: E402

from mmoe.config_io import from_dict  # noqa: E402
from mmoe.model.active_params import active_param_count, dense_equivalent_config  # noqa: E402
from mmoe.model.vlm import MMoEVLM, VLMConfig  # noqa: E402
from mmoe.training.module import MMoEModule, lm_loss  # noqa: E402


def build(config: str, kind: str, device: torch.device) -> MMoEModule:
    arch = from_dict(VLMConfig, yaml.safe_load(open(config))["model"]["arch"], "model.arch")
    if kind == "dense":
        arch = dense_equivalent_config(arch)
    torch.manual_seed(0)
    return MMoEModule(arch=arch).to(device)


def make_batch(module: MMoEModule, batch: int, seq: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    cfg = module.arch
    ids = torch.randint(5, 80, (batch, seq), generator=g)
    ids[:, 1] = cfg.image_token_id
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    size = cfg.vision.image_size
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, dtype=torch.bool).to(device),
            "labels": labels.to(device), "pixel_values": torch.randn(batch, 3, size, size, generator=g).to(device)}


def step_fn(module: MMoEModule, batch: dict):
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step():
        out = module.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
        aux, _ = module.balancing_loss(out.routing)
        loss = lm_loss(out.logits, out.labels) + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def memory_child(args) -> None:
    device = torch.device(args.device)
    module = build(args.config, args.memory_of, device)
    fn = step_fn(module, make_batch(module, args.batch, args.seq, device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(3):
        fn()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak, "before_step_bytes": before}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=110)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-of", choices=("moe", "dense"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup_threads(args.threads)
    if args.memory_of:
        return memory_child(args)
    device = torch.device(args.device)
    mods = {k: build(args.config, k, device) for k in ("moe", "dense")}
    fns = {k: step_fn(m, make_batch(m, args.batch, args.seq, device)) for k, m in mods.items()}
    t = measure(fns, repeats=args.repeats, warmup=2, device=device)
    mem = {}
    for k in mods:
        out = subprocess.run([sys.executable, __file__, "--memory-of", k, "--config", args.config, "--batch",
                              str(args.batch), "--seq", str(args.seq), "--device", args.device],
                             capture_output=True, text=True, check=True)
        mem[k] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    rows = [{"model": k, "params_total": sum(p.numel() for p in m.parameters()),
             "params_active": active_param_count(m.model), "step_median_s": round(t[k]["median"], 4),
             "step_min_s": round(t[k]["min"], 4), "peak_mem_gib": round(mem[k] / 2**30, 3)} for k, m in mods.items()]
    print_table(rows)
    finish("model_step", {  # writes benchmarks/results/model_step-<cpu|cuda>.json (date, commit, machine)
        "benchmark": "model_step", "config": args.config, "device": str(device), "batch": args.batch, "seq": args.seq,
        "step_ratio_vs_dense": round(t["moe"]["median"] / t["dense"]["median"], 3),
        "step_ratio_vs_dense_min": round(t["moe"]["min"] / t["dense"]["min"], 3),
        "moe_peak_mem_gib": round(mem["moe"] / 2**30, 3), "dense_peak_mem_gib": round(mem["dense"] / 2**30, 3),
        "active_params_ratio": round(rows[0]["params_active"] / rows[1]["params_active"], 4),
        "target_step_ratio": 1.2, **env_info(device),
    }, device)


if __name__ == "__main__":
    main()

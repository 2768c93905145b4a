"""Training-step time and peak memory: the default MoE VLM against a dense VLM with the same active parameters.

    .venv/bin/python benchmarks/model_step.py [--config configs/default.yaml] [--repeats 8] [--batch 32]

The dense twin (mmoe.model.active_params.dense_equivalent_config) keeps every dimension and replaces each
MoE site by a dense layer whose width gives the same activated parameters per token. Both models train
on the same synthetic batch shaped like the default data (one 64x64 image + ~110 tokens per sample);
steps (forward, backward, AdamW) are timed interleaved and compared by medians. Peak memory is the
resident-set high-water mark of a fresh process per model running three steps (CPU) or
torch.cuda.max_memory_allocated (GPU). Last stdout line: JSON with step_ratio_vs_dense (target <= 1.2).

GPU mode (`--device cuda`): `--config configs/model/mid.yaml --batch 8 --seq 1024` under bf16
autocast with fused AdamW; the two models are timed one after the other (each alone on the GPU) and the
JSON adds model-FLOPs utilisation, 6 * active params * tokens / step time / --peak-tflops (989: H100/H200
dense bf16). Targets: step_ratio_vs_dense <= 1.35 and moe_mfu >= 0.25. `--compile` compiles every block
(fullgraph). `--device cpu --gpu-mode` rehearses this path on a small config.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _util import env_info, finish, measure, print_table, setup_threads, time_once  # noqa: E402

from mmoe.config_io import from_dict  # noqa: E402
from mmoe.model.active_params import active_param_count, dense_equivalent_config  # noqa: E402
from mmoe.model.vlm import VLMConfig  # noqa: E402
from mmoe.training.module import MMoEModule, lm_loss  # noqa: E402


def build(config: str, kind: str, device: torch.device) -> MMoEModule:
    arch = from_dict(VLMConfig, yaml.safe_load(open(config))["model"]["arch"], "model.arch")
    if kind == "dense":
        arch = dense_equivalent_config(arch)
    torch.manual_seed(0)
    if device.type == "cuda":  # initialise on the GPU: a 2.6 B model takes long to initialise on the CPU
        with torch.device(device):
            return MMoEModule(arch=arch)
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


def step_fn(module: MMoEModule, batch: dict, autocast_dtype: torch.dtype | None = None, fused: bool = False):
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=fused or None)
    dev = batch["input_ids"].device.type

    def step():
        ctx = torch.autocast(dev, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with ctx:
            out = module.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
            aux, _ = module.balancing_loss(out.routing)
            loss = lm_loss(out.logits, out.labels) + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def gpu_main(args) -> None:
    """One model at a time on the accelerator: warm up, time `repeats` steps, read the peak memory."""
    from mmoe.training.compile import compile_blocks

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    rows, res = [], {}
    for kind in ("moe", "dense"):
        module = build(args.config, kind, device)
        if args.compile:
            compile_blocks(module.model, mode=args.compile_mode)
        batch = make_batch(module, args.batch, args.seq, device)
        tokens = args.batch * (args.seq + module.model.num_image_tokens - 1)
        fn = step_fn(module, batch, torch.bfloat16 if args.precision == "bf16-mixed" else None, fused=cuda)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        warm_s = time.perf_counter() - t0
        times = [time_once(fn, device) for _ in range(args.repeats)]
        step = sorted(times)[len(times) // 2]
        active = active_param_count(module.model)
        flops = 6 * active * tokens / step
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else -1.0  # -1: not measured on CPU
        res[kind] = {"step_s": step, "mfu": flops / (args.peak_tflops * 1e12), "tflops": flops / 1e12,
                     "peak_gib": peak, "params": sum(p.numel() for p in module.parameters()), "active": active}
        rows.append({"model": kind, "params_total": res[kind]["params"], "params_active": active,
                     "step_median_s": round(step, 4), "step_min_s": round(min(times), 4),
                     "tokens_per_s": round(tokens / step), "tflops": round(flops / 1e12, 1),
                     "mfu": round(res[kind]["mfu"], 4), "peak_mem_gib": round(peak, 2), "warmup_s": round(warm_s, 1)})
        del module, fn, batch
        if cuda:
            torch.cuda.empty_cache()
    print_table(rows)
    ratio = res["moe"]["step_s"] / res["dense"]["step_s"]
    targets = {"step_ratio_vs_dense": 1.35, "moe_mfu_min": 0.25}
    # model_step[_compiled]-<cpu|cuda>.json: the eager and the compiled step both run in one GPU call
    finish("model_step_compiled" if args.compile else "model_step", {
        "benchmark": "model_step_gpu", "config": args.config, "device": str(device), "batch": args.batch,
        "seq": args.seq, "precision": args.precision, "compile": args.compile, "step_ratio_vs_dense": round(ratio, 3),
        "moe_step_s": round(res["moe"]["step_s"], 4), "dense_step_s": round(res["dense"]["step_s"], 4),
        "moe_mfu": round(res["moe"]["mfu"], 4), "dense_mfu": round(res["dense"]["mfu"], 4),
        "moe_peak_mem_gib": round(res["moe"]["peak_gib"], 2), "dense_peak_mem_gib": round(res["dense"]["peak_gib"], 2),
        "moe_params_total": res["moe"]["params"], "moe_params_active": res["moe"]["active"],
        "targets": targets, "meets_targets": ratio <= 1.35 and res["moe"]["mfu"] >= 0.25, **env_info(device),
    }, device)


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
    ap.add_argument("--gpu-mode", action="store_true", help="the GPU protocol on --device (implied for cuda)")
    ap.add_argument("--precision", default="bf16-mixed", choices=("bf16-mixed", "32-true"), help="GPU mode")
    ap.add_argument("--compile", action="store_true", help="GPU mode: torch.compile every block (fullgraph)")
    ap.add_argument("--compile-mode", default=None, help="GPU mode: torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--warmup", type=int, default=3, help="GPU mode: untimed steps first")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU mode: dense bf16 peak for the MFU")
    args = ap.parse_args()
    setup_threads(args.threads)
    if args.memory_of:
        return memory_child(args)
    if args.compile_mode and not args.compile:
        raise SystemExit("--compile-mode needs --compile")
    if args.device != "cpu" or args.gpu_mode:
        return gpu_main(args)
    if args.compile:
        raise SystemExit("--compile is for the GPU mode (--device cuda, or --gpu-mode on a CPU)")
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

"""GPU correctness of the static MoE dispatch (docs/moe_gpu.md), one JSON line at the end.

    python benchmarks/gpu_correctness.py [--device cuda] [--size tiny]

Checks, each recorded (a failing check does not stop the others):
  kernels_bf16     MoEFFN fwd+bwd in bf16: grouped_mm path == host-count loop path == dense path
                   (max abs difference of the output and of every gradient)
  no_host_sync     fwd+bwd of every MoE site kind under torch.cuda.set_sync_debug_mode("error")
                   (token choice, top-p + shared, capacity buffers, expert choice, MoA, a decoder block)
  compile_block    torch.compile(fullgraph=True, inductor) of a MoE+MoA decoder block == eager on three
                   batches with different routing, no recompile
  cuda_graph_decode  generate() with decode_step compiled as mode="reduce-overhead" (CUDA graphs) gives
                   the eager tokens; ms per token of both
  grouped_mm_fp32  whether torch._grouped_mm takes fp32 on this GPU (information: fp32 uses the dense path)
`--device cpu --size tiny` rehearses the script (sync checks become no-ops there).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _util import env_info, finish  # noqa: E402

from mmoe.model.decoder import Decoder, DecoderConfig  # noqa: E402
from mmoe.model.generation import generate  # noqa: E402
from mmoe.model.moe import MoAAttention, MoEConfig, MoEFFN  # noqa: E402
from mmoe.model.moe.attention import AttnMask  # noqa: E402
from mmoe.model.moe.experts import expert_kernel  # noqa: E402


class SyncDebug:
    """torch.cuda.set_sync_debug_mode("error") inside the block (no-op off CUDA)."""

    def __init__(self, device):
        self.on = device.type == "cuda"

    def __enter__(self):
        if self.on:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        if self.on:
            torch.cuda.set_sync_debug_mode(0)


def check_kernels(device, dtype, h) -> dict:
    torch.manual_seed(0)
    moe = MoEFFN(h, h, MoEConfig(num_experts=8, top_k=2), causal=True).to(device, dtype).train()
    x = torch.randn(4, 128, h, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(4, 128, dtype=torch.bool, device=device)
    mask[0, -30:] = False
    g = torch.randn_like(x)
    res = {}
    for kernel in ("grouped_mm", "loop", "dense"):
        moe.zero_grad(set_to_none=True)
        x.grad = None
        with expert_kernel(kernel):
            y, _ = moe(x, mask)
            y.backward(g)
        res[kernel] = [y.detach().float(), x.grad.float()] + [p.grad.float() for p in moe.parameters()]
    out = {}
    for other in ("loop", "dense"):
        out[f"grouped_mm_vs_{other}_max_abs"] = max((a - b).abs().max().item()
                                                    for a, b in zip(res["grouped_mm"], res[other]))
    out["output_scale"] = res["grouped_mm"][0].abs().max().item()
    out["ok"] = out["grouped_mm_vs_loop_max_abs"] <= 2e-2 * max(1.0, out["output_scale"])
    return out


def sites(device, dtype, h):
    def ffn(**kw):
        causal = kw.get("router") != "expert_choice"
        m = MoEFFN(h, h, MoEConfig(**{"num_experts": 8, "top_k": 2, **kw}), causal=causal).to(device, dtype).train()
        return lambda x, mask: m(x, mask)[0]

    moa = MoAAttention(h, 16, 4, h // 16, MoEConfig(num_experts=4, top_k=2), layer=0).to(device, dtype).train()
    cos = torch.ones(2, 64, h // 16, device=device, dtype=dtype)
    sin = torch.zeros_like(cos)
    return {
        "ffn_topk": ffn(),
        "ffn_top_p_shared": ffn(router="top_p", top_k=3, top_p=0.6, num_shared_experts=1),
        "ffn_group_limited_aux_free": ffn(hierarchy="group_limited", num_groups=4, top_groups=2, score_func="sigmoid",
                                          aux_free_bias=True),
        "ffn_capacity": ffn(capacity_factor=1.0),
        "vision_expert_choice": ffn(router="expert_choice", capacity_factor=1.0),
        "moa": lambda x, mask: moa(x, cos, sin, AttnMask(None, True), token_mask=mask)[0],
    }


def check_no_sync(device, dtype, h) -> dict:
    out = {}
    for name, fn in sites(device, dtype, h).items():
        x = torch.randn(2, 64, h, device=device, dtype=dtype, requires_grad=True)
        mask = torch.ones(2, 64, dtype=torch.bool, device=device)
        mask[1, -9:] = False
        fn(x, mask)  # warm up (lazy init, cuBLAS handles)
        try:
            with SyncDebug(device):
                y = fn(x, mask)
                y.backward(torch.ones_like(y))
            out[name] = "ok"
        except Exception as e:  # noqa: BLE001 - report which site synchronised
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    out["ok"] = all(v == "ok" for v in out.values())
    return out


def tiny_decoder(device, dtype, dim=64, layers=2, vocab=128, max_len=96) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=8, n_kv_heads=2, hidden=2 * dim,
                        max_seq_len=max_len,
                        ffn_moe=MoEConfig(num_experts=8, top_k=2, hierarchy="group_limited", num_groups=4,
                                          top_groups=2, num_shared_experts=1),
                        ffn_moe_layers="all", attn_moe=MoEConfig(num_experts=4, top_k=2), attn_moe_layers="every_2")
    return Decoder(cfg).to(device, dtype)


def check_compile_block(device, dtype, h) -> dict:
    torch._dynamo.reset()
    dec = tiny_decoder(device, torch.float32, dim=h, layers=1).train()
    block = dec.layers[0]
    compiled = copy.deepcopy(block)
    compiled.compile(fullgraph=True, dynamic=False)
    cos, sin = dec.rope(torch.arange(64, device=device).expand(2, 64))
    out, routes = {}, []
    worst = 0.0
    for i in range(3):
        x = torch.randn(2, 64, h, device=device, generator=torch.Generator(device).manual_seed(i))
        mask = torch.ones(2, 64, dtype=torch.bool, device=device)
        mask[i % 2, 60 - i:] = False
        y_e, r_e = block(x, cos, sin, AttnMask(None, True), None, token_mask=mask, modality=None)
        stance = torch.compiler.set_stance("fail_on_recompile") if i else torch.compiler.set_stance("default")
        with stance:
            y_c, _ = compiled(x, cos, sin, AttnMask(None, True), None, token_mask=mask, modality=None)
        worst = max(worst, (y_e - y_c).abs().max().item())
        routes.append(r_e[-1].expert_idx)
    out["max_abs_diff_fp32"] = worst
    out["routing_changed"] = not torch.equal(routes[0], routes[1])
    out["ok"] = worst < 1e-4 and out["routing_changed"]
    return out


def check_cuda_graph_decode(device, dtype, steps) -> dict:
    torch._dynamo.reset()
    dec = tiny_decoder(device, dtype).eval()
    ids = torch.randint(5, 128, (4, 16), device=device, generator=torch.Generator(device).manual_seed(0))
    mask = torch.ones(4, 16, dtype=torch.bool, device=device)
    mask[0, :3] = False  # left padding
    mode = "reduce-overhead" if device.type == "cuda" else None
    step = torch.compile(dec.decode_step, fullgraph=True, mode=mode, dynamic=False)
    out = {}

    def timed(**kw):
        generate(dec, ids, attention_mask=mask, max_new_tokens=steps, **kw)  # warm up / compile / capture
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        toks = generate(dec, ids, attention_mask=mask, max_new_tokens=steps, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return toks, 1e3 * (time.perf_counter() - t) / steps

    ref, out["eager_ms_per_token"] = timed()
    static, out["static_eager_ms_per_token"] = timed(static=True)
    graphed, out["compiled_ms_per_token"] = timed(step_fn=step)
    out["static_equals_eager"] = bool(torch.equal(static, ref))
    out["compiled_equals_eager"] = bool(torch.equal(graphed, ref))
    out["compiled_token_agreement"] = (graphed == ref).float().mean().item()  # bf16 may flip a near-tie
    out["ok"] = out["static_equals_eager"] and out["compiled_token_agreement"] >= 0.9
    return out


def check_grouped_mm_fp32(device) -> dict:
    x = torch.randn(64, 32, device=device)
    w = torch.randn(4, 32, 16, device=device)
    offs = torch.tensor([10, 20, 20, 64], dtype=torch.int32, device=device)
    y = torch._grouped_mm(x, w, offs=offs)
    ref = torch.cat([x[:10] @ w[0], x[10:20] @ w[1], x[20:] @ w[3]])
    return {"max_abs": (y - ref).abs().max().item(), "ok": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="full", choices=("full", "tiny"))
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    h = 64 if args.size == "tiny" else 256
    steps = 4 if args.size == "tiny" else 32
    result: dict = {"benchmark": "gpu_correctness", "device": str(device), "size": args.size}
    checks = {"kernels_bf16": lambda: check_kernels(device, dtype, h),
              "no_host_sync": lambda: check_no_sync(device, dtype, h),
              "compile_block": lambda: check_compile_block(device, dtype, h),
              "cuda_graph_decode": lambda: check_cuda_graph_decode(device, dtype, steps),
              "grouped_mm_fp32": lambda: check_grouped_mm_fp32(device)}
    for name, fn in checks.items():
        t = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
            traceback.print_exc()
            result[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        result[name]["seconds"] = round(time.perf_counter() - t, 1)
        print(name, result[name], flush=True)
    result["all_ok"] = all(result[k].get("ok") for k in checks if k != "grouped_mm_fp32")
    result.update(env_info(device))
    finish("gpu_correctness", result, device)


if __name__ == "__main__":
    main()

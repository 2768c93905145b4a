"""Pure-bf16 routing: how far a bf16 MoE FFN strays from fp32 with the router kept in fp32 (what mmoe does under
`--trainer.precision bf16-true`) versus a router whose gate weight is rounded to bf16 (what a plain cast did).

    python benchmarks/router_precision.py [--device cuda] [--tokens 8192]

Prints a table and one JSON line: the share of tokens whose expert set equals fp32's, and the relative output
difference ||y - y_fp32|| / ||y_fp32||, for both variants, measured in this one run.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from mmoe.model.moe import MoEConfig, MoEFFN, Router


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top_k", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    ref = MoEFFN(args.dim, args.dim * 2, MoEConfig(num_experts=args.experts, top_k=args.top_k,
                                                   score_func="sigmoid"), "swiglu").to(args.device).eval()
    fp32_router = copy.deepcopy(ref).to(torch.bfloat16)  # Router keeps its gate fp32
    bf16_gate = copy.deepcopy(ref).to(torch.bfloat16)
    for m in bf16_gate.modules():
        if isinstance(m, Router):
            m.gate.weight.data = m.gate.weight.data.to(torch.bfloat16)
    x = torch.randn(1, args.tokens, args.dim, device=args.device)
    with torch.no_grad():
        y_ref, r_ref = ref(x.bfloat16().float())  # same (bf16-representable) input for all three
        sets_ref = r_ref.expert_idx.sort(-1).values
        out = {}
        for name, model in (("fp32_router", fp32_router), ("bf16_gate", bf16_gate)):
            y, r = model(x.bfloat16())
            out[name] = {
                "routing_match": float((r.expert_idx.sort(-1).values == sets_ref).all(-1).float().mean()),
                "rel_output_diff": float((y.float() - y_ref).norm() / y_ref.norm()),
            }
    print(f"{'variant':<12} {'routing match':>14} {'rel. output diff':>17}")
    for name, v in out.items():
        print(f"{name:<12} {v['routing_match']:>14.4f} {v['rel_output_diff']:>17.5f}")
    print(json.dumps({"benchmark": "router_precision", "device": args.device, "tokens": args.tokens,
                      "dim": args.dim, "experts": args.experts, "top_k": args.top_k, **out}))


if __name__ == "__main__":
    main()

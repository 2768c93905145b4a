"""MoEFFN speed on CPU against a FLOP-matched dense SwiGLU and transformers' MixtralSparseMoeBlock.

    .venv/bin/python benchmarks/moe_layer.py [--repeats 12] [--threads N]

fp32, H=512, expert hidden 1024, E=8, k=2 (dropless, softmax, renormalised: Mixtral routing).
The dense baseline is a SwiGLU of width k*1024 = 2048, so it does the same matmul FLOPs as the
routed experts; the MoE ratio measures routing + dispatch + combine overhead. Callables are timed
interleaved and compared by medians. The last stdout line is JSON with:

  train_ratio_vs_dense  fwd+bwd at T=4096, MoEFFN / dense          (target <= 1.08)
  t1_ratio_vs_dense     forward at T=1 (decode), MoEFFN / dense     (target <= 1.5)
  t8_ratio_vs_hf        forward at T=8, MoEFFN / Mixtral eager      (target <= 1.0)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _util import env_info, finish, measure, print_table, setup_threads  # noqa: E402

from mmoe.model.layers import SwiGLU  # noqa: E402
from mmoe.model.moe import MoEConfig, MoEFFN  # noqa: E402

H, I, E, K = 512, 1024, 8, 2


def build_hf_mixtral(moe: MoEFFN):
    """transformers' MixtralSparseMoeBlock (eager experts) holding the same weights as `moe`."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                        experts_implementation="eager")
    cfg._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.gate.weight)
        block.experts.gate_up_proj.copy_(moe.experts.w_in.weight.transpose(1, 2))  # (E, 2I, H)
        block.experts.down_proj.copy_(moe.experts.w_out.weight.transpose(1, 2))  # (E, H, I)
    return block.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=12, help="timed rounds for the T=4096 training case")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    args = ap.parse_args()
    threads = setup_threads(args.threads)
    torch.manual_seed(0)

    moe = MoEFFN(H, I, MoEConfig(num_experts=E, top_k=K), activation="swiglu", causal=True)
    dense = SwiGLU(H, K * I)
    hf = build_hf_mixtral(moe)
    rows: list[dict[str, object]] = []

    def add(case: str, t: dict[str, dict[str, float]], a: str, b: str) -> float:
        ratio = t[a]["median"] / t[b]["median"]
        rows.append({"case": case, a + "_ms": 1e3 * t[a]["median"], b + "_ms": 1e3 * t[b]["median"],
                     "ratio(median)": ratio, "ratio(min)": t[a]["min"] / t[b]["min"], "n": t[a]["n"]})
        return ratio

    # ---- training step, T=4096: forward + backward with a dense upstream gradient
    moe.train(), dense.train()
    x = torch.randn(1, 4096, H, requires_grad=True)
    gy = torch.randn(1, 4096, H)

    def step(module, fn):
        def run():
            for p in module.parameters():
                p.grad = None
            x.grad = None
            fn(x).backward(gy)
        return run

    t = measure({"moe": step(moe, lambda v: moe(v)[0]), "dense": step(dense, dense)}, repeats=args.repeats,
                warmup=2)
    train_ratio = add("train fwd+bwd T=4096 vs dense", t, "moe", "dense")

    moe.eval(), dense.eval()
    with torch.no_grad():
        # ---- decode, T=1
        x1 = torch.randn(1, 1, H)
        t = measure({"moe": lambda: moe(x1), "dense": lambda: dense(x1)}, repeats=300, warmup=20, min_time=2)
        t1_ratio = add("fwd T=1 vs dense", t, "moe", "dense")

        # ---- small batch decode, T=8, against HF Mixtral (eager experts)
        x8 = torch.randn(1, 8, H)
        ref = hf(x8)
        err = (moe(x8)[0] - ref).abs().max().item()
        t = measure({"moe": lambda: moe(x8), "hf": lambda: hf(x8)}, repeats=300, warmup=20, min_time=2)
        t8_ratio = add("fwd T=8 vs HF Mixtral eager", t, "moe", "hf")
        t = measure({"moe": lambda: moe(x8), "dense": lambda: dense(x8)}, repeats=200, warmup=10, min_time=2)
        add("fwd T=8 vs dense", t, "moe", "dense")

        # ---- prefill forward, T=4096
        t = measure({"moe": lambda: moe(x), "dense": lambda: dense(x), "hf": lambda: hf(x)}, repeats=5,
                    warmup=1)
        add("fwd T=4096 vs dense", t, "moe", "dense")
        add("fwd T=4096 vs HF Mixtral eager", t, "moe", "hf")

    print(f"MoEFFN H={H} expert_hidden={I} E={E} k={K} fp32 CPU, threads={threads}, "
          f"max |moe - hf| at T=8: {err:.2e}")
    print_table(rows, ["case", "moe_ms", "dense_ms", "hf_ms", "ratio(median)", "ratio(min)", "n"])
    targets = {"train_ratio_vs_dense": 1.08, "t1_ratio_vs_dense": 1.5, "t8_ratio_vs_hf": 1.0}
    result = {"benchmark": "moe_layer", "train_ratio_vs_dense": round(train_ratio, 4),
              "t1_ratio_vs_dense": round(t1_ratio, 4), "t8_ratio_vs_hf": round(t8_ratio, 4),
              "hf_max_abs_diff_t8": err, "targets": targets, **env_info()}
    result["meets_targets"] = all(result[k] <= v for k, v in targets.items())
    finish("moe_layer", result)  # writes benchmarks/results/moe_layer-cpu.json (date, commit, machine)


if __name__ == "__main__":
    main()

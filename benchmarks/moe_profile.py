"""Where the MoE FFN's training step spends its time: op and kernel tables, eager and compiled (issue 23).

    python benchmarks/moe_profile.py --device cuda --dtype bf16           # a benchmarks/gpu_check.sh step
    .venv/bin/python benchmarks/moe_profile.py --device cpu --size tiny   # rehearsal (seconds to a minute)

The training shape of moe_layer.py's GPU mode (H=2048, expert hidden 2048, E=8, top-2, T=16384): forward +
backward of the MoEFFN and of the dense SwiGLU of the active width, each eager and `torch.compile`d
(fullgraph), timed interleaved; then `torch.profiler` over `--steps` steps of the eager and the compiled MoE
step. On the H200 at 4a12d85 the eager MoE step took 1.89x the dense one while its grouped GEMMs alone take
about the dense matmul time: these tables say where the rest goes, and the compiled ratio says how much of it
compilation already removes (a training run compiles blocks with `model.compile: true`).

Ops are aten operators by the device time of the kernels they launch (CPU time on a CPU); kernels (CUDA only)
also cover what compiled code launches without an aten operator (on a CPU, inductor's own C++ kernels appear in
no table, so the compiled step's table there holds only the aten calls left in the graph).

Final JSON line: train_ms, train_ratio_vs_dense (eager / eager), train_compiled_ratio_vs_dense (compiled /
compiled), and per mode profiled_ms_per_step, top_ops and top_kernels ([{name, calls_per_step, ms_per_step,
share}]); compile failures are recorded, not fatal.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _util import env_info, finish, print_table, setup_threads, sync  # noqa: E402
from moe_layer import event_time, gpu_case, train_step  # noqa: E402


def op_table(fn, device: torch.device, steps: int, top: int) -> dict[str, object]:
    """Profile `steps` calls of fn: the `top` aten ops (and CUDA kernels) by self time per step."""
    cuda = device.type == "cuda"
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    events = prof.key_averages()
    time_of = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)

    def rows(kind: DeviceType) -> tuple[list[dict[str, object]], float]:
        picked = [e for e in events if e.device_type == kind and time_of(e) > 0]
        if kind == DeviceType.CPU:  # operators, not the profiler's own or autograd's wrapper records
            picked = [e for e in picked if e.key.startswith(("aten::", "mmoe::"))]
        total = sum(time_of(e) for e in picked)  # microseconds over all steps
        picked.sort(key=time_of, reverse=True)
        return [{"name": e.key[:90], "calls_per_step": round(e.count / steps, 2),
                 "ms_per_step": round(time_of(e) / 1e3 / steps, 4), "share": round(time_of(e) / total, 4)}
                for e in picked[:top]], total / 1e3 / steps

    ops, ops_ms = rows(DeviceType.CPU)
    out: dict[str, object] = {"top_ops": ops, "ops_ms_per_step": round(ops_ms, 4)}
    if cuda:
        kernels, kernels_ms = rows(DeviceType.CUDA)
        out.update(top_kernels=kernels, profiled_ms_per_step=round(kernels_ms, 4))
    else:
        out["profiled_ms_per_step"] = round(ops_ms, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--size", default="full", choices=("full", "tiny"), help="tiny rehearses on small shapes")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per mode")
    ap.add_argument("--top", type=int, default=15, help="rows per table")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on a CPU (default: usable cores)")
    args = ap.parse_args()
    setup_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (rehearse with --device cpu --size tiny)")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    moe, dense, tokens = gpu_case(args.size, device, dtype)
    h = moe.experts.w_in.in_features
    x = torch.randn(1, tokens, h, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(1, tokens, h, device=device, dtype=dtype)
    step = partial(train_step, x=x, gy=gy)

    fns = {"moe": step(moe, lambda v: moe(v)[0]), "dense": step(dense, dense)}
    result: dict[str, object] = {}
    if not args.no_compile:
        try:
            c_moe = torch.compile(lambda v: moe(v)[0], fullgraph=True, dynamic=False)
            c_dense = torch.compile(dense, fullgraph=True, dynamic=False)
            compiled = {"moe_compiled": step(moe, c_moe), "dense_compiled": step(dense, c_dense)}
            for fn in compiled.values():
                fn()  # compile here, so a failure is recorded instead of stopping the eager rows
            fns.update(compiled)
        except Exception as err:  # noqa: BLE001
            result["compile_error"] = f"{type(err).__name__}: {err}"[:500]
    t = event_time(fns, device, iters=2 if args.size == "tiny" else 5)
    result["train_ms"] = {n: round(1e3 * v, 4) for n, v in t.items()}
    result["train_ratio_vs_dense"] = round(t["moe"] / t["dense"], 4)
    if "moe_compiled" in t:
        result["train_compiled_ratio_vs_dense"] = round(t["moe_compiled"] / t["dense_compiled"], 4)
        result["train_compiled_moe_vs_eager_dense"] = round(t["moe_compiled"] / t["dense"], 4)

    for mode in ("moe", "moe_compiled", "dense"):
        if mode in fns:
            table = op_table(fns[mode], device, args.steps, args.top)
            result[mode] = table
            print(f"== {mode}: {table['profiled_ms_per_step']} ms profiled per step")
            print_table(table.get("top_kernels", table["top_ops"]))
            if "top_kernels" in table:
                print_table(table["top_ops"])

    e, k = moe.cfg.num_experts, moe.cfg.top_k
    print(f"MoEFFN H={h} E={e} k={k} T={tokens} {args.dtype} on {device}: train ms {result['train_ms']}")
    result.update({"benchmark": "moe_profile", "size": args.size, "dtype": args.dtype, "tokens": tokens,
                   "steps": args.steps, **env_info(device)})
    finish("moe_profile", result, device)


if __name__ == "__main__":
    main()

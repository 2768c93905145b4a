"""Static, sync-free MoE dispatch (docs/moe_gpu.md): every expert kernel equals the float64 loop reference, the
device-agnostic path issues no data-dependent op in forward and backward at every MoE site, and a
decode-size MoE FFN forward stays under a pinned number of aten ops."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmoe.model.moe import MoAAttention, MoEConfig, MoEFFN
from mmoe.model.moe.attention import AttnMask
from mmoe.model.moe.experts import expert_kernel

from test_moe_layer import CAPACITY, KINDS, build, check_against_loop, inputs

# ops whose output shape or value reaches the host: each is a device->host sync on a GPU and a graph
# break (or a recompile) under torch.compile
DATA_DEPENDENT = {"nonzero", "_local_scalar_dense", "item", "bincount", "masked_select", "unique", "_unique2",
                  "unique_consecutive", "nonzero_static"}


class OpRecorder(TorchDispatchMode):
    """Records the aten overload packet name of every op dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@contextmanager
def no_tolist():
    """Tensor.tolist() reads a tensor on the host without an aten op: forbid it outright."""
    orig = torch.Tensor.tolist

    def refuse(self):
        raise AssertionError("Tensor.tolist() called: a host synchronisation on routing outcomes")

    torch.Tensor.tolist = refuse
    try:
        yield
    finally:
        torch.Tensor.tolist = orig


def record_fwd_bwd(fn, *inputs_requiring_grad) -> list[str]:
    rec = OpRecorder()
    with no_tolist(), rec:
        y = fn()
        y.backward(torch.ones_like(y))
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in inputs_requiring_grad)
    return rec.ops


# ---------------------------------------------------------------- kernels agree with the loop reference
@pytest.mark.parametrize("kind", ["softmax_renorm", "top_p", "group_limited", "two_level", "aux_free_bias",
                                  "shared_experts", "expert_choice", "cap_score", "cap_position"])
def test_dense_kernel_equals_float64_loop_reference(kind):
    """The static 'dense' kernel (any device/dtype) against the per-token loop, forward and every gradient."""
    moe = build(KINDS.get(kind) or CAPACITY[kind], "gelu", bias=True)
    x, mask = inputs(padded=True)
    with expert_kernel("dense"):
        check_against_loop(moe, x, mask, train=True)


@pytest.mark.parametrize("kind", ["softmax_renorm", "top_p", "shared_experts"])
def test_grouped_mm_kernel_equals_loop_kernel_fp32(kind):
    """torch._grouped_mm with device-side offsets (CPU implementation here) == the host-count loop."""
    torch.manual_seed(0)  # torch._grouped_mm wants 16-byte rows: widths multiple of 4 in fp32
    moe = MoEFFN(16, 8, MoEConfig(num_experts=6, **KINDS[kind]), activation="gelu", bias=True)
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 0.7)
        for p in moe.experts.parameters():
            p.normal_(0, 0.3)
    _, mask = inputs(padded=True)
    x = torch.randn(*mask.shape, 16, requires_grad=True)
    g = torch.randn(x.shape)
    outs = {}
    for kernel in ("loop", "grouped_mm"):
        moe.zero_grad(set_to_none=True)
        x.grad = None
        with expert_kernel(kernel):
            y, _ = moe(x, mask)
            y.backward(g)
        outs[kernel] = [y.detach(), x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    for a, b in zip(outs["loop"], outs["grouped_mm"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="expert kernel"):
        with expert_kernel("cutlass"):
            pass


class _CudaLike:
    """Duck-typed stand-in for a CUDA activation (choose_kernel reads only is_cuda, dtype and device), so the
    CUDA branch of the kernel choice is checked on a CPU-only machine."""

    def __init__(self, dtype, index=0):
        self.is_cuda, self.dtype, self.device = True, dtype, torch.device("cuda", index)


def test_kernel_choice_by_device_dtype_capability_and_override(monkeypatch):
    """auto: the loop on CPU (any dtype); on CUDA torch._grouped_mm only for bf16 on compute capability >= 9 with
    16-byte aligned rows, else the dense kernel; other devices dense; an override wins until its block ends."""
    from mmoe.model.moe import experts

    w32, w16 = torch.zeros(4, 16, 32), torch.zeros(4, 16, 32, dtype=torch.bfloat16)
    assert experts.choose_kernel(torch.zeros(3, 16), w32) == "loop"
    assert experts.choose_kernel(torch.zeros(3, 16, dtype=torch.bfloat16), w16) == "loop"
    assert experts.choose_kernel(torch.zeros(3, 16, device="meta"), w32.to("meta")) == "dense"
    monkeypatch.setattr(experts, "_cuda_major", lambda index: 9)
    if hasattr(torch, "_grouped_mm"):
        assert experts.choose_kernel(_CudaLike(torch.bfloat16), w16) == "grouped_mm"
    assert experts.choose_kernel(_CudaLike(torch.float32), w32) == "dense"  # fp32: no grouped GEMM
    assert experts.choose_kernel(_CudaLike(torch.bfloat16), w32) == "dense"  # weights not bf16
    for misaligned in ((4, 16, 31), (4, 15, 32)):  # 31 or 15 bf16 = 62 or 30 bytes: rows not 16-byte aligned
        w_bad = torch.zeros(misaligned, dtype=torch.bfloat16)
        assert experts.choose_kernel(_CudaLike(torch.bfloat16), w_bad) == "dense"
    # the capability asked is the activation's own device's (cuda:1 an Ampere here), or the current device's
    monkeypatch.setattr(experts, "_cuda_major", lambda index: {0: 9, 1: 8}[index])
    assert experts.choose_kernel(_CudaLike(torch.bfloat16, index=1), w16) == "dense"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert experts.choose_kernel(_CudaLike(torch.bfloat16, index=None), w16) == "dense"
    if hasattr(torch, "_grouped_mm"):
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        assert experts.choose_kernel(_CudaLike(torch.bfloat16, index=None), w16) == "grouped_mm"
    monkeypatch.setattr(experts, "_cuda_major", lambda index: 8)  # Ampere: no fast grouped GEMM
    assert experts.choose_kernel(_CudaLike(torch.bfloat16), w16) == "dense"
    for name in ("dense", "grouped_mm", "loop"):
        with expert_kernel(name):
            assert experts.choose_kernel(torch.zeros(3, 16), w32) == name
            with expert_kernel("auto"):  # nested auto restores the device choice inside
                assert experts.choose_kernel(torch.zeros(3, 16), w32) == "loop"
        assert experts.choose_kernel(torch.zeros(3, 16), w32) == "loop"


# ---------------------------------------------------------------- no data-dependent ops, every site
def _ffn_site(kind_kw, activation, bias, causal, out_dim=None):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, expert_hidden=16, **kind_kw)
    moe = MoEFFN(16, 16, cfg, activation=activation, bias=bias, causal=causal, out_dim=out_dim).train()
    x = torch.randn(2, 6, 16, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, -2:] = False  # padding tokens: zero weight, same shapes
    return (lambda: moe(x, mask)[0]), x


def _moa_site(kind_kw):
    torch.manual_seed(0)
    cfg = MoEConfig(**{"num_experts": 4, **kind_kw})
    attn = MoAAttention(16, 8, 2, 4, cfg, layer=0).train()
    x = torch.randn(2, 6, 16, requires_grad=True)
    cos, sin = torch.ones(2, 6, 4), torch.zeros(2, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :1] = False
    return (lambda: attn(x, cos, sin, AttnMask(None, True), token_mask=mask)[0]), x


SITES = {
    "ffn_topk": lambda: _ffn_site(dict(top_k=2), "swiglu", False, True),
    "ffn_top_p": lambda: _ffn_site(dict(router="top_p", top_k=3, top_p=0.6), "swiglu", False, True),
    "ffn_group_limited_aux_free": lambda: _ffn_site(dict(hierarchy="group_limited", num_groups=2, top_groups=1,
                                                         top_k=2, score_func="sigmoid", aux_free_bias=True),
                                                    "swiglu", False, True),
    "ffn_two_level_shared": lambda: _ffn_site(dict(hierarchy="two_level", num_groups=2, top_groups=1, top_k=2,
                                                   renormalize=False, num_shared_experts=1), "swiglu", False, True),
    "ffn_capacity": lambda: _ffn_site(dict(top_k=2, capacity_factor=0.75), "swiglu", False, True),
    "vision_gelu_bias": lambda: _ffn_site(dict(top_k=2), "gelu", True, False),
    "vision_expert_choice": lambda: _ffn_site(dict(router="expert_choice", top_k=2, capacity_factor=1.0),
                                              "gelu", True, False),
    "connector_width_change": lambda: _ffn_site(dict(top_k=2), "gelu", True, False, out_dim=24),
    "moa": lambda: _moa_site(dict(top_k=2)),
    "moa_shared_capacity": lambda: _moa_site(dict(top_k=1, num_experts=3, num_shared_experts=1,
                                                  capacity_factor=1.0)),
}


@pytest.mark.parametrize("kernel,dtype", [("grouped_mm", torch.float32), ("dense", torch.float64)])
@pytest.mark.parametrize("site", list(SITES))
def test_forward_backward_issue_no_data_dependent_op(site, kernel, dtype):
    torch.set_default_dtype(dtype)
    try:
        fn, x = SITES[site]()
    finally:
        torch.set_default_dtype(torch.float32)
    with expert_kernel(kernel):
        ops = record_fwd_bwd(fn, x)
    bad = sorted(set(ops) & DATA_DEPENDENT)
    assert not bad, f"{site}: data-dependent ops {bad}"
    buffered = "capacity" in site or "expert_choice" in site  # static (E, C) buffers: one batched matmul
    expected = {"bmm", "baddbmm"} if buffered else {"_grouped_mm"} if kernel == "grouped_mm" else {"gather"}
    assert expected & set(ops), f"{site}: expected one of {expected} in {sorted(set(ops))}"


def test_detector_catches_the_host_count_loop():
    """Negative control: the CPU-eager loop kernel reads counts on the host, and the check sees it."""
    fn, x = SITES["ffn_topk"]()
    with expert_kernel("loop"), pytest.raises(AssertionError, match="tolist"):
        record_fwd_bwd(fn, x)
    rec = OpRecorder()
    with rec:
        torch.tensor([1, 0, 2]).nonzero()
        torch.tensor(3.0).item()
    assert {"nonzero", "_local_scalar_dense"} <= set(rec.ops)


# ---------------------------------------------------------------- decode-size op budget
DECODE_OP_CEILING = 38  # 36 on torch 2.14 (about 60 before the dispatch was made static)


def test_decode_size_moe_ffn_forward_op_count_is_pinned():
    """One token, eval, no grad (a decode step): router + plan + dispatch + 2 grouped GEMMs + combine.

    The ceiling pins today's count with a small margin; a regression that adds host syncs, per-expert
    loops or extra copies at decode size shows up here first (each op is at least one GPU kernel)."""
    torch.manual_seed(0)
    moe = MoEFFN(64, 128, MoEConfig(num_experts=8, top_k=2), causal=True).eval()
    x = torch.randn(1, 1, 64)
    rec = OpRecorder()
    with torch.no_grad(), expert_kernel("grouped_mm"), rec:
        moe(x)
    ops = [o for o in rec.ops if o not in ("view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze",
                                           "squeeze", "alias", "detach", "slice", "select", "permute")]
    assert not set(ops) & DATA_DEPENDENT
    assert ops.count("_grouped_mm") == 2
    assert len(ops) <= DECODE_OP_CEILING, f"{len(ops)} ops > {DECODE_OP_CEILING}: {ops}"


def test_cpu_loop_custom_op_passes_opcheck_and_matches_the_reference():
    """The CPU loop kernel as an opaque op for torch.compile: fake/autograd registrations are right."""
    from mmoe.model.moe.experts import expert_loop_mm

    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([2, 0, 3])  # rows 5-6 count for nobody: output 0
    y = expert_loop_mm(x, w, counts)
    ref = torch.cat([x[:2] @ w[0], x[2:5] @ w[2], x.new_zeros(2, 5)])
    torch.testing.assert_close(y, ref)
    assert torch.autograd.gradcheck(lambda a, b: expert_loop_mm(a, b, counts), (x, w))
    torch.library.opcheck(expert_loop_mm, (x, w, counts))

"""torch.compile(fullgraph=True) of every MoE block kind equals eager (fp32, 1e-5) on three batches with
different routing, forward and backward, without recompiling.

The CPU tests use the aot_eager backend: it runs dynamo's full-graph capture and AOTAutograd's
functionalised forward/backward graphs (where graph breaks, data-dependent shapes and recompiles come
from) without inductor's C++ code generation, which takes minutes on a 2-core machine. Inductor and
CUDA graphs are exercised by benchmarks/gpu_check.sh on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mmoe.model.connector import Connector, ConnectorConfig
from mmoe.model.decoder import Decoder, DecoderConfig
from mmoe.model.moe import MoEConfig
from mmoe.model.moe.attention import AttnMask
from mmoe.model.moe.experts import expert_kernel
from mmoe.model.vision import VisionConfig, VisionEncoder
from mmoe.training.compile import compile_blocks

BACKEND = "aot_eager"
pytestmark = pytest.mark.slow  # ~1 min per compiled block on a loaded 2-core machine


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def check_three_batches(eager: torch.nn.Module, make_inputs, route_of) -> None:
    """Compile a copy; feed three batches (make_inputs(i) -> (args, kwargs, x)); compare outputs and all gradients;
    forbid recompiles. route_of(module, output) gives the routing decisions to compare."""
    compiled = copy.deepcopy(eager)
    compiled.compile(fullgraph=True, backend=BACKEND, dynamic=False)
    routes = []
    for i in range(3):
        outs = {}
        for name, mod in (("eager", eager), ("compiled", compiled)):
            mod.zero_grad(set_to_none=True)
            args, kwargs, x = make_inputs(i)
            if name == "compiled" and i > 0:
                with torch.compiler.set_stance("fail_on_recompile"):
                    y = mod(*args, **kwargs)
            else:
                y = mod(*args, **kwargs)
            out = y[0] if isinstance(y, tuple) else y
            out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
            outs[name] = (out.detach(), x.grad.clone(), {n: p.grad for n, p in mod.named_parameters()},
                          route_of(mod, y))
        (ye, ge, pe, re), (yc, gc, pc, rc) = outs["eager"], outs["compiled"]
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)
        for n in pe:
            if pe[n] is None:
                assert pc[n] is None or not pc[n].any(), n
            else:
                torch.testing.assert_close(pc[n], pe[n], rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {n}: {m}")
        assert torch.equal(rc, re)  # same routing decisions
        routes.append(re)
    assert not torch.equal(routes[0], routes[1]) and not torch.equal(routes[1], routes[2]), "routing did not change"
    for b_e, b_c in zip(eager.buffers(), compiled.buffers()):  # e.g. the aux-free load accumulator
        torch.testing.assert_close(b_c, b_e)


DECODER_KINDS = {
    "topk_moa_topk": (dict(num_experts=4, top_k=2), dict(num_experts=2, top_k=1)),
    "top_p_capacity_shared": (dict(router="top_p", top_k=3, top_p=0.6, capacity_factor=1.0, num_shared_experts=1),
                              dict(router="top_p", num_experts=3, top_k=2, top_p=0.5, num_shared_experts=1)),
    "group_limited_aux_free_two_level": (dict(num_experts=4, top_k=2, hierarchy="group_limited", num_groups=2,
                                              top_groups=1, score_func="sigmoid", aux_free_bias=True),
                                         dict(num_experts=4, top_k=2, hierarchy="two_level", num_groups=2,
                                              top_groups=1, renormalize=False, capacity_factor=1.5)),
}


@pytest.mark.parametrize("kernel,kind", [("auto", k) for k in DECODER_KINDS] + [("dense", "topk_moa_topk")])
def test_decoder_block_compiles_fullgraph_and_matches_eager(kind, kernel):
    """auto: the CPU loop kernel as one custom op; dense: the static device-agnostic kernel."""
    with expert_kernel(kernel):
        check_decoder_block_case(kind)


def check_decoder_block_case(kind):
    ffn, moa = DECODER_KINDS[kind]
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=64, dim=32, n_layers=1, n_heads=8, n_kv_heads=2, hidden=48,
                        ffn_moe=MoEConfig(**ffn), ffn_moe_layers="all", attn_moe=MoEConfig(**moa),
                        attn_moe_layers="all")
    dec = Decoder(cfg).train()
    block = dec.layers[0]
    with torch.no_grad():  # sharper routers so that each batch routes differently
        for m in block.modules():
            if hasattr(m, "gate") and isinstance(m.gate, torch.nn.Linear):
                m.gate.weight.normal_(0, 1.0)
    cos, sin = dec.rope(torch.arange(7).expand(2, 7))
    mask = AttnMask(None, True)  # right padding: the causal fast path, as in training

    def make_inputs(i):
        g = torch.Generator().manual_seed(10 + i)
        x = torch.randn(2, 7, 32, generator=g, requires_grad=True)
        tm = torch.ones(2, 7, dtype=torch.bool)
        tm[i % 2, 7 - i - 1:] = False  # padding changes with the batch, shapes do not
        return (x, cos, sin, mask, None), {"token_mask": tm, "modality": None}, x

    check_three_batches(block, make_inputs, lambda mod, y: torch.cat([r.expert_idx for r in y[1]], 1))


@pytest.mark.parametrize("moe_kw", [dict(num_experts=4, top_k=2, capacity_factor=1.5),
                                    dict(num_experts=4, top_k=1, router="expert_choice", capacity_factor=1.0)],
                         ids=["token_choice_capacity", "expert_choice"])
def test_vision_moe_block_compiles_fullgraph_and_matches_eager(moe_kw):
    torch.manual_seed(0)
    enc = VisionEncoder(VisionConfig(image_size=32, patch_size=8, dim=32, depth=1, n_heads=2, mlp_ratio=2.0,
                                     feature_layer=-1, moe=MoEConfig(**moe_kw), moe_layers="all")).train()
    block = enc.vit.blocks[0]
    mlp = block.mlp
    with torch.no_grad():
        mlp.moe.router.gate.weight.normal_(0, 1.0)

    def make_inputs(i):
        x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(20 + i), requires_grad=True)
        return (x,), {}, x

    def route_of(mod, y):  # the block returns (x, RoutingResult)
        return y[1].expert_idx * y[1].kept

    check_three_batches(block, make_inputs, route_of)


def test_connector_moe_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    conn = Connector(ConnectorConfig(kind="moe_mlp", moe=MoEConfig(num_experts=4, top_k=2), pool=2), 16, 24,
                     grid=4).train()
    with torch.no_grad():
        conn.proj.router.gate.weight.normal_(0, 1.0)

    def make_inputs(i):
        x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(30 + i), requires_grad=True)
        image_mask = torch.tensor([True, i != 1, True])  # a placeholder image in one batch
        return (x, image_mask), {}, x

    check_three_batches(conn, make_inputs, lambda mod, y: y[1][0].expert_idx)


def test_compile_blocks_wires_every_block_and_the_connector():
    from test_vlm import tiny_vlm

    model = tiny_vlm()
    n = compile_blocks(model, backend=BACKEND)
    assert n == len(model.vision.vit.blocks) + 1 + len(model.decoder.layers)
    assert all(b._compiled_call_impl is not None for b in model.decoder.layers)
    assert model.connector._compiled_call_impl is not None
    assert set(model.state_dict()) == set(tiny_vlm().state_dict())  # in place: checkpoint keys unchanged


def _tiny_decoder() -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=8, n_kv_heads=2, hidden=48, max_seq_len=32,
                        ffn_moe=MoEConfig(num_experts=4, top_k=2, router="top_p", top_p=0.7, num_shared_experts=1),
                        ffn_moe_layers="all", attn_moe=MoEConfig(num_experts=2, top_k=1), attn_moe_layers="every_2")
    dec = Decoder(cfg).eval()
    with torch.no_grad():
        for m in dec.modules():
            if hasattr(m, "gate") and isinstance(m.gate, torch.nn.Linear):
                m.gate.weight.normal_(0, 1.0)
    return dec


def test_static_decode_matches_dynamic_cache_generation():
    """The fixed-shape decode step (whole preallocated cache + key mask) generates the same tokens as the
    growing-cache path, with left padding and a modality label."""
    from mmoe.model.generation import generate

    dec = _tiny_decoder()
    ids = torch.randint(5, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    mask[2, :1] = False
    modality = torch.zeros(3, 6, dtype=torch.long)
    ref = generate(dec, ids, attention_mask=mask, modality=modality, max_new_tokens=8)
    out = generate(dec, ids, attention_mask=mask, modality=modality, max_new_tokens=8, static=True)
    assert torch.equal(out, ref)
    assert len(set(map(tuple, ref.tolist()))) > 1  # rows differ: the comparison is not trivially equal


def test_compiled_decode_step_fullgraph_no_recompile_across_steps():
    """torch.compile(fullgraph) of the decode step: one graph for every step of a generation (positions,
    routing and the filled length change, shapes do not), same tokens as eager."""
    from mmoe.model.generation import generate

    dec = _tiny_decoder()
    ids = torch.randint(5, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    ref = generate(dec, ids, max_new_tokens=7)
    step = torch.compile(dec.decode_step, fullgraph=True, backend=BACKEND, dynamic=False)
    calls = []

    def counted(*a):
        calls.append(1)
        if len(calls) > 1:
            with torch.compiler.set_stance("fail_on_recompile"):
                return step(*a)
        return step(*a)

    out = generate(dec, ids, max_new_tokens=7, step_fn=counted)
    assert len(calls) == 6 and torch.equal(out, ref)


def test_compiled_cpu_experts_run_the_loop_custom_op_not_the_dense_fallback():
    """On CPU the compiled expert matmul is the per-expert loop as one custom op. The dense fallback gives the same
    values at E times the FLOPs (every row through every expert), so only the traced graph tells them apart."""
    from mmoe.model.moe import GroupedLinear
    traced: list[str] = []

    def recording_backend(gm, example_inputs):
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm.forward

    torch.manual_seed(0)
    lin = GroupedLinear(4, 8, 6, bias=True)
    x, counts = torch.randn(10, 8), torch.tensor([3, 0, 5, 2])
    compiled = torch.compile(lambda x, counts: lin(x, counts), backend=recording_backend, fullgraph=True)
    torch.testing.assert_close(compiled(x, counts), lin(x, counts))
    assert any("expert_loop_mm" in t for t in traced), traced
    assert not any(t in ("matmul", "gather", "bmm") or "matmul" in t for t in traced), traced

"""MoEFFN (packed dispatch) against a naive per-token loop in float64, forward and backward, for every
router kind; dense-mixture and transformers-Mixtral equivalences; gradient flow and token dropping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmoe.model.moe import (GroupedExperts, GroupedLinear, LocalDispatcher, MoEConfig, MoEConfigError, MoEFFN,
                            RoutingResult)
from mmoe.model.moe.experts import reference_expert, swiglu_act

D, HID, B, T = 12, 10, 2, 9

KINDS = {
    "softmax_renorm": dict(top_k=2),
    "softmax_raw": dict(top_k=2, renormalize=False),
    "sigmoid_renorm": dict(top_k=2, score_func="sigmoid"),
    "sigmoid_raw_scaled": dict(top_k=3, score_func="sigmoid", renormalize=False, routed_scaling=2.5),
    "switch": dict(top_k=1, renormalize=False),
    "top_p": dict(router="top_p", top_k=3, top_p=0.6),
    "noisy": dict(top_k=2, noisy_gating=True),
    "jitter": dict(top_k=2, jitter_eps=0.2),
    "expert_choice": dict(router="expert_choice", top_k=2, capacity_factor=1.0),
    "expert_choice_k1": dict(router="expert_choice", top_k=1, capacity_factor=1.0),
    "group_limited": dict(hierarchy="group_limited", num_groups=3, top_groups=2, top_k=2,
                          score_func="sigmoid"),
    "two_level": dict(hierarchy="two_level", num_groups=3, top_groups=1, top_k=2, renormalize=False),
    "aux_free_bias": dict(top_k=2, score_func="sigmoid", aux_free_bias=True),
    "shared_experts": dict(top_k=2, num_shared_experts=2),
}
CAPACITY = {
    "cap_position": dict(top_k=2, capacity_factor=0.5, drop_policy="position"),
    "cap_score": dict(top_k=2, capacity_factor=0.5, drop_policy="score"),
    "cap_top_p_score": dict(router="top_p", top_k=3, top_p=0.8, capacity_factor=0.4, drop_policy="score"),
    "cap_group_position": dict(hierarchy="group_limited", num_groups=3, top_groups=1, top_k=2,
                               capacity_factor=0.5, drop_policy="position"),
    "cap_one_row": dict(top_k=1, renormalize=False, capacity_factor=0.2, drop_policy="score"),  # C = 1
}


def build(kind_kw: dict, activation: str = "swiglu", bias: bool = False, seed: int = 0, E: int = 6) -> MoEFFN:
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=E, expert_hidden=HID, **kind_kw)
    moe = MoEFFN(D, 2 * HID, cfg, activation=activation, bias=bias, causal=cfg.router != "expert_choice")
    moe = moe.double()
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 0.7)
        for lin in (moe.router.group_gate, moe.router.noise_gate):
            if lin is not None:
                lin.weight.normal_(0, 0.7)
        if cfg.aux_free_bias:
            moe.router.expert_bias.copy_(torch.linspace(-0.4, 0.4, E))
        for p in moe.experts.parameters():  # biases start at 0 by default: make them matter
            p.normal_(0, 0.3)
    return moe


def inputs(seed: int = 1, padded: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    if padded:
        mask[0, -3:] = False
        mask[1, -1] = False
    return x, mask


def loop_reference(moe: MoEFFN, x: torch.Tensor, r) -> torch.Tensor:
    """For each token, for each kept slot: weight * expert_e(x), plus shared experts. No packing."""
    flat = x.reshape(-1, x.shape[-1])
    rows = []
    for n in range(flat.shape[0]):
        acc = flat.new_zeros(flat.shape[-1])
        for j in range(r.expert_idx.shape[1]):
            if bool(r.kept[n, j]):
                e = int(r.expert_idx[n, j])
                acc = acc + r.weights[n, j] * reference_expert(moe.experts, e, flat[n:n + 1])[0]
        if moe.shared is not None:
            acc = acc + moe.shared(flat[n:n + 1])[0]
        rows.append(acc)
    return torch.stack(rows).view_as(x)


def check_against_loop(moe: MoEFFN, x, mask, train: bool):
    moe.train(train)
    torch.manual_seed(7)
    y, r = moe(x, mask)
    assert y.dtype == torch.float64
    ref = loop_reference(moe, x, r)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    # backward: same routing (shared router graph), compare grads of the input and of every parameter
    params = [x] + [p for p in moe.parameters()]
    g = torch.randn_like(y)
    gy = torch.autograd.grad(y, params, g, retain_graph=True, allow_unused=True)
    gr = torch.autograd.grad(ref, params, g, allow_unused=True)
    names = ["x"] + [n for n, _ in moe.named_parameters()]
    for name, p, a, b in zip(names, params, gy, gr):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"grad of {name}: {m}")
    return y, r


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("act", ["swiglu", "gelu_bias"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_packed_equals_loop(kind, act, train):
    moe = build(KINDS[kind], "swiglu" if act == "swiglu" else "gelu", bias=act != "swiglu")
    x, mask = inputs(padded=kind in ("top_p", "expert_choice", "group_limited", "aux_free_bias"))
    y, r = check_against_loop(moe, x, mask, train)
    assert r.kept.any(-1)[mask.flatten()].any()
    if kind.startswith("expert_choice"):
        assert not r.kept[~mask.flatten()].any()


@pytest.mark.parametrize("act", ["swiglu", "gelu_bias"])
@pytest.mark.parametrize("kind", list(CAPACITY))
def test_packed_equals_loop_with_capacity(kind, act):
    moe = build(CAPACITY[kind], "swiglu" if act == "swiglu" else "gelu", bias=act != "swiglu")
    with torch.no_grad():
        moe.router.gate.weight[0].add_(2.0)  # make expert 0 popular so capacity bites
    x, mask = inputs(padded=True)
    y, r = check_against_loop(moe, x, mask, train=True)
    C = moe.cfg.capacity(int(mask.sum()), True)
    assert (r.expert_counts("kept") <= C).all()
    assert (r.kept != (r.selected & mask.flatten()[:, None])).any()  # some assignments were dropped


def test_fully_dropped_tokens_output_exactly_zero():
    moe = build(dict(top_k=1, renormalize=False, capacity_factor=0.25, drop_policy="position"), E=4)
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0] = 50.0  # every token whose x[0] > 0 picks expert 0
    x, _ = inputs()
    with torch.no_grad():
        x[..., 0] = 1.0
    moe.train()
    y, r = moe(x)
    dropped = ~r.kept.any(-1)
    assert dropped.sum() > 0
    assert (y.reshape(-1, D)[dropped] == 0).all()  # the block output is exactly the residual
    resid = x + y
    assert torch.equal(resid.reshape(-1, D)[dropped], x.reshape(-1, D)[dropped])
    g = torch.autograd.grad(y.sum(), x)[0].reshape(-1, D)
    assert (g[dropped] == 0).all()  # no gradient through dropped tokens either


def test_padding_tokens_get_no_expert_compute():
    moe = build(KINDS["softmax_renorm"])
    x, mask = inputs(padded=True)
    y, r = moe(x, mask)
    assert (y[~mask] == 0).all()
    assert not r.kept[~mask.flatten()].any()


def test_top_k_all_experts_is_dense_softmax_mixture():
    E = 5
    moe = build(dict(top_k=E, renormalize=False), E=E).eval()
    x, _ = inputs()
    y, _ = moe(x)
    flat = x.reshape(-1, D)
    p = (flat @ moe.router.gate.weight.t()).softmax(-1)
    dense = sum(p[:, e:e + 1] * reference_expert(moe.experts, e, flat) for e in range(E))
    torch.testing.assert_close(y.reshape(-1, D), dense, rtol=1e-10, atol=1e-12)


def test_matches_transformers_mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    H, I, E, K = 16, 24, 6, 2
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                        experts_implementation="eager")
    torch.manual_seed(0)
    hf = MixtralSparseMoeBlock(cfg).double().eval()
    shapes = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    assert shapes == {"gate.weight": (E, H), "experts.gate_up_proj": (E, 2 * I, H),
                      "experts.down_proj": (E, H, I)}
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5)
    ours = MoEFFN(H, I, MoEConfig(num_experts=E, top_k=K, renormalize=True)).double().eval()
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.experts.w_in.weight.copy_(hf.experts.gate_up_proj.transpose(1, 2))  # (E, H, 2I): [gate | up]
        ours.experts.w_out.weight.copy_(hf.experts.down_proj.transpose(1, 2))  # (E, I, H)
    x = torch.randn(3, 7, H, dtype=torch.float64)
    ref = hf(x.clone())
    y, r = ours(x)
    # HF takes the softmax in float32 even for float64 inputs, hence the 1e-6 tolerance
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    _, _, hf_idx = hf.gate(x.reshape(-1, H))
    assert torch.equal(r.expert_idx.sort(-1).values, hf_idx.sort(-1).values)


def test_gradients_reach_selected_experts_and_router_only():
    E = 8
    moe = build(dict(top_k=1, renormalize=False), E=E)
    with torch.no_grad():
        moe.router.gate.weight[-2:, 0] = -100.0  # with x[..., 0] = 1, experts 6 and 7 can never win
    x, _ = inputs()
    with torch.no_grad():
        x[..., 0] = 1.0
    y, r = moe(x)
    (y * torch.randn_like(y)).sum().backward()
    used = set(r.expert_idx[r.kept].tolist())
    assert used and not used & {6, 7}
    for lin in (moe.experts.w_in, moe.experts.w_out):
        for e in range(E):
            nz = lin.weight.grad[e].abs().sum() > 0
            assert bool(nz) == (e in used), (e, used)
    g = moe.router.gate.weight.grad
    assert g.abs().sum() > 0
    for e in used:
        assert g[e].abs().sum() > 0


def test_grouped_linear_with_empty_experts_and_bias_gradcheck():
    lin = GroupedLinear(4, 3, 5, bias=True).double()
    counts = torch.tensor([2, 0, 3, 0])
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = lin(x, counts)
    ref = torch.cat([x[:2] @ lin.weight[0] + lin.bias[0], x[2:] @ lin.weight[2] + lin.bias[2]])
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert (lin.weight.grad[[1, 3]] == 0).all() and (lin.bias.grad[[1, 3]] == 0).all()
    assert torch.autograd.gradcheck(lambda a, w, b: GroupedLinear.forward(_with(lin, w, b), a, counts),
                                    (x, lin.weight.detach().clone().requires_grad_(),
                                     lin.bias.detach().clone().requires_grad_()))
    assert lin(x[:0], torch.zeros(4, dtype=torch.long)).shape == (0, 5)


def _with(lin: GroupedLinear, w, b):
    class _L:
        weight, bias = w, b
    return _L()


def test_swiglu_act_gradcheck():
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    g, u = h.chunk(2, -1)
    torch.testing.assert_close(swiglu_act(h), F.silu(g) * u)
    assert torch.autograd.gradcheck(swiglu_act, (h,))


@pytest.mark.parametrize("kind", ["softmax_renorm", "top_p", "expert_choice_k1", "cap_score", "cap_one_row"])
def test_combine_paths_match_index_add(kind):
    moe = build(KINDS.get(kind) or CAPACITY[kind])
    x, mask = inputs(padded=True)
    moe.train()
    _, r = moe(x, mask)
    d = LocalDispatcher()
    plan = d.plan(r)
    xs, _ = d.dispatch(x.detach().reshape(B * T, D), plan)
    ys = torch.randn(plan.token_idx.numel(), D, dtype=torch.float64)
    out = d.combine(ys.view_as(xs), plan)
    ref = torch.zeros(B * T, D, dtype=torch.float64).index_add(0, plan.token_idx, ys * plan.weights[:, None])
    torch.testing.assert_close(out, ref)
    per_slot = d.combine(ys.view_as(xs), plan, per_slot=True).view(B * T, -1, D)
    x_slots = torch.randn(B * T * plan.num_slots, D, dtype=torch.float64)  # per-slot inputs (MoA's outputs)
    rows_slots = d.dispatch(x_slots, plan, per_slot=True)[0].reshape(-1, D)
    valid = plan.row_valid
    for a, (tok, slot) in enumerate(zip(plan.token_idx.tolist(), plan.slot_idx.tolist())):
        if valid[a]:
            assert torch.equal(per_slot[tok, slot % plan.num_slots], ys[a])
            assert torch.equal(rows_slots[a], x_slots[tok * plan.num_slots + slot % plan.num_slots])
    # every kept slot has exactly one row; rows that hold no kept slot weigh 0
    assert int(valid.sum()) == int(r.kept.sum()) == int(plan.tokens_per_expert.sum())
    assert sorted(plan.slot_idx[valid].tolist()) == r.kept.flatten().nonzero().squeeze(1).tolist()
    assert (plan.weights[~valid] == 0).all()
    experts = r.expert_idx.flatten()[plan.slot_idx[valid]]
    assert (experts[1:] >= experts[:-1]).all()  # sorted by expert
    assert plan.capacity == r.extras["capacity"]  # the router's static buffer size (0: dropless)
    if plan.capacity:  # static (E, C) buffer: row e*C + i belongs to expert e
        assert xs.shape == (r.num_experts, plan.capacity, D)
        assert torch.equal(experts, valid.nonzero().squeeze(1) // plan.capacity)
    else:  # dropless: A = N*K rows whatever the routing, counted rows first
        assert xs.shape == (B * T * plan.num_slots, D) and valid[:int(valid.sum())].all()


def test_dropless_combine_forward_and_gradients_match_a_per_token_loop():
    """Combine of N*K rows (some slots not kept, weight 0) against a float64 loop over tokens and slots:
    the output, and the gradients of the rows and of the router weights (through autograd of the loop)."""
    N, K, E, Dm = 300, 2, 5, 6
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    kept = torch.rand(N, K, generator=g) > 0.2
    w = (torch.rand(N, K, generator=g, dtype=torch.float64) * kept).requires_grad_()
    probs = torch.full((N, E), 1.0 / E, dtype=torch.float64)
    r = RoutingResult(expert_idx=idx, weights=w, selected=kept, kept=kept, probs=probs, logits=probs.log(),
                      token_mask=torch.ones(N, dtype=torch.bool), num_experts=E, batch_shape=(1, N))
    d = LocalDispatcher()
    plan = d.plan(r)
    rows = torch.randn(N * K, Dm, generator=g, dtype=torch.float64, requires_grad=True)  # expert outputs
    out = d.combine(rows, plan)
    gy = torch.randn(N, Dm, generator=g, dtype=torch.float64)
    g_rows, g_w = torch.autograd.grad(out, (rows, w), gy)
    row_of = {int(s): a for a, s in enumerate(plan.slot_idx.tolist())}  # slot n*K+j -> its row
    ref = torch.stack([sum(w[n, j] * rows[row_of[n * K + j]] for j in range(K)) for n in range(N)])
    ref_rows, ref_w = torch.autograd.grad(ref, (rows, w), gy)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_rows, ref_rows, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_w, ref_w, rtol=1e-12, atol=1e-12)


def test_hand_built_routing_without_capacity_is_planned_dropless():
    """A RoutingResult built by hand (no router, so no 'capacity' in extras) is dispatched dropless: every
    kept slot is a row, and combining the dispatched rows unchanged gives sum_k w_nk * x_n over kept slots."""
    N, K, E = 7, 2, 3
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    kept = torch.rand(N, K, generator=g) > 0.3
    w = torch.rand(N, K, generator=g, dtype=torch.float64) * kept
    probs = torch.full((N, E), 1.0 / E, dtype=torch.float64)
    r = RoutingResult(expert_idx=idx, weights=w, selected=kept, kept=kept, probs=probs, logits=probs.log(),
                      token_mask=torch.ones(N, dtype=torch.bool), num_experts=E, batch_shape=(1, N))
    d = LocalDispatcher()
    plan = d.plan(r)
    assert plan.capacity == 0 and plan.token_idx.numel() == N * K
    assert plan.tokens_per_expert.tolist() == [sum(int(kept[n, j] and idx[n, j] == e) for n in range(N)
                                                   for j in range(K)) for e in range(E)]
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    xs, _ = d.dispatch(x, plan)
    ref = torch.stack([x[n] * sum(float(w[n, j]) for j in range(K) if kept[n, j]) for n in range(N)])
    torch.testing.assert_close(d.combine(xs, plan), ref, rtol=1e-12, atol=1e-12)


def test_capacity_plan_drops_slots_beyond_the_buffer():
    """A hand-built routing that keeps two slots on an expert with a one-row buffer: the plan keeps the first, and
    the second is dropped (0 per slot) instead of spilling into the next expert's row."""
    idx = torch.tensor([[0], [0], [1]])
    kept = torch.ones(3, 1, dtype=torch.bool)
    probs = torch.full((3, 2), 0.5, dtype=torch.float64)
    r = RoutingResult(expert_idx=idx, weights=torch.ones(3, 1, dtype=torch.float64), selected=kept, kept=kept,
                      probs=probs, logits=probs.log(), token_mask=torch.ones(3, dtype=torch.bool), num_experts=2,
                      batch_shape=(1, 3), extras={"capacity": 1})
    d = LocalDispatcher()
    plan = d.plan(r)
    x = torch.arange(1.0, 4.0, dtype=torch.float64)[:, None].expand(3, D)
    xs, _ = d.dispatch(x, plan)
    assert xs.shape == (2, 1, D)
    expected = torch.stack([x[0], torch.zeros(D, dtype=torch.float64), x[2]])
    assert torch.equal(d.combine(xs, plan), expected)
    assert torch.equal(d.combine(xs, plan, per_slot=True), expected)


def test_upcycled_moe_equals_dense_mlp():
    from mmoe.model.layers import SwiGLU

    torch.manual_seed(0)
    dense = SwiGLU(D, HID).double()
    moe = MoEFFN(D, HID, MoEConfig(num_experts=4, top_k=2, num_shared_experts=1)).double()
    moe.upcycle_(dense)
    x, _ = inputs()
    torch.testing.assert_close(moe(x)[0], dense(x))
    assert isinstance(moe.experts, GroupedExperts)


def test_upcycled_from_mixtral_expert_naming_equals_transformers_qwen2_mlp():
    """Mixtral checkpoints name an expert's gate/up/down w1/w3/w2: upcycling from that naming must put w1 in the
    gate and w3 in the up half (a swap changes the output: silu is not symmetric)."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    torch.manual_seed(0)
    hf = Qwen2MLP(Qwen2Config(hidden_size=D, intermediate_size=HID, hidden_act="silu")).double()
    mixtral_style = torch.nn.Module()
    mixtral_style.w1, mixtral_style.w3, mixtral_style.w2 = hf.gate_proj, hf.up_proj, hf.down_proj
    x, _ = inputs()
    for dense in (hf, mixtral_style):
        moe = MoEFFN(D, HID, MoEConfig(num_experts=4, top_k=2)).double()
        moe.upcycle_(dense)
        torch.testing.assert_close(moe(x)[0], hf(x))


def test_upcycling_copies_dense_biases_and_refuses_to_drop_them():
    from mmoe.model.layers import GeluMLP, SwiGLU

    torch.manual_seed(0)
    x = torch.randn(5, D, dtype=torch.float64)
    for dense, act in ((SwiGLU(D, HID, bias=True), "swiglu"), (GeluMLP(D, HID, bias=True), "gelu")):
        dense = dense.double()
        with torch.no_grad():
            for p in dense.parameters():
                p.normal_(0, 0.5)  # biases far from their init so a dropped one shows
        experts = GroupedExperts(3, D, HID, act, bias=True).double()
        experts.upcycle_(dense)
        for e in range(3):
            torch.testing.assert_close(reference_expert(experts, e, x), dense(x))
        refused = r"with a bias into experts without one \(experts=3, in=12, .*bias=False\)"
        with pytest.raises(ValueError, match=refused):
            GroupedExperts(3, D, HID, act, bias=False).double().upcycle_(dense)


def _redrawn_units(experts: GroupedExperts, dense, e: int) -> dict[str, set[int]]:
    """Hidden units of expert e whose weights differ from the dense MLP's, per dense matrix."""
    hid = experts.w_out.in_features
    w_in, w_out = experts.w_in.weight[e].t(), experts.w_out.weight[e]  # (parts * hid, in), (hid, out)
    if experts.glu:
        ins, out = (dense.gate_proj, dense.up_proj), dense.down_proj
    else:
        ins, out = (dense.fc1,), dense.fc2
    units = {f"in{i}": {h for h in range(hid) if not torch.equal(w_in[i * hid + h], m.weight[h])}
             for i, m in enumerate(ins)}
    units["out"] = {h for h in range(hid) if not torch.equal(w_out[h], out.weight[:, h])}
    return units


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_drop_upcycling_redraws_a_different_quarter_of_hidden_units_in_each_expert(act):
    """upcycle_reinit 0.25 of 40 units: in each expert exactly 10 units are redrawn (the same units in every
    matrix, their input biases zeroed), the other 30 stay exact copies, and the experts redraw different units."""
    from mmoe.model.layers import GeluMLP, SwiGLU
    hid = 40
    torch.manual_seed(0)
    dense = (SwiGLU(D, hid, bias=True) if act == "swiglu" else GeluMLP(D, hid, bias=True)).double()
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.2, 0.5)  # biases nonzero, so a kept or zeroed one shows
    experts = GroupedExperts(4, D, hid, act, bias=True).double()
    experts.upcycle_(dense, reinit=0.25)
    b_in = experts.w_in.bias
    first = dense.gate_proj if act == "swiglu" else dense.fc1
    redrawn = []
    for e in range(4):
        units = _redrawn_units(experts, dense, e)
        assert len(set(map(frozenset, units.values()))) == 1, units  # one set of units across the matrices
        chosen = units["out"]
        assert len(chosen) == 10
        for h in range(hid):
            assert (b_in[e, h] == 0) if h in chosen else torch.equal(b_in[e, h], first.bias[h])
        redrawn.append(frozenset(chosen))
    assert len(set(redrawn)) == 4
    torch.testing.assert_close(experts.w_out.bias, dense.state_dict()[
        "down_proj.bias" if act == "swiglu" else "fc2.bias"].expand(4, -1))  # output biases are not per unit
    with pytest.raises(ValueError, match="reinit fraction must be in"):
        experts.upcycle_(dense, reinit=1.5)


def test_drop_upcycled_units_are_drawn_with_the_dense_matrix_statistics():
    from mmoe.model.layers import SwiGLU
    torch.manual_seed(0)
    dense = SwiGLU(64, 256).double()
    with torch.no_grad():
        dense.gate_proj.weight.normal_(0.3, 0.1)
        dense.up_proj.weight.normal_(-0.2, 0.4)
        dense.down_proj.weight.normal_(0.05, 0.02)
    experts = GroupedExperts(2, 64, 256, "swiglu").double()
    experts.upcycle_(dense, reinit=0.5)
    units = sorted(_redrawn_units(experts, dense, 1)["out"])
    assert len(units) == 128
    gate, up = experts.w_in.weight[1, :, :256][:, units], experts.w_in.weight[1, :, 256:][:, units]
    for got, (mean, std) in ((gate, (0.3, 0.1)), (up, (-0.2, 0.4)), (experts.w_out.weight[1, units], (0.05, 0.02))):
        assert abs(got.mean().item() - mean) < 0.05 * std + 0.01 * abs(mean) + 1e-3
        assert abs(got.std().item() / std - 1) < 0.05


def test_identical_upcycled_experts_give_the_router_no_gradient_and_drop_upcycling_does():
    """Why drop-upcycling exists: with exact copies every expert mix gives the same output, so the task loss
    cannot teach the router anything; redrawn units make the choice matter from the first step."""
    from mmoe.model.layers import GeluMLP
    torch.manual_seed(0)
    dense = GeluMLP(D, HID, bias=False).double()
    grads = {}
    for reinit in (0.0, 0.5):
        moe = MoEFFN(D, HID, MoEConfig(num_experts=4, top_k=2, upcycle_reinit=reinit), activation="gelu",
                     causal=False, site="vision").double()
        moe.upcycle_(dense)
        x, mask = inputs()
        y, _ = moe(x, mask)
        (y ** 2).sum().backward()
        grads[reinit] = moe.router.gate.weight.grad.abs().max().item()
    assert grads[0.0] < 1e-12 and grads[0.5] > 1e-3, grads


def test_upcycle_reinit_is_checked_and_refused_where_nothing_is_redrawn():
    from mmoe.model.decoder import DecoderConfig
    with pytest.raises(MoEConfigError, match=r"vision: moe.upcycle_reinit must be in \[0, 1\], got -0.1"):
        MoEConfig(upcycle_reinit=-0.1).validate(site="vision")
    with pytest.raises(MoEConfigError, match="decoder.attn_moe.upcycle_reinit is not used by mixture-of-attention"):
        DecoderConfig(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden=32, max_seq_len=16,
                      attn_moe=MoEConfig(upcycle_reinit=0.5)).validate()


def test_upcycling_an_unknown_mlp_names_the_accepted_layouts():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_in, self.proj_out = torch.nn.Linear(D, HID), torch.nn.Linear(HID, D)

    with pytest.raises(TypeError, match="cannot upcycle Odd: expected gate_proj/up_proj/down_proj or w1/w3/w2"):
        GroupedExperts(2, D, HID, "swiglu").upcycle_(Odd())
    with pytest.raises(TypeError, match="expected fc1/fc2 or c_fc/c_proj or linear_1/linear_2"):
        GroupedExperts(2, D, HID, "gelu").upcycle_(Odd())


@pytest.mark.parametrize("kw", [dict(), dict(capacity_factor=0.5)], ids=["dropless", "capacity"])
@pytest.mark.parametrize("bias,activation", [(True, "gelu"), (False, "swiglu")], ids=["vit_mlp", "llama_swiglu"])
def test_autocast_bf16_runs_and_stays_close(kw, bias, activation):
    """bf16 expert outputs combined with float32 router weights, dropless and with a capacity buffer; with biases
    (ViT MLP) and without (the decoder's SwiGLU, where there is no bias to cast)."""
    torch.manual_seed(0)
    moe = MoEFFN(D, HID, MoEConfig(num_experts=4, top_k=2, **kw), bias=bias, activation=activation)
    x = torch.randn(B, T, D, requires_grad=True)
    ref, _ = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, r = moe(x)
    assert y.dtype == torch.bfloat16 and r.probs.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert moe.experts.w_in.weight.grad.dtype == torch.float32
    assert moe.experts.w_in.weight.grad.abs().sum() > 0 and x.grad is not None


def test_moe_ffn_defaults_to_a_causal_decoder_ffn_and_refuses_a_swiglu_width_change():
    """Built without site arguments, an MoE FFN is the decoder's: causal (expert choice, which reads future tokens,
    refused), reporting its routing as site "ffn". SwiGLU experts cannot change the width (only the connector's
    GELU experts project to another width)."""
    with pytest.raises(MoEConfigError, match=r"^ffn\.3: moe\.router 'expert_choice'"):  # the error names the layer
        MoEFFN(D, HID, MoEConfig(num_experts=4, top_k=1, router="expert_choice"), layer=3)
    _, r = MoEFFN(D, HID, MoEConfig(num_experts=4, top_k=2))(torch.randn(B, T, D))
    assert r.site == "ffn"
    with pytest.raises(ValueError, match=r"SwiGLU experts keep the width \(out_dim 16 != dim 12\)"):
        MoEFFN(D, HID, MoEConfig(num_experts=4, top_k=2), "swiglu", out_dim=16)
    assert MoEFFN(D, HID, MoEConfig(num_experts=4, top_k=2), "gelu", out_dim=16)(torch.randn(B, T, D))[0].shape == (
        B, T, 16)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_shared_experts_take_the_bias_setting_of_the_routed_ones(activation):
    cfg = MoEConfig(num_experts=4, top_k=1, num_shared_experts=1)
    for bias in (True, False):
        moe = MoEFFN(D, HID, cfg, activation, bias=bias)
        linears = [m for m in moe.shared.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all((m.bias is not None) == bias for m in linears)
        assert (moe.experts.w_in.bias is not None) == bias


def test_shared_expert_uses_the_routed_experts_activation():
    """A quick_gelu ViT (CLIP's) gets a quick_gelu shared expert: x * sigmoid(1.702 x), written out here."""
    moe = MoEFFN(D, HID, MoEConfig(num_experts=4, top_k=1, num_shared_experts=1), "quick_gelu", bias=True)
    x = torch.randn(5, D)
    h = F.linear(x, moe.shared.fc1.weight, moe.shared.fc1.bias)
    want = F.linear(h * torch.sigmoid(1.702 * h), moe.shared.fc2.weight, moe.shared.fc2.bias)
    torch.testing.assert_close(moe.shared(x), want)


def test_grouped_linear_starts_like_nn_linear():
    """Each expert's weight and bias start as nn.Linear's do: uniform on (-1/sqrt(in), 1/sqrt(in)), filling it."""
    torch.manual_seed(0)
    lin = GroupedLinear(8, 64, 32, bias=True)
    for t in (lin.weight, lin.bias):
        assert t.abs().max() <= 1 / 8 and t.min() < -0.9 / 8 and t.max() > 0.9 / 8
    assert GroupedLinear(2, 3, 4).bias is None  # bias-free unless asked (Llama/Mixtral experts)


def test_grouped_experts_default_to_bias_free_swiglu_and_keep_their_activation_name():
    """Built with no activation, experts are Llama/Mixtral SwiGLU (gate and up in one input projection, no
    biases); the activation name is kept because upcycling from a checkpoint rebuilds the dense MLP with it."""
    experts = GroupedExperts(4, D, HID)
    assert experts.glu and experts.activation == "swiglu"
    assert experts.w_in.weight.shape == (4, D, 2 * HID) and experts.w_out.weight.shape == (4, HID, D)
    assert experts.w_in.bias is None and experts.w_out.bias is None
    x = torch.randn(5, D)
    gate, up = (x @ experts.w_in.weight[0]).chunk(2, dim=-1)
    torch.testing.assert_close(experts(x, torch.tensor([5, 0, 0, 0])), (F.silu(gate) * up) @ experts.w_out.weight[0])
    assert GroupedExperts(2, D, HID, "quick_gelu").activation == "quick_gelu"

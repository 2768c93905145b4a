"""Routing correctness: group-score rules against transformers' DeepSeek routers and a float64 loop,
options that must change behaviour wherever they are accepted (or be refused), activation checkpointing that
covers the ViT and recomputes routing exactly, frozen routers, and fp32 routers under pure bf16."""

from __future__ import annotations

import math

import pytest
import torch

from mmoe.model.moe import MoEConfig, MoEConfigError, Router

D = 16


def _router(cfg: MoEConfig, seed: int = 0, dtype=torch.float64, causal: bool = False) -> Router:
    torch.manual_seed(seed)
    r = Router(D, cfg, causal=causal).to(dtype)
    with torch.no_grad():
        r.gate.weight.normal_(0, 1.0)
        if r.group_gate is not None:
            r.group_gate.weight.normal_(0, 1.0)
    return r


def _x(n: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _sets(idx, w, keep=None):
    keep = torch.ones_like(idx, dtype=torch.bool) if keep is None else keep
    return [{e: v for e, v, k in zip(ir, wr, kr) if k} for ir, wr, kr in
            zip(idx.tolist(), w.detach().double().tolist(), keep.tolist())]


def _assert_same(ours, ref, atol):
    assert len(ours) == len(ref)
    for n, (a, b) in enumerate(zip(ours, ref)):
        assert set(a) == set(b), f"token {n}: {sorted(a)} vs {sorted(b)}"
        for e in a:
            assert abs(a[e] - b[e]) <= atol, (n, e, a[e], b[e])


# ----------------------------------------------------------------------------- 1. group-score rules
# (E, G, top_groups, top_k); in (16, 2, 1, 4) the top-k sum takes 4 experts: more than G, fewer than a group holds
COMBOS = [(16, 4, 2, 2), (16, 4, 2, 4), (16, 4, 1, 2), (16, 4, 1, 3), (16, 8, 3, 4), (12, 3, 2, 6),
          (16, 2, 1, 4)]


@pytest.mark.parametrize("E,G,tg,k", COMBOS)
def test_group_score_top2_matches_transformers_deepseek_v3_router(E, G, tg, k):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf_cfg = DeepseekV3Config(hidden_size=D, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=E, num_experts_per_tok=k, n_group=G, topk_group=tg,
                              norm_topk_prob=True, routed_scaling_factor=2.5)
    hf = DeepseekV3TopkRouter(hf_cfg)
    ours = _router(MoEConfig(num_experts=E, top_k=k, score_func="sigmoid", hierarchy="group_limited", num_groups=G,
                             top_groups=tg, group_score="top2", aux_free_bias=True, routed_scaling=2.5),
                   dtype=torch.float32).eval()
    with torch.no_grad():
        ours.expert_bias.copy_(torch.linspace(-0.2, 0.25, E)[torch.randperm(E, generator=torch.Generator().manual_seed(3))])
        hf.weight.copy_(ours.gate.weight)
        hf.e_score_correction_bias.copy_(ours.expert_bias)
    x = _x(600, dtype=torch.float32)
    res = ours(x)
    _, hf_w, hf_idx = hf(x)
    _assert_same(_sets(res.expert_idx, res.weights), _sets(hf_idx, hf_w), atol=1e-6)


@pytest.mark.parametrize("E,G,tg,k", COMBOS)
def test_group_score_max_matches_transformers_deepseek_v2_router(E, G, tg, k):
    from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    hf_cfg = DeepseekV2Config(hidden_size=D, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=E, num_experts_per_tok=k, n_group=G, topk_group=tg,
                              topk_method="group_limited_greedy", routed_scaling_factor=16.0)
    hf = DeepseekV2TopkRouter(hf_cfg)
    ours = _router(MoEConfig(num_experts=E, top_k=k, score_func="softmax", renormalize=False,
                             hierarchy="group_limited", num_groups=G, top_groups=tg, group_score="max",
                             routed_scaling=16.0), dtype=torch.float32).eval()
    with torch.no_grad():
        hf.weight.copy_(ours.gate.weight)
    x = _x(600, dtype=torch.float32)
    res = ours(x)
    _, hf_w, hf_idx = hf(x)
    _assert_same(_sets(res.expert_idx, res.weights), _sets(hf_idx, hf_w), atol=1e-6 * 16)


def _topk_sum_loop(s, b, G, tg, k, renormalize):
    """Per token, in plain Python floats: DeepSeek-V3 paper / Megatron group_limited_topk."""
    N, E = len(s), len(s[0])
    P = E // G
    n_top = max(1, min(P, k // tg))
    out = []
    for n in range(N):
        choice = [s[n][e] + b[e] for e in range(E)]
        group_scores = [sum(sorted(choice[g * P:(g + 1) * P], reverse=True)[:n_top]) for g in range(G)]
        groups = sorted(range(G), key=lambda g: -group_scores[g])[:tg]
        allowed = [e for e in range(E) if e // P in groups]
        picked = sorted(allowed, key=lambda e: -choice[e])[:k]
        w = {e: s[n][e] for e in picked}
        total = sum(w.values())
        out.append({e: v / total for e, v in w.items()} if renormalize else w)
    return out


@pytest.mark.parametrize("E,G,tg,k", COMBOS)
@pytest.mark.parametrize("score_func,renormalize", [("sigmoid", True), ("softmax", False)])
def test_group_score_topk_sum_matches_float64_loop(E, G, tg, k, score_func, renormalize):
    ours = _router(MoEConfig(num_experts=E, top_k=k, score_func=score_func, renormalize=renormalize,
                             hierarchy="group_limited", num_groups=G, top_groups=tg, aux_free_bias=True)).eval()
    with torch.no_grad():
        ours.expert_bias.copy_(torch.linspace(-0.05, 0.05, E, dtype=torch.float64))
    x = _x(300)
    res = ours(x)
    logits = (x @ ours.gate.weight.t()).tolist()
    s = [[1 / (1 + math.exp(-v)) for v in row] if score_func == "sigmoid" else
         [math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    _assert_same(_sets(res.expert_idx, res.weights), _topk_sum_loop(s, ours.expert_bias.tolist(), G, tg, k, renormalize),
                 atol=1e-12)


def test_group_score_rules_route_differently_when_top_k_per_group_is_not_two():
    """The option does something: with 16 experts, 4 groups, top_groups 2, top_k 2 the three rules disagree."""
    x = _x(2000, dtype=torch.float32)
    picks = {}
    for rule in ("topk_sum", "top2", "max"):
        r = _router(MoEConfig(num_experts=16, top_k=2, score_func="sigmoid", hierarchy="group_limited",
                              num_groups=4, top_groups=2, group_score=rule), dtype=torch.float32).eval()
        picks[rule] = r(x).expert_idx.sort(-1).values
    differ = (picks["topk_sum"] != picks["top2"]).any(-1).float().mean()
    assert differ > 0.05, differ
    assert torch.equal(picks["topk_sum"], picks["max"])  # floor(2 / 2) = 1: the top-1 sum is the max


@pytest.mark.parametrize("kw,field", [
    (dict(group_score="top3", hierarchy="group_limited", num_groups=2), "group_score"),
    (dict(group_score="top2"), "group_score"),  # flat: nothing to score
    (dict(group_score="top2", num_experts=4, hierarchy="group_limited", num_groups=4, top_k=1), "group_score"),
])
def test_group_score_refusals_name_the_field(kw, field):
    with pytest.raises(MoEConfigError, match=rf"moe\.{field}"):
        MoEConfig(**kw).validate()


# ----------------------------------------------------------------------------- 2. activation checkpointing
IMG = 4


def _ckpt_vlm(vision_router: str):
    from mmoe.model.connector import ConnectorConfig
    from mmoe.model.decoder import DecoderConfig
    from mmoe.model.vision import VisionConfig
    from mmoe.model.vlm import MMoEVLM, VLMConfig

    tc = MoEConfig(num_experts=4, top_k=2, aux_free_bias=True)
    vis = tc if vision_router == "token_choice" else MoEConfig(num_experts=4, top_k=1, router="expert_choice",
                                                               capacity_factor=1.0)
    cfg = VLMConfig(
        vision=VisionConfig(image_size=32, patch_size=16, dim=32, depth=3, n_heads=2, mlp_ratio=2.0, moe=vis,
                            moe_layers="0,2", feature_layer=-1),
        connector=ConnectorConfig(kind="moe_mlp", moe=tc),
        decoder=DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, hidden=64, max_seq_len=64,
                              ffn_moe=MoEConfig(num_experts=4, top_k=2, hierarchy="group_limited", num_groups=2,
                                                top_groups=1, aux_free_bias=True, jitter_eps=0.05,
                                                num_shared_experts=1),
                              ffn_moe_layers="all", attn_moe=tc, attn_moe_layers="all"),
        image_token_id=IMG)
    torch.manual_seed(0)
    model = MMoEVLM(cfg).double().train()
    model.always_encode_images = True  # the text-only batch runs a masked placeholder image
    return model


def _ckpt_loss(model):
    from mmoe.model.moe import balancing as B
    from mmoe.training.module import lm_loss

    torch.manual_seed(7)
    ids = torch.tensor([[1, IMG, 7, 8, 9, 10], [1, 11, IMG, 12, 13, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9, 10], [-100, -100, -100, 12, 13, -100]])
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = model(ids, ids != 0, pixels, labels)
    text = torch.tensor([[1, 5, 6, 7, 8]])
    out2 = model(text, text != 0, None, text.clone())  # placeholder image: every vision/connector token masked
    routing = out.routing + out2.routing
    assert {r.site for r in routing} == {"vision", "connector", "attention", "ffn"}
    assert any(not r.token_mask.any() for r in out2.routing if r.site == "vision")
    aux = sum(B.load_balance_loss(r) + B.z_loss(r) for r in routing)
    return lm_loss(out.logits, out.labels) + lm_loss(out2.logits, out2.labels) + 0.1 * aux, routing


@pytest.mark.parametrize("vision_router", ["token_choice", "expert_choice"])
def test_activation_checkpointing_same_losses_grads_and_loads_with_a_masked_placeholder(vision_router):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from mmoe.training.block_wrappers import apply_activation_checkpointing

    plain, ckpt = _ckpt_vlm(vision_router), _ckpt_vlm(vision_router)
    n = apply_activation_checkpointing(ckpt)
    vit_blocks = ckpt.vision.vit.blocks
    assert isinstance(vit_blocks, torch.nn.Sequential) and all(isinstance(b, CheckpointWrapper) for b in vit_blocks)
    assert all(isinstance(b, CheckpointWrapper) for b in ckpt.decoder.layers)
    assert isinstance(ckpt.connector.proj, CheckpointWrapper)
    assert n == len(vit_blocks) + 1 + len(ckpt.decoder.layers) == 3 + 1 + 2
    calls = {id(m): 0 for m in ckpt.modules() if isinstance(m, Router)}

    def count(mod, args, out):
        calls[id(mod)] += 1
    for m in ckpt.modules():
        if isinstance(m, Router):
            m.register_forward_hook(count)
    _assert_same_loss_grads_and_loads(plain, ckpt, rtol=1e-9, atol=1e-12)
    assert all(c == 4 for c in calls.values()), calls  # 2 forwards, each recomputed once in backward


def _assert_same_loss_grads_and_loads(plain, ckpt, *, rtol: float, atol: float) -> None:
    """One forward+backward of each model: equal loss, routing count and gradients (within rtol/atol), and router
    loads exactly equal (counted once per real forward, not again in a recompute)."""
    results = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        loss, routing = _ckpt_loss(model)
        loss.backward()
        grads = {k.replace("._checkpoint_wrapped_module", ""): p.grad for k, p in model.named_parameters()}
        loads = [m.load_accum.clone() for m in model.modules() if isinstance(m, Router)]
        results[name] = (loss.detach(), grads, loads, len(routing))
    (l0, g0, ld0, n0), (l1, g1, ld1, n1) = results["plain"], results["ckpt"]
    assert n0 == n1
    torch.testing.assert_close(l1, l0, rtol=0, atol=atol)
    assert g0.keys() == g1.keys()
    for k in g0:
        assert (g0[k] is None) == (g1[k] is None), k
        if g0[k] is not None:
            torch.testing.assert_close(g1[k], g0[k], rtol=rtol, atol=atol, msg=k)
    assert any(ld.sum() > 0 for ld in ld0)
    for a, b in zip(ld0, ld1):
        assert torch.equal(a, b)


@pytest.mark.slow  # aot_eager compile of 6 blocks
def test_activation_checkpointing_under_compile_same_losses_grads_and_loads():
    """model.compile with model.activation_checkpointing: the checkpointed blocks compile fullgraph (the eager
    recompute marker, a context_fn, is left out: compile rejects it and runs no Python forward twice) and give
    the plain model's loss, gradients and router loads (counted once)."""
    from mmoe.training.block_wrappers import apply_activation_checkpointing
    from mmoe.training.compile import compile_blocks

    torch._dynamo.reset()
    plain, ckpt = _ckpt_vlm("token_choice"), _ckpt_vlm("token_choice")
    apply_activation_checkpointing(ckpt, compiled=True)
    assert compile_blocks(ckpt, backend="aot_eager") == 3 + 1 + 2
    try:
        _assert_same_loss_grads_and_loads(plain, ckpt, rtol=1e-8, atol=1e-10)
    finally:
        torch._dynamo.reset()


def test_vision_set_grad_checkpointing_with_image_mask_matches_plain():
    from mmoe.model.vision import VisionConfig, VisionEncoder

    cfg = VisionConfig(image_size=32, patch_size=16, dim=32, depth=2, n_heads=2, mlp_ratio=2.0,
                       moe=MoEConfig(num_experts=4, top_k=2, aux_free_bias=True), moe_layers="all", feature_layer=-1)
    torch.manual_seed(0)
    a = VisionEncoder(cfg).double().train()
    b = VisionEncoder(cfg).double().train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    px = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    outs = []
    for enc in (a, b):
        f, routing = enc(px, mask)
        (f[mask].pow(2).mean() + sum(r.probs.pow(2).mean() for r in routing)).backward()
        assert all(not r.kept.view(3, -1)[1].any() for r in routing)  # the masked image routes nowhere
        outs.append((f, {k: p.grad for k, p in enc.named_parameters()},
                     [m.moe.router.load_accum.clone() for m in enc.moe_mlps.values()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    for k in outs[0][1]:
        torch.testing.assert_close(outs[1][1][k], outs[0][1][k], rtol=1e-10, atol=1e-13, msg=k)
    for la, lb in zip(outs[0][2], outs[1][2]):
        assert torch.equal(la, lb) and la.sum() == 2 * 5 * 2  # 2 real images x 5 tokens x top-2


# ----------------------------------------------------------------------------- 3. frozen routers
def test_frozen_sites_keep_their_aux_free_biases_and_outputs():
    from mmoe.training.config import StageConfig
    from mmoe.training.module import MMoEModule, lm_loss

    model = _ckpt_vlm("token_choice")
    module = MMoEModule(arch=model.cfg, stage=StageConfig(freeze=["vision", "connector"]))
    module.model.double()
    frozen = [m for n, m in module.model.named_modules() if isinstance(m, Router) and n.startswith(("vision", "connector"))]
    live = [m for n, m in module.model.named_modules() if isinstance(m, Router) and n.startswith("decoder")]
    assert frozen and live and all(not m.gate.weight.requires_grad for m in frozen)
    px = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ids = torch.tensor([[1, IMG, 7, 8, 9, 10], [1, 11, IMG, 12, 13, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9, 10], [-100, -100, -100, 12, 13, -100]])

    def image_features():
        module.model.eval()
        with torch.no_grad():
            tokens, _ = module.model.encode_images(px)
        module.model.train()
        return tokens

    before_feats = image_features()
    before_bias = [m.expert_bias.clone() for m in frozen]
    live_bias = [m.expert_bias.clone() for m in live]
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = module.model(ids, ids != 0, px, labels)
        aux, _ = module.balancing_loss(out.routing)
        (lm_loss(out.logits, out.labels) + aux).backward()
        opt.step()
        opt.zero_grad()
        module.update_router_biases()
    for m, b in zip(frozen, before_bias):
        assert torch.equal(m.expert_bias, b) and m.load_accum.sum() == 0
    assert any(not torch.equal(m.expert_bias, b) for m, b in zip(live, live_bias))  # the others do move
    torch.testing.assert_close(image_features(), before_feats, rtol=0, atol=0)


# ----------------------------------------------------------------------------- 4. two-level group gate
TWO_LEVEL = [(tg, k, renorm) for tg in (1, 2, 4) for k in (tg, 2 * tg) for renorm in (True, False)]


@pytest.mark.parametrize("tg,k,renorm", TWO_LEVEL)
def test_two_level_group_gate_gets_task_gradient_or_is_refused(tg, k, renorm):
    from mmoe.model.moe import MoEFFN

    cfg = MoEConfig(num_experts=8, top_k=k, hierarchy="two_level", num_groups=4, top_groups=tg, renormalize=renorm)
    if renorm and tg == 1:
        with pytest.raises(MoEConfigError, match=r"moe\.renormalize.*two_level.*top_groups"):
            MoEFFN(D, 8, cfg, "gelu", causal=False)
        return
    torch.manual_seed(0)
    layer = MoEFFN(D, 8, cfg, "gelu", bias=True, causal=False).double()
    with torch.no_grad():
        layer.router.group_gate.weight.normal_(0, 1.0)
    x = _x(32).view(4, 8, D)
    y, _ = layer(x)
    (y * torch.randn_like(y)).sum().backward()  # task loss only: no balancing term
    assert layer.router.group_gate.weight.grad.abs().max() > 1e-6


# ----------------------------------------------------------------------------- 5. aux-free bias moves selection
@pytest.mark.parametrize("kw", [
    dict(),
    dict(score_func="sigmoid"),
    dict(router="top_p", top_k=3, top_p=0.6),
    dict(hierarchy="group_limited", num_groups=2, top_groups=1, score_func="sigmoid"),
    dict(hierarchy="two_level", num_groups=2, top_groups=1, top_k=1, renormalize=False),
    dict(hierarchy="two_level", num_groups=2, top_groups=2, top_k=2),
])
def test_aux_free_bias_changes_selection_wherever_accepted(kw):
    cfg = dict(num_experts=4, top_k=2, aux_free_bias=True) | kw
    r = _router(MoEConfig(**cfg)).eval()
    x = _x(200)
    base = r(x)
    with torch.no_grad():
        r.expert_bias[0] = 1.0  # favour expert 0
    biased = r(x)
    count = lambda res: int(((res.expert_idx == 0) & res.selected).sum())
    assert count(biased) > count(base)
    # weights still come from the unbiased scores: tokens whose picks did not change keep their weights
    same = (biased.expert_idx == base.expert_idx).all(-1) & (biased.selected == base.selected).all(-1)
    assert same.any()
    torch.testing.assert_close(biased.weights[same], base.weights[same])


@pytest.mark.parametrize("kw", [
    dict(router="expert_choice"),
    dict(top_k=4),  # every token takes every expert
    dict(hierarchy="two_level", num_groups=2, top_groups=1, top_k=2, renormalize=False),  # all of the group
])
def test_aux_free_bias_that_cannot_move_selection_is_refused(kw):
    with pytest.raises(MoEConfigError, match=r"moe\.aux_free_bias"):
        MoEConfig(**(dict(num_experts=4, aux_free_bias=True) | kw)).validate()


# ----------------------------------------------------------------------------- 6. connector capacity
@pytest.mark.parametrize("kw,field", [(dict(capacity_factor=1.0), "capacity_factor"),
                                      (dict(eval_capacity_factor=2.0), "capacity_factor"),
                                      (dict(router="expert_choice", top_k=1), "router")])
def test_connector_refuses_dropping_tokens_without_a_shared_expert(kw, field):
    from mmoe.model.connector import Connector, ConnectorConfig

    with pytest.raises(MoEConfigError, match=rf"connector: moe\.{field}.*num_shared_experts"):
        Connector(ConnectorConfig(kind="moe_mlp", moe=MoEConfig(**(dict(num_experts=4, top_k=2) | kw))), 8, 8, grid=4)


@pytest.mark.parametrize("kw", [dict(capacity_factor=0.3), dict(router="expert_choice", top_k=1, capacity_factor=0.5)])
def test_connector_with_shared_expert_gives_dropped_tokens_a_projection(kw):
    from mmoe.model.connector import Connector, ConnectorConfig

    torch.manual_seed(0)
    moe = MoEConfig(**(dict(num_experts=4, top_k=2, num_shared_experts=1) | kw))
    conn = Connector(ConnectorConfig(kind="moe_mlp", moe=moe), 8, 8, grid=4).double().train()
    with torch.no_grad():
        conn.proj.router.gate.weight.normal_(0, 1.0)
        conn.proj.router.gate.weight[0] += 3.0  # most tokens want expert 0 first
    feats = torch.randn(2, 16, 8, dtype=torch.float64).abs()
    y, (r,) = conn(feats)
    dropped = ~r.kept.any(-1)
    assert dropped.any()  # some tokens got no routed expert at all
    y_dropped = y.reshape(32, 8)[dropped]
    assert (y_dropped.abs().sum(-1) > 0).all()
    torch.testing.assert_close(y_dropped, conn.proj.shared(feats.reshape(32, 8))[dropped])


# ----------------------------------------------------------------------------- 7. batch-invariant eval
SITE_KINDS = {
    "token_choice_capacity": dict(top_k=2, capacity_factor=0.5, eval_capacity_factor=0.5),
    "token_choice_capacity_position": dict(top_k=2, eval_capacity_factor=0.5, drop_policy="position"),
    "top_p_capacity": dict(router="top_p", top_k=3, top_p=0.8, eval_capacity_factor=0.4),
    "expert_choice": dict(router="expert_choice", top_k=1, capacity_factor=1.0),
    "expert_choice_eval_cf": dict(router="expert_choice", top_k=1, eval_capacity_factor=0.5),
    "group_limited": dict(hierarchy="group_limited", num_groups=2, top_groups=1, eval_capacity_factor=0.5),
    "two_level": dict(hierarchy="two_level", num_groups=2, top_groups=2, eval_capacity_factor=0.5),
}


@pytest.mark.parametrize("kind", sorted(SITE_KINDS))
def test_vision_and_connector_eval_outputs_are_batch_invariant(kind):
    from mmoe.model.connector import Connector, ConnectorConfig
    from mmoe.model.vision import VisionConfig, VisionEncoder

    moe = MoEConfig(**(dict(num_experts=4) | SITE_KINDS[kind]))
    torch.manual_seed(0)
    enc = VisionEncoder(VisionConfig(image_size=32, patch_size=8, dim=32, depth=2, n_heads=2, mlp_ratio=2.0, moe=moe,
                                     moe_layers="all", feature_layer=-1)).double().eval()
    conn = Connector(ConnectorConfig(kind="moe_mlp", moe=MoEConfig(**(vars(moe) | dict(num_shared_experts=1)))),
                     enc.out_dim, 24, enc.grid).double().eval()
    for m in list(enc.modules()) + list(conn.modules()):
        if isinstance(m, Router):
            with torch.no_grad():
                m.gate.weight.normal_(0, 0.5)
                m.gate.weight[0] += 1.0  # skewed: capacity binds
    px = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        feats, routing = enc(px)
        out, con_routing = conn(feats)
        if kind.startswith("expert_choice"):  # some tokens are picked by no expert
            assert any((~r.kept.any(-1)).any() for r in routing + con_routing)
        else:
            assert any((r.selected & ~r.kept).any() for r in routing + con_routing)  # capacity really drops
        for i in range(4):
            f_i, _ = enc(px[i:i + 1])
            o_i, _ = conn(f_i)
            torch.testing.assert_close(f_i[0], feats[i], rtol=0, atol=1e-12)
            torch.testing.assert_close(o_i[0], out[i], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- 8. fp32 routers under bf16-true
def _bf16_decoder():
    from mmoe.model.decoder import Decoder, DecoderConfig

    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=128,
                                 ffn_moe=MoEConfig(num_experts=16, top_k=2, aux_free_bias=True), ffn_moe_layers="all",
                                 attn_moe=MoEConfig(num_experts=2, top_k=1), attn_moe_layers="all"))


def test_routers_stay_fp32_under_lightning_bf16_true():
    from lightning.pytorch.plugins.precision import HalfPrecision

    plugin = HalfPrecision("bf16-true")
    with plugin.module_init_context():  # what Trainer(precision="bf16-true") uses around model creation
        model = _bf16_decoder()
    model = plugin.convert_module(model)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert len(routers) == 4
    for r in routers:
        assert all(t.dtype == torch.float32 for t in list(r.parameters()) + list(r.buffers())), r
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if ".router." not in n)
    model.double()  # float64 still applies (float64 reference tests)
    assert all(r.gate.weight.dtype == torch.float64 for r in routers)


def test_bf16_true_routing_matches_fp32_more_often_than_with_a_bf16_gate():
    ref = _bf16_decoder().eval()
    ids = torch.randint(0, 64, (32, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_sets = [r.expert_idx.sort(-1).values for r in ref(ids).routing]
        bf16 = _bf16_decoder().eval().to(torch.bfloat16)  # fp32 routers (the fix)
        bf16_gate = _bf16_decoder().eval().to(torch.bfloat16)
        for m in bf16_gate.modules():  # what a plain cast did before: the gate rounded to bf16
            if isinstance(m, Router):
                m.gate.weight.data = m.gate.weight.data.to(torch.bfloat16)
        assert all(r.gate.weight.dtype == torch.float32 for r in bf16.modules() if isinstance(r, Router))

        def match(model):
            sets = [r.expert_idx.sort(-1).values for r in model(ids).routing]
            return sum(int((a == b).all(-1).sum()) for a, b in zip(sets, ref_sets))
        ours, rounded = match(bf16), match(bf16_gate)
    total = sum(len(s) for s in ref_sets)
    assert ours > rounded, (ours, rounded, total)  # seeded, so not flaky


# ----------------------------------------------------------------------------- audit: refused combinations
@pytest.mark.parametrize("kw,causal,field", [
    (dict(top_p=0.5), False, "top_p"),  # only router='top_p' reads it
    (dict(top_groups=2, num_groups=2), False, "top_groups"),  # flat routing has no group step
    (dict(drop_policy="position"), False, "drop_policy"),  # dropless: nothing to drop
    (dict(router="expert_choice", capacity_factor=1.0, drop_policy="position"), False, "drop_policy"),
    (dict(bias_update_rate=0.01), False, "bias_update_rate"),  # no aux_free_bias
    (dict(eval_capacity_factor=1.0), True, "eval_capacity_factor"),  # causal: generation cannot honour it
    (dict(hierarchy="two_level", num_groups=2, group_score="max"), False, "group_score"),
])
def test_inert_or_unhonourable_options_are_refused_naming_the_field(kw, causal, field):
    with pytest.raises(MoEConfigError, match=rf"ffn\.1: moe\.{field}"):
        MoEConfig(**kw).validate(causal=causal, site="ffn.1")


def test_moa_refuses_expert_hidden():
    from mmoe.model.decoder import DecoderConfig

    with pytest.raises(MoEConfigError, match=r"decoder\.attn_moe\.expert_hidden"):
        DecoderConfig(n_heads=4, n_kv_heads=1, attn_moe=MoEConfig(num_experts=2, expert_hidden=32),
                      attn_moe_layers="all").validate()

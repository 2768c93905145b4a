"""Modality-aware routing (hierarchy 'modality'): each token routes inside its own modality's
expert group. Checked against a per-token float64 loop, with padding and text-only batches; per-group balance
loss and aux-free bias; exact upcycling; the decoder FFN and MoA inside a VLM."""

from __future__ import annotations

import math

import pytest
import torch

from mmoe.constants import MODALITY_IMAGE, MODALITY_TEXT
from mmoe.model.moe import MoEConfig, MoEConfigError, MoEFFN, Router
from mmoe.model.moe import balancing as B

D, E, EI = 16, 6, 2  # 2 image experts [0, 2), 4 text experts [2, 6)


def _router(seed=0, **kw) -> Router:
    torch.manual_seed(seed)
    r = Router(D, MoEConfig(**(dict(num_experts=E, top_k=2, hierarchy="modality", image_experts=EI) | kw)),
               causal=True).double()
    with torch.no_grad():
        r.gate.weight.normal_(0, 1.0)
    return r


def _batch(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    modality = torch.where(torch.rand(n, generator=g) < 0.4, MODALITY_IMAGE, MODALITY_TEXT)
    mask = torch.ones(n, dtype=torch.bool)
    mask[-5:] = False  # padding
    return x, modality, mask


def _loop(x, modality, mask, W, bias, *, score_func, top_k, renormalize):
    """Per token, plain Python floats: scores inside the token's group only, top-k by score + bias."""
    out = []
    for n in range(len(x)):
        if not mask[n]:
            out.append({})
            continue
        group = list(range(EI)) if modality[n] == MODALITY_IMAGE else list(range(EI, E))
        logits = {e: sum(float(x[n, d]) * float(W.detach()[e, d]) for d in range(D)) for e in group}
        if score_func == "softmax":
            z = sum(math.exp(v) for v in logits.values())
            s = {e: math.exp(v) / z for e, v in logits.items()}
        else:
            s = {e: 1 / (1 + math.exp(-v)) for e, v in logits.items()}
        picked = sorted(group, key=lambda e: -(s[e] + bias[e]))[:top_k]
        w = {e: s[e] for e in picked}
        total = sum(w.values())
        out.append({e: v / total for e, v in w.items()} if renormalize else w)
    return out


@pytest.mark.parametrize("score_func,renormalize,bias", [("softmax", True, False), ("sigmoid", True, True),
                                                          ("softmax", False, True)])
def test_modality_routing_matches_float64_loop_with_padding(score_func, renormalize, bias):
    r = _router(score_func=score_func, renormalize=renormalize, aux_free_bias=bias).eval()
    if bias:
        r.expert_bias.copy_(torch.tensor([0.3, -0.1, 0.2, 0.0, -0.2, 0.1]))
    x, modality, mask = _batch()
    res = r(x, mask, modality)
    ref = _loop(x, modality, mask, r.gate.weight, r.expert_bias.tolist(), score_func=score_func, top_k=2,
                renormalize=renormalize)
    for n in range(len(x)):
        got = {e: w for e, w, k in zip(res.expert_idx[n].tolist(), res.weights[n].tolist(), res.kept[n].tolist()) if k}
        assert set(got) == set(ref[n]), n
        for e in got:
            assert abs(got[e] - ref[n][e]) < 1e-12
    image = (modality == MODALITY_IMAGE) & mask
    # losses see in-group distributions: image tokens put all probability on image experts
    torch.testing.assert_close(res.probs[image][:, :EI].sum(-1), torch.ones(int(image.sum()), dtype=torch.float64))


def test_modality_text_only_batch_uses_text_experts_only():
    r = _router(aux_free_bias=True).train()
    x, _, mask = _batch()
    for modality in (torch.full((40,), MODALITY_TEXT), None):
        res = r(x, mask, modality)
        assert (res.expert_idx[res.kept] >= EI).all()
    load = r.load_accum.clone()
    assert load[:EI].sum() == 0 and load[EI:].sum() == 2 * 2 * 35
    r.update_bias()  # image group saw no tokens: its biases stay put; the text group moves towards balance
    assert (r.expert_bias[:EI] == 0).all()
    torch.testing.assert_close(r.expert_bias[EI:], 1e-3 * torch.sign(load[EI:].mean() - load[EI:]))


def test_modality_in_group_max_violation_counts_each_group_on_its_own_tokens():
    """MaxVio inside each modality group (its tokens on its experts), worst of the two, against a plain count; the
    overall MaxVio pools every expert over all tokens and differs when the groups see unequal token numbers."""
    r = _router().eval()
    x, modality, mask = _batch(n=60)
    res = r(x, mask, modality)
    loads = {MODALITY_IMAGE: [0] * EI, MODALITY_TEXT: [0] * (E - EI)}
    for n in range(len(x)):
        for e, k in zip(res.expert_idx[n].tolist(), res.kept[n].tolist()):
            if mask[n] and k:
                loads[int(modality[n])][e - (0 if int(modality[n]) == MODALITY_IMAGE else EI)] += 1
    want = max((max(v) - sum(v) / len(v)) / (sum(v) / len(v)) for v in loads.values())
    got = B.routing_metrics(res)
    assert got["in_group_max_violation"] == pytest.approx(want, abs=1e-6)
    assert got["max_violation"] != pytest.approx(want, abs=1e-3)
    flat = B.routing_metrics(Router(D, MoEConfig(num_experts=E, top_k=2), causal=True).double()(x, mask, modality))
    assert "in_group_max_violation" not in flat  # only where experts are split into modality groups


def test_modality_balance_loss_is_one_when_each_group_is_balanced():
    from mmoe.model.moe.routing import RoutingResult

    N = 8
    modality = torch.tensor([MODALITY_IMAGE] * 4 + [MODALITY_TEXT] * 4)
    idx = torch.tensor([[0], [1], [0], [1], [2], [3], [4], [5]])
    probs = torch.zeros(N, E)
    probs[:4, :EI] = 1 / EI
    probs[4:, EI:] = 1 / (E - EI)
    em = torch.tensor([MODALITY_IMAGE] * EI + [MODALITY_TEXT] * (E - EI))

    def result(i, probs=probs):
        sel = torch.ones_like(i, dtype=torch.bool)
        return RoutingResult(expert_idx=i, weights=torch.ones(N, 1), selected=sel, kept=sel, probs=probs,
                             logits=probs.log(), token_mask=torch.ones(N, dtype=torch.bool), num_experts=E,
                             batch_shape=(1, N), modality=modality, expert_modality=em)
    assert B.load_balance_loss(result(idx)).item() == pytest.approx(1.0)
    assert B.modality_balance_loss(result(idx)).item() == pytest.approx(1.0)
    skewed, skewed_probs = idx.clone(), probs.clone()
    skewed[:4] = 0  # every image token on expert 0, which also gets 0.9 of their probability
    skewed_probs[:4, :EI] = torch.tensor([0.9, 0.1])
    # image group: 2 * (1.0 * 0.9) = 1.8; text group balanced: 1.0; mean 1.4 (pooled over all 6 experts it differs)
    assert B.load_balance_loss(result(skewed, skewed_probs)).item() == pytest.approx(1.4)


def test_modality_moe_ffn_upcycles_exactly_from_dense():
    from mmoe.model.layers import SwiGLU

    torch.manual_seed(0)
    dense = SwiGLU(D, 32).double()
    moe = MoEFFN(D, 32, MoEConfig(num_experts=E, top_k=2, hierarchy="modality", image_experts=EI), "swiglu",
                 causal=True).double()
    moe.upcycle_(dense)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    modality = torch.randint(0, 2, (2, 10))
    y, r = moe(x, None, modality)
    torch.testing.assert_close(y, dense(x), rtol=0, atol=1e-12)
    image = modality.reshape(-1) == MODALITY_IMAGE
    assert (r.expert_idx[image] < EI).all() and (r.expert_idx[~image] >= EI).all()


def test_modality_routing_in_vlm_decoder_ffn_and_moa():
    from mmoe.model.connector import ConnectorConfig
    from mmoe.model.decoder import DecoderConfig
    from mmoe.model.vision import VisionConfig
    from mmoe.model.vlm import MMoEVLM, VLMConfig

    ffn = MoEConfig(num_experts=4, top_k=1, hierarchy="modality", image_experts=2, num_shared_experts=1,
                    aux_free_bias=True)
    moa = MoEConfig(num_experts=4, top_k=1, hierarchy="modality", image_experts=2)
    cfg = VLMConfig(vision=VisionConfig(image_size=32, patch_size=16, dim=32, depth=1, n_heads=2, feature_layer=-1),
                    connector=ConnectorConfig(kind="mlp"),
                    decoder=DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, hidden=64,
                                          ffn_moe=ffn, ffn_moe_layers="all", attn_moe=moa, attn_moe_layers="all"),
                    image_token_id=4)
    torch.manual_seed(0)
    model = MMoEVLM(cfg).train()
    ids = torch.tensor([[1, 4, 7, 8, 9], [1, 10, 11, 0, 0]])
    out = model(ids, ids != 0, torch.randn(1, 3, 32, 32), ids.clone())
    assert {r.site for r in out.routing} == {"attention", "ffn"}
    for r in out.routing:
        kept_experts = r.expert_idx.masked_fill(~r.kept, -1)
        image = (r.modality == MODALITY_IMAGE) & r.token_mask
        assert image.sum() == 4 and (kept_experts[image] < 2).all() and (kept_experts[image] >= 0).all()
        text = (r.modality == MODALITY_TEXT) & r.token_mask
        assert (kept_experts[text] >= 2).all()
        assert torch.isfinite(B.load_balance_loss(r)) and torch.isfinite(B.z_loss(r))
    loss = out.logits.float().logsumexp(-1).mean() + sum(B.load_balance_loss(r) + B.z_loss(r) for r in out.routing)
    loss.backward()
    for name, p in model.decoder.named_parameters():
        if ".router.gate" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kw,causal,field,why", [
    (dict(image_experts=0), True, "image_experts", r"must be in \[1, num_experts - 1 = 5\], got 0"),
    (dict(image_experts=6), True, "image_experts", r"must be in \[1, num_experts - 1 = 5\], got 6"),
    (dict(image_experts=2, top_k=3), True, "top_k", r"3 does not fit in the image group \(2 experts\)"),
    (dict(image_experts=2), False, "hierarchy",  # ViT / connector: no text tokens
     "'modality' needs a decoder site: the ViT and the connector see image tokens only, so the text experts would "
     "never be used"),
    (dict(image_experts=2, router="top_p"), True, "hierarchy", "'modality' routing needs router='token_choice', "
                                                                "got 'top_p'"),
    (dict(image_experts=2, num_groups=2), True, "num_groups",
     r"\(and top_groups\) must stay 1 with hierarchy=.modality."),
    (dict(image_experts=3, top_k=3, aux_free_bias=True), True, "aux_free_bias",
     "cannot change which experts are picked: every token takes all experts of its modality group"),
    (dict(hierarchy="flat", image_experts=2), True, "image_experts", "is only used by hierarchy='modality'"),
])
def test_modality_config_refusals_name_the_field(kw, causal, field, why):
    cfg = dict(num_experts=E, top_k=2, hierarchy="modality") | kw
    with pytest.raises(MoEConfigError, match=rf"moe\.{field} {why}"):
        MoEConfig(**cfg).validate(causal=causal)


@pytest.mark.parametrize("image_experts", [1, E - 1])
def test_modality_groups_of_one_expert_are_valid(image_experts):
    """The smallest groups the split allows: one image expert (or one text expert), each token its group's top-1."""
    r = _router(top_k=1, image_experts=image_experts)  # validates the config
    x, modality, mask = _batch()
    picked = r(x, mask, modality).expert_idx[:, 0][mask]
    image = modality[mask] == MODALITY_IMAGE
    assert (picked[image] < image_experts).all() and (picked[~image] >= image_experts).all()
    assert image.any() and (~image).any()

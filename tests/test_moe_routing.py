"""Routers against independent float64 re-derivations: token choice, top-p, expert choice, hierarchical
routing, capacity and drop policies, the aux-loss-free bias, and config validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmoe.constants import MODALITY_IMAGE, MODALITY_TEXT
from mmoe.model.moe import LocalDispatcher, MoEConfig, MoEConfigError, Router, routing_metrics, select_layers, within_capacity

D = 16


def make_router(seed: int = 0, causal: bool = False, **kw) -> Router:
    torch.manual_seed(seed)
    r = Router(D, MoEConfig(**kw), causal=causal).double()
    with torch.no_grad():  # larger logits than the 0.02 init so routing is decisive and ties impossible
        r.gate.weight.normal_(0, 1.0)
        if r.group_gate is not None:
            r.group_gate.weight.normal_(0, 1.0)
    return r


def tokens(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def scores_of(r: Router, x: torch.Tensor) -> torch.Tensor:
    logits = x @ r.gate.weight.t()
    return logits.softmax(-1) if r.cfg.score_func == "softmax" else logits.sigmoid()


def as_sets(idx: torch.Tensor, w: torch.Tensor, keep: torch.Tensor | None = None):
    """Per token: {expert: weight} over kept slots (slot order does not matter)."""
    keep = torch.ones_like(idx, dtype=torch.bool) if keep is None else keep
    return [{e: v for e, v, k in zip(ir, wr, kr) if k}
            for ir, wr, kr in zip(idx.tolist(), w.detach().tolist(), keep.tolist())]


def assert_same_routing(a, b, tol=1e-10):
    assert len(a) == len(b)
    for da, db in zip(a, b):
        assert set(da) == set(db)
        for e in da:
            assert abs(da[e] - db[e]) <= tol


# ----------------------------------------------------------------------------- token choice
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_token_choice_matches_reference(score_func, renormalize, top_k):
    r = make_router(num_experts=6, top_k=top_k, score_func=score_func, renormalize=renormalize,
                    routed_scaling=1.5).eval()
    x = tokens()
    res = r(x)
    s = scores_of(r, x)
    w, idx = s.topk(top_k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    assert_same_routing(as_sets(res.expert_idx, res.weights, res.kept), as_sets(idx, 1.5 * w))
    assert res.kept.all() and res.selected.all()
    torch.testing.assert_close(res.probs.sum(-1), torch.ones(len(x), dtype=res.probs.dtype))


def test_switch_top1_weight_is_the_probability():
    r = make_router(num_experts=4, top_k=1, renormalize=False).eval()
    x = tokens()
    res = r(x)
    p = scores_of(r, x)
    torch.testing.assert_close(res.weights[:, 0], p.max(-1).values)
    assert torch.equal(res.expert_idx[:, 0], p.argmax(-1))


def test_noisy_gating_eval_is_clean_train_is_noisy():
    r = make_router(num_experts=6, top_k=2, noisy_gating=True)
    with torch.no_grad():
        r.noise_gate.weight.normal_(0, 2.0)
    x = tokens(64)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.expert_idx, b.expert_idx) and torch.equal(a.weights, b.weights)
    clean = make_router(num_experts=6, top_k=2).eval()
    clean.gate.weight.data.copy_(r.gate.weight)
    assert_same_routing(as_sets(a.expert_idx, a.weights), as_sets(clean(x).expert_idx, clean(x).weights))
    r.train()
    torch.manual_seed(3)
    n = r(x)
    assert not torch.equal(n.weights, a.weights)  # noise changes weights (and usually picks)
    torch.testing.assert_close(n.probs, a.probs)  # loss distribution stays the clean one
    torch.testing.assert_close(n.weights.sum(-1), torch.ones(len(x), dtype=n.weights.dtype))


def test_jitter_only_in_training():
    r = make_router(num_experts=4, top_k=2, jitter_eps=0.5)
    x = tokens()
    r.eval()
    torch.testing.assert_close(r(x).logits, x @ r.gate.weight.t())
    r.train()
    assert not torch.allclose(r(x).logits, x @ r.gate.weight.t())


def test_jitter_multiplies_each_router_input_by_a_factor_in_its_band():
    """Switch-style jitter: every input element times its own U(1 - eps, 1 + eps) draw. With all-ones tokens and a
    gate that reads one input dim per expert, each logit is one draw: they fill the band and never leave it."""
    eps, E = 0.5, 4
    r = make_router(num_experts=E, top_k=2, jitter_eps=eps).train()
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(E, D, dtype=r.gate.weight.dtype))
    torch.manual_seed(0)
    draws = r(torch.ones(2048, D, dtype=torch.float64)).logits
    assert draws.min() >= 1 - eps and draws.max() <= 1 + eps
    assert draws.min() < 1 - 0.95 * eps and draws.max() > 1 + 0.95 * eps  # the whole band, both sides
    assert abs(draws.mean().item() - 1.0) < 0.01


def test_noisy_gating_noise_has_the_learned_std():
    """Shazeer 2017: selection logits = logits + N(0, 1) * softplus(x W_noise). Two experts, a zero clean gate and
    a noise gate giving softplus(...) = 2 for every token: with top-2 of 2 and no renormalisation the first
    weight is sigmoid(z1 - z2), z1 - z2 ~ N(0, 2 * 2^2), so its logit has std 2 * sqrt(2)."""
    r = make_router(num_experts=2, top_k=2, noisy_gating=True, renormalize=False).train()
    x = torch.zeros(20000, D, dtype=torch.float64)
    x[:, 0] = 1.0
    with torch.no_grad():
        r.gate.weight.zero_()
        r.noise_gate.weight.zero_()
        r.noise_gate.weight[:, 0] = math.log(math.expm1(2.0))  # softplus^-1(2)
    torch.manual_seed(0)
    res = r(x)
    first = res.weights.gather(1, (res.expert_idx == 0).long().argmax(1, keepdim=True))[:, 0]  # expert 0's weight
    spread = torch.logit(first).std().item()
    assert abs(spread - 2 * math.sqrt(2)) < 0.1, spread


# ----------------------------------------------------------------------------- top-p
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("p", [0.3, 0.6, 0.9, 1.0])
def test_top_p_selects_minimal_mass(p, score_func):
    r = make_router(num_experts=8, top_k=4, router="top_p", top_p=p, score_func=score_func).eval()
    with torch.no_grad():
        r.gate.weight.mul_(0.7)
    x = tokens(64)
    res = r(x)
    probs = scores_of(r, x)
    probs = probs / probs.sum(-1, keepdim=True)  # the mass is taken of the distribution (sigmoid scores)
    counts = res.selected.sum(-1)
    for n in range(len(x)):
        sel = res.expert_idx[n][res.selected[n]]
        mass = probs[n, sel].sum().item()
        k = int(counts[n])
        assert 1 <= k <= 4
        assert mass >= p - 1e-12 or k == 4
        # minimal: the k-1 largest probabilities do not reach p
        top = probs[n].sort(descending=True).values
        assert top[: k - 1].sum().item() < p
        assert torch.allclose(probs[n, sel].sort(descending=True).values, top[:k])  # they are the largest
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(len(x), dtype=res.weights.dtype))
    assert (res.weights[~res.selected] == 0).all()
    assert len(set(counts.tolist())) > 1 or p in (1.0,)  # adaptive k actually varies


@pytest.mark.parametrize("p,k", [(0.5, 2), (0.75, 3), (1.0, 4)])
def test_top_p_mass_exactly_at_p_is_reached(p, k):
    """Uniform routing (a zero gate, as at upcycling): four experts of exactly 0.25; the fewest reaching p."""
    r = make_router(num_experts=4, top_k=4, router="top_p", top_p=p).eval()
    with torch.no_grad():
        r.gate.weight.zero_()
    res = r(tokens(8))
    assert res.selected.sum(-1).tolist() == [k] * 8
    assert res.weights[res.selected].tolist() == [1 / k] * (8 * k)


@pytest.mark.parametrize("kw", [dict(), dict(hierarchy="two_level", num_groups=2, top_groups=2, top_k=2)])
def test_a_loaded_bias_is_ignored_without_aux_free_bias(kw):
    """A checkpoint trained with the aux-loss-free bias, loaded into a config without it: routes by score."""
    r = make_router(**(dict(num_experts=4, top_k=1) | kw)).eval()
    x = tokens(32)
    before = r(x)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0]))
    after = r(x)
    assert torch.equal(after.expert_idx, before.expert_idx) and torch.equal(after.weights, before.weights)
    assert after.expert_bias is None


# ----------------------------------------------------------------------------- expert choice
@pytest.mark.parametrize("cf", [1.0, 2.0, 0.5])
def test_expert_choice_exact_capacity_and_no_padding(cf):
    E, k = 4, 2
    r = make_router(num_experts=E, top_k=k, router="expert_choice", capacity_factor=cf).train()
    x = tokens(30)
    mask = torch.ones(30, dtype=torch.bool)
    mask[[3, 7, 20, 21, 29]] = False
    res = r(x, mask)
    n_real = int(mask.sum())
    C = min(n_real, max(1, math.ceil(cf * n_real * k / E)))
    assert res.expert_idx.shape == (30, E)
    per_expert = res.kept.sum(0)
    assert per_expert.tolist() == [C] * E
    assert not res.kept[~mask].any() and not res.selected[~mask].any()
    s = scores_of(r, x).masked_fill(~mask[:, None], -1.0)
    for e in range(E):
        chosen = set(res.kept[:, e].nonzero().flatten().tolist())
        assert chosen == set(s[:, e].topk(C).indices.tolist())
        torch.testing.assert_close(res.weights[res.kept[:, e], e], s[res.kept[:, e], e])
    assert (res.weights[~res.kept] == 0).all()


# Expected buffer sizes below are worked out by hand from C = ceil(cf * tokens * k / E), at least 1, at most the
# tokens: per sequence (T tokens) in eval, over the pooled batch (B*T) in training; an eval factor of 0 means the
# training factor, a factor of 0 means 1.
@pytest.mark.parametrize("cf,eval_cf,k,B,T,train_C,eval_C", [
    (1.5, 0.5, 2, 2, 16, 24, 4),  # eval uses its own factor
    (1.5, 0.0, 2, 2, 16, 24, 12),  # eval factor 0: the training factor, per sequence
    (0.0, 0.0, 1, 2, 16, 8, 4),  # factor 0: one buffer row per k-th share of tokens
    (1.0, 1.0, 1, 1, 4, 1, 1),  # fewer tokens than experts: one row each, not zero or two
], ids=["eval_factor", "eval_factor_0", "factor_0", "one_row"])
def test_expert_choice_buffer_sizes_in_training_and_eval(cf, eval_cf, k, B, T, train_C, eval_C):
    E = 4
    r = make_router(num_experts=E, top_k=k, router="expert_choice", capacity_factor=cf, eval_capacity_factor=eval_cf)
    x = tokens(B * T)
    res = r.train()(x, batch_shape=(B, T))
    assert res.kept.sum(0).tolist() == [train_C] * E  # each expert's picks over the pooled batch
    assert res.extras["capacity"] == train_C  # the dispatcher's buffer: no bigger than the picks
    res = r.eval()(x, batch_shape=(B, T))
    assert res.kept.view(B, T, E).sum(1).tolist() == [[eval_C] * E] * B  # each expert's picks in each image
    assert res.extras["capacity"] == B * eval_C


def test_expert_choice_capacity_counts_real_tokens_only():
    """8 slots, 2 real tokens, 4 experts, k=1: the buffer has ceil(8/4) = 2 rows but each expert takes
    ceil(2/4) = 1 real token (at least one, never two)."""
    r = make_router(num_experts=4, top_k=1, router="expert_choice", capacity_factor=1.0).train()
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[1, 6]] = True
    res = r(tokens(8), mask)
    assert res.kept.sum(0).tolist() == [1, 1, 1, 1] and not res.kept[~mask].any()


# ----------------------------------------------------------------------------- hierarchical
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias", [False, True])
def test_group_limited_never_leaves_chosen_groups(score_func, bias):
    E, G, tg, k = 8, 4, 2, 4
    r = make_router(num_experts=E, top_k=k, hierarchy="group_limited", num_groups=G, top_groups=tg,
                    score_func=score_func, aux_free_bias=bias).eval()
    if bias:
        r.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    x = tokens(48)
    res = r(x)
    s = scores_of(r, x)
    choice = s + r.expert_bias if bias else s
    per = E // G
    group_score = choice.view(-1, G, per).topk(k // tg, dim=-1).values.sum(-1)
    groups = group_score.topk(tg, dim=-1).indices
    for n in range(len(x)):
        allowed = {int(g) * per + j for g in groups[n] for j in range(per)}
        picked = set(res.expert_idx[n].tolist())
        assert picked <= allowed
        best = sorted(allowed, key=lambda e: -choice[n, e].item())[:k]
        assert picked == set(best)
        w = s[n, res.expert_idx[n]]
        torch.testing.assert_close(res.weights[n], w / w.sum())  # weights from unbiased scores
    torch.testing.assert_close(res.group_probs, r._probs(x @ r.gate.weight.t()).view(-1, G, per).sum(-1))


@pytest.mark.parametrize("tg,k,renorm", [(1, 2, False), (2, 2, True), (2, 4, True), (2, 4, False)])
def test_two_level_selects_inside_top_groups(tg, k, renorm):
    E, G = 8, 4
    r = make_router(num_experts=E, top_k=k, hierarchy="two_level", num_groups=G, top_groups=tg,
                    renormalize=renorm).eval()
    x = tokens(40)
    res = r(x)
    per = E // G
    pg = (x @ r.group_gate.weight.t()).softmax(-1)
    pe = (x @ r.gate.weight.t()).view(-1, G, per).softmax(-1)
    top_groups = pg.topk(tg, dim=-1).indices
    for n in range(len(x)):
        picked = res.expert_idx[n].tolist()
        assert {e // per for e in picked} == set(top_groups[n].tolist())
        for g in top_groups[n].tolist():
            inside = [e for e in picked if e // per == g]
            assert set(inside) == {g * per + int(j) for j in pe[n, g].topk(k // tg).indices}
        w = torch.stack([pg[n, e // per] * pe[n, e // per, e % per] for e in picked])
        torch.testing.assert_close(res.weights[n], w / w.sum() if renorm else w)
    torch.testing.assert_close(res.probs, (pg[..., None] * pe).view(-1, E))
    assert res.group_logits is not None and res.group_probs is not None


def test_two_level_noisy_training_keeps_the_clean_loss_distribution():
    """Two-level routing with noisy gating in training: the noise moves selection weights, while the loss
    distribution stays the clean P(g) * P(e|g). The router is left float32 and given float64 tokens, so it
    must run in float64 (both gates cast to the input's precision)."""
    E, G, P = 8, 4, 2
    torch.manual_seed(0)
    r = Router(D, MoEConfig(num_experts=E, top_k=4, hierarchy="two_level", num_groups=G, top_groups=2,
                            noisy_gating=True)).train()
    with torch.no_grad():
        for gate in (r.gate, r.group_gate):
            gate.weight.normal_(0, 1.0)
        r.noise_gate.weight.normal_(0, 2.0)
    x = tokens(40)
    res = r(x)
    w, gw = r.gate.weight.double(), r.group_gate.weight.double()
    ref = torch.zeros(len(x), E, dtype=torch.float64)
    for n in range(len(x)):  # per token: softmax over groups, softmax inside each group, product
        pg = [math.exp(v) for v in (gw @ x[n]).tolist()]
        logits = (w @ x[n]).tolist()
        for e in range(E):
            g = e // P
            inside = [math.exp(v) for v in logits[g * P:(g + 1) * P]]
            ref[n, e] = pg[g] / sum(pg) * inside[e % P] / sum(inside)
    assert res.probs.dtype == torch.float64
    torch.testing.assert_close(res.probs, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.logits, x @ w.t())  # clean expert logits for the z-loss
    torch.testing.assert_close(res.group_logits, x @ gw.t())
    clean_w = ref.gather(1, res.expert_idx)
    assert not torch.allclose(res.weights, clean_w / clean_w.sum(-1, keepdim=True))  # the noise did act


# ----------------------------------------------------------------------------- capacity
def test_within_capacity_position_and_score_policies():
    # expert 0 is wanted by tokens 0-2 as a second choice and by token 3 as a first choice
    idx = torch.tensor([[1, 0], [2, 0], [3, 0], [0, 1]])
    w = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]])
    sel = torch.ones_like(idx, dtype=torch.bool)
    pos = within_capacity(idx, w, sel, 2, 4, "position")
    # first choices first (token 3 slot 0), then second choices in token order (token 0 slot 1)
    assert pos[:, 1].tolist() == [True, False, False, True]
    assert pos[3, 0] and pos[0, 0] and pos[1, 0] and pos[2, 0]
    score = within_capacity(idx, w, sel, 2, 4, "score")
    # highest weights on expert 0: 0.8 (token 3) and 0.4 (token 0); expert 1: 0.6 and 0.2 both fit
    assert score.tolist() == [[True, True], [True, False], [True, False], [True, True]]
    # unselected slots never take capacity
    sel2 = sel.clone()
    sel2[3, 0] = False
    assert within_capacity(idx, w, sel2, 2, 4, "position")[:, 1].tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="drop_policy"):
        within_capacity(idx, w, sel, 2, 4, "random")


@pytest.mark.parametrize("policy", ["position", "score"])
def test_within_capacity_matches_a_loop_with_many_ties(policy):
    """300 slots whose weights take two values (ties everywhere, and enough slots that an unstable sort would
    reorder them): per expert, keep the first C slots by (policy key, token, slot), as a Python loop does."""
    N, K, E, C = 150, 2, 3, 17
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    w = torch.tensor([0.5, 0.25], dtype=torch.float64)[torch.randint(0, 2, (N, K), generator=g)]
    sel = torch.rand(N, K, generator=g) > 0.1
    got = within_capacity(idx, w, sel, C, E, policy)
    ref = torch.zeros(N, K, dtype=torch.bool)
    for e in range(E):
        slots = [(n, j) for n in range(N) for j in range(K) if sel[n, j] and idx[n, j] == e]
        key = (lambda nj: (-float(w[nj]), nj[0], nj[1])) if policy == "score" else (lambda nj: (nj[1], nj[0]))
        for n, j in sorted(slots, key=key)[:C]:
            ref[n, j] = True
    assert torch.equal(got, ref)


@pytest.mark.parametrize("policy", ["position", "score"])
@pytest.mark.parametrize("kind", [dict(), dict(router="top_p", top_p=0.8, top_k=3),
                                  dict(hierarchy="group_limited", num_groups=2, top_groups=1)])
def test_router_capacity_limits(policy, kind):
    cfg = dict(num_experts=4, top_k=2, capacity_factor=0.6, drop_policy=policy) | kind
    r = make_router(**cfg).train()
    with torch.no_grad():
        r.gate.weight[0] += 0.8 * r.gate.weight[0].sign()  # skew: expert 0 overflows
    x = tokens(40)
    mask = torch.ones(40, dtype=torch.bool)
    mask[-6:] = False
    res = r(x, mask)
    C = r.cfg.capacity(int(mask.sum()), True)
    assert C == math.ceil(0.6 * 34 * r.cfg.top_k / 4)
    kept_counts = res.expert_counts("kept")
    real = res.expert_idx[mask]
    assert kept_counts.tolist() == [int((real == e)[res.kept[mask]].sum()) for e in range(4)]
    assert torch.equal(res.expert_counts(), kept_counts)  # the default counts kept slots, after capacity
    with pytest.raises(ValueError, match="which"):
        res.expert_counts("dropped")
    assert (kept_counts <= C).all()
    assert (res.expert_counts("selected") > C).any()  # something was actually dropped
    assert not res.kept[~mask].any()
    assert (res.weights[~res.kept] == 0).all()
    assert (res.kept <= res.selected).all()
    for e in range(4):
        here = res.selected & (res.expert_idx == e) & mask[:, None]
        kept = res.kept & (res.expert_idx == e)
        if int(here.sum()) <= C:
            assert torch.equal(kept, here)
            continue
        if policy == "score":
            # unnormalised selection weights: recompute from the router scores
            kw = _selection_weight(r, x, res)[kept]
            dw = _selection_weight(r, x, res)[here & ~kept]
            assert kw.min() >= dw.max()
        else:
            slots = here.nonzero().tolist()
            order = sorted(slots, key=lambda nk: (nk[1], nk[0]))
            assert {tuple(s) for s in kept.nonzero().tolist()} == {tuple(s) for s in order[:C]}
    eval_res = r.eval()(x, mask)  # eval capacity factor 0: dropless
    assert torch.equal(eval_res.kept, eval_res.selected & mask[:, None])


@pytest.mark.parametrize("causal", [True, False], ids=["batch", "per_sequence"])
def test_capacity_of_one_row(causal):
    """Capacity 1: each expert keeps at most one token over the batch in training (ceil(0.25 * 16 tokens / 4
    experts)), or per sequence in eval at a bidirectional site (ceil(0.5 * 8 / 4)); a skewed gate makes tokens
    drop."""
    kw = dict(capacity_factor=0.25) if causal else dict(eval_capacity_factor=0.5)
    r = make_router(num_experts=4, top_k=1, causal=causal, **kw).train(causal)
    with torch.no_grad():
        r.gate.weight[0] += 2.0 * r.gate.weight[0].sign()  # expert 0 wanted by most tokens
    x = tokens(16)
    res = r(x, batch_shape=(2, 8))
    for rows in ([slice(0, 16)] if causal else [slice(0, 8), slice(8, 16)]):
        counts = [int((res.expert_idx[rows][res.kept[rows]] == e).sum()) for e in range(4)]
        assert max(counts) == 1
    assert (~res.kept).any()
    # the dispatcher's static buffer: C rows per expert over the batch, or C for each of the 2 sequences
    buffer_rows = 1 if causal else 2
    assert res.extras["capacity"] == buffer_rows
    dispatcher = LocalDispatcher()
    rows_ECD, _ = dispatcher.dispatch(x, dispatcher.plan(res))
    assert rows_ECD.shape == (4, buffer_rows, D)


def test_routed_scaling_of_two_scales_the_weights():
    r = make_router(num_experts=4, top_k=2, routed_scaling=2.0).eval()
    x = tokens()
    res = r(x)
    w, idx = scores_of(r, x).topk(2, dim=-1)
    assert_same_routing(as_sets(res.expert_idx, res.weights), as_sets(idx, 2.0 * w / w.sum(-1, keepdim=True)))


def test_results_carry_the_group_count_and_the_expert_modalities():
    """What the group balance loss and the per-modality metrics read from a result."""
    from mmoe.model.moe.balancing import group_balance_loss

    res = make_router(num_experts=6, top_k=2, hierarchy="group_limited", num_groups=3, top_groups=2).eval()(
        tokens())
    assert res.num_groups == 3 and float(group_balance_loss(res).detach()) > 0
    res = make_router(num_experts=6, top_k=2, hierarchy="modality", image_experts=2, causal=True).eval()(
        tokens())
    image, text = MODALITY_IMAGE, MODALITY_TEXT
    assert res.expert_modality is not None and res.expert_modality.tolist() == [image] * 2 + [text] * 4
    assert make_router(num_experts=4, top_k=1).eval()(tokens()).expert_bias is None


def _selection_weight(r: Router, x, res):
    """Weights the score policy ranks by: the renormalised weights before capacity zeroes dropped slots."""
    s = scores_of(r, x)
    w = s.gather(1, res.expert_idx) * res.selected
    if r.cfg.router == "top_p":
        w = w / s.sum(-1, keepdim=True)
    return w / w.sum(-1, keepdim=True) if r.cfg.renormalize else w


def test_token_choice_capacity_follows_the_eval_factor_in_eval():
    """Every one of 16 tokens (4 experts, k=1, one image) wants expert 0: it keeps ceil(0.5 * 16 / 4) = 2 in
    training (capacity_factor 0.5) and ceil(2.0 * 16 / 4) = 8 in eval (eval_capacity_factor 2.0; causal sites
    refuse an eval capacity)."""
    r = make_router(num_experts=4, top_k=1, capacity_factor=0.5, eval_capacity_factor=2.0)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 10.0
    x = tokens(16).abs() + 1.0  # dim 0 positive: expert 0 wins for every token
    assert (r.train()(x).expert_counts("kept") == torch.tensor([2, 0, 0, 0])).all()
    assert (r.eval()(x).expert_counts("kept") == torch.tensor([8, 0, 0, 0])).all()


# ----------------------------------------------------------------------------- aux-loss-free bias
def test_aux_free_bias_lowers_maxvio_and_leaves_weights_alone():
    E = 4
    r = make_router(num_experts=E, top_k=1, score_func="sigmoid", aux_free_bias=True, bias_update_rate=0.02,
                    renormalize=False).train()
    with torch.no_grad():
        r.gate.weight.mul_(0.3)
        r.gate.weight[0] = 0.0
        r.gate.weight[0, 0] = 4.0  # expert 0 wins for most tokens
    before = {k: v.clone() for k, v in r.state_dict().items() if k != "expert_bias"}
    gen = torch.Generator().manual_seed(5)
    first = last = None
    for step in range(50):
        x = torch.randn(256, D, generator=gen, dtype=torch.float64).abs()
        res = r(x)
        if step == 0:
            first = routing_metrics(res)["max_violation"]
        last = routing_metrics(res)["max_violation"]
        r.update_bias()
    assert first > 1.5
    assert last < 0.5 * first
    for k, v in r.state_dict().items():
        if k != "expert_bias":
            assert torch.equal(v, before[k]), k  # bitwise: only selection moved
    assert r.load_accum.abs().sum() == 0
    # combine weights are the unbiased scores of the chosen experts
    x = tokens(32)
    res = r.eval()(x)
    torch.testing.assert_close(res.weights, scores_of(r, x).gather(1, res.expert_idx))
    assert torch.equal(res.expert_idx[:, 0], (scores_of(r, x) + r.expert_bias).argmax(-1))
    assert not torch.equal(res.expert_idx[:, 0], scores_of(r, x).argmax(-1))  # the bias changed picks
    assert torch.equal(res.expert_bias, r.expert_bias)


def test_update_bias_is_sign_step_and_noop_without_flag():
    r = make_router(num_experts=4, top_k=1, aux_free_bias=True, bias_update_rate=0.1)
    r.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0], dtype=r.expert_bias.dtype))
    plain = make_router(num_experts=4, top_k=1)
    plain.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    assert (plain.expert_bias == 0).all()


# ----------------------------------------------------------------------------- config validation
@pytest.mark.parametrize("kw,causal,field", [
    (dict(num_experts=4, top_k=5), False, "top_k"),
    (dict(num_experts=4, top_k=0), False, "top_k"),
    (dict(router="expert_choice"), True, "router"),
    (dict(router="nope"), False, "router"),
    (dict(num_experts=8, hierarchy="group_limited", num_groups=3), False, "num_groups"),
    (dict(num_experts=8, hierarchy="group_limited", num_groups=1), False, "num_groups"),
    (dict(num_experts=6, num_groups=4), False, "num_groups"),
    (dict(num_experts=8, hierarchy="group_limited", num_groups=4, top_groups=5), False, "top_groups"),
    (dict(num_experts=8, top_k=6, hierarchy="group_limited", num_groups=4, top_groups=2), False,
     "top_groups"),
    (dict(num_experts=8, top_k=3, hierarchy="two_level", num_groups=4, top_groups=2), False, "top_k"),
    (dict(num_experts=8, hierarchy="two_level", num_groups=4, score_func="sigmoid"), False, "score_func"),
    (dict(hierarchy="group_limited", router="top_p", num_groups=2), False, "hierarchy"),
    (dict(top_p=0.0), False, "top_p"),
    (dict(capacity_factor=-1.0), False, "capacity_factor"),
    (dict(drop_policy="random"), False, "drop_policy"),
])
def test_config_errors_name_the_field(kw, causal, field):
    with pytest.raises(MoEConfigError, match=rf"moe\.{field}"):
        MoEConfig(**kw).validate(causal=causal, site="ffn.3")
    with pytest.raises(MoEConfigError, match="ffn.3"):
        MoEConfig(**kw).validate(causal=causal, site="ffn.3")


def test_valid_configs_pass():
    ec = MoEConfig(router="expert_choice")
    ec.validate(causal=False)  # raises if refused
    assert ec.slots == ec.num_experts
    two = MoEConfig(num_experts=8, hierarchy="two_level", num_groups=4, top_groups=2, top_k=2)
    two.validate(causal=True)
    assert two.slots == 2 and two.capacity(100, training=True) == 0  # dropless by default
    gl = MoEConfig(num_experts=8, hierarchy="group_limited", num_groups=4, top_groups=2, top_k=4,
                   score_func="sigmoid", aux_free_bias=True, capacity_factor=1.25)
    gl.validate(causal=True)
    assert gl.capacity(100, training=True) == 63 and gl.capacity(100, training=False) == 0


def test_select_layers_specs_and_errors():
    assert select_layers("all", 4) == [0, 1, 2, 3]
    assert select_layers("none", 4) == []
    assert select_layers("every_2", 6) == [1, 3, 5]
    assert select_layers("last_2", 6) == [4, 5]
    assert select_layers("first_2", 6) == [0, 1]
    assert select_layers("0,3, 5", 6) == [0, 3, 5]
    assert select_layers([5, 1, 1], 6) == [1, 5]
    with pytest.raises(MoEConfigError, match="vit_moe_layers"):
        select_layers("every_x", 6, field="vit_moe_layers")
    with pytest.raises(MoEConfigError, match="moe_layers.*out of range"):
        select_layers("0,9", 6)
    with pytest.raises(MoEConfigError, match="moe_layers"):
        select_layers("sometimes", 6)


def test_router_float32_for_low_precision_inputs():
    r = Router(D, MoEConfig(num_experts=4, top_k=2)).bfloat16()
    res = r(torch.randn(5, D, dtype=torch.bfloat16))
    assert res.probs.dtype == torch.float32 and res.weights.dtype == torch.float32
    assert F.softmax(res.logits, -1).dtype == torch.float32


# ----------------------------------------------------------------------------- router parameters
def _every_gate_router() -> Router:
    """A router with every gate and buffer it can have: two-level groups, noisy gating, aux-loss-free bias."""
    return Router(D, MoEConfig(num_experts=8, top_k=2, hierarchy="two_level", num_groups=4, top_groups=2,
                               noisy_gating=True, aux_free_bias=True))


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float16, torch.float64])
def test_router_gates_keep_their_precision_under_any_default_dtype(default):
    """Built under a bf16/fp16 default dtype (Lightning's bf16-true init context) every gate stays float32;
    under a float64 default (float64 references) the gates are float64 like the rest of the model."""
    torch.set_default_dtype(default)  # restored by conftest's autouse fixture
    r = _every_gate_router()
    want = torch.float64 if default == torch.float64 else torch.float32
    gates = {n: p.dtype for n, p in r.named_parameters()}
    assert gates == {"gate.weight": want, "group_gate.weight": want, "noise_gate.weight": want}
    assert r.expert_bias.dtype == torch.float32


def test_router_checkpoint_holds_the_gates_and_the_aux_free_bias_only():
    """The state dict is the gates' weights (no biases: HF/Mixtral's router layout) and the aux-loss-free bias
    (training resumes with it); the load accumulator and the modality map are rebuilt, never saved."""
    r = _every_gate_router()
    assert set(r.state_dict()) == {"gate.weight", "group_gate.weight", "noise_gate.weight", "expert_bias"}
    modality = Router(D, MoEConfig(num_experts=4, top_k=1, hierarchy="modality", image_experts=2), causal=True)
    assert set(modality.state_dict()) == {"gate.weight", "expert_bias"}
    with torch.no_grad():
        r.expert_bias.copy_(torch.arange(8.0))
    fresh = _every_gate_router()
    fresh.load_state_dict(r.state_dict())
    assert torch.equal(fresh.expert_bias, torch.arange(8.0))


def test_a_fresh_router_starts_near_uniform():
    """The gates start at std 0.02 (the HF initializer_range) so every expert and group is about equally likely at
    step 0; a unit-std gate would start with each token's choice all but decided."""
    torch.manual_seed(0)
    r = _every_gate_router().eval()
    res = r(torch.randn(256, D))
    assert res.probs.max(-1).values.mean() < 1.5 / 8
    assert res.group_probs.max(-1).values.mean() < 1.5 / 4


def test_moving_and_casting_a_router_in_one_call_moves_it_and_keeps_float32():
    """`model.to(device, torch.bfloat16)` (one call) must move the router too, while its floats stay float32."""
    r = Router(D, MoEConfig(num_experts=4, top_k=2, aux_free_bias=True)).to(device="meta", dtype=torch.bfloat16)
    assert all(t.device.type == "meta" and t.dtype == torch.float32 for t in (r.gate.weight, r.expert_bias))

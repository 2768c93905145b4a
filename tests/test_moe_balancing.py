"""Balancing losses and routing metrics on hand-built routing results (balance losses are 1 at balance)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from mmoe.constants import MODALITY_IMAGE, MODALITY_TEXT
from mmoe.model.moe import (MoEConfig, Router, RoutingResult, balancing_loss, balancing_losses, device_balance_loss,
                            expert_load, group_balance_loss, load_balance_loss, modality_balance_loss,
                            routing_metrics, sequence_balance_loss, z_loss)


def result(idx, probs, *, selected=None, kept=None, mask=None, modality=None, logits=None, batch_shape=None,
           num_groups=1, group_probs=None, group_logits=None, expert_modality=None) -> RoutingResult:
    idx = torch.as_tensor(idx)
    probs = torch.as_tensor(probs, dtype=torch.float64)
    N, K = idx.shape
    selected = torch.ones(N, K, dtype=torch.bool) if selected is None else torch.as_tensor(selected)
    mask = torch.ones(N, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
    kept = selected & mask[:, None] if kept is None else torch.as_tensor(kept)
    return RoutingResult(expert_idx=idx, weights=probs.gather(1, idx) * kept, selected=selected, kept=kept,
                         probs=probs, logits=probs.log() if logits is None else logits, token_mask=mask,
                         num_experts=probs.shape[1], batch_shape=batch_shape or (1, N),
                         modality=None if modality is None else torch.as_tensor(modality),
                         num_groups=num_groups, group_probs=group_probs, group_logits=group_logits,
                         expert_modality=None if expert_modality is None else torch.as_tensor(expert_modality))


def uniform(N, E):
    return torch.full((N, E), 1.0 / E, dtype=torch.float64)


def test_balance_is_one_at_perfect_balance_and_larger_when_skewed():
    E = 4
    idx = torch.arange(8).remainder(E)[:, None]  # each expert twice, top-1
    assert load_balance_loss(result(idx, uniform(8, E))).item() == pytest.approx(1.0, abs=1e-12)
    # top-2 balanced too
    idx2 = torch.stack([torch.arange(8) % E, (torch.arange(8) + 1) % E], -1)
    assert load_balance_loss(result(idx2, uniform(8, E))).item() == pytest.approx(1.0, abs=1e-12)
    # skewed: everything on expert 0, with probability mass following
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1]], dtype=torch.float64).expand(8, E)
    skew = load_balance_loss(result(torch.zeros(8, 1, dtype=torch.long), p)).item()
    assert skew == pytest.approx(E * 0.7)
    assert skew > 1


def test_zero_initialised_gate_gives_exactly_one():
    E = 4
    r = Router(10, MoEConfig(num_experts=E, top_k=2))
    torch.nn.init.zeros_(r.gate.weight)
    res = r(torch.randn(37, 10))
    assert torch.equal(res.probs, torch.full_like(res.probs, 0.25))
    assert load_balance_loss(res).item() == pytest.approx(1.0, abs=1e-6)


def test_z_loss_hand_formula_and_padding():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, -1.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([True, True, False])
    r = result(torch.zeros(3, 1, dtype=torch.long), logits.softmax(-1), logits=logits, mask=mask)
    hand = (math.log(math.e + math.e ** 2 + math.e ** 3) ** 2 + math.log(3.0) ** 2) / 2
    assert z_loss(r).item() == pytest.approx(hand)
    gl = torch.tensor([[0.0, 1.0]] * 3, dtype=torch.float64)
    r2 = result(torch.zeros(3, 1, dtype=torch.long), logits.softmax(-1), logits=logits, mask=mask,
                group_logits=gl)
    assert z_loss(r2).item() == pytest.approx(hand + math.log(1 + math.e) ** 2)


def test_group_loss_one_at_balance_zero_for_flat():
    E, G = 4, 2
    idx = torch.tensor([[0], [1], [2], [3]])
    assert group_balance_loss(result(idx, uniform(4, E), num_groups=G)).item() == pytest.approx(1.0)
    skew = result(torch.tensor([[0], [1], [0], [1]]), torch.tensor([[0.4, 0.4, 0.1, 0.1]] * 4), num_groups=G)
    assert group_balance_loss(skew).item() == pytest.approx(2 * 0.8)
    assert group_balance_loss(result(idx, uniform(4, E))).item() == 0.0


def test_modality_loss_sees_per_modality_skew_that_pooling_hides():
    E = 4
    text_p = [0.5, 0.5, 0.0, 0.0]
    image_p = [0.0, 0.0, 0.5, 0.5]
    probs = torch.tensor([text_p] * 4 + [image_p] * 4, dtype=torch.float64)
    idx = torch.tensor([[0], [1], [0], [1], [2], [3], [2], [3]])
    mod = torch.tensor([MODALITY_TEXT] * 4 + [MODALITY_IMAGE] * 4)
    r = result(idx, probs, modality=mod)
    assert load_balance_loss(r).item() == pytest.approx(1.0)  # pooled: perfect
    assert modality_balance_loss(r).item() == pytest.approx(2.0)  # each modality: 4 * (.5*.5 + .5*.5)
    text_only = result(idx[:4], probs[:4])
    assert load_balance_loss(text_only).item() == pytest.approx(2.0)
    # without modality ids it falls back to the pooled loss
    assert modality_balance_loss(result(idx, probs)).item() == pytest.approx(1.0)


def test_device_loss():
    E = 4
    idx = torch.tensor([[0], [1], [2], [3]])
    assert device_balance_loss(result(idx, uniform(4, E)), 2).item() == pytest.approx(1.0)
    skew = result(torch.tensor([[0], [1], [0], [1]]), torch.tensor([[0.3, 0.3, 0.2, 0.2]] * 4))
    assert device_balance_loss(skew, 2).item() == pytest.approx(2 * 0.6)
    assert device_balance_loss(skew, 1).item() == 0.0
    with pytest.raises(ValueError, match="num_devices"):
        device_balance_loss(skew, 3)


def test_sequence_loss_is_per_sequence():
    E, Bsz, T = 4, 2, 4
    # sequence 0 uses experts 0/1, sequence 1 uses 2/3: the batch is balanced, each sequence is not
    idx = torch.tensor([[0], [1], [0], [1], [2], [3], [2], [3]])
    probs = torch.tensor([[0.5, 0.5, 0, 0]] * 4 + [[0, 0, 0.5, 0.5]] * 4, dtype=torch.float64)
    r = result(idx, probs, batch_shape=(Bsz, T))
    assert load_balance_loss(r).item() == pytest.approx(1.0)
    assert sequence_balance_loss(r).item() == pytest.approx(2.0)
    balanced = result(torch.tensor([[0], [1], [2], [3]] * 2), uniform(8, E), batch_shape=(Bsz, T))
    assert sequence_balance_loss(balanced).item() == pytest.approx(1.0)
    # hand formula (DeepSeek-V3): mean_b E * sum_i f_bi P_bi, f from counts / (T*k)
    g = torch.Generator().manual_seed(0)
    p = torch.rand(Bsz * T, E, generator=g, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True)
    idx = p.topk(2, -1).indices
    r = result(idx, p, batch_shape=(Bsz, T))
    hand = 0.0
    for b in range(Bsz):
        rows = slice(b * T, (b + 1) * T)
        f = torch.bincount(idx[rows].flatten(), minlength=E).double() / (T * 2)
        hand += E * (f * p[rows].mean(0)).sum().item()
    assert sequence_balance_loss(r).item() == pytest.approx(hand / Bsz)


def test_expert_choice_result_works_with_sequence_loss():
    """Expert choice (experts pick tokens, so a token may get 0..E experts): the sequence loss equals a float64
    per-sequence loop over the selected (token, expert) pairs."""
    torch.manual_seed(0)
    E, Bsz, T = 4, 2, 5
    r = Router(6, MoEConfig(num_experts=E, top_k=1, router="expert_choice"))
    with torch.no_grad():
        res = r(torch.randn(Bsz * T, 6), batch_shape=(Bsz, T))
    ref = 0.0
    for b in range(Bsz):
        counts, psum = [0.0] * E, [0.0] * E
        for t in range(b * T, (b + 1) * T):
            for j in range(res.expert_idx.shape[1]):
                if res.selected[t, j]:
                    counts[int(res.expert_idx[t, j])] += 1
            for e in range(E):
                psum[e] += float(res.probs[t, e])
        ref += E * sum(c / sum(counts) * p / T for c, p in zip(counts, psum))
    assert sequence_balance_loss(res).item() == pytest.approx(ref / Bsz, rel=1e-5)


def test_padding_never_changes_any_loss():
    E, Bsz, T, P = 4, 2, 5, 3
    g = torch.Generator().manual_seed(1)
    real_p = torch.rand(Bsz, T, E, generator=g, dtype=torch.float64).softmax(-1)
    real_idx = real_p.topk(2, -1).indices
    real_mod = torch.randint(0, 2, (Bsz, T), generator=g)
    junk_p = (torch.eye(E, dtype=torch.float64)[0] + 1e-6).expand(Bsz, P, E)  # all on expert 0
    junk_idx = torch.zeros(Bsz, P, 2, dtype=torch.long)
    junk_mod = torch.randint(0, 2, (Bsz, P), generator=g)

    def flat(a):
        return a.reshape(-1, *a.shape[2:])

    base = result(flat(real_idx), flat(real_p), modality=flat(real_mod), batch_shape=(Bsz, T),
                  logits=flat(real_p).log(), num_groups=2)
    padded_p = torch.cat([real_p, junk_p], 1)
    padded_logits = torch.cat([real_p.log(), 30 * junk_p], 1)
    mask = torch.cat([torch.ones(Bsz, T, dtype=torch.bool), torch.zeros(Bsz, P, dtype=torch.bool)], 1)
    padded = result(flat(torch.cat([real_idx, junk_idx], 1)), flat(padded_p), mask=flat(mask),
                    modality=flat(torch.cat([real_mod, junk_mod], 1)), batch_shape=(Bsz, T + P),
                    logits=flat(padded_logits), num_groups=2)
    a, b = balancing_losses(base, num_devices=2), balancing_losses(padded, num_devices=2)
    assert set(a) == {"balance", "z", "group", "modality", "device", "sequence"}
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), msg=k)
    ma, mb = routing_metrics(base), routing_metrics(padded)
    for k in ma:
        assert ma[k] == pytest.approx(mb[k]), k
    torch.testing.assert_close(expert_load(base), expert_load(padded))


def test_routing_metrics_hand_case():
    E = 4
    # selected loads [3, 2, 2, 1]; expert 3's only assignment and one of expert 0's are dropped
    idx = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2]])
    kept = torch.tensor([[True, True], [True, True], [False, False], [True, True]])
    probs = torch.tensor([[0.25] * 4, [0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]], dtype=torch.float64)
    mod = torch.tensor([MODALITY_TEXT, MODALITY_TEXT, MODALITY_IMAGE, MODALITY_IMAGE])
    m = routing_metrics(result(idx, probs, kept=kept, modality=mod, num_groups=2))
    load = torch.tensor([2.0, 2.0, 2.0, 0.0])
    assert m["load_cv"] == pytest.approx((load.std(unbiased=False) / load.mean()).item())
    assert m["max_violation"] == pytest.approx((2 - 1.5) / 1.5)
    assert m["dead_experts"] == 1
    assert m["drop_rate"] == pytest.approx(1 - 6 / 8)
    assert m["experts_per_token"] == pytest.approx(6 / 4)
    h = [math.log(4), math.log(4), 0.0, math.log(2)]
    assert m["token_entropy"] == pytest.approx(sum(h) / 4 / math.log(4), abs=1e-9)
    pbar = probs.mean(0)
    assert m["marginal_entropy"] == pytest.approx((-(pbar * pbar.log()).sum() / math.log(4)).item())
    assert m["text/max_violation"] == pytest.approx((2 - 1) / 1)  # text loads [2, 1, 1, 0]
    assert m["image/drop_rate"] == pytest.approx(1 - 2 / 4)
    assert m["image/dead_experts"] == 2
    assert m["group/max_violation"] == pytest.approx((4 - 3) / 3)  # group loads [4, 2]
    assert all(isinstance(v, float) for v in m.values())


def test_router_losses_differentiable_and_balance_gradient_pushes_towards_uniform():
    torch.manual_seed(0)
    r = Router(8, MoEConfig(num_experts=4, top_k=2))
    with torch.no_grad():
        r.gate.weight[0] += 1.0
    x = torch.randn(64, 8).abs()
    res = r(x)
    loss = load_balance_loss(res)
    assert loss.item() > 1
    loss.backward()
    # gradient step lowers the over-used expert's logits: d loss / d w_0 points along +x
    assert (r.gate.weight.grad[0] @ x.mean(0)).item() > 0


def test_one_registry_of_balancing_loss_kinds_feeds_config_and_losses():
    from dataclasses import fields

    from mmoe.model.moe import BALANCING_LOSSES, LOSS_KINDS, balancing_loss
    from mmoe.training.config import LossCoefs

    assert tuple(f.name for f in fields(LossCoefs)) == LOSS_KINDS == tuple(BALANCING_LOSSES)
    r = Router(8, MoEConfig(num_experts=4, top_k=2, num_groups=2, top_groups=1, hierarchy="group_limited"),
               causal=True)(torch.randn(12, 8))
    losses = balancing_losses(r, num_devices=2)
    assert set(losses) == set(LOSS_KINDS)
    assert torch.equal(losses["device"], device_balance_loss(r, 2))
    assert torch.equal(balancing_loss("z", r), z_loss(r))
    with pytest.raises(KeyError, match="'entropy'.*balance"):
        balancing_loss("entropy", r)


def _loop_fp(counts: list[float], probs_sum: list[float], n_tokens: int) -> float:
    """n * sum_i f_i P_i from plain per-bucket sums (f: share of assignments, P: mean probability)."""
    total = sum(counts)
    return len(counts) * sum((c / total) * (p / n_tokens) for c, p in zip(counts, probs_sum))


def test_balance_losses_count_load_before_capacity_drops():
    """f_i counts what the router *selected*, not what survived capacity: with drops the two differ, and
    penalising only kept load would hide the overload that caused the drops (GShard / Switch use the
    pre-capacity dispatch fractions). Float64 per-token loops are the reference."""
    E, N, K, G, D = 4, 6, 2, 2, 2
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(N, E, generator=g, dtype=torch.float64).softmax(-1)
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3], [0, 1], [2, 3]])
    mask = torch.tensor([True, True, True, True, True, False])
    # expert 0 has capacity 2: its last three (real) assignments are dropped, one expert-1 slot is dropped too
    kept = torch.tensor([[True, True], [True, True], [False, True], [False, True], [False, False], [False, False]])
    r = result(idx, probs, kept=kept, mask=mask, num_groups=G, batch_shape=(2, 3))
    real = [t for t in range(N) if mask[t]]
    sel_counts = [0.0] * E
    kept_counts = [0.0] * E
    psum = [0.0] * E
    for t in real:
        for k in range(K):
            sel_counts[int(idx[t, k])] += 1
            kept_counts[int(idx[t, k])] += float(kept[t, k])
        for e in range(E):
            psum[e] += float(probs[t, e])
    assert sel_counts != kept_counts  # the fixture really drops
    assert load_balance_loss(r).item() == pytest.approx(_loop_fp(sel_counts, psum, len(real)), rel=1e-6)
    assert load_balance_loss(r).item() != pytest.approx(_loop_fp(kept_counts, psum, len(real)), rel=1e-3)
    pair = lambda v: [v[0] + v[1], v[2] + v[3]]  # noqa: E731  (groups == devices == contiguous halves here)
    ref_pair = _loop_fp(pair(sel_counts), pair(psum), len(real))
    assert group_balance_loss(r).item() == pytest.approx(ref_pair, rel=1e-6)
    assert device_balance_loss(r, D).item() == pytest.approx(ref_pair, rel=1e-6)
    # sequence-wise: sequence 0 = tokens 0..2, sequence 1 = tokens 3..4 (token 5 is padding)
    per_seq = []
    for rows in ([0, 1, 2], [3, 4]):
        c, p = [0.0] * E, [0.0] * E
        for t in rows:
            for k in range(K):
                c[int(idx[t, k])] += 1
            for e in range(E):
                p[e] += float(probs[t, e])
        per_seq.append(_loop_fp(c, p, len(rows)))
    assert sequence_balance_loss(r).item() == pytest.approx(sum(per_seq) / 2, rel=1e-6)
    # the logged load (routing health) is the *kept* load, and the drop rate says what capacity removed
    m = routing_metrics(r)
    assert m["drop_rate"] == pytest.approx(1 - sum(kept_counts) / sum(sel_counts))
    torch.testing.assert_close(expert_load(r), torch.tensor(kept_counts) / sum(kept_counts))


def test_router_with_capacity_drops_uses_selected_load():
    """A real router whose capacity drops slots: its balance loss equals the float64 loop over `selected`."""
    torch.manual_seed(0)
    E = 4
    router = Router(8, MoEConfig(num_experts=E, top_k=2, capacity_factor=0.5))
    with torch.no_grad():
        router.gate.weight[0] += 2.0  # crowd expert 0 so capacity binds
    x = torch.randn(32, 8).abs()
    res = router(x)
    assert bool((res.selected & ~res.kept).any()), "capacity must drop something for this test to mean anything"
    counts = [0.0] * E
    for t in range(32):
        for k in range(2):
            if res.selected[t, k]:
                counts[int(res.expert_idx[t, k])] += 1
    psum = res.probs.double().sum(0).tolist()
    assert load_balance_loss(res).item() == pytest.approx(_loop_fp(counts, psum, 32), rel=1e-5)


# ---------------------------------------------------------------- edge cases found by mutation testing (docs/mutation.md)
def test_single_real_token_and_single_slot_are_not_rescaled():
    """One real token (or one selected slot per sequence): every mean divides by exactly 1."""
    E = 4
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25] * 4], dtype=torch.float64)
    logits = probs.log() + 1.5  # logsumexp 1.5, not 0 (a rescaled 0 would stay 0)
    r = result(torch.tensor([[0], [1]]), probs, logits=logits, mask=torch.tensor([True, False]), num_groups=2,
               batch_shape=(2, 1))
    assert z_loss(r).item() == pytest.approx(torch.logsumexp(logits[0], -1).item() ** 2)
    # one assignment on expert 0 (group 0 / device 0): f = [1, 0], P = [0.7, 0.3]
    assert group_balance_loss(r).item() == pytest.approx(2 * 0.7)
    assert device_balance_loss(r, 2).item() == pytest.approx(2 * 0.7)
    assert load_balance_loss(r).item() == pytest.approx(4 * 0.4)
    # sequence 0 has one real token with one slot; sequence 1 is padding only and is left out
    assert sequence_balance_loss(r).item() == pytest.approx(E * 0.4)
    torch.testing.assert_close(expert_load(r), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # loads [1, 0, 0, 0]: mean 0.25 (below one assignment per expert), MaxVio (1 - 0.25) / 0.25 = 3
    m = routing_metrics(r)
    assert m["max_violation"] == pytest.approx(3.0) and m["load_cv"] == pytest.approx(3 ** 0.5)


def test_group_loss_uses_the_group_gate_probabilities_when_given():
    """Two-level routing has its own group gate: its probabilities, not the summed expert probabilities, are P_g."""
    idx = torch.tensor([[0], [1], [2], [3]])
    gp = torch.tensor([[0.9, 0.1]] * 4, dtype=torch.float64)  # expert probs sum to 0.5 / 0.5 per group
    r = result(idx, uniform(4, 4), num_groups=2, group_probs=gp)
    assert group_balance_loss(r).item() == pytest.approx(2 * (0.5 * 0.9 + 0.5 * 0.1))
    balanced = result(idx, uniform(4, 4), num_groups=2)
    assert group_balance_loss(balanced).item() == pytest.approx(1.0)
    skewed = result(torch.tensor([[0], [1], [0], [1]]), uniform(4, 4), num_groups=2, group_probs=gp)
    assert group_balance_loss(skewed).item() == pytest.approx(2 * 0.9)


def test_modality_loss_with_one_modality_present_or_hidden_in_padding():
    """Only text among the real tokens: the modality loss is the text tokens' balance loss, whatever modality the
    padding tokens carry; no real token at all (a masked placeholder image) gives 0, not an error."""
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1],
                          [0.25] * 4, [0.25] * 4], dtype=torch.float64)
    idx = torch.tensor([[0], [1], [0], [3], [3]])
    mod = torch.tensor([MODALITY_TEXT] * 3 + [MODALITY_IMAGE] * 2)
    mask = torch.tensor([True, True, True, False, False])
    r = result(idx, probs, modality=mod, mask=mask)
    text_only = result(idx[:3], probs[:3])
    assert modality_balance_loss(r).item() == pytest.approx(load_balance_loss(text_only).item())
    assert modality_balance_loss(r).item() == pytest.approx(4 * (2 / 3 * 0.5 + 1 / 3 * 0.3))
    nothing = result(idx, probs, modality=mod, mask=torch.zeros(5, dtype=torch.bool))
    for fn in (modality_balance_loss, sequence_balance_loss):
        out = fn(nothing)
        assert out.shape == () and out.item() == 0.0, fn.__name__


def test_balancing_losses_has_no_device_term_without_expert_parallelism():
    r = result(torch.tensor([[0], [0]]), torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 2, dtype=torch.float64))
    assert balancing_losses(r)["device"].item() == 0.0
    assert balancing_losses(r, num_devices=2)["device"].item() == pytest.approx(2 * 0.8)


def _loop_group_balance(idx, probs, tokens, group: list[int]) -> float:
    """Eg * sum_{i in group} f_i P_i over `tokens` (float64 loop): f and P restricted to the group's experts."""
    counts = [sum(1.0 for t in tokens for e in idx[t] if int(e) == i) for i in group]
    psum = [sum(float(probs[t, i]) for t in tokens) for i in group]
    return _loop_fp(counts, psum, len(tokens))


def test_modality_grouped_balance_with_one_modality_no_modality_an_extra_mask_or_only_padding():
    """With expert modality groups the balance loss is the mean over the modalities present of each group's own
    loss. One modality alone (either one), a router given no modality (every token text), an extra token mask and an
    all-padding layer each take their own path; each is checked against a float64 loop over the tokens."""
    E, N = 4, 6
    image, text = [0, 1], [2, 3]
    em = [MODALITY_IMAGE, MODALITY_IMAGE, MODALITY_TEXT, MODALITY_TEXT]
    g = torch.Generator().manual_seed(7)
    probs = torch.rand(N, E, generator=g, dtype=torch.float64).softmax(-1)
    idx_img = torch.tensor([[0], [0], [1], [0], [1], [0]])
    idx_txt = torch.tensor([[2], [3], [2], [2], [2], [3]])
    everyone = list(range(N))
    # image tokens only: the text group is absent, the image group's loss is the whole loss (not 0)
    r = result(idx_img, probs, modality=[MODALITY_IMAGE] * N, expert_modality=em)
    assert load_balance_loss(r).item() == pytest.approx(_loop_group_balance(idx_img, probs, everyone, image))
    # text tokens only, and a grouped router given no modality at all: every token counts as text
    want_text = _loop_group_balance(idx_txt, probs, everyone, text)
    assert want_text != pytest.approx(1.0, abs=1e-3)  # skewed, so a zero or a default of 1 would show
    text_only = result(idx_txt, probs, modality=[MODALITY_TEXT] * N, expert_modality=em)
    assert load_balance_loss(text_only).item() == pytest.approx(want_text)
    assert load_balance_loss(result(idx_txt, probs, expert_modality=em)).item() == pytest.approx(want_text)
    # an extra mask (the first three tokens only) narrows the tokens like padding does
    extra = torch.tensor([True, True, True, False, False, False])
    first_three = _loop_group_balance(idx_txt, probs, [0, 1, 2], text)
    assert load_balance_loss(text_only, extra).item() == pytest.approx(first_three)
    # a layer of padding only (a masked placeholder image): zero, finite
    pad = result(idx_txt, probs, modality=[MODALITY_TEXT] * N, expert_modality=em,
                 mask=torch.zeros(N, dtype=torch.bool))
    assert load_balance_loss(pad).item() == 0.0


class _ThreadAllReduce:
    """An element-wise sum over `world` ranks run as threads: a stand-in for torch.distributed.all_reduce that knows
    nothing of what the tensor holds."""

    def __init__(self, world: int):
        self.barrier, self.parts = threading.Barrier(world, timeout=60), [None] * world

    def for_rank(self, rank: int):
        def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = t.detach().clone()
            self.barrier.wait()
            total = torch.stack(self.parts).sum(0)
            self.barrier.wait()  # nobody overwrites a part before every rank has summed
            return total
        return sum_over_ranks

    def run(self, per_rank):
        """per_rank(rank, sum_over_ranks) on every rank at once; returns the results by rank (a rank's error is
        raised here, after the barrier is broken so the other ranks stop waiting)."""
        out, errors = [None] * len(self.parts), []

        def target(rank):
            try:
                out[rank] = per_rank(rank, self.for_rank(rank))
            except BaseException as e:  # noqa: BLE001  (re-raised in the test's thread below)
                errors.append(e)
                self.barrier.abort()
        threads = [threading.Thread(target=target, args=(k,), daemon=True) for k in range(len(out))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


def test_device_loss_over_ranks_is_the_global_loss_and_each_rank_gets_world_times_its_gradient_share():
    """With `sum_over_ranks` every rank's value is the loss of the global batch (float64 loop over the tokens of
    both ranks, padding excluded), and each rank's gradient is world x its own tokens' part of the global loss's
    gradient, so the data-parallel mean of the gradients is the global gradient."""
    E, K, D, W = 4, 2, 2, 2
    g = torch.Generator().manual_seed(11)
    logits = [torch.randn(n, E, generator=g, dtype=torch.float64) for n in (5, 3)]  # unequal tokens per rank
    masks = [torch.tensor([True, True, True, True, False]), torch.ones(3, dtype=torch.bool)]
    idx = [lg.topk(K, -1).indices for lg in logits]
    leaves = [lg.clone().requires_grad_() for lg in logits]

    def per_rank(rank, sum_over_ranks):
        r = result(idx[rank], leaves[rank].softmax(-1), mask=masks[rank], logits=leaves[rank])
        return balancing_loss("device", r, D, sum_over_ranks)
    losses = _ThreadAllReduce(W).run(per_rank)
    # the reference: one float64 loop over the real tokens of both ranks, experts 0-1 on device 0, 2-3 on device 1
    ref_leaves = [lg.clone().requires_grad_() for lg in logits]
    counts, psum, n_real = [0.0] * D, [0.0] * D, 0
    for rank in range(W):
        probs = ref_leaves[rank].softmax(-1)
        for t in range(len(masks[rank])):
            if not masks[rank][t]:
                continue
            n_real += 1
            for k in range(K):
                counts[int(idx[rank][t, k]) // (E // D)] += 1
            for e in range(E):
                psum[e // (E // D)] = psum[e // (E // D)] + probs[t, e]
    ref = D * sum((c / sum(counts)) * (p / n_real) for c, p in zip(counts, psum))
    ref.backward()
    for rank in range(W):
        assert losses[rank].item() == pytest.approx(ref.item(), rel=1e-12)
        losses[rank].backward()
        torch.testing.assert_close(leaves[rank].grad, W * ref_leaves[rank].grad, rtol=1e-10, atol=1e-12)
    # the local loss of rank 0 alone is a different number: the collective mattered
    alone = device_balance_loss(result(idx[0], logits[0].softmax(-1), mask=masks[0]), D).item()
    assert alone != pytest.approx(ref.item(), rel=1e-3)


def test_balancing_loss_device_kind_defaults_to_one_device_and_forwards_sum_over_ranks():
    N = 4
    r0 = result(torch.tensor([[0, 1]] * N), torch.tensor([[0.7, 0.1, 0.1, 0.1]] * N, dtype=torch.float64))
    r1 = result(torch.tensor([[2, 3]] * N), torch.tensor([[0.1, 0.1, 0.1, 0.7]] * N, dtype=torch.float64))
    assert balancing_loss("device", r0).item() == 0.0  # no expert parallelism unless num_devices says so
    assert balancing_loss("device", r0, 2).item() == pytest.approx(2 * 0.8)  # device 0: all load, 0.8 of the prob
    # with the other rank's tokens all on device 1 the global batch is balanced across the two devices
    glob = _ThreadAllReduce(2).run(lambda rank, s: balancing_loss("device", (r0, r1)[rank], 2, s).item())
    assert glob == [pytest.approx(1.0), pytest.approx(1.0)]
    # one real token in the whole global batch (the other rank is all padding): its mean is not rescaled
    pad = result(torch.tensor([[2, 3]]), torch.tensor([[0.1, 0.1, 0.1, 0.7]], dtype=torch.float64),
                 mask=torch.zeros(1, dtype=torch.bool))
    one = result(torch.tensor([[0, 1]]), torch.tensor([[0.7, 0.1, 0.1, 0.1]], dtype=torch.float64))
    glob = _ThreadAllReduce(2).run(lambda rank, s: balancing_loss("device", (one, pad)[rank], 2, s).item())
    assert glob == [pytest.approx(2 * 0.8), pytest.approx(2 * 0.8)]

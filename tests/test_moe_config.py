"""MoEConfig's rules at their boundaries: each refusal with its whole message, and the config one step inside
every boundary accepted, so a shifted comparison (`<` to `<=`), a dropped condition or a mangled message fails.

The expected values are the documented rules written out by hand (field docstrings in mmoe/model/moe/config.py),
not re-derived from the code.
"""

from __future__ import annotations

import re

import pytest

from mmoe.model.moe import MoEConfig, MoEConfigError, select_layers

HIER8 = dict(num_experts=8, num_groups=4)  # 4 groups of 2 experts

# (config fields, causal, residual, the message after "site: moe.")
REFUSED = [
    (dict(num_experts=0, top_k=0), False, True, "num_experts must be >= 1, got 0"),
    (dict(top_k=0), False, True, "top_k must be in [1, num_experts=4], got 0"),
    (dict(top_k=5), False, True, "top_k must be in [1, num_experts=4], got 5"),
    (dict(router="expert_choice"), True, True,
     "router 'expert_choice' lets each expert pick tokens by looking at the whole sequence; it is not causal-safe "
     "and cannot be used in a causal decoder site (use token_choice or top_p)"),
    (dict(router="switch"), False, True, "router unknown router 'switch'"),
    (dict(score_func="relu"), False, True, "score_func unknown score function 'relu'"),
    (dict(router="top_p", top_p=0.0), False, True, "top_p must be in (0, 1], got 0.0"),
    (dict(router="top_p", top_p=1.01), False, True, "top_p must be in (0, 1], got 1.01"),
    (dict(capacity_factor=-0.5), False, True, "capacity_factor must be >= 0 (0 = dropless)"),
    (dict(eval_capacity_factor=-0.5), False, True, "capacity_factor must be >= 0 (0 = dropless)"),
    (dict(eval_capacity_factor=0.5), True, True,
     "eval_capacity_factor must be 0 (dropless) at a causal decoder site: cached generation routes one token per "
     "sequence per step, so an eval capacity would drop differently from a full forward and depend on the other "
     "sequences in the batch"),
    (dict(hierarchy="tree"), False, True, "hierarchy unknown hierarchy 'tree'"),
    (dict(num_groups=0), False, True, "num_groups must be >= 1 and divide num_experts=4, got 0"),
    (dict(num_groups=3), False, True, "num_groups must be >= 1 and divide num_experts=4, got 3"),
    (dict(drop_policy="random"), False, True, "drop_policy must be 'position' or 'score', got 'random'"),
    (dict(image_experts=2), True, True, "image_experts is only used by hierarchy='modality' (got hierarchy='flat')"),
    (dict(HIER8, hierarchy="group_limited", router="top_p"), False, True,
     "hierarchy hierarchical routing needs router='token_choice', got 'top_p'"),
    (dict(hierarchy="two_level", router="expert_choice", num_groups=2), False, True,
     "hierarchy hierarchical routing needs router='token_choice', got 'expert_choice'"),
    (dict(hierarchy="group_limited", num_groups=1), False, True,
     "num_groups must be >= 2 and divide num_experts=4, got 1"),
    (dict(HIER8, hierarchy="group_limited", top_groups=0), False, True,
     "top_groups must be in [1, num_groups=4], got 0"),
    (dict(HIER8, hierarchy="group_limited", top_groups=5), False, True,
     "top_groups must be in [1, num_groups=4], got 5"),
    (dict(HIER8, hierarchy="group_limited", top_groups=1, top_k=3), False, True,
     "top_groups 1 groups of 2 experts cannot hold top_k=3"),
    (dict(HIER8, hierarchy="two_level", score_func="sigmoid", top_groups=2), False, True,
     "score_func two_level routing uses softmax group and expert gates; use hierarchy='group_limited' for "
     "sigmoid (DeepSeek-V3) scores"),
    (dict(HIER8, hierarchy="two_level", top_groups=2, top_k=3), False, True,
     "top_k two_level routing picks top_k/top_groups experts in each chosen group: top_k=3 must be a multiple of "
     "top_groups=2 and at most 4"),
    (dict(HIER8, hierarchy="two_level", top_groups=1, top_k=3, renormalize=False), False, True,
     "top_k two_level routing picks top_k/top_groups experts in each chosen group: top_k=3 must be a multiple of "
     "top_groups=1 and at most 2"),
    (dict(num_shared_experts=-1), False, True, "num_shared_experts and expert_hidden must be >= 0"),
    (dict(expert_hidden=-1), False, True, "num_shared_experts and expert_hidden must be >= 0"),
    (dict(upcycle_reinit=-0.01), False, True, "upcycle_reinit must be in [0, 1], got -0.01"),
    (dict(upcycle_reinit=1.01), False, True, "upcycle_reinit must be in [0, 1], got 1.01"),
    # _refuse_inert: options that would do nothing
    (dict(HIER8, hierarchy="group_limited", group_score="top3"), False, True,
     "group_score must be 'topk_sum', 'top2' or 'max', got 'top3'"),
    (dict(group_score="max"), False, True, "group_score is only used by hierarchy='group_limited' (got hierarchy='flat')"),
    (dict(HIER8, hierarchy="two_level", group_score="top2", top_groups=2), False, True,
     "group_score is only used by hierarchy='group_limited' (got hierarchy='two_level')"),
    (dict(num_experts=4, num_groups=4, top_k=1, hierarchy="group_limited", group_score="top2"), False, True,
     "group_score 'top2' sums two experts per group; each group has only one"),
    (dict(top_groups=2, num_groups=2), False, True,
     "top_groups is only used by hierarchical routing (hierarchy='group_limited' or 'two_level')"),
    (dict(top_p=0.5), False, True, "top_p is only used by router='top_p' (got router='token_choice')"),
    (dict(router="expert_choice", top_p=0.9), False, True, "top_p is only used by router='top_p' (got router='expert_choice')"),
    (dict(router="expert_choice", aux_free_bias=True), False, True,
     "aux_free_bias does nothing with router='expert_choice': each expert ranks tokens, and a per-expert bias "
     "shifts all of an expert's scores alike (expert choice is balanced already)"),
    (dict(top_k=4, aux_free_bias=True), False, True,
     "aux_free_bias cannot change which experts are picked: every token already takes all experts; lower top_k "
     "or drop aux_free_bias"),
    (dict(HIER8, hierarchy="two_level", top_groups=2, top_k=4, aux_free_bias=True), False, True,
     "aux_free_bias cannot change which experts are picked: every token already takes all experts of each chosen "
     "group (two_level groups are chosen by the group gate alone); lower top_k or drop aux_free_bias"),
    (dict(num_experts=8, num_groups=2, hierarchy="two_level", top_groups=1, top_k=4, renormalize=False,
          aux_free_bias=True), False, True,
     "aux_free_bias cannot change which experts are picked: every token already takes all experts of each chosen "
     "group (two_level groups are chosen by the group gate alone); lower top_k or drop aux_free_bias"),
    (dict(bias_update_rate=0.01), False, True, "bias_update_rate is only used with aux_free_bias=true"),
    (dict(drop_policy="position"), False, True,
     "drop_policy is only used by token-choice / top_p routing with a capacity (capacity_factor or "
     "eval_capacity_factor > 0)"),
    (dict(router="expert_choice", drop_policy="position", capacity_factor=1.0), False, True,
     "drop_policy is only used by token-choice / top_p routing with a capacity (capacity_factor or "
     "eval_capacity_factor > 0)"),
    (dict(num_experts=8, num_groups=2, hierarchy="two_level", top_groups=1, top_k=2), False, True,
     "renormalize with hierarchy='two_level' and top_groups=1 divides P(g) out of every weight, so the group gate "
     "gets no gradient from the task loss: set renormalize false (weight P(g) P(e|g)) or top_groups >= 2"),
    # no residual (the connector): a token every routed expert drops would be all zero
    (dict(router="expert_choice"), False, False,
     "router 'expert_choice' leaves tokens that no expert picks with an all-zero output here (no residual): add "
     "num_shared_experts >= 1 or use token_choice / top_p"),
    (dict(capacity_factor=1.0), False, False,
     "capacity_factor (and eval_capacity_factor) > 0 drops tokens, and a token dropped by every expert gets an "
     "all-zero output here (no residual): use 0 (dropless) or num_shared_experts >= 1"),
    (dict(eval_capacity_factor=1.0), False, False,
     "capacity_factor (and eval_capacity_factor) > 0 drops tokens, and a token dropped by every expert gets an "
     "all-zero output here (no residual): use 0 (dropless) or num_shared_experts >= 1"),
]


@pytest.mark.parametrize("kw,causal,residual,message", REFUSED)
def test_each_refusal_names_the_site_field_and_reason(kw, causal, residual, message):
    with pytest.raises(MoEConfigError) as err:
        MoEConfig(**kw).validate(causal=causal, site="dec.2", residual=residual)
    assert str(err.value) == f"dec.2: moe.{message}"


def test_validate_defaults_to_a_bidirectional_residual_site_named_moe():
    """validate() alone: not causal (expert choice passes), residual (a capacity passes), errors say 'moe:'."""
    MoEConfig(router="expert_choice").validate()
    MoEConfig(capacity_factor=1.0).validate()
    with pytest.raises(MoEConfigError, match=re.escape("moe: moe.top_k must be in [1, num_experts=4], got 9")):
        MoEConfig(top_k=9).validate()


# Each is one step inside a boundary refused above (or the other side of a condition): all must pass.
ACCEPTED = [
    (dict(num_experts=1, top_k=1), True, True),
    (dict(top_k=4), False, True),  # top_k == num_experts without aux_free_bias
    (dict(top_k=3, aux_free_bias=True), True, True),
    (dict(router="expert_choice"), False, True),
    (dict(router="top_p", top_p=1.0), True, True),
    (dict(router="top_p", top_p=1e-6, top_k=4, aux_free_bias=True), True, True),  # adaptive k: bias can move picks
    (dict(capacity_factor=0.0, eval_capacity_factor=0.0), True, True),
    (dict(eval_capacity_factor=0.5), False, True),  # bidirectional sites may drop in eval
    (dict(capacity_factor=0.5), True, True),  # causal sites may drop in training
    (dict(num_groups=4), False, True),  # flat: groups only feed the group balance metrics
    (dict(num_groups=2, hierarchy="group_limited"), True, True),
    (dict(HIER8, hierarchy="group_limited", top_groups=4), True, True),
    (dict(HIER8, hierarchy="group_limited", top_groups=1, top_k=2), True, True),
    (dict(HIER8, hierarchy="group_limited", top_groups=1, top_k=2, group_score="top2"), True, True),
    (dict(HIER8, hierarchy="group_limited", top_groups=2, group_score="max", score_func="sigmoid"), True, True),
    (dict(HIER8, hierarchy="two_level", top_groups=2, top_k=4), True, True),
    (dict(HIER8, hierarchy="two_level", top_groups=2, top_k=2, aux_free_bias=True), True, True),
    (dict(HIER8, hierarchy="two_level", top_groups=1, top_k=2, renormalize=False), True, True),
    (dict(num_experts=8, num_groups=2, hierarchy="two_level", top_groups=1, top_k=2, renormalize=False,
          aux_free_bias=True), True, True),
    (dict(num_shared_experts=0, expert_hidden=0), True, True),
    (dict(upcycle_reinit=0.0), True, True),
    (dict(upcycle_reinit=1.0), False, True),
    (dict(aux_free_bias=True, bias_update_rate=0.01), True, True),
    (dict(drop_policy="position", capacity_factor=1.0), True, True),
    (dict(drop_policy="position", eval_capacity_factor=1.0), False, True),
    (dict(router="top_p", drop_policy="position", capacity_factor=1.0), True, True),
    (dict(router="expert_choice", num_shared_experts=1), False, False),
    (dict(capacity_factor=1.0, num_shared_experts=1), False, False),
    (dict(), False, False),  # dropless token choice needs no residual
    (dict(hierarchy="modality", image_experts=2), True, True),
]


@pytest.mark.parametrize("kw,causal,residual", ACCEPTED)
def test_each_config_inside_a_boundary_is_accepted(kw, causal, residual):
    cfg = MoEConfig(**kw)
    cfg.validate(causal=causal, site="dec.2", residual=residual)  # raises if refused
    assert cfg == MoEConfig(**kw)  # validate does not rewrite the config


@pytest.mark.parametrize("kw,training,tokens,expected", [
    (dict(capacity_factor=1.0), True, 10, 5),  # ceil(1.0 * 10 * 2 / 4)
    (dict(capacity_factor=1.25), True, 10, 7),  # ceil(6.25)
    (dict(capacity_factor=1.0, top_k=1, num_experts=3), True, 10, 4),  # ceil(3.33)
    (dict(capacity_factor=1.0), True, 0, 1),  # never an empty buffer
    (dict(capacity_factor=1.0), False, 10, 0),  # eval factor 0: dropless in eval
    (dict(eval_capacity_factor=2.0), False, 10, 10),
    (dict(eval_capacity_factor=2.0), True, 10, 0),
])
def test_capacity_is_the_ceiling_of_the_factor_times_tokens_times_k_over_experts(kw, training, tokens, expected):
    assert MoEConfig(**kw).capacity(tokens, training=training) == expected


def test_slots_are_top_k_except_expert_choice_which_has_one_per_expert():
    assert MoEConfig(num_experts=6, top_k=3).slots == 3
    assert MoEConfig(num_experts=6, top_k=3, router="top_p").slots == 3
    assert MoEConfig(num_experts=6, top_k=3, router="expert_choice").slots == 6


@pytest.mark.parametrize("spec,n,expected", [
    ("every_3", 7, [2, 5]),
    ("every_1", 3, [0, 1, 2]),
    ("last_10", 4, [0, 1, 2, 3]),
    ("last_1", 4, [3]),
    ("first_10", 4, [0, 1, 2, 3]),
    ("first_1", 4, [0]),
    ("", 4, []),
    (" All ", 3, [0, 1, 2]),
    ("NONE", 3, []),
    ("3,1", 4, [1, 3]),
    (" 3 , 1 ", 4, [1, 3]),
    ("every_02", 4, [1, 3]),
    ((2, 0, 2), 3, [0, 2]),
    ([], 3, []),
])
def test_select_layers_specs(spec, n, expected):
    assert select_layers(spec, n) == expected


def test_select_layers_errors_name_moe_layers_by_default():
    with pytest.raises(MoEConfigError) as err:
        select_layers("9", 4)
    assert str(err.value) == "moe_layers: layer indices [9] out of range for 4 layers"


@pytest.mark.parametrize("spec,why", [
    ("every_0", "cannot parse 'every_0'"),
    ("last_0", "cannot parse 'last_0'"),
    ("first_-1", "cannot parse 'first_-1'"),
    ("every_two", "cannot parse 'every_two'"),
    ("1;2", "cannot parse '1;2'"),
    ("every_2_3", "cannot parse 'every_2_3'"),  # int() alone reads "2_3" as 23
    ("1_0", "cannot parse '1_0'"),
    ("every_", "cannot parse 'every_'"),
    (["1"], "cannot parse ['1']"),
    ([True], "cannot parse [True]"),
    ("-1", "layer indices [-1] out of range for 4 layers"),
    ("0,4,9", "layer indices [4, 9] out of range for 4 layers"),
    ([4], "layer indices [4] out of range for 4 layers"),
])
def test_select_layers_refusals_name_the_field(spec, why):
    with pytest.raises(MoEConfigError) as err:
        select_layers(spec, 4, field="vit_moe_layers")
    message = str(err.value)
    assert message.startswith(f"vit_moe_layers: {why}"), message
    if why.startswith("cannot parse"):
        assert message.endswith("use 'none', 'all', 'every_N', 'last_N', 'first_N' (N >= 1) or a comma list of "
                                "layer indices"), message

"""One flat config for every MoE site (ViT MLP, connector, MoA attention, decoder FFN).

Strings pick behaviour (``Literal`` fields) so configs round-trip through plain YAML.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Literal


class MoEConfigError(ValueError):
    """A MoE config that cannot work; the message names the field."""


@dataclass
class MoEConfig:
    """Routing, capacity, experts and balancing knobs of one MoE layer."""

    num_experts: int = 4
    """Routed experts E (shared experts not counted)."""
    top_k: int = 2
    """Experts per token for token choice; the cap for top-p; tokens-per-expert multiplier for expert choice."""
    router: Literal["token_choice", "top_p", "expert_choice"] = "token_choice"
    """token_choice: each token picks top-k (switch = top_k 1 without renormalisation); top_p: fewest experts
    whose mass reaches `top_p` (adaptive k, capped at top_k); expert_choice: each expert picks its top-C tokens,
    C = ceil(cf * tokens * top_k / E), weights = the raw scores (bidirectional sites only: it looks at future
    tokens; pooled over the batch in training, per image in eval so eval outputs are batch-invariant)."""
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    """Router score: softmax over experts (Switch, Mixtral) or independent sigmoids (DeepSeek-V3)."""
    renormalize: bool = True
    """Rescale the selected weights to sum to 1 (Mixtral: yes; Switch top-1: no). Token choice and top_p only:
    expert choice weights are the raw scores."""
    top_p: float = 0.7
    """Probability mass for the top_p router."""
    noisy_gating: bool = False
    """Shazeer-2017 noisy top-k: learned, input-dependent Gaussian noise on the logits, training only."""
    jitter_eps: float = 0.0
    """Multiplicative input jitter U(1-eps, 1+eps) on the router input, training only (Switch: 0.01)."""
    hierarchy: Literal["flat", "group_limited", "two_level", "modality"] = "flat"
    """flat: one gate over all experts. group_limited: DeepSeek-style (score each group by `group_score`, keep
    the top_groups best, mask the rest with -inf, pick top_k experts inside). two_level: a group gate then an
    expert gate inside each chosen group, weight = P(g) * P(e|g) (renormalize with top_groups 1 is refused:
    it cancels P(g), so the group gate would get no gradient). modality: experts split into an image group and a
    text group (`image_experts`); each token picks top_k inside its own modality's group (MoMa, Lin et al. 2024);
    decoder sites only (the ViT and connector see image tokens alone)."""
    group_score: Literal["topk_sum", "top2", "max"] = "topk_sum"
    """How group_limited routing scores a group from its (aux-free-biased) selection scores. topk_sum: sum of
    the top floor(top_k / top_groups) (DeepSeek-V3 paper §2.1.2, "the sum of the highest K_r/M affinity
    scores"; Megatron-Core `group_limited_topk`). top2: sum of the top 2 whatever top_k (DeepSeek-V3's
    inference code `Gate` and transformers' `DeepseekV3TopkRouter`: use it to reproduce a DeepSeek-V3
    checkpoint or config). max: the best expert's score (DeepSeek-V2 device-limited routing, transformers'
    `DeepseekV2TopkRouter` topk_method 'group_limited_greedy'). All agree when top_k / top_groups = 2."""
    image_experts: int = 0
    """hierarchy 'modality': routed experts [0, image_experts) serve image tokens, [image_experts, num_experts) text
    tokens (shared experts, `num_shared_experts`, serve every token). Balance losses and the aux-free bias act
    inside each group."""
    num_groups: int = 1
    """Expert groups G for hierarchical routing (E must divide evenly)."""
    top_groups: int = 1
    """Groups kept per token for hierarchical routing."""
    capacity_factor: float = 0.0
    """Training capacity factor; 0 means dropless. Capacity C = ceil(cf * tokens * k / E) over the batch's real
    tokens (expert choice: its C, with 0 meaning 1.0)."""
    eval_capacity_factor: float = 0.0
    """Capacity factor in eval mode; 0 means dropless (expert choice: 0 keeps capacity_factor). At bidirectional
    sites (ViT, connector) eval capacity counts inside each image, so outputs do not depend on the batch;
    refused at causal decoder sites (generation could not honour it)."""
    drop_policy: Literal["position", "score"] = "score"
    """Which assignments survive when an expert overflows: earlier positions first (first choices before
    second choices, GShard) or higher router weight first (Megatron 'probs')."""
    num_shared_experts: int = 0
    """Always-on experts (DeepSeekMoE) added unweighted to the routed output."""
    expert_hidden: int = 0
    """Hidden width of each routed expert; 0 means the site's dense hidden width."""
    routed_scaling: float = 1.0
    """Constant factor on routed weights (DeepSeek's routed_scaling_factor)."""
    aux_free_bias: bool = False
    """DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias added to scores for selection only,
    nudged after each optimizer step towards equal load (token_choice, top_p and hierarchies; with two_level it
    moves the pick inside each group, not the group gate). Refused where it cannot move any pick: expert_choice
    (balanced by construction; a per-expert bias shifts all of one expert's token scores alike) and configs in
    which every token takes every (in-group) expert."""
    bias_update_rate: float = 1e-3
    """Step size u of the bias update b_i += u * sign(mean_load - load_i)."""
    upcycle_reinit: float = 0.0
    """Drop-Upcycling (Nakamura et al., ICLR 2025): when the site is upcycled from a dense MLP, redraw this
    fraction of each expert's hidden units (a different random subset per expert; the paper uses 0.5), so the
    experts start apart and the router learns from the first step. 0: exact copies (the output equals the dense
    MLP's at step 0). FFN sites only (MoA splits heads; nothing to redraw)."""

    def validate(self, causal: bool = False, site: str = "moe", residual: bool = True) -> None:
        """Raise MoEConfigError naming the field when the combination cannot work or an option would do nothing.

        `residual=False` (the connector): the layer's output is all a token gets, so a token that every routed
        expert drops (capacity, expert choice) needs a shared expert to stay non-zero."""
        def fail(field: str, why: str) -> None:
            raise MoEConfigError(f"{site}: moe.{field} {why}")

        if self.num_experts < 1:
            fail("num_experts", f"must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            fail("top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.router == "expert_choice" and causal:
            fail("router", "'expert_choice' lets each expert pick tokens by looking at the whole sequence; it is "
                 "not causal-safe and cannot be used in a causal decoder site (use token_choice or top_p)")
        if self.router not in ("token_choice", "top_p", "expert_choice"):
            fail("router", f"unknown router {self.router!r}")
        if self.score_func not in ("softmax", "sigmoid"):
            fail("score_func", f"unknown score function {self.score_func!r}")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.capacity_factor < 0 or self.eval_capacity_factor < 0:
            fail("capacity_factor", "must be >= 0 (0 = dropless)")
        if causal and self.eval_capacity_factor > 0:
            fail("eval_capacity_factor", "must be 0 (dropless) at a causal decoder site: cached generation routes "
                 "one token per sequence per step, so an eval capacity would drop differently from a full forward "
                 "and depend on the other sequences in the batch")
        if self.hierarchy not in ("flat", "group_limited", "two_level", "modality"):
            fail("hierarchy", f"unknown hierarchy {self.hierarchy!r}")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            fail("num_groups", f"must be >= 1 and divide num_experts={self.num_experts}, got {self.num_groups}")
        if self.drop_policy not in ("position", "score"):
            fail("drop_policy", f"must be 'position' or 'score', got {self.drop_policy!r}")
        if self.hierarchy == "modality":
            self._check_modality(fail, causal)
        elif self.image_experts:
            fail("image_experts", f"is only used by hierarchy='modality' (got hierarchy={self.hierarchy!r})")
        if self.hierarchy in ("group_limited", "two_level"):
            if self.router != "token_choice":
                fail("hierarchy", f"hierarchical routing needs router='token_choice', got {self.router!r}")
            if self.num_groups < 2 or self.num_experts % self.num_groups:
                fail("num_groups", f"must be >= 2 and divide num_experts={self.num_experts}, got {self.num_groups}")
            if not 1 <= self.top_groups <= self.num_groups:
                fail("top_groups", f"must be in [1, num_groups={self.num_groups}], got {self.top_groups}")
            per_group = self.num_experts // self.num_groups
            if self.hierarchy == "group_limited" and self.top_groups * per_group < self.top_k:
                fail("top_groups", f"{self.top_groups} groups of {per_group} experts cannot hold top_k={self.top_k}")
            if self.hierarchy == "two_level":
                if self.score_func != "softmax":
                    fail("score_func", "two_level routing uses softmax group and expert gates; use "
                         "hierarchy='group_limited' for sigmoid (DeepSeek-V3) scores")
                if self.top_k % self.top_groups or self.top_k // self.top_groups > per_group:
                    fail("top_k", f"two_level routing picks top_k/top_groups experts in each chosen group: "
                         f"top_k={self.top_k} must be a multiple of top_groups={self.top_groups} and at most "
                         f"{per_group * self.top_groups}")
        if self.num_shared_experts < 0 or self.expert_hidden < 0:
            fail("num_shared_experts", "and expert_hidden must be >= 0")
        if not 0.0 <= self.upcycle_reinit <= 1.0:
            fail("upcycle_reinit", f"must be in [0, 1], got {self.upcycle_reinit}")
        self._refuse_inert(fail)
        if not residual and self.num_shared_experts == 0:
            if self.router == "expert_choice":
                fail("router", "'expert_choice' leaves tokens that no expert picks with an all-zero output here "
                     "(no residual): add num_shared_experts >= 1 or use token_choice / top_p")
            if self.capacity_factor > 0 or self.eval_capacity_factor > 0:
                fail("capacity_factor", "(and eval_capacity_factor) > 0 drops tokens, and a token dropped by every "
                     "expert gets an all-zero output here (no residual): use 0 (dropless) or num_shared_experts >= 1")

    def _check_modality(self, fail, causal: bool) -> None:
        if self.router != "token_choice":
            fail("hierarchy", f"'modality' routing needs router='token_choice', got {self.router!r}")
        if not causal:
            fail("hierarchy", "'modality' needs a decoder site: the ViT and the connector see image tokens only, so "
                 "the text experts would never be used")
        n_text = self.num_experts - self.image_experts
        if self.image_experts < 1 or n_text < 1:
            fail("image_experts", f"must be in [1, num_experts - 1 = {self.num_experts - 1}], got {self.image_experts}")
        if self.top_k > min(self.image_experts, n_text):
            fail("top_k", f"{self.top_k} does not fit in the image group ({self.image_experts} experts) and the text "
                 f"group ({n_text} experts)")
        if self.num_groups != 1 or self.top_groups != 1:
            fail("num_groups", "(and top_groups) must stay 1 with hierarchy='modality': image_experts sets the groups")
        if self.aux_free_bias and self.top_k == self.image_experts == n_text:
            fail("aux_free_bias", "cannot change which experts are picked: every token takes all experts of its "
                 "modality group")

    def _refuse_inert(self, fail) -> None:
        """Refuse combinations in which an option would silently do nothing (or undo itself)."""
        default = {f.name: f.default for f in fields(self)}
        if self.group_score not in ("topk_sum", "top2", "max"):
            fail("group_score", f"must be 'topk_sum', 'top2' or 'max', got {self.group_score!r}")
        if self.hierarchy != "group_limited" and self.group_score != default["group_score"]:
            fail("group_score", f"is only used by hierarchy='group_limited' (got hierarchy={self.hierarchy!r})")
        if self.hierarchy == "group_limited" and self.group_score == "top2" and self.num_experts // self.num_groups < 2:
            fail("group_score", "'top2' sums two experts per group; each group has only one")
        if self.hierarchy == "flat" and self.top_groups != default["top_groups"]:
            fail("top_groups", "is only used by hierarchical routing (hierarchy='group_limited' or 'two_level')")
        if self.router != "top_p" and self.top_p != default["top_p"]:
            fail("top_p", f"is only used by router='top_p' (got router={self.router!r})")
        if self.aux_free_bias and self.router == "expert_choice":
            fail("aux_free_bias", "does nothing with router='expert_choice': each expert ranks tokens, and a "
                 "per-expert bias shifts all of an expert's scores alike (expert choice is balanced already)")
        if self.aux_free_bias and self.router == "token_choice":
            per_group = self.num_experts // max(1, self.num_groups)
            if self.top_k == self.num_experts or (
                    self.hierarchy == "two_level" and self.top_k // max(1, self.top_groups) == per_group):
                fail("aux_free_bias", "cannot change which experts are picked: every token already takes all "
                     "experts" + (" of each chosen group (two_level groups are chosen by the group gate alone)"
                                  if self.hierarchy == "two_level" else "") + "; lower top_k or drop aux_free_bias")
        if not self.aux_free_bias and self.bias_update_rate != default["bias_update_rate"]:
            fail("bias_update_rate", "is only used with aux_free_bias=true")
        if self.drop_policy != default["drop_policy"] and (
                self.router == "expert_choice" or (self.capacity_factor <= 0 and self.eval_capacity_factor <= 0)):
            fail("drop_policy", "is only used by token-choice / top_p routing with a capacity "
                 "(capacity_factor or eval_capacity_factor > 0)")
        if self.hierarchy == "two_level" and self.renormalize and self.top_groups == 1:
            fail("renormalize", "with hierarchy='two_level' and top_groups=1 divides P(g) out of every weight, so "
                 "the group gate gets no gradient from the task loss: set renormalize false (weight P(g) P(e|g)) "
                 "or top_groups >= 2")

    @property
    def slots(self) -> int:
        """Assignment slots per token in a routing result (E for expert choice)."""
        return self.num_experts if self.router == "expert_choice" else self.top_k

    def capacity(self, num_tokens: int, training: bool) -> int:
        """Per-expert capacity for `num_tokens` routed tokens; 0 means unlimited (dropless)."""
        cf = self.capacity_factor if training else self.eval_capacity_factor
        if cf <= 0:
            return 0
        return max(1, math.ceil(cf * num_tokens * self.top_k / self.num_experts))


def select_layers(spec: str | list[int], n_layers: int, field: str = "moe_layers") -> list[int]:
    """Which layers carry MoE: 'none', 'all', 'every_N' (layers N-1, 2N-1, ...), 'last_N', 'first_N', '0,3,5'."""
    def unparsable() -> MoEConfigError:
        return MoEConfigError(f"{field}: cannot parse {spec!r}; use 'none', 'all', 'every_N', 'last_N', "
                              "'first_N' (N >= 1) or a comma list of layer indices")

    if isinstance(spec, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
            raise unparsable()
        layers = list(spec)
    else:
        s = str(spec).strip().lower()
        counted = re.fullmatch(r"(every|last|first)_([0-9]+)", s)  # strict: int() would read "2_3" as 23
        if s in ("", "none"):
            layers = []
        elif s == "all":
            layers = list(range(n_layers))
        elif counted:
            kind, n = counted[1], int(counted[2])
            if n < 1:  # every_0 would divide by zero; last_0 / first_0 would silently select nothing
                raise unparsable()
            if kind == "every":
                layers = [i for i in range(n_layers) if (i + 1) % n == 0]
            elif kind == "last":
                layers = list(range(max(0, n_layers - n), n_layers))
            else:
                layers = list(range(min(n_layers, n)))
        elif all(re.fullmatch(r"\s*-?[0-9]+\s*", t) for t in s.split(",")):
            layers = [int(t) for t in s.split(",")]
        else:
            raise unparsable()
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise MoEConfigError(f"{field}: layer indices {bad} out of range for {n_layers} layers")
    return sorted(set(layers))

"""Export the decoder of an mmoe export as a Hugging Face transformers `save_pretrained` directory
(command line: `python -m mmoe.export_hf EXPORT_DIR OUT_DIR`).

What maps to what (the decoder only: transformers has no class for mmoe's MoE vision tower and connector):
  dense decoder, no q/k/v bias      -> LlamaForCausalLM
  dense decoder with q/k/v bias     -> Qwen2ForCausalLM
  every FFN a flat softmax top-k MoE, renormalised, no shared experts, dropless -> MixtralForCausalLM
  sigmoid top-k MoE FFNs (flat or DeepSeek-V3 group-limited, top-2 group score), with shared experts, on the
  last layers (the first ones dense), optional aux-loss-free selection bias and routed scaling -> Glm4MoeForCausalLM
  (GLM-4.5: DeepSeek-V3's router and shared experts with ordinary GQA attention; full rotary, no q/k norm)
Refused, with the field named: MoA attention layers (transformers has no mixture-of-attention-heads model),
MoE FFNs on layers other than all or the last ones, softmax routing with shared experts or groups, two-level
routing, top-p or expert choice, capacity dropping, and the combinations above that a format lacks.
(Qwen2-MoE gates its shared expert with a sigmoid and DeepSeek-V3 uses multi-head latent attention: neither
equals mmoe's layers, so they are not targets.)

The tokenizer files of EXPORT_DIR are copied along, so `AutoTokenizer` / `AutoModelForCausalLM` load OUT_DIR;
`mmoe.interop.hf.load_decoder(OUT_DIR)` loads it back into mmoe. OUT_DIR is written atomically.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from mmoe.model.decoder import DecoderConfig


class NotRepresentableError(ValueError):
    """The decoder uses something no transformers model reproduces; the message names the field(s)."""


def _moe_problems(cfg: DecoderConfig) -> list[str]:
    moe = cfg.ffn_moe
    f = "model.arch.decoder.ffn_moe"
    problems = []
    if cfg.moe_ffn_layer_ids() != list(range(cfg.n_layers)):
        problems.append(f"model.arch.decoder.ffn_moe_layers={cfg.ffn_moe_layers!r} mixes dense and MoE FFN layers "
                        "(Mixtral needs every layer MoE)")
    checks = [
        (moe.router != "token_choice", f"{f}.router={moe.router!r} (transformers MoE models route token-choice top-k)"),
        (moe.score_func != "softmax", f"{f}.score_func={moe.score_func!r} (Mixtral scores with a softmax)"),
        (not moe.renormalize, f"{f}.renormalize=False (Mixtral renormalises the top-k weights)"),
        (moe.hierarchy != "flat", f"{f}.hierarchy={moe.hierarchy!r} (group-limited routing exists in transformers "
                                  "only with DeepSeek-V3's latent attention)"),
        (moe.num_shared_experts > 0, f"{f}.num_shared_experts={moe.num_shared_experts} (Qwen2-MoE gates its shared "
                                     "expert with a sigmoid; mmoe adds it ungated)"),
        (moe.capacity_factor > 0 or moe.eval_capacity_factor > 0,
         f"{f}.capacity_factor/eval_capacity_factor > 0 (dropped tokens; transformers MoE is dropless)"),
        (moe.aux_free_bias, f"{f}.aux_free_bias=True (a selection bias Mixtral has no place for)"),
        (moe.routed_scaling != 1.0, f"{f}.routed_scaling={moe.routed_scaling} (Mixtral has no routed scaling)"),
    ]
    return problems + [why for bad, why in checks if bad]


def _glm_first_dense(cfg: DecoderConfig) -> int | None:
    """first_k_dense_replace when the MoE layers are exactly the last ones, else None."""
    ids = cfg.moe_ffn_layer_ids()
    return ids[0] if ids and ids == list(range(ids[0], cfg.n_layers)) else None


def _glm_problems(cfg: DecoderConfig) -> list[str]:
    moe, f = cfg.ffn_moe, "model.arch.decoder.ffn_moe"
    problems = []
    if _glm_first_dense(cfg) is None:
        problems.append(f"model.arch.decoder.ffn_moe_layers={cfg.ffn_moe_layers!r} (Glm4-MoE's MoE layers are the "
                        "last ones after first_k_dense_replace dense layers, e.g. 'all' or 'last_N')")
    per_group = max(1, min(moe.num_experts // max(1, moe.num_groups), moe.top_k // max(1, moe.top_groups)))
    checks = [
        (moe.router != "token_choice", f"{f}.router={moe.router!r} (Glm4-MoE routes token-choice top-k)"),
        (moe.score_func != "sigmoid", f"{f}.score_func={moe.score_func!r} with shared experts or groups "
                                      "(Glm4-MoE / DeepSeek-V3 score with sigmoids)"),
        (moe.hierarchy == "two_level", f"{f}.hierarchy='two_level' (no transformers model has a group gate)"),
        (moe.hierarchy == "group_limited" and per_group != 2,
         f"{f}.top_k/top_groups={moe.top_k}/{moe.top_groups} (transformers scores a group by its top-2 experts; "
         "mmoe by its top top_k // top_groups)"),
        (moe.num_shared_experts < 1, f"{f}.num_shared_experts=0 with sigmoid routing (Glm4-MoE always has a "
                                     "shared expert)"),
        (moe.capacity_factor > 0 or moe.eval_capacity_factor > 0,
         f"{f}.capacity_factor/eval_capacity_factor > 0 (dropped tokens; transformers MoE is dropless)"),
    ]
    return problems + [why for bad, why in checks if bad]


def target_model(cfg: DecoderConfig) -> str:
    """model_type of the transformers format for `cfg` (llama, qwen2, mixtral, glm4_moe), or
    NotRepresentableError naming every field in the way."""
    problems = []
    if cfg.moa_layer_ids():
        problems.append(f"model.arch.decoder.attn_moe (MoA on layers {cfg.moa_layer_ids()}): transformers has no "
                        "mixture-of-attention-heads model")
    moe = cfg.ffn_moe is not None and bool(cfg.moe_ffn_layer_ids())
    target = "qwen2" if cfg.attn_bias else "llama"
    if moe:
        m = cfg.ffn_moe
        deepseek_like = m.score_func == "sigmoid" or m.num_shared_experts > 0 or m.hierarchy != "flat" \
            or m.aux_free_bias or m.routed_scaling != 1.0
        if deepseek_like:
            target = "glm4_moe"
            problems += _glm_problems(cfg)
        else:
            target = "mixtral"
            problems += _moe_problems(cfg)
            if cfg.attn_bias:
                problems.append("model.arch.decoder.attn_bias=True (Mixtral attention has no q/k/v bias)")
    if problems:
        raise NotRepresentableError("cannot export this decoder to a transformers model: " + "; ".join(problems))
    return target


def hf_config(cfg: DecoderConfig):
    """The transformers config equivalent to `cfg`, or NotRepresentableError naming every field in the way."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2Config

    target = target_model(cfg)
    moe = target in ("mixtral", "glm4_moe")
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        head_dim=cfg.head_dim or cfg.dim // cfg.n_heads,
    )
    if target == "glm4_moe":
        from transformers import Glm4MoeConfig

        m = cfg.ffn_moe
        grouped = m.hierarchy == "group_limited"
        common["rope_parameters"] = {**common["rope_parameters"], "partial_rotary_factor": 1.0}
        return Glm4MoeConfig(intermediate_size=cfg.hidden, moe_intermediate_size=m.expert_hidden or cfg.hidden,
                             n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k,
                             n_shared_experts=m.num_shared_experts, routed_scaling_factor=m.routed_scaling,
                             n_group=m.num_groups if grouped else 1, topk_group=m.top_groups if grouped else 1,
                             first_k_dense_replace=_glm_first_dense(cfg), norm_topk_prob=m.renormalize,
                             use_qk_norm=False, attention_bias=cfg.attn_bias, partial_rotary_factor=1.0, **common)
    if moe:
        return MixtralConfig(intermediate_size=cfg.ffn_moe.expert_hidden or cfg.hidden,
                             num_local_experts=cfg.ffn_moe.num_experts, num_experts_per_tok=cfg.ffn_moe.top_k,
                             router_jitter_noise=0.0, sliding_window=None, **common)
    if cfg.attn_bias:
        return Qwen2Config(intermediate_size=cfg.hidden, use_sliding_window=False, sliding_window=None, **common)
    return LlamaConfig(intermediate_size=cfg.hidden, attention_bias=False, mlp_bias=False, **common)


def hf_state_dict(decoder_state: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """mmoe decoder tensors (names without the `decoder.` prefix) -> transformers names and layouts."""
    glm = target_model(cfg) == "glm4_moe"
    out = {}
    for name, t in decoder_state.items():
        if name.endswith("router.expert_bias") and glm:
            out[f"model.{name.replace('mlp.router.expert_bias', 'mlp.gate.e_score_correction_bias')}"] = t
            continue
        if name.endswith(("router.expert_bias", "router.load_accum")) or ".router.noise" in name:
            continue  # selection bias of a format without one (refused if used) and training-only noise gates
        if name == "lm_head.weight":
            out[name] = t
            continue
        hf = f"model.{name}"
        if name.endswith("mlp.router.gate.weight"):
            hf = f"model.{name.replace('mlp.router.gate', 'mlp.gate')}"
        elif name.endswith("mlp.experts.w_in.weight"):  # (E, dim, 2I) [gate | up] -> (E, 2I, dim)
            hf, t = f"model.{name.replace('w_in.weight', 'gate_up_proj')}", t.transpose(1, 2)
        elif name.endswith("mlp.experts.w_out.weight"):  # (E, I, dim) -> (E, dim, I)
            hf, t = f"model.{name.replace('w_out.weight', 'down_proj')}", t.transpose(1, 2)
        elif ".mlp.shared." in name:
            hf = f"model.{name.replace('.mlp.shared.', '.mlp.shared_experts.')}"
        out[hf] = t.contiguous()
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def export_hf(export_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the decoder of an mmoe export (EXPORT_DIR) as a transformers directory; returns OUT_DIR."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mmoe.interop.export import TOKENIZER_FILES, read_export_config

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    arch = read_export_config(export_dir)
    cfg = arch.decoder
    config = hf_config(cfg)
    state = {k[len("decoder."):]: v for k, v in load_file(str(export_dir / "model.safetensors")).items()
             if k.startswith("decoder.")}
    tensors = hf_state_dict(state, cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    want = set(model.state_dict())
    if set(tensors) != want:
        raise NotRepresentableError(f"{export_dir}: tensors do not map onto {type(model).__name__}: missing "
                                    f"{sorted(want - set(tensors))[:6]}, extra {sorted(set(tensors) - want)[:6]}")
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        for name in TOKENIZER_FILES:
            if (export_dir / name).exists():
                shutil.copy(export_dir / name, tmp / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

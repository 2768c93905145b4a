"""Load Hugging Face causal-LM checkpoints (a local `save_pretrained` directory) into `Decoder`.

Supported: Llama, Mistral, Qwen2 (q/k/v biases) dense, loaded exactly by name; Mixtral, whose experts and
router go straight into `MoEFFN` (softmax top-k, renormalised, like `MixtralSparseMoeBlock`); Glm4-MoE
(GLM-4.5: sigmoid routing, flat or DeepSeek-V3 group-limited, shared experts, selection bias, routed scaling,
first layers dense; full rotary and no q/k norm only), what `python -m mmoe.export_hf` writes for such MoEs. `moe=` upcycles
the dense model: each dense MLP into a `MoEFFN` (every expert a copy) and each dense attention into
`MoAAttention` (heads split across experts), routers fresh.

Not modelled: Mistral/Qwen2 sliding-window attention. It only differs from full causal attention beyond
`sliding_window` tokens, so results are exact for shorter contexts; longer ones attend to the full prefix.
RoPE scaling variants (llama3, yarn, linear, dynamic) are rejected.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from mmoe.model.decoder import Decoder, DecoderConfig, upcycle_decoder
from mmoe.model.moe import MoEConfig

from .checkpoint import CheckpointError

SUPPORTED = ("llama", "mistral", "qwen2", "mixtral", "glm4_moe")


def _rope_theta(hf: dict, where: str) -> float:
    rp = hf.get("rope_parameters") or {}
    rs = hf.get("rope_scaling") or {}
    kind = rp.get("rope_type") or rs.get("rope_type") or rs.get("type") or "default"
    if kind != "default":
        raise CheckpointError(f"{where}: rope_type={kind!r} (RoPE scaling) is not supported; only 'default'")
    return float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))


def decoder_config_from_hf(hf: dict, where: str = "config.json") -> DecoderConfig:
    """DecoderConfig equivalent to a transformers config dict (Llama / Mistral / Qwen2 / Mixtral)."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise CheckpointError(f"{where}: model_type={mt!r} (architectures={hf.get('architectures')}) is not "
                              f"supported; supported: {', '.join(SUPPORTED)}")

    def need(key: str):
        if key not in hf:
            raise CheckpointError(f"{where}: missing field {key!r} for model_type={mt!r}")
        return hf[key]

    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if mt == "glm4_moe":
        rotary = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        if float(rotary) != 1.0 or hf.get("use_qk_norm"):
            raise CheckpointError(f"{where}: glm4_moe with partial_rotary_factor={rotary} / use_qk_norm="
                                  f"{hf.get('use_qk_norm')} is not supported (only full rotary, no q/k norm)")
    if mt == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise CheckpointError(f"{where}: attention_bias/mlp_bias=True Llama variants are not supported")
    n_heads = need("num_attention_heads")
    dim = need("hidden_size")
    cfg = DecoderConfig(
        vocab_size=need("vocab_size"), dim=dim, n_layers=need("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, hidden=need("intermediate_size"),
        max_seq_len=hf.get("max_position_embeddings", 4096), rope_theta=_rope_theta(hf, where),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attn_bias=(mt == "qwen2") or (mt == "glm4_moe" and bool(hf.get("attention_bias"))), ffn_moe=None, attn_moe=None, attn_moe_layers="none",
        head_dim=(hf.get("head_dim") or 0) if (hf.get("head_dim") or 0) != dim // n_heads else 0,
    )
    if mt == "mixtral":
        cfg.ffn_moe = MoEConfig(num_experts=need("num_local_experts"), top_k=need("num_experts_per_tok"),
                                router="token_choice", score_func="softmax", renormalize=True)
        cfg.ffn_moe_layers = "all"
    if mt == "glm4_moe":
        groups = int(hf.get("n_group") or 1)
        cfg.ffn_moe = MoEConfig(num_experts=need("n_routed_experts"), top_k=need("num_experts_per_tok"),
                                router="token_choice", score_func="sigmoid",
                                renormalize=bool(hf.get("norm_topk_prob", True)),
                                hierarchy="group_limited" if groups > 1 else "flat", num_groups=groups,
                                top_groups=int(hf.get("topk_group") or 1) if groups > 1 else 1,
                                num_shared_experts=int(hf.get("n_shared_experts") or 0),
                                expert_hidden=need("moe_intermediate_size"),
                                routed_scaling=float(hf.get("routed_scaling_factor", 1.0)))
        cfg.ffn_moe_layers = f"last_{cfg.n_layers - int(hf.get('first_k_dense_replace', 0))}"
    return cfg


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index}: shard files {missing} listed in weight_map are missing")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (only safetensors checkpoints are supported)")
    return files


class _Tensors:
    """Lazy name -> tensor access over safetensors shards, remembering which file holds each name."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self.handles = {f: safe_open(str(f), framework="pt") for f in files}
        for f, h in self.handles.items():
            for k in h.keys():
                self.where[k] = f
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple | None = None) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"missing tensor {name!r} in {sorted({str(f) for f in self.handles})}")
        t = self.handles[self.where[name]].get_tensor(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} in {self.where[name]} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(shape)}")
        self.used.add(name)
        return t


def _prefix(t: _Tensors) -> str:
    return "model." if any(k.startswith("model.") for k in t.where) else ""


def _glm_name(name: str) -> str | None:
    """Glm4-MoE checkpoint name (without the model. prefix) of an mmoe MoE-FFN tensor, else None."""
    m = re.fullmatch(r"layers\.(\d+)\.mlp\.(router\.gate\.weight|router\.expert_bias|shared\.(.+))", name)
    if not m:
        return None
    base = f"layers.{m.group(1)}.mlp"
    if m.group(2) == "router.gate.weight":
        return f"{base}.gate.weight"
    if m.group(2) == "router.expert_bias":
        return f"{base}.gate.e_score_correction_bias"
    return f"{base}.shared_experts.{m.group(3)}"


def dense_source_name(name: str, prefix: str) -> str:
    """Checkpoint name of a dense decoder tensor (our names are the HF ones, under the checkpoint's prefix)."""
    return name if name == "lm_head.weight" else prefix + name


def check_leftovers(t: _Tensors, tied: bool, kind: str) -> None:
    """Every checkpoint tensor must have been used (rotary caches and a tied head excepted)."""
    leftovers = [k for k in t.where if k not in t.used and not k.endswith("rotary_emb.inv_freq")
                 and not (k == "lm_head.weight" and tied)]
    if leftovers:
        raise CheckpointError(f"unexpected tensors not used by the {kind} mapping: {leftovers[:8]}"
                              f"{' ...' if len(leftovers) > 8 else ''} (in {t.where[leftovers[0]]})")


def open_checkpoint(path: str | Path) -> tuple[dict, DecoderConfig, _Tensors]:
    """(HF config.json, its DecoderConfig, lazy tensor access) of a transformers save_pretrained directory."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json (expected a transformers save_pretrained directory)")
    hf = json.loads(cfg_file.read_text())
    return hf, decoder_config_from_hf(hf, str(cfg_file)), _Tensors(_checkpoint_files(path))


def _load_into(model: Decoder, t: _Tensors, mixtral: bool, glm: bool = False) -> None:
    """Fill every tensor of `model` from the checkpoint (names, shapes and leftovers checked)."""
    p = _prefix(t)
    state = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    for name, ref in state.items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # tied to embed_tokens
        if glm and _glm_name(name) is not None:
            new[name] = t.get(p + _glm_name(name), tuple(ref.shape))
            continue
        if name.endswith("router.expert_bias"):
            new[name] = ref  # aux-loss-free bias: not part of HF checkpoints
            continue
        m = re.fullmatch(r"layers\.(\d+)\.mlp\.(router\.gate|experts\.w_in|experts\.w_out)\.weight", name)
        if (mixtral or glm) and m:
            new[name] = _mixtral_tensor(t, p, int(m.group(1)), m.group(2) + ".weight", tuple(ref.shape))
            continue
        new[name] = t.get(dense_source_name(name, p), tuple(ref.shape))
    check_leftovers(t, model.cfg.tie_embeddings, "mixtral" if mixtral else "dense")
    dtype = model.embed_tokens.weight.dtype
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in new.items()},
                          strict=False)


def _mixtral_tensor(t: _Tensors, p: str, i: int, what: str, shape: tuple) -> torch.Tensor:
    """Mixtral MoE tensors in MoEFFN layout (legacy per-expert w1/w2/w3 or fused gate_up_proj/down_proj)."""
    E = shape[0]  # (E, ...) for expert tensors; the gate is (E, dim) too
    base = f"{p}layers.{i}"
    blk = f"{base}.block_sparse_moe" if f"{base}.block_sparse_moe.gate.weight" in t else f"{base}.mlp"
    if what == "router.gate.weight":
        return t.get(f"{blk}.gate.weight", shape)
    _, a, b = shape  # w_in: (E, dim, 2*hidden); w_out: (E, hidden, dim)
    if f"{blk}.experts.gate_up_proj" in t:  # transformers v5 fused layout: (E, 2I, H) and (E, H, I)
        if what == "experts.w_in.weight":
            return t.get(f"{blk}.experts.gate_up_proj", (E, b, a)).transpose(1, 2)
        return t.get(f"{blk}.experts.down_proj", (E, b, a)).transpose(1, 2)
    # one tensor per expert: gate/up/down_proj (DeepSeek, GLM-4.5 checkpoints) or Mixtral's legacy w1/w3/w2
    per_expert = ("gate_proj", "up_proj", "down_proj") if f"{blk}.experts.0.gate_proj.weight" in t \
        else ("w1", "w3", "w2")
    gate, up, down = (f"{blk}.experts.{{}}.{proj}.weight" for proj in per_expert)
    if what == "experts.w_in.weight":  # [gate | up] per expert: 2 x (hid, dim) -> (dim, 2 * hid)
        hid = b // 2
        return torch.stack([torch.cat([t.get(gate.format(e), (hid, a)).t(), t.get(up.format(e), (hid, a)).t()],
                                      dim=1) for e in range(E)])
    return torch.stack([t.get(down.format(e), (b, a)).t() for e in range(E)])


def load_decoder(path: str | Path, moe: dict | None = None,
                 dtype: torch.dtype | None = None) -> tuple[Decoder, DecoderConfig]:
    """Decoder from a transformers `save_pretrained` directory (config.json + safetensors, sharded or not).

    `moe` overrides DecoderConfig fields (ffn_moe, ffn_moe_layers, attn_moe, attn_moe_layers) and upcycles
    the dense layers it selects. `dtype` defaults to float32. Returns the model in eval mode and its config.
    """
    hf, cfg, tensors = open_checkpoint(path)
    mixtral = hf["model_type"] == "mixtral"
    glm = hf["model_type"] == "glm4_moe"
    moe = dict(moe or {})
    allowed = {"ffn_moe", "ffn_moe_layers", "attn_moe", "attn_moe_layers"}
    if set(moe) - allowed:
        raise CheckpointError(f"moe: unknown keys {sorted(set(moe) - allowed)}; allowed: {sorted(allowed)}")
    if mixtral and ({"ffn_moe", "ffn_moe_layers"} & set(moe)):
        raise CheckpointError("moe: a Mixtral checkpoint already has MoE FFNs; only attn_moe/attn_moe_layers "
                              "apply")
    dtype = dtype or torch.float32
    if glm:  # a nonzero selection bias is DeepSeek-V3's aux-loss-free balancing: keep it on
        biases = [k for k in tensors.where if k.endswith("e_score_correction_bias")]
        cfg.ffn_moe.aux_free_bias = any(bool(tensors.handles[tensors.where[k]].get_tensor(k).any()) for k in biases)
    with torch.device("cpu"):
        model = Decoder(cfg).to(dtype)
    _load_into(model, tensors, mixtral, glm)
    if moe:
        target = replace(cfg, **moe)
        if target.ffn_moe is not None and not target.moe_ffn_layer_ids() and not mixtral:
            target.ffn_moe = None
        model, cfg = upcycle_decoder(model, target), target
    return model.eval(), cfg


__all__ = ["load_decoder", "decoder_config_from_hf", "CheckpointError"]

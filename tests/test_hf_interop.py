"""Loading tiny transformers checkpoints written by the test itself (no downloads): exact logits, upcycling, errors."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from mmoe.interop.hf import CheckpointError, load_decoder  # noqa: E402
from mmoe.model.moe import MoEConfig  # noqa: E402
from mmoe.model.moe.attention import MoAAttention  # noqa: E402
from mmoe.model.moe.ffn import MoEFFN  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def save_tiny(arch: str, path, **kw):
    cfg_cls, model_cls, extra = ARCHS[arch]
    shard = kw.pop("shard", "2GB")
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**TINY, **extra, **kw})
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # larger-than-default weights (and biases) so the comparison is not trivially small
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(path, max_shard_size=shard)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dense_and_mixtral_load_exactly(arch, tmp_path):
    hf = save_tiny(arch, tmp_path)
    dec, cfg = load_decoder(tmp_path)
    ids = torch.randint(0, 128, (2, 12))
    ref = logits(hf, ids)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(logits(dec, ids), ref, atol=1e-4, rtol=0)
    assert cfg.attn_bias == (arch == "qwen2") and cfg.tie_embeddings == (arch == "qwen2")
    if arch == "mixtral":
        assert all(isinstance(lyr.mlp, MoEFFN) for lyr in dec.layers)


def test_sharded_checkpoint(tmp_path):
    hf = save_tiny("llama", tmp_path, shard="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    dec, _ = load_decoder(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 9))
    torch.testing.assert_close(logits(dec, ids), logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_upcycled_load_equals_dense(arch, tmp_path):
    hf = save_tiny(arch, tmp_path)
    moe = {"ffn_moe": MoEConfig(num_experts=4, top_k=2), "ffn_moe_layers": "all",
           "attn_moe": MoEConfig(num_experts=2, top_k=2, renormalize=False), "attn_moe_layers": "all"}
    dec, cfg = load_decoder(tmp_path, moe=moe)
    assert cfg.attn_moe.num_experts == 2 and cfg.ffn_moe_layers == "all"
    for lyr in dec.layers:
        assert isinstance(lyr.self_attn, MoAAttention) and isinstance(lyr.mlp, MoEFFN)
        lyr.self_attn.force_unit_weights = True
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(logits(dec, ids), logits(hf, ids), atol=1e-4, rtol=0)


def test_mixtral_with_upcycled_moa(tmp_path):
    hf = save_tiny("mixtral", tmp_path)
    dec, _ = load_decoder(tmp_path, moe={"attn_moe": MoEConfig(num_experts=4, top_k=4, renormalize=False),
                                         "attn_moe_layers": "1"})
    assert isinstance(dec.layers[1].self_attn, MoAAttention)
    dec.layers[1].self_attn.force_unit_weights = True
    ids = torch.randint(0, 128, (2, 8))
    torch.testing.assert_close(logits(dec, ids), logits(hf, ids), atol=1e-4, rtol=0)
    with pytest.raises(CheckpointError, match="Mixtral checkpoint already has MoE"):
        load_decoder(tmp_path, moe={"ffn_moe": MoEConfig()})


def test_unsupported_architecture(tmp_path):
    save_tiny("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type='gpt2'.*not supported"):
        load_decoder(tmp_path)


def test_missing_tensor_and_shape_mismatch(tmp_path):
    save_tiny("llama", tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate_proj.weight.*shape \(96, 64\).*\(80, 64\)"):
        load_decoder(tmp_path)
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    del sd["model.layers.1.self_attn.v_proj.weight"]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.self_attn.v_proj.weight'"):
        load_decoder(tmp_path)


def test_rope_scaling_rejected(tmp_path):
    save_tiny("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope_type='llama3'"):
        load_decoder(tmp_path)


def test_explicit_head_dim_loads_exactly(tmp_path):
    """head_dim != hidden_size / num_attention_heads (Qwen3- / Gemma-style): q/k/v widths follow head_dim."""
    hf = save_tiny("llama", tmp_path, head_dim=16)  # 8 heads x 16 = 128 != hidden 64
    assert hf.model.layers[0].self_attn.q_proj.weight.shape == (128, 64)
    dec, cfg = load_decoder(tmp_path)
    assert cfg.head_dim == 16
    ids = torch.randint(0, 128, (2, 11))
    torch.testing.assert_close(logits(dec, ids), logits(hf, ids), atol=1e-4, rtol=0)


def test_mixtral_fused_expert_layout_loads_exactly(tmp_path):
    """transformers 5 keeps Mixtral experts fused in memory (experts.gate_up_proj (E, 2I, H), experts.down_proj
    (E, H, I)) while save_pretrained writes the legacy per-expert w1/w2/w3: a checkpoint saved from the
    in-memory state dict has the fused names, and must give the same logits."""
    from safetensors.torch import save_file as save_st

    hf = save_tiny("mixtral", tmp_path / "legacy")
    sd = hf.state_dict()
    if "model.layers.0.mlp.experts.gate_up_proj" not in sd:
        pytest.skip("this transformers version keeps Mixtral experts per expert in memory")
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "legacy" / "config.json").read_text())
    save_st({k: v.contiguous() for k, v in sd.items()}, str(fused / "model.safetensors"), metadata={"format": "pt"})
    dec, _ = load_decoder(fused)
    ids = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(logits(dec, ids), logits(hf, ids), atol=1e-4, rtol=0)
    legacy, _ = load_decoder(tmp_path / "legacy")
    for (k, a), (_, b) in zip(sorted(dec.state_dict().items()), sorted(legacy.state_dict().items())):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)


def test_stage_hf_decoder_initialises_the_vlm_decoder(tmp_path):
    """model.stage.hf_decoder (loaded non-strictly, dense MLPs upcycled into the VLM's MoE FFNs): every decoder
    tensor the HF model has is copied, and the VLM's decoder with unit-weight experts gives the HF logits."""
    from mmoe.config_io import from_dict
    from mmoe.model.vlm import VLMConfig
    from mmoe.training.config import StageConfig
    from mmoe.training.module import MMoEModule
    from conftest import TINY_OVERRIDES

    hf = save_tiny("llama", tmp_path / "hf")
    arch = json.loads(json.dumps(TINY_OVERRIDES["model"]["arch"]))
    arch["decoder"] = {"vocab_size": 128, "dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "hidden": 96,
                       "max_seq_len": 256, "rope_theta": hf.config.rope_parameters["rope_theta"]
                       if getattr(hf.config, "rope_parameters", None) else hf.config.rope_theta,
                       "norm_eps": hf.config.rms_norm_eps, "tie_embeddings": False,
                       "ffn_moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 0}, "ffn_moe_layers": "every_2",
                       "attn_moe": None, "attn_moe_layers": "none"}
    cfg = from_dict(VLMConfig, arch, "arch")
    torch.manual_seed(1)
    module = MMoEModule(arch=cfg, stage=StageConfig(hf_decoder=str(tmp_path / "hf")))
    dec = module.model.decoder
    hsd = hf.state_dict()
    torch.testing.assert_close(dec.embed_tokens.weight, hsd["model.embed_tokens.weight"], atol=0, rtol=0)
    torch.testing.assert_close(dec.layers[0].self_attn.q_proj.weight,
                               hsd["model.layers.0.self_attn.q_proj.weight"], atol=0, rtol=0)
    moe_layers = [lyr for lyr in dec.layers if isinstance(lyr.mlp, MoEFFN)]
    assert moe_layers, "the test config must upcycle at least one FFN"
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ours = dec(ids).logits
    torch.testing.assert_close(ours, logits(hf, ids), atol=1e-4, rtol=0)

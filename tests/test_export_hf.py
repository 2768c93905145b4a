"""`python -m mmoe.export_hf`: the decoder as a transformers directory (Llama, Qwen2, Mixtral) whose logits equal
mmoe's and which mmoe's importer loads back exactly; what transformers cannot represent is refused by field."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_lora import tiny_arch

from mmoe.model.vlm import MMoEVLM
from mmoe.interop.export import export_model

FLAT_MOE = {"num_experts": 4, "top_k": 2, "hierarchy": "flat", "num_groups": 1, "top_groups": 1,
            "num_shared_experts": 0, "expert_hidden": 24}
VARIANTS = {
    "llama": {"ffn_moe": None, "attn_moe": None, "attn_moe_layers": "none"},
    "qwen2": {"ffn_moe": None, "attn_moe": None, "attn_moe_layers": "none", "attn_bias": True},
    "mixtral": {"ffn_moe": FLAT_MOE, "ffn_moe_layers": "all", "attn_moe": None, "attn_moe_layers": "none",
                "tie_embeddings": False},
    # DeepSeek-V3 routing (sigmoid, group-limited, selection bias, routed scaling) + a shared expert, the first
    # layer dense: GLM-4.5's format
    "glm4_moe": {"ffn_moe": {**FLAT_MOE, "num_experts": 8, "top_k": 4, "score_func": "sigmoid",
                             "hierarchy": "group_limited", "num_groups": 4, "top_groups": 2, "num_shared_experts": 1,
                             "routed_scaling": 2.5, "aux_free_bias": True},
                 "ffn_moe_layers": "last_1", "attn_moe": None, "attn_moe_layers": "none", "attn_bias": True},
}


def _export(tmp_path, tiny_data, **decoder):
    from mmoe.config_io import from_dict  # noqa: F401  (tiny_arch composes the config the CLI would)

    torch.manual_seed(0)
    model = MMoEVLM(tiny_arch(**decoder)).eval()
    with torch.no_grad():  # norms and biases away from their init so a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("router.expert_bias"):  # a trained aux-loss-free selection bias
                b.uniform_(-0.05, 0.05)
    return model, export_model(model, tmp_path / "mmoe_export", tokenizer=tiny_data)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "mmoe.export_hf", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_hf_logits_match_and_mmoe_loads_it_back(variant, tmp_path, tiny_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmoe.interop.hf import load_decoder

    model, export = _export(tmp_path, tiny_data, **VARIANTS[variant])
    out = tmp_path / "hf"
    proc = _run(export, out)
    assert proc.returncode == 0, proc.stderr
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf.config.model_type == variant
    ids = torch.randint(5, model.cfg.decoder.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.decoder(input_ids=ids).logits
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids("<image>") == model.cfg.image_token_id
    back, cfg = load_decoder(out)
    own = model.decoder.state_dict()
    assert set(back.state_dict()) == set(own)
    for name, t in back.state_dict().items():
        if name.endswith("router.expert_bias") and variant != "glm4_moe":
            continue  # formats without a selection bias (mmoe's stays zero there)
        assert torch.equal(t, own[name]), name
    assert cfg.ffn_moe == model.cfg.decoder.ffn_moe or variant in ("mixtral",)


def test_export_hf_refuses_what_transformers_cannot_represent(tmp_path, tiny_data):
    _, export = _export(tmp_path, tiny_data)  # the default: MoA, group-limited routing, a shared expert
    out = tmp_path / "hf"
    proc = _run(export, out)
    assert proc.returncode == 2
    for field in ("model.arch.decoder.attn_moe", "ffn_moe.score_func='softmax'",
                  "ffn_moe.top_k/top_groups=2/2"):
        assert field in proc.stderr, (field, proc.stderr)
    assert not out.exists() and "Traceback" not in proc.stderr

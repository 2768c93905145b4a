"""Shared fixtures: a tiny synthetic dataset (generated once per session) and a tiny model config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# A small but complete MoE VLM: MoE ViT block, MoE connector, MoA and hierarchical MoE FFN.
TINY_OVERRIDES = {
    "trainer": {"max_steps": 2, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1,
                "enable_progress_bar": False, "enable_model_summary": False},
    "model": {
        "arch": {
            "vision": {"patch_size": 16, "dim": 32, "depth": 2, "n_heads": 2, "mlp_ratio": 2.0,
                       "moe": {"num_experts": 4, "top_k": 2, "capacity_factor": 1.5}, "moe_layers": "every_2"},
            "connector": {"kind": "moe_mlp", "pool": 2, "moe": {"num_experts": 4, "top_k": 2}},
            "decoder": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 1, "hidden": 64, "max_seq_len": 160,
                        "ffn_moe": {"num_experts": 8, "top_k": 2, "expert_hidden": 32, "hierarchy": "group_limited",
                                    "num_groups": 4, "top_groups": 2, "num_shared_experts": 1},
                        "ffn_moe_layers": "every_2",
                        "attn_moe": {"num_experts": 4, "top_k": 2}, "attn_moe_layers": "every_2"},
        },
        "log_routing_every": 1,
    },
    "data": {"batch_size": 4, "val_max_questions": 4, "max_len": 128},
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A few dozen synthetic images with questions, captions and the tokenizer."""
    from mmoe.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(out, seed=0, n_train=24, n_val=8, n_test=8, n_heldout=8, log=lambda *a, **k: None)
    return out


@pytest.fixture()
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_OVERRIDES))
    return path


@pytest.fixture(autouse=True)
def _restore_torch_defaults():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)

"""Shared fixtures: a tiny synthetic dataset (generated once per session) and a tiny model config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# The "tiny" model preset (configs/model/tiny.yaml): MoE ViT block, MoE connector, MoA and hierarchical MoE FFN.
TINY_ARCH = yaml.safe_load((REPO / "configs/model/tiny.yaml").read_text())["model"]["arch"]
TINY_OVERRIDES = {
    "trainer": {"max_steps": 2, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1,
                "enable_progress_bar": False, "enable_model_summary": False},
    "model": {"arch": TINY_ARCH, "log_routing_every": 1},
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

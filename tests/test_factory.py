"""mmoe.interop.factory: constructors read no files; the factory loads the weights a config names."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mmoe.config_io import from_dict
from mmoe.interop.checkpoint import CheckpointError
from mmoe.interop.factory import build_model
from mmoe.model.vlm import MMoEVLM, VLMConfig

ARCH = {"vision": {"image_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "n_heads": 2, "mlp_ratio": 2.0,
                   "feature_layer": -1, "moe": {"num_experts": 2, "top_k": 2}, "moe_layers": "all"},
        "connector": {"kind": "moe_mlp", "moe": {"num_experts": 2, "top_k": 2}},
        "decoder": {"vocab_size": 32, "dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 1, "hidden": 64}}


def _arch(**named) -> VLMConfig:
    cfg = from_dict(VLMConfig, ARCH, "arch")
    cfg.vision.checkpoint = named.get("vision")
    cfg.connector.checkpoint = named.get("connector")
    return cfg


def _dense_files(tmp_path):
    """A dense vision tower and a dense connector saved as plain state dicts, with their modules."""
    torch.manual_seed(0)
    dense = MMoEVLM(from_dict(VLMConfig, {**ARCH, "vision": {**ARCH["vision"], "moe": None},
                                          "connector": {"kind": "mlp"}}, "arch")).eval()
    vit, con = tmp_path / "vit.safetensors", tmp_path / "connector.pt"
    save_file({k: v.contiguous() for k, v in dense.vision.vit.state_dict().items()}, str(vit))
    torch.save(dense.connector.state_dict(), con)
    return dense, vit, con


def test_constructor_reads_no_file_the_factory_loads_and_upcycles(tmp_path):
    dense, vit, con = _dense_files(tmp_path)
    missing = tmp_path / "gone.safetensors"
    MMoEVLM(_arch(vision=str(missing), connector=str(missing)))  # a file it never opens

    model = build_model(_arch(vision=str(vit), connector=str(con))).eval()
    # every expert a copy of the dense MLP, renormalised top-k weights summing to 1: the dense features
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, _ = dense.encode_images(x)
        got, routing = model.encode_images(x)
    assert len(routing) == 3  # two MoE ViT blocks and the MoE connector ran
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    with pytest.raises(CheckpointError, match="gone.safetensors"):
        build_model(_arch(vision=str(missing)))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        build_model(_arch(connector=str(missing)))


def test_an_export_whose_config_names_a_deleted_checkpoint_still_loads(tmp_path):
    from mmoe.inference.pipeline import load_model
    from mmoe.interop.export import export_model

    _, vit, _ = _dense_files(tmp_path)
    model = build_model(_arch(vision=str(vit))).eval()
    export_model(model, tmp_path / "export")
    vit.unlink()  # the training machine's file is not where inference runs
    loaded = load_model(tmp_path / "export", "cpu")
    assert loaded.cfg.vision.checkpoint == str(vit)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

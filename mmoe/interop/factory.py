"""Build a model from its config and load the weights the config names.

Model constructors never touch files (so they run on the meta device, in tests without fixtures, and in
inference where an export's config may name checkpoints that exist only on the training machine). The weights a
config points at (`vision.checkpoint`, `connector.checkpoint`) are loaded here, after construction, and dense
weights are upcycled into MoE layers (CuMo co-upcycling).
"""

from __future__ import annotations

from pathlib import Path

from mmoe.config_io import from_dict
from mmoe.model.connector import Connector, ConnectorConfig
from mmoe.model.vision import VisionConfig, VisionEncoder
from mmoe.model.vlm import MMoEVLM, VLMConfig

from .connector_ckpt import load_connector_checkpoint
from .vision_ckpt import load_vision_checkpoint


def build_vision_encoder(cfg: VisionConfig) -> VisionEncoder:
    """VisionEncoder(cfg), then `cfg.checkpoint` loaded (dense MLPs upcycled into the MoE blocks)."""
    encoder = VisionEncoder(cfg)
    if cfg.checkpoint:
        load_vision_checkpoint(encoder, cfg.checkpoint)
    return encoder


def build_connector(cfg: ConnectorConfig, in_dim: int, out_dim: int, grid: int | None) -> Connector:
    """Connector(...), then `cfg.checkpoint` loaded (a dense connector upcycled for kind 'moe_mlp')."""
    connector = Connector(cfg, in_dim, out_dim, grid)
    if cfg.checkpoint:
        load_connector_checkpoint(connector, cfg.checkpoint)
    return connector


def load_config_weights(model: MMoEVLM) -> MMoEVLM:
    """Load every checkpoint `model.cfg` names into the built model; returns the model."""
    if model.cfg.vision.checkpoint:
        load_vision_checkpoint(model.vision, model.cfg.vision.checkpoint)
    if model.cfg.connector.checkpoint:
        load_connector_checkpoint(model.connector, model.cfg.connector.checkpoint)
    return model


def build_model(cfg: VLMConfig) -> MMoEVLM:
    """MMoEVLM(cfg) with the vision / connector checkpoints the config names loaded."""
    return load_config_weights(MMoEVLM(cfg))


CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODEL_PRESETS = {
    "tiny": "model/tiny.yaml",  # every MoE site, trains in seconds on a CPU: tests and CI
    "default": "default.yaml",  # the `make train` model
    "mid": "model/mid.yaml",  # GPU benchmarks
    "cumo_large": "cumo_large.yaml",  # CLIP ViT-L/14-336 + 7B Mistral-family decoder (CuMo)
}
"""Named model presets: YAML files (relative to configs/) whose `model.arch` is a VLMConfig."""


def model_preset(name: str | Path) -> VLMConfig:
    """The VLMConfig of a named preset (MODEL_PRESETS) or of any recipe YAML with a `model.arch` section."""
    import yaml

    if str(name) in MODEL_PRESETS:
        path = CONFIGS / MODEL_PRESETS[str(name)]
    elif str(name).endswith((".yaml", ".yml")):
        path = Path(name)
    else:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)} or a YAML path")
    if not path.is_file():
        raise FileNotFoundError(f"model preset {name!r}: {path} not found (presets live in the repository's configs/)")
    arch = (yaml.safe_load(path.read_text()) or {}).get("model", {}).get("arch")
    if not isinstance(arch, dict):
        raise ValueError(f"{path}: no model.arch section")
    return from_dict(VLMConfig, arch, "model.arch")


__all__ = ["build_model", "build_vision_encoder", "build_connector", "load_config_weights", "model_preset",
           "MODEL_PRESETS"]

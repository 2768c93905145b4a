"""Build a model from its config and load the weights the config names.

Model constructors never touch files (so they run on the meta device, in tests without fixtures, and in
inference where an export's config may name checkpoints that exist only on the training machine). The weights a
config points at (`vision.checkpoint`, `connector.checkpoint`) are loaded here, after construction, and dense
weights are upcycled into MoE layers (CuMo co-upcycling).
"""

from __future__ import annotations

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


__all__ = ["build_model", "build_vision_encoder", "build_connector", "load_config_weights"]

"""Model code: plain nn.Modules that take typed configs and know nothing of training or distribution."""

from .connector import Connector, ConnectorConfig
from .decoder import Decoder, DecoderConfig, DecoderOutput, KVCache
from .generation import generate
from .vision import VisionConfig, VisionEncoder
from .vlm import MMoEVLM, VLMConfig, VLMOutput

__all__ = ["Connector", "ConnectorConfig", "Decoder", "DecoderConfig", "DecoderOutput", "KVCache", "generate",
           "VisionConfig", "VisionEncoder", "MMoEVLM", "VLMConfig", "VLMOutput"]

"""Optional int8 weight-only quantisation for inference, through torchao.

Every ``nn.Linear`` except the routers gets int8 weights with one scale per output channel; activations stay in
the model's dtype. Routers stay in full precision because a small error in a gate logit can flip which expert a
token goes to. The packed expert weights (``GroupedLinear``, 3-D parameters) are not ``nn.Linear`` and stay as
they are.
"""

from __future__ import annotations

from torch import nn

QUANTIZE_MODES = ("int8",)


def _linear_outside_routers(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and ".router." not in f".{fqn}."


def quantize_for_inference(model: nn.Module, mode: str = "int8") -> dict[str, int]:
    """Quantise `model` in place; returns how many linears and weight elements were quantised."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize: {mode!r} is not supported; choose one of {list(QUANTIZE_MODES)}")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ImportError(f"quantize={mode!r} needs torchao: pip install torchao ({e})") from None
    targets = [(n, m) for n, m in model.named_modules() if _linear_outside_routers(m, n)]
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=_linear_outside_routers)
    return {"linears": len(targets), "weights": sum(m.weight.numel() for _, m in targets)}


__all__ = ["QUANTIZE_MODES", "quantize_for_inference"]

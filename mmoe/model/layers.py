"""Dense building blocks shared by the vision encoder, connector and decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def activation_fn(name: str):
    """Activation by name, so configs stay plain strings."""
    table = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "quick_gelu": quick_gelu,
        "relu": F.relu,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (Llama)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x)); names match Hugging Face checkpoints."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """Two-layer MLP (ViT, LLaVA projector); names match timm's Mlp (fc1, fc2)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, activation: str = "gelu",
                 bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)
        self.activation = activation
        self.act = activation_fn(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, hd); cos/sin: (B, T, hd) gathered at each token's position."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def init_linear_(module: nn.Module, std: float = 0.02) -> None:
    """GPT-style init for from-scratch models (upcycled weights overwrite it)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)


__all__ = ["RMSNorm", "SwiGLU", "GeluMLP", "apply_rope", "activation_fn", "quick_gelu", "init_linear_"]

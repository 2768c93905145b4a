"""Reading weights from disk: the one place that opens checkpoint files, and the error every loader raises.

Accepted: a ``.safetensors`` file; a torch-saved state dict or Lightning ``.ckpt`` (weights-only unpickling;
wrappers ``state_dict`` / ``model`` / ``module`` unwrapped, Lightning's ``model.`` and DDP's ``module.``
prefixes stripped); an exported mmoe directory (its ``model.safetensors``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and tensors."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file or exported directory (see the module docstring), on the CPU."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if path.is_dir():
        path = path / "model.safetensors"
        if not path.exists():
            raise CheckpointError(f"{path.parent}: not an exported mmoe model (no model.safetensors)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, truncation, non-weights-only content
            raise CheckpointError(f"{path}: cannot load as a weights-only checkpoint ({type(e).__name__}: {e}). "
                                  "Pickled checkpoints with arbitrary objects are refused.") from None
        for key in ("state_dict", "model", "module"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: no state_dict inside (got {type(sd).__name__})")
    sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: the state dict holds no tensors")
    if all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("model.") for k in sd):  # a Lightning checkpoint: the LightningModule's `self.model`
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return sd


__all__ = ["CheckpointError", "read_state_dict"]

"""Dense ViT checkpoints (timm or open_clip) -> MoE VisionEncoder, with co-upcycling (CuMo).

open_clip / OpenAI-CLIP state dicts are mapped into timm's ViT layout with timm's own converter
(``_convert_openai_clip``: conv1 -> patch_embed.proj, in_proj -> qkv, ln_1 -> norm1, c_fc -> fc1, ...).
Each dense MLP ``blocks.{i}.mlp.fc1/fc2`` then fills every expert of MoE layer i; routers keep their
fresh initialisation. Anything missing or of the wrong shape raises :class:`CheckpointError`
naming the tensors and the file. Keys of blocks that are not built (after ``feature_layer``), the final
norm and heads are ignored; any other unknown key is an error (it means a different architecture).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, read_state_dict

if TYPE_CHECKING:  # pragma: no cover
    from mmoe.model.vision import VisionEncoder


def timm_layout_of(keys, path="<state dict>") -> tuple[str, str]:
    """(format 'open_clip' | 'timm', key prefix) of a ViT checkpoint, from its tensor names alone."""
    keys = list(keys)
    for prefix in ("visual.", ""):
        if f"{prefix}class_embedding" in keys and f"{prefix}conv1.weight" in keys:
            return "open_clip", prefix
    for stem_key in STEM_KEYS.values():
        found = [k for k in keys if k.endswith(stem_key)]
        if len(found) == 1:
            return "timm", found[0][: -len(stem_key)]
    raise CheckpointError(
        f"{path}: not a timm ViT (no unique '*patch_embed.proj.weight', or '*patch_embed.inner.proj.0.weight' "
        f"for a conv stem) nor an open_clip ViT ('visual.class_embedding' + 'visual.conv1.weight'); "
        f"first keys: {sorted(keys)[:8]}")


def to_timm_layout_one(name: str, t: Tensor, fmt: str, prefix: str) -> dict[str, Tensor]:
    """One checkpoint tensor in timm ViT naming ({} when it is outside the tower); see `to_timm_layout`."""
    if fmt == "open_clip":
        from timm.models.vision_transformer import _convert_openai_clip

        return _convert_openai_clip({name: t}, None, prefix=prefix)
    return {name[len(prefix):]: t} if name.startswith(prefix) else {}


def to_timm_layout(sd: dict[str, Tensor], path="<state dict>") -> tuple[dict[str, Tensor], str]:
    """(state dict in timm ViT naming, detected format 'open_clip' | 'timm')."""
    fmt, prefix = timm_layout_of(sd, path)
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        out.update(to_timm_layout_one(k, v, fmt, prefix))
    return out, fmt


STEM_KEYS = {"patch": "patch_embed.proj.weight", "conv": "patch_embed.inner.proj.0.weight"}


def checkpoint_stem(sd: dict[str, Tensor]) -> str:
    """'conv' for our convolutional stem (stage-0 pretraining), else 'patch' (every pretrained ViT)."""
    return "conv" if STEM_KEYS["conv"] in sd else "patch"


_IGNORABLE = re.compile(r"^(head|norm|fc_norm|attn_pool|head_drop)\.|^(head|proj)$")


class _DenseMLP(nn.Module):
    def __init__(self, fc1: nn.Linear, fc2: nn.Linear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2


def _linear(w: Tensor, b: Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


def _fmt(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_vision_checkpoint(encoder: "VisionEncoder", path) -> str:
    """Load a dense (or already-MoE) timm/open_clip ViT checkpoint into `encoder`; returns the format.

    Dense MLPs of MoE layers are upcycled into every expert; routers stay as initialised.
    """
    raw = read_state_dict(path)
    sd, fmt = to_timm_layout(raw, path)
    new, upcycle = vision_load_plan(encoder, sd, path, fmt)
    encoder.vit.load_state_dict(new, strict=True)
    for i, (w1, b1, w2, b2) in upcycle.items():
        encoder.moe_mlps[i].upcycle_(_DenseMLP(_linear(w1, b1), _linear(w2, b2)))
    return fmt


def vision_load_plan(encoder: "VisionEncoder", sd: dict[str, Tensor], path, fmt: str
                     ) -> tuple[dict[str, Tensor], dict[int, tuple]]:
    """What loading timm-layout `sd` into `encoder` does, checked (names and shapes only, so `sd` may hold
    meta tensors): {vit state name: tensor (sd's, or the encoder's own for experts and routers)} and
    {MoE layer: (fc1 weight, fc1 bias, fc2 weight, fc2 bias)} of the dense MLPs to upcycle."""
    stem = checkpoint_stem(sd)
    if stem != encoder.cfg.stem:
        raise CheckpointError(f"{path}: the checkpoint has a {stem} stem but vision.stem={encoder.cfg.stem!r};"
                                      f" set vision.stem: {stem}")
    vit = encoder.vit
    target = vit.state_dict()
    n_blocks = len(vit.blocks)
    new: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    upcycle: dict[int, tuple[Tensor, Tensor | None, Tensor, Tensor | None]] = {}

    moe_prefixes = {f"blocks.{i}.mlp.": m for i, m in encoder.moe_mlps.items()}
    for i, m in encoder.moe_mlps.items():
        pre = f"blocks.{i}.mlp."
        if f"{pre}moe.experts.w_in.weight" in sd:  # already an MoE checkpoint: plain copy below
            moe_prefixes.pop(pre)
            continue
        ex = m.moe.experts
        has_bias = ex.w_in.bias is not None
        want = {f"{pre}fc1.weight": (ex.w_in.out_features, ex.w_in.in_features),
                f"{pre}fc2.weight": (ex.w_out.out_features, ex.w_out.in_features)}
        if has_bias:
            want[f"{pre}fc1.bias"] = (ex.w_in.out_features,)
            want[f"{pre}fc2.bias"] = (ex.w_out.out_features,)
        ok = True
        for k, shape in want.items():
            if k not in sd:
                missing.append(f"{k} (dense MLP to upcycle into the experts of vision layer {i})")
                ok = False
            elif tuple(sd[k].shape) != shape:
                mismatched.append(f"{k}: checkpoint {tuple(sd[k].shape)} vs experts' {shape}")
                ok = False
            used.add(k)
        if ok:
            upcycle[i] = (sd[f"{pre}fc1.weight"], sd.get(f"{pre}fc1.bias") if has_bias else None,
                          sd[f"{pre}fc2.weight"], sd.get(f"{pre}fc2.bias") if has_bias else None)

    for k, v in target.items():
        if any(k.startswith(p) for p in moe_prefixes):
            new[k] = v  # experts get upcycled below; routers stay fresh
            continue
        if k not in sd:
            missing.append(k)
            new[k] = v
        elif tuple(sd[k].shape) != tuple(v.shape):
            mismatched.append(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}")
            new[k] = v
        else:
            new[k] = sd[k]
        used.add(k)

    unexpected = []
    for k in sd:
        if k in used or _IGNORABLE.search(k):
            continue
        mb = re.match(r"^blocks\.(\d+)\.", k)
        if mb and int(mb.group(1)) >= n_blocks:  # block after feature_layer: not built
            continue
        unexpected.append(k)

    if missing or mismatched or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_fmt(missing)}")
        if mismatched:
            parts.append(f"shape mismatch {len(mismatched)}: {_fmt(mismatched)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_fmt(sorted(unexpected))}")
        raise CheckpointError(f"{path} ({fmt} checkpoint) does not fit the vision encoder: " + "; ".join(parts))
    return new, upcycle


__all__ = ["to_timm_layout", "to_timm_layout_one", "timm_layout_of", "load_vision_checkpoint", "vision_load_plan"]

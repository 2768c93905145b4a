"""Start a stage from the previous one: load weights, upcycling dense layers into MoE where needed.

Stage 3 of the recipes has MoE layers where stage 2 had dense ones. Every MoE FFN (vision MLP,
connector, decoder FFN) whose previous-stage weights are a dense MLP at the same place gets each
expert set to a copy of it; every MoA layer whose previous weights are a dense attention gets the
dense heads partitioned among its experts. Routers are freshly initialised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from mmoe.interop.checkpoint import CheckpointError, read_state_dict
from mmoe.model.layers import GeluMLP, SwiGLU
from mmoe.model.moe import MoEFFN


def _dense_at(sd: dict[str, Tensor], prefix: str, names: tuple[str, ...]) -> str | None:
    """Return the prefix (this one or its parent) holding a dense module with weights `names`."""
    candidates = [prefix, prefix.rsplit(".", 1)[0] if "." in prefix else ""]
    for p in candidates:
        if all(f"{p}.{n}.weight" in sd for n in names):
            return p
    return None


@torch.no_grad()
def load_stage_weights(model: nn.Module, path: str | Path, strict: bool = True) -> dict[str, list[str]]:
    """Load previous-stage weights into `model`, upcycling dense -> MoE. Returns what happened."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    return load_state_upcycling(model, read_state_dict(path), str(file), strict)


@torch.no_grad()
def load_hf_decoder(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Initialise `model.decoder` from a Hugging Face checkpoint directory (dense ones upcycled)."""
    from mmoe.interop.hf import load_decoder

    dense, _ = load_decoder(path)
    sd = {f"decoder.{k}": v for k, v in dense.state_dict().items()}
    return load_state_upcycling(model, sd, str(path), strict=False, only_prefix="decoder.")


@torch.no_grad()
def load_state_upcycling(model: nn.Module, sd: dict[str, Tensor], path: str, strict: bool = True,
                         only_prefix: str = "") -> dict[str, list[str]]:
    """Copy `sd` into `model`; dense MLPs / attentions at MoE / MoA places are upcycled."""
    from mmoe.model.moe.attention import MoAAttention

    own = model.state_dict()
    consumed: set[str] = set()
    upcycled: list[str] = []
    for name, mod in model.named_modules():
        if not name.startswith(only_prefix):
            continue
        if isinstance(mod, MoEFFN) and not any(k.startswith(f"{name}.experts.") for k in sd):
            glu = mod.experts.glu
            names = ("gate_proj", "up_proj", "down_proj") if glu else ("fc1", "fc2")
            p = _dense_at(sd, name, names)
            if p is None:
                continue
            if glu:
                dense = SwiGLU(*sd[f"{p}.gate_proj.weight"].t().shape, bias=f"{p}.gate_proj.bias" in sd)
            else:
                w1 = sd[f"{p}.fc1.weight"]
                dense = GeluMLP(w1.shape[1], w1.shape[0], sd[f"{p}.fc2.weight"].shape[0],
                                activation=mod.experts.activation, bias=f"{p}.fc1.bias" in sd)
            sub = {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".") and k[len(p) + 1:].split(".")[0] in names}
            dense.load_state_dict(sub)
            mod.upcycle_(dense)
            consumed.update(f"{p}.{k}" for k in sub)
            upcycled.append(name)
        elif isinstance(mod, MoAAttention) and sd.get(f"{name}.q_proj.weight", torch.empty(0, 0, 0)).ndim == 2:
            sub = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            sub = {k: v for k, v in sub.items() if k.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj")}
            dense = _linears_from(sub)
            mod.upcycle_(dense)
            consumed.update(f"{name}.{k}" for k in sub)
            upcycled.append(name)
    loaded, mismatched = [], []
    upcycled_prefixes = tuple(n + "." for n in upcycled)
    for k, v in sd.items():
        if k in consumed:
            continue
        if k in own:
            if own[k].shape != v.shape:
                mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
                continue
            own[k].copy_(v)
            loaded.append(k)
    if mismatched:
        raise CheckpointError(f"{path}: tensor shapes do not match this config: " + "; ".join(mismatched[:8]))
    fresh_ok = (".router.", "expert_bias", "load_accum")
    tied = {own[k].data_ptr() for k in loaded}  # e.g. a tied lm_head: loaded through embed_tokens
    missing = [k for k in own if k.startswith(only_prefix) and k not in loaded
               and not k.startswith(upcycled_prefixes) and not any(s in k for s in fresh_ok)
               and own[k].data_ptr() not in tied]
    if strict and missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensor(s) this model needs, e.g. {missing[:6]}")
    return {"loaded": loaded, "upcycled": upcycled, "missing": missing}


def _linears_from(sub: dict[str, Tensor]) -> nn.Module:
    """A module with one nn.Linear per prefix in `sub` (e.g. q_proj/k_proj/v_proj/o_proj), weights loaded."""
    dense = nn.Module()
    for lin in {k.split(".")[0] for k in sub}:
        w = sub[f"{lin}.weight"]
        setattr(dense, lin, nn.Linear(w.shape[1], w.shape[0], bias=f"{lin}.bias" in sub))
    dense.load_state_dict(sub)
    return dense


def apply_freeze(model: nn.Module, prefixes: list[str]) -> None:
    """Freeze parameters whose name starts with any prefix; an unknown prefix is an error."""
    for pre in prefixes:
        hits = [p for n, p in model.named_parameters() if n == pre or n.startswith(pre + ".")]
        if not hits:
            top = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
            raise ValueError(f"model.stage.freeze: {pre!r} matches no parameter; top-level modules: {top}")
        for p in hits:
            p.requires_grad_(False)

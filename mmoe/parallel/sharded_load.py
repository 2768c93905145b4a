"""Streaming upcycling into a sharded model (`model.parallel.sharded_init` with checkpoints to load).

After `sharded_init.materialize_sharded` has filled the shards with the model's own initialisation, the
checkpoints the config names are streamed in: tensors are read one at a time with safetensors' `safe_open`
and each rank copies only its slice of every target into its (FSDP / EP) shards. Dense FFNs are upcycled
slice-wise (each local expert gets its slice of the dense weights), so neither the dense checkpoint nor the
MoE model is ever whole on one rank. The result equals the ordinary load (`mmoe.interop.factory.build_model`
+ `mmoe.training.stage_init.load_hf_decoder`) exactly; the key mapping and checks are the ordinary loaders'
(`mmoe.interop.hf`, `mmoe.interop.vision_ckpt.vision_load_plan`).

Covered: a dense Llama / Mistral / Qwen2 `save_pretrained` directory (`stage.hf_decoder`, MoE FFNs upcycled)
and a timm / open_clip ViT `.safetensors` file (`vision.checkpoint`, MoE MLPs upcycled). Refused, naming the
field: MoA upcycling (`decoder.attn_moe` with `stage.hf_decoder`), MoE sources (Mixtral, GLM-4.5), vision
checkpoints that are not .safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from mmoe.interop.checkpoint import CheckpointError
from mmoe.model.moe import MoEFFN

from .sharded_init import _local_region

_MOE_SOURCES = ("mixtral", "glm4_moe")


def _box(shape: tuple, box: tuple | None) -> tuple[slice, ...]:
    box = tuple(box or ()) + (slice(None),) * (len(shape) - len(box or ()))
    return tuple(slice(*b.indices(s)[:2]) for b, s in zip(box, shape))


@torch.no_grad()
def write_box(t: Tensor, value: Tensor, box: tuple | None = None) -> None:
    """Copy `value` (broadcast to the box) into `box` of the global tensor `t` - only the part this rank
    holds (t a DTensor of the global shape) or all of it (a plain tensor)."""
    shape = tuple(t.shape)
    region = _local_region(t) if isinstance(t, DTensor) else _box(shape, None)
    write_local(t.to_local() if isinstance(t, DTensor) else t, region, value, _box(shape, box))


def write_local(local: Tensor, region: tuple[slice, ...], value: Tensor, box: tuple[slice, ...]) -> None:
    """`local` holds `region` of a global tensor: write the part of `box` (<- `value`, broadcast) inside it."""
    inter = [(max(b.start, r.start), min(b.stop, r.stop)) for b, r in zip(box, region)]
    if any(a >= z for a, z in inter):
        return
    val = value.expand(tuple(b.stop - b.start for b in box))
    local[tuple(slice(a - r.start, z - r.start) for (a, z), r in zip(inter, region))].copy_(
        val[tuple(slice(a - b.start, z - b.start) for (a, z), b in zip(inter, box))])


class _Targets:
    """The sharded model's tensors by one-process name (experts as global DTensors)."""

    def __init__(self, model: nn.Module):
        from .fsdp_checkpoint import sharded_state_dict
        self.sd = sharded_state_dict(model)

    def write(self, name: str, value: Tensor, box: tuple | None = None) -> None:
        if name not in self.sd:
            raise CheckpointError(f"streaming load: the model has no tensor {name}")
        write_box(self.sd[name], value, box)

    def upcycle_glu(self, prefix: str, part: str, w: Tensor) -> None:
        """One dense SwiGLU matrix into every expert of MoE FFN `prefix` (GroupedExperts.upcycle_'s layout)."""
        if part == "down":
            self.write(f"{prefix}.experts.w_out.weight", w.t()[None])
            if f"{prefix}.experts.w_out.bias" in self.sd:
                self.write(f"{prefix}.experts.w_out.bias", w.new_zeros(w.shape[0])[None])
            return
        hid = w.shape[0]
        box = (slice(None), slice(None), slice(0, hid) if part == "gate" else slice(hid, 2 * hid))
        self.write(f"{prefix}.experts.w_in.weight", w.t()[None], box)

    def upcycle_linear(self, prefix: str, which: str, w: Tensor, b: Tensor | None) -> None:
        """A dense fc1 / fc2 into every expert's w_in / w_out (GroupedLinear.copy_dense_)."""
        self.write(f"{prefix}.experts.{which}.weight", w.t()[None])
        if f"{prefix}.experts.{which}.bias" in self.sd:
            self.write(f"{prefix}.experts.{which}.bias", (b if b is not None else w.new_zeros(w.shape[0]))[None])

    def silence_shared(self, prefix: str, moe: MoEFFN) -> None:
        """MoEFFN.upcycle_: shared experts start with a zero output projection."""
        if moe.shared is None:
            return
        out = "down_proj" if hasattr(moe.shared, "down_proj") else "fc2"
        for kind in ("weight", "bias"):
            name = f"{prefix}.shared.{out}.{kind}"
            if name in self.sd:
                write_box(self.sd[name], torch.zeros(()))


def _moe_ffns(meta_model: nn.Module, under: str) -> dict[str, MoEFFN]:
    return {n: m for n, m in meta_model.named_modules() if n.startswith(under) and isinstance(m, MoEFFN)}


def check_streamable(arch, stage) -> None:
    """Refuse, before any process group exists, the loads streaming does not cover (naming the field)."""
    if arch.connector.checkpoint:
        raise ValueError("model.parallel.sharded_init=true does not stream model.arch.connector.checkpoint")
    for site, moe in (("vision.moe", arch.vision.moe), ("decoder.ffn_moe", arch.decoder.ffn_moe)):
        if moe is not None and moe.upcycle_reinit:
            raise ValueError(f"model.parallel.sharded_init=true streams exact expert copies: model.arch.{site}."
                             f"upcycle_reinit={moe.upcycle_reinit} is not supported (load without sharded_init)")
    if arch.vision.checkpoint and Path(arch.vision.checkpoint).suffix != ".safetensors":
        raise ValueError(f"model.parallel.sharded_init=true streams .safetensors vision checkpoints only; "
                         f"model.arch.vision.checkpoint={arch.vision.checkpoint!r}")
    if stage.hf_decoder:
        from mmoe.interop.hf import open_checkpoint
        hf, _, _ = open_checkpoint(stage.hf_decoder)
        if hf.get("model_type") in _MOE_SOURCES:
            raise ValueError(f"model.parallel.sharded_init=true does not stream MoE sources: model.stage.hf_decoder="
                             f"{stage.hf_decoder!r} is a {hf['model_type']} checkpoint (load it without sharded_init)")
        if arch.decoder.attn_moe is not None and arch.decoder.moa_layer_ids():
            raise ValueError("model.parallel.sharded_init=true with model.stage.hf_decoder does not upcycle MoA "
                             "attention (model.arch.decoder.attn_moe); load it without sharded_init")


@torch.no_grad()
def stream_hf_decoder(model: nn.Module, arch, path: str | Path) -> dict:
    """Stream a dense HF decoder into the sharded `model` (see the module docstring); returns counts."""
    from mmoe.interop.hf import check_leftovers, dense_source_name, open_checkpoint
    from mmoe.model.decoder import Decoder
    from mmoe.model.vlm import MMoEVLM

    hf, dense_cfg, t = open_checkpoint(path)
    if hf.get("model_type") in _MOE_SOURCES:
        raise CheckpointError(f"{path}: {hf['model_type']} (MoE) sources are not streamed")
    with torch.device("meta"):
        dense = Decoder(dense_cfg)
        target = MMoEVLM(arch)
    moes = {n[len("decoder."):]: m for n, m in _moe_ffns(target, "decoder.").items()}
    for name, m in moes.items():
        if not m.experts.glu:
            raise CheckpointError(f"{path}: decoder.{name} experts are not SwiGLU; a Llama-family FFN cannot be "
                                  "upcycled into them")
        if m.experts.w_out.in_features != dense_cfg.hidden:
            raise ValueError(f"cannot upcycle a dense MLP of hidden width {dense_cfg.hidden} into experts of width "
                             f"{m.experts.w_out.in_features}: copies are exact only at equal width (set "
                             f"moe.expert_hidden to 0 or {dense_cfg.hidden})")
    out = _Targets(model)
    p = "model." if any(k.startswith("model.") for k in t.where) else ""
    counts = {"copied": 0, "upcycled": 0}
    for name, ref in dense.state_dict().items():
        tied_head = name == "lm_head.weight" and dense_cfg.tie_embeddings  # the embedding, as a tied model has it
        v = t.get(dense_source_name("embed_tokens.weight" if tied_head else name, p), tuple(ref.shape))
        v = v.to(torch.float32) if v.is_floating_point() else v  # the ordinary load's float32 dense decoder
        owner, _, leaf = name.rpartition(".")
        mlp, _, proj = owner.rpartition(".")
        if mlp in moes and proj in ("gate_proj", "up_proj", "down_proj"):
            if leaf != "weight":
                raise CheckpointError(f"{path}: biased SwiGLU FFNs ({name}) are not streamed")
            out.upcycle_glu(f"decoder.{mlp}", proj.split("_")[0], v)
            counts["upcycled"] += 1
        elif f"decoder.{name}" in out.sd:
            have = tuple(out.sd[f"decoder.{name}"].shape)
            if have != tuple(v.shape):
                raise CheckpointError(f"{path}: tensor shapes do not match this config: decoder.{name}: "
                                      f"checkpoint {tuple(v.shape)} vs model {have}")
            out.write(f"decoder.{name}", v)
            counts["copied"] += 1
        del v
    check_leftovers(t, dense_cfg.tie_embeddings, "dense")
    for name, m in moes.items():
        out.silence_shared(f"decoder.{name}", m)
    return counts


def _safetensors_meta(path: Path) -> dict[str, Tensor]:
    """{name: meta tensor of the stored shape} without reading any data."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}


@torch.no_grad()
def stream_vision_checkpoint(model: nn.Module, arch, path: str | Path) -> dict:
    """Stream a timm / open_clip ViT .safetensors file into the sharded `model`'s vision tower."""
    from safetensors import safe_open

    from mmoe.interop.vision_ckpt import timm_layout_of, to_timm_layout_one, vision_load_plan
    from mmoe.model.vlm import MMoEVLM

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors vision checkpoints are streamed")
    meta = _safetensors_meta(path)
    fmt, prefix = timm_layout_of(meta, path)
    timm_sd, origin = {}, {}
    for k, v in meta.items():
        for k2, v2 in to_timm_layout_one(k, v, fmt, prefix).items():
            timm_sd[k2], origin[k2] = v2, k
    with torch.device("meta"):
        target = MMoEVLM(arch)
    encoder = target.vision
    new, upcycle = vision_load_plan(encoder, timm_sd, path, fmt)  # the ordinary checks, on shapes only
    vit_name = next(n for n, m in target.named_modules() if m is encoder.vit)
    by_id = {id(v): k2 for k2, v in timm_sd.items()}
    copies: dict[str, list[str]] = {}  # timm name -> model names it is copied to
    for k, v in new.items():
        if id(v) in by_id:
            copies.setdefault(by_id[id(v)], []).append(f"{vit_name}.{k}")
    moe_names = {i: next(n for n, mm in target.named_modules() if mm is m.moe)
                 for i, m in encoder.moe_mlps.items() if i in upcycle}
    roles: dict[str, tuple] = {}  # timm name -> (MoE prefix, 'w_in' | 'w_out', 'weight' | 'bias', dense has bias)
    for i, (w1, b1, w2, b2) in upcycle.items():
        for v, which, kind, bias in ((w1, "w_in", "weight", b1), (b1, "w_in", "bias", b1),
                                     (w2, "w_out", "weight", b2), (b2, "w_out", "bias", b2)):
            if v is not None:
                roles[by_id[id(v)]] = (moe_names[i], which, kind, bias is not None)
    out = _Targets(model)
    dtype = torch.get_default_dtype()  # the ordinary path's dense nn.Linear for upcycling
    counts = {"copied": 0, "upcycled": 0}
    pending: dict[tuple[str, str], dict[str, Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        for k in meta:
            for k2, v in to_timm_layout_one(k, f.get_tensor(k), fmt, prefix).items():
                for name in copies.get(k2, []):
                    out.write(name, v)
                    counts["copied"] += 1
                if k2 in roles:  # fc1 / fc2 weight and bias arrive one at a time: upcycle when both are in
                    moe, which, kind, has_bias = roles[k2]
                    got = pending.setdefault((moe, which), {})
                    got[kind] = v.to(dtype)
                    if "weight" in got and ("bias" in got or not has_bias):
                        out.upcycle_linear(moe, which, got["weight"], got.get("bias"))
                        pending.pop((moe, which))
                        counts["upcycled"] += 1
    if pending:
        raise CheckpointError(f"{path}: incomplete dense MLPs for {sorted(pending)}")
    for i in upcycle:
        out.silence_shared(moe_names[i], encoder.moe_mlps[i].moe)
    return counts


def stream_checkpoints(model: nn.Module, arch, stage) -> dict:
    """Every checkpoint the config names, streamed into the sharded model (after sharded init)."""
    done = {}
    if arch.vision.checkpoint:
        done["vision"] = stream_vision_checkpoint(model, arch, arch.vision.checkpoint)
    if stage.hf_decoder:
        done["decoder"] = stream_hf_decoder(model, arch, stage.hf_decoder)
    return done


def fill_sharded_module(module: nn.Module, device) -> dict | None:
    """The fsdp_ep strategy's step after sharding: a LightningModule built with `parallel.sharded_init`
    (its `_sharded_init` record) gets its shards allocated on `device`, initialised, and the config's
    checkpoints streamed in. None when the module was built normally."""
    from .sharded_init import materialize_sharded
    record = getattr(module, "_sharded_init", None)
    if record is None:
        return None
    stats = materialize_sharded(module.model, record, device)
    module._sharded_init = None
    stats["loaded"] = stream_checkpoints(module.model, module.arch, module.stage_cfg)
    return stats


__all__ = ["check_streamable", "fill_sharded_module", "stream_checkpoints", "stream_hf_decoder", "stream_vision_checkpoint", "write_box"]

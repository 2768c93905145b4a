"""MoE vision encoder: co-upcycling from timm / open_clip files, feature selection, routing, counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mmoe.constants import MODALITY_IMAGE
from mmoe.interop.checkpoint import CheckpointError
from mmoe.interop.factory import build_vision_encoder
from mmoe.model.connector import Connector, ConnectorConfig
from mmoe.model.moe import MoEConfig
from mmoe.model.vision import VisionConfig, VisionConfigError, VisionEncoder, vision_param_count

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


def _randomize_(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (timm zero-inits biases, LN is 1/0): a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _hidden_state(model: nn.Module, blocks: nn.Module, embed_out: nn.Module, idx: int, run) -> torch.Tensor:
    """LLaVA hidden_states[idx] of a dense model, read with a forward hook on its own modules."""
    store = {}
    mod = embed_out if idx == 0 else blocks[idx - 1]
    h = mod.register_forward_hook(lambda m, i, o: store.setdefault("x", o))
    try:
        with torch.no_grad():
            run()
    finally:
        h.remove()
    return store["x"]


def _tiny_timm_dense(depth: int = 4) -> VisionTransformer:
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=4, num_classes=0)
    _randomize_(m)
    return m.eval()


def _tiny_cfg(**kw) -> VisionConfig:
    base = dict(image_size=32, patch_size=8, dim=64, depth=4, n_heads=4,
                moe=MoEConfig(num_experts=4, top_k=2))
    base.update(kw)
    return VisionConfig(**base)


# ------------------------------------------------------------ timm upcycling
@pytest.mark.parametrize("feature_layer,keep_cls,fmt", [(-2, False, "pth"), (-1, True, "safetensors"),
                                                         (2, True, "pth"), (0, False, "safetensors")])
def test_timm_upcycled_features_equal_dense(tmp_path, feature_layer, keep_cls, fmt):
    dense = _tiny_timm_dense()
    path = tmp_path / f"vit.{fmt}"
    if fmt == "pth":
        torch.save(dense.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(path))
    cfg = _tiny_cfg(feature_layer=feature_layer, keep_cls=keep_cls, checkpoint=str(path))
    enc = build_vision_encoder(cfg).eval()
    idx = feature_layer if feature_layer >= 0 else 5 + feature_layer
    assert len(enc.vit.blocks) == idx  # blocks after feature_layer are not built
    assert enc.moe_layers == list(range(idx))

    x = torch.randn(3, 3, 32, 32)
    ref = _hidden_state(dense, dense.blocks, dense.norm_pre, idx, lambda: dense.forward_features(x))
    if not keep_cls:
        ref = ref[:, 1:]
    feats, routing = enc(x)
    assert feats.shape == (3, enc.num_patches, enc.out_dim) == (3, 16 + int(keep_cls), 64)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    assert [r.layer for r in routing] == list(range(idx))
    for r in routing:
        assert r.site == "vision"
        assert (r.modality == MODALITY_IMAGE).all() and r.modality.numel() == 3 * 17
        # several experts really are in use (the equality is not a single-expert accident)
        assert (r.expert_counts() > 0).sum() >= 2
    # router freshly initialised, every expert a copy of the dense MLP
    if idx:
        w_in = enc.moe_mlps[0].moe.experts.w_in.weight
        for e in range(4):
            torch.testing.assert_close(w_in[e], dense.blocks[0].mlp.fc1.weight.t())
        assert enc.moe_mlps[0].moe.router.gate.weight.abs().sum() > 0


def test_timm_checkpoint_drop_upcycles_when_the_moe_config_asks(tmp_path):
    """vision.moe.upcycle_reinit reaches the checkpoint load: each expert of every MoE block keeps the dense fc1
    columns except a different half of its hidden units."""
    dense = _tiny_timm_dense()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(path))
    enc = build_vision_encoder(_tiny_cfg(checkpoint=str(path), moe=MoEConfig(num_experts=4, top_k=2,
                                                                             upcycle_reinit=0.5)))
    for i in enc.moe_layers:
        fc1 = dense.blocks[i].mlp.fc1.weight  # (hidden, dim)
        w_in = enc.moe_mlps[i].moe.experts.w_in.weight  # (E, dim, hidden)
        redrawn = [frozenset(h for h in range(fc1.shape[0]) if not torch.equal(w_in[e, :, h], fc1[h]))
                   for e in range(4)]
        assert [len(r) for r in redrawn] == [fc1.shape[0] // 2] * 4 and len(set(redrawn)) == 4


def test_timm_registry_arch_mixed_layers(tmp_path):
    """Architecture from timm's registry (no download); MoE every 2nd block, dense timm Mlp elsewhere."""
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0)
    _randomize_(dense, seed=1)
    dense.eval()
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": dense.state_dict()}, path)
    cfg = VisionConfig(timm_model_name="vit_tiny_patch16_224", image_size=32, moe_layers="every_2",
                       moe=MoEConfig(num_experts=3, top_k=2), checkpoint=str(path))
    enc = build_vision_encoder(cfg).eval()
    assert enc.out_dim == 192 and len(enc.vit.blocks) == 11 and enc.num_patches == 4
    assert enc.moe_layers == [1, 3, 5, 7, 9]
    assert type(enc.vit.blocks[0].mlp).__name__ == "Mlp"
    x = torch.randn(2, 3, 32, 32)
    ref = _hidden_state(dense, dense.blocks, dense.norm_pre, 11, lambda: dense.forward_features(x))[:, 1:]
    feats, routing = enc(x)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    assert [r.layer for r in routing] == [1, 3, 5, 7, 9]


# ------------------------------------------------------------ open_clip upcycling
def _tiny_open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    name = "mmoe-test-tiny-vit"
    cfg = {"embed_dim": 32, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    cfg_dir = tmp_path / "oc_cfg"
    cfg_dir.mkdir()
    (cfg_dir / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_dir)
    model = open_clip.create_model(name, pretrained=None)
    _randomize_(model, seed=2)
    return name, model.eval()


@pytest.mark.parametrize("feature_layer", [-2, -1])
def test_open_clip_upcycled_features_equal_dense(tmp_path, feature_layer):
    name, model = _tiny_open_clip(tmp_path)
    path = tmp_path / "open_clip.pt"
    torch.save(model.state_dict(), path)
    enc = build_vision_encoder(VisionConfig(backend="open_clip", open_clip_model_name=name, image_size=32,
                                     activation="quick_gelu", feature_layer=feature_layer, keep_cls=True,
                                     moe=MoEConfig(num_experts=4, top_k=2), checkpoint=str(path))).eval()
    assert enc.out_dim == 64 and enc.vit.blocks[0].attn.num_heads == 4
    idx = 4 + feature_layer
    vt = model.visual
    x = torch.randn(2, 3, 32, 32)
    ref = _hidden_state(model, vt.transformer.resblocks, vt.ln_pre, idx, lambda: vt(x))
    if not getattr(vt.transformer, "batch_first", True):
        ref = ref.transpose(0, 1)
    feats, routing = enc(x)
    assert feats.shape == (2, 17, 64) and len(routing) == idx
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)


def test_open_clip_layout_from_fields(tmp_path):
    """backend='open_clip' without a name: ln_pre + eps 1e-5 come from the backend, shape from the fields."""
    _, model = _tiny_open_clip(tmp_path)
    path = tmp_path / "oc.pt"
    torch.save(model.state_dict(), path)
    cfg = VisionConfig(backend="open_clip", image_size=32, patch_size=8, dim=64, depth=3, n_heads=4,
                       activation="quick_gelu", moe=MoEConfig(num_experts=2, top_k=2), moe_layers="last_1",
                       feature_layer=-1, checkpoint=str(path))
    enc = build_vision_encoder(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    vt = model.visual
    ref = _hidden_state(model, vt.transformer.resblocks, vt.ln_pre, 3, lambda: vt(x))[:, 1:]
    torch.testing.assert_close(enc(x)[0], ref, atol=1e-5, rtol=1e-5)


def test_checkpoint_errors_name_tensors_and_file(tmp_path):
    dense = _tiny_timm_dense()
    sd = dense.state_dict()
    bad = dict(sd)
    del bad["blocks.1.attn.qkv.weight"]
    del bad["blocks.2.mlp.fc1.bias"]
    bad["blocks.0.norm1.weight"] = torch.ones(65)
    bad["blocks.0.extra.weight"] = torch.ones(3)
    path = tmp_path / "broken.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as ei:
        build_vision_encoder(_tiny_cfg(checkpoint=str(path)))
    msg = str(ei.value)
    for needle in ("broken.pth", "blocks.1.attn.qkv.weight", "blocks.2.mlp.fc1.bias", "blocks.0.norm1.weight",
                   "blocks.0.extra.weight"):
        assert needle in msg, needle
    # a wider checkpoint fails too
    wide = VisionTransformer(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=4, num_classes=0)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="wide.pth.*patch_embed.proj.weight"):
        build_vision_encoder(_tiny_cfg(checkpoint=str(tmp_path / "wide.pth")))
    with pytest.raises(CheckpointError, match="nope.pth"):
        build_vision_encoder(_tiny_cfg(checkpoint=str(tmp_path / "nope.pth")))


# ------------------------------------------------------------ routing, shapes
def test_expert_choice_capacity_inside_vit():
    moe = MoEConfig(num_experts=4, top_k=1, router="expert_choice", capacity_factor=1.0)
    enc = VisionEncoder(_tiny_cfg(moe=moe, feature_layer=-1)).train()
    feats, routing = enc(torch.randn(3, 3, 32, 32))
    n_tokens = 3 * 17
    cap = math.ceil(1.0 * n_tokens * 1 / 4)
    assert len(routing) == 4 and feats.shape == (3, 16, 64)
    for r in routing:
        assert r.expert_counts().tolist() == [cap] * 4
        assert r.expert_idx.shape == (n_tokens, 4)
    # a second forward returns fresh results, not stale ones
    _, routing2 = enc(torch.randn(1, 3, 32, 32))
    assert all(r.expert_counts().sum() == 4 * math.ceil(17 / 4) for r in routing2)


def test_dense_tower_and_config_errors():
    enc = VisionEncoder(_tiny_cfg(moe=None))
    feats, routing = enc(torch.randn(2, 3, 32, 32))
    assert routing == [] and feats.shape == (2, 16, 64) and not enc.moe_mlps
    with pytest.raises(VisionConfigError, match="feature_layer"):
        VisionEncoder(_tiny_cfg(feature_layer=-6))
    with pytest.raises(VisionConfigError, match="keep_cls"):
        VisionEncoder(_tiny_cfg(class_token=False, keep_cls=True))
    with pytest.raises(VisionConfigError, match="activation"):
        VisionEncoder(_tiny_cfg(activation="swiglu"))
    no_cls = VisionEncoder(_tiny_cfg(class_token=False, moe_layers="first_1"))
    assert no_cls(torch.randn(1, 3, 32, 32))[0].shape == (1, 16, 64) and no_cls.moe_layers == [0]


def test_every_parameter_gets_gradient_encoder_plus_connector():
    torch.manual_seed(0)
    enc = VisionEncoder(_tiny_cfg(moe=MoEConfig(num_experts=4, top_k=2, num_shared_experts=1))).train()
    conn = Connector(ConnectorConfig(kind="moe_mlp", moe=MoEConfig(num_experts=4, top_k=2), pool=2),
                     enc.out_dim, 48, enc.grid)
    feats, vr = enc(torch.randn(4, 3, 32, 32))
    out, cr = conn(feats)
    assert out.shape == (4, conn.num_tokens(enc.num_patches), 48) == (4, 4, 48)
    loss = out.pow(2).mean() + sum(r.probs.pow(2).mean() for r in vr + cr)
    loss.backward()
    for name, p in list(enc.named_parameters()) + list(conn.named_parameters()):
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_image_transform_uses_config():
    from PIL import Image

    enc = VisionEncoder(_tiny_cfg(image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.5, 0.5)))
    t = enc.image_transform()
    y = t(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert tuple(y.shape) == (3, 32, 32)
    # a flat red image normalises to (1 - mean) / std and (0 - mean) / std per channel: this tower's values
    want = torch.tensor([(1 - 0.1) / 0.5, (0 - 0.2) / 0.5, (0 - 0.3) / 0.5]).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=0)


# ------------------------------------------------------------ parameter count
def test_param_count_large_cumo_config_on_meta():
    dim, hidden, L = 1024, 4096, 24
    mlp = 2 * dim * hidden + hidden + dim
    vit_l = 303_505_408  # timm vit_large_patch14_clip_336 without head
    moe = MoEConfig(num_experts=4, top_k=2)
    full = vision_param_count(VisionConfig(timm_model_name="vit_large_patch14_clip_336", image_size=336,
                                           activation="quick_gelu", moe=moe, feature_layer=-1))
    cumo = vision_param_count(VisionConfig(timm_model_name="vit_large_patch14_clip_336", image_size=336,
                                           activation="quick_gelu", moe=moe,
                                           image_mean=(0.48145466, 0.4578275, 0.40821073),
                                           image_std=(0.26862954, 0.26130258, 0.27577711)))
    dense = vision_param_count(VisionConfig(timm_model_name="vit_large_patch14_clip_336", image_size=336,
                                            activation="quick_gelu", feature_layer=-1))
    assert dense["total"] == dense["active"] == vit_l
    router = dim * 4
    assert full["total"] == vit_l + L * (3 * mlp + router)
    assert full["active"] == vit_l + L * (mlp + router)
    assert full["dense"] == vit_l and full["moe_layers"] == 24 and full["experts"] == 4 * L * mlp
    block = 4 * dim * dim + 4 * dim + 4 * dim  # attention + two LayerNorms
    assert cumo["blocks"] == cumo["moe_layers"] == 23
    assert cumo["total"] == full["total"] - (block + 4 * mlp + router)
    assert 850e6 < cumo["total"] < 950e6 and 450e6 < cumo["active"] < 550e6


# ------------------------------------------------------------ convolutional stem
def test_conv_stem_same_tokens_overlapping_receptive_fields():
    torch.manual_seed(0)
    patch = VisionEncoder(_tiny_cfg(moe=None, feature_layer=0)).eval()
    conv = VisionEncoder(_tiny_cfg(moe=None, feature_layer=0, stem="conv")).eval()
    strided = [m for m in conv.vit.patch_embed.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 3 and all(m.kernel_size == (3, 3) for m in strided)  # log2(8) overlapping convs
    assert (conv.num_patches, conv.grid, conv.out_dim) == (patch.num_patches, patch.grid, patch.out_dim)
    x = torch.randn(1, 3, 32, 32)
    x2 = x.clone()
    x2[0, :, 7, 7] += 5.0  # last pixel of patch (0, 0), next to patches (0, 1), (1, 0), (1, 1)
    changed = {}
    for name, enc in (("patch", patch), ("conv", conv)):
        with torch.no_grad():
            diff = (enc(x2)[0] - enc(x)[0]).abs().amax(-1)[0]
        changed[name] = set(torch.nonzero(diff > 1e-6).flatten().tolist())
    assert changed["patch"] == {0}
    assert {0, 1, 4, 5} <= changed["conv"]  # tokens of the 4x4 grid around the border pixel


def test_conv_stem_trains_batch_independent_and_refuses_bad_configs():
    torch.manual_seed(0)
    enc = VisionEncoder(_tiny_cfg(stem="conv", moe=None)).train()
    x = torch.randn(3, 3, 32, 32)
    feats, _ = enc(x)
    alone, _ = enc(x[1:2])
    torch.testing.assert_close(feats[1:2], alone, rtol=1e-5, atol=1e-5)  # GroupNorm: no batch statistics
    feats.pow(2).mean().backward()
    for name, p in enc.vit.patch_embed.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(VisionConfigError, match="power-of-two patch_size"):
        VisionEncoder(_tiny_cfg(stem="conv", patch_size=6, image_size=36))
    with pytest.raises(VisionConfigError, match="vision.stem"):
        VisionEncoder(_tiny_cfg(stem="convnext"))
    counts = vision_param_count(_tiny_cfg(stem="conv"))
    assert counts["total"] == sum(p.numel() for p in VisionEncoder(_tiny_cfg(stem="conv")).parameters())


def test_conv_stem_checkpoint_round_trip_upcycles_and_refuses_the_other_stem(tmp_path):
    """A dense conv-stem tower (stage-0 pretraining) loads into the MoE conv tower: every expert a copy of the
    dense MLP, so the features are the dense tower's; a conv checkpoint into a patch tower (or back) is refused
    naming the stem."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    dense = VisionEncoder(_tiny_cfg(stem="conv", moe=None, feature_layer=-1)).eval()
    path = tmp_path / "vision.safetensors"
    save_file({k: v.contiguous() for k, v in dense.vit.state_dict().items()}, str(path))
    moe = build_vision_encoder(_tiny_cfg(stem="conv", feature_layer=-1, checkpoint=str(path))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], dense(x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="conv stem but vision.stem='patch'"):
        build_vision_encoder(_tiny_cfg(feature_layer=-1, checkpoint=str(path)))
    patch = VisionEncoder(_tiny_cfg(moe=None, feature_layer=-1))
    save_file({k: v.contiguous() for k, v in patch.vit.state_dict().items()}, str(tmp_path / "p.safetensors"))
    with pytest.raises(CheckpointError, match="patch stem but vision.stem='conv'"):
        build_vision_encoder(_tiny_cfg(stem="conv", feature_layer=-1, checkpoint=str(tmp_path / "p.safetensors")))

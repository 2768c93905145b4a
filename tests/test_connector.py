"""Connector: kinds, pooling on the patch grid, MoE connector co-upcycled from a dense one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmoe.constants import MODALITY_IMAGE
from mmoe.interop.checkpoint import CheckpointError
from mmoe.interop.factory import build_connector
from mmoe.model.connector import Connector, ConnectorConfig, ConnectorConfigError
from mmoe.model.moe import MoEConfig, MoEFFN


def _randomize_(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["linear", "mlp", "moe_mlp"])
def test_kinds_shapes_and_routing(kind):
    conn = Connector(ConnectorConfig(kind=kind, moe=MoEConfig(num_experts=4, top_k=2)), 16, 24, grid=4)
    y, routing = conn(torch.randn(2, 16, 16))
    assert y.shape == (2, 16, 24) and conn.num_tokens(16) == 16
    if kind == "moe_mlp":
        assert isinstance(conn.proj, MoEFFN)
        (r,) = routing
        assert r.site == "connector" and r.layer == 0 and (r.modality == MODALITY_IMAGE).all()
        assert conn.proj.experts.w_in.weight.shape == (4, 16, 24)  # hidden 0 -> LLM dim
    else:
        assert routing == []
    if kind == "mlp":
        assert conn.proj.fc1.out_features == 24 and conn.proj.activation == "gelu"


def _ref_pool(feats, g, p):
    N, P, C = feats.shape
    x = feats.view(N, g, g, C).permute(0, 3, 1, 2)
    return F.avg_pool2d(x, p).permute(0, 2, 3, 1).reshape(N, -1, C)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_pooling_matches_avg_pool2d(kind):
    torch.manual_seed(0)
    conn = Connector(ConnectorConfig(kind=kind, pool=2), 8, 12, grid=4)
    feats = torch.randn(3, 16, 8)
    pooled = conn.pool_tokens(feats)
    assert pooled.shape == (3, 4, 8) and conn.num_tokens(16) == 4
    torch.testing.assert_close(pooled, _ref_pool(feats, 4, 2))
    # row-major grid: token 1 of the 2x2 output averages patches (0,2),(0,3),(1,2),(1,3)
    torch.testing.assert_close(pooled[:, 1], feats[:, [2, 3, 6, 7]].mean(1))
    y, _ = conn(feats)
    torch.testing.assert_close(y, conn.proj(_ref_pool(feats, 4, 2)))
    # grid inferred when not given
    conn2 = Connector(ConnectorConfig(kind=kind, pool=3), 8, 12, grid=None)
    feats36 = torch.randn(2, 36, 8)
    torch.testing.assert_close(conn2.pool_tokens(feats36), _ref_pool(feats36, 6, 3))
    assert conn2.num_tokens(36) == 4


@pytest.mark.parametrize("kind", ["linear", "moe_mlp"])
def test_concat_pooling_stacks_each_window_in_row_major_order(kind):
    torch.manual_seed(0)
    g, p, C = 6, 3, 5
    cfg = ConnectorConfig(kind=kind, pool=p, pool_mode="concat", moe=MoEConfig(num_experts=4, top_k=2))
    conn = Connector(cfg, C, 12, grid=g)
    feats = torch.randn(2, g * g, C)
    merged = conn.pool_tokens(feats)
    # reference: loop over windows (row-major), each window's patches row-major, features side by side
    windows = [(wr, wc) for wr in range(g // p) for wc in range(g // p)]
    cells = [(r, c) for r in range(p) for c in range(p)]
    ref = torch.stack([torch.cat([feats[:, (wr * p + r) * g + wc * p + c] for r, c in cells], -1)
                       for wr, wc in windows], 1)
    assert merged.shape == (2, 4, p * p * C) and conn.num_tokens(g * g) == 4
    torch.testing.assert_close(merged, ref, rtol=0, atol=0)
    # the projector takes the stacked width; nothing is averaged away (patch order inside a window matters)
    y, routing = conn(feats)
    assert y.shape == (2, 4, 12) and len(routing) == (kind == "moe_mlp")
    w = conn.proj.weight if kind == "linear" else conn.proj.experts.w_in.weight
    assert p * p * C in w.shape
    swapped = feats.clone()
    swapped[:, [0, 1]] = feats[:, [1, 0]]  # two patches of the same window trade places
    assert not torch.allclose(conn(swapped)[0][:, 0], y[:, 0])
    torch.testing.assert_close(conn(swapped)[0][:, 1:], y[:, 1:])
    with pytest.raises(ConnectorConfigError, match="pool_mode"):
        Connector(ConnectorConfig(kind="linear", pool=2, pool_mode="max"), C, 12, grid=4)


def test_pooling_rejects_cls_and_bad_factor():
    conn = Connector(ConnectorConfig(kind="linear", pool=2), 8, 8, grid=None)
    with pytest.raises(ConnectorConfigError, match="CLS"):
        conn(torch.randn(1, 17, 8))
    with pytest.raises(ConnectorConfigError, match="pool"):
        Connector(ConnectorConfig(kind="linear", pool=3), 8, 8, grid=4)
    with pytest.raises(ConnectorConfigError, match="moe"):
        Connector(ConnectorConfig(kind="moe_mlp"), 8, 8, grid=None)
    # pool=1 passes anything through, CLS included
    assert Connector(ConnectorConfig(kind="linear"), 8, 8, None)(torch.randn(1, 17, 8))[0].shape == (1, 17, 8)


@pytest.mark.parametrize("fmt,shared", [("own", 0), ("llava", 1)])
def test_moe_connector_upcycled_equals_dense(tmp_path, fmt, shared):
    dense = Connector(ConnectorConfig(kind="mlp"), 16, 24, grid=4)
    _randomize_(dense)
    if fmt == "own":
        path = tmp_path / "connector.pt"
        torch.save(dense.state_dict(), path)
    else:  # LLaVA mm_projector.bin naming, as safetensors
        path = tmp_path / "mm_projector.safetensors"
        p = dense.proj
        pre = "model.mm_projector."
        save_file({f"{pre}0.weight": p.fc1.weight.contiguous(), f"{pre}0.bias": p.fc1.bias,
                   f"{pre}2.weight": p.fc2.weight.contiguous(), f"{pre}2.bias": p.fc2.bias}, str(path))
    moe = MoEConfig(num_experts=4, top_k=2, num_shared_experts=shared)
    conn = build_connector(ConnectorConfig(kind="moe_mlp", moe=moe, checkpoint=str(path)), 16, 24, grid=4)
    feats = torch.randn(3, 16, 16)
    y, (r,) = conn(feats)
    torch.testing.assert_close(y, dense(feats)[0], atol=1e-5, rtol=1e-5)
    assert (r.expert_counts() > 0).sum() >= 2
    # the dense kind loads the same file
    again = build_connector(ConnectorConfig(kind="mlp", checkpoint=str(path)), 16, 24, grid=4)
    torch.testing.assert_close(again(feats)[0], dense(feats)[0])
    # an MoE connector's own state dict round-trips
    torch.save(conn.state_dict(), tmp_path / "moe.pt")
    conn2 = build_connector(ConnectorConfig(kind="moe_mlp", moe=moe, checkpoint=str(tmp_path / "moe.pt")),
                      16, 24, 4)
    torch.testing.assert_close(conn2.proj.router.gate.weight, conn.proj.router.gate.weight)


def test_connector_checkpoint_mismatch(tmp_path):
    dense = Connector(ConnectorConfig(kind="mlp"), 16, 32, grid=4)
    torch.save(dense.state_dict(), tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="c.pt.*fc1.weight"):
        build_connector(ConnectorConfig(kind="moe_mlp", moe=MoEConfig(), checkpoint=str(tmp_path / "c.pt")),
                  16, 24, 4)


def test_concat_moe_connector_upcycles_from_dense_concat_and_names_the_width(tmp_path):
    dense = Connector(ConnectorConfig(kind="mlp", pool=2, pool_mode="concat"), 16, 24, grid=4)
    _randomize_(dense)
    torch.save(dense.state_dict(), tmp_path / "cat.pt")
    moe = MoEConfig(num_experts=4, top_k=2)
    conn = build_connector(ConnectorConfig(kind="moe_mlp", moe=moe, pool=2, pool_mode="concat",
                                     checkpoint=str(tmp_path / "cat.pt")), 16, 24, grid=4)
    feats = torch.randn(3, 16, 16)
    torch.testing.assert_close(conn(feats)[0], dense(feats)[0], atol=1e-5, rtol=1e-5)
    # an averaging connector's weights (16 wide) do not fit the 64-wide concat projector: the error says so
    avg = Connector(ConnectorConfig(kind="mlp", pool=2), 16, 24, grid=4)
    torch.save(avg.state_dict(), tmp_path / "avg.pt")
    with pytest.raises(CheckpointError, match=r"avg.pt.*\(64->24\).*fc1.weight"):
        build_connector(ConnectorConfig(kind="moe_mlp", moe=moe, pool=2, pool_mode="concat",
                                  checkpoint=str(tmp_path / "avg.pt")), 16, 24, grid=4)


def test_expert_choice_connector():
    # a shared expert: a token no expert picks still gets a projection (refused without one, see
    # tests/test_routing_correctness.py)
    moe = MoEConfig(num_experts=4, top_k=1, router="expert_choice", capacity_factor=1.0, num_shared_experts=1)
    conn = Connector(ConnectorConfig(kind="moe_mlp", moe=moe), 8, 8, grid=4).train()
    y, (r,) = conn(torch.randn(2, 16, 8))
    assert y.shape == (2, 16, 8) and r.expert_counts().tolist() == [8, 8, 8, 8]

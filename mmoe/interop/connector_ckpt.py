"""Dense connector checkpoints -> Connector, upcycled into every expert of an MoE connector (CuMo)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from mmoe.model.layers import GeluMLP
from mmoe.model.moe import MoEFFN

from .checkpoint import CheckpointError, read_state_dict

if TYPE_CHECKING:  # pragma: no cover
    from mmoe.model.connector import Connector


@torch.no_grad()
def load_connector_checkpoint(connector: "Connector", path) -> None:
    """Load a dense connector; upcycle it into every expert for kind 'moe_mlp' (router stays fresh).

    Accepts the Connector's state dict (kind linear/mlp: 'proj.*'), a bare GeluMLP ('fc1.*'/'fc2.*'),
    LLaVA's mm_projector ('[model.]mm_projector.0/2.*' for mlp2x_gelu, '.weight/.bias' for linear),
    or a moe_mlp connector's own state dict.
    """
    sd = read_state_dict(path)  # strips Lightning's / LLaVA's leading 'model.'
    for pre in ("mm_projector.", "connector.", "proj."):
        if any(k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    sd = {re.sub(r"^0\.", "fc1.", re.sub(r"^2\.", "fc2.", k)): v for k, v in sd.items()}
    proj = connector.proj
    if isinstance(proj, MoEFFN) and any(k.startswith("experts.") for k in sd):
        dense_sd, dense = sd, proj  # an MoE connector checkpoint: plain load
    elif isinstance(proj, MoEFFN):
        e = proj.experts
        dense = GeluMLP(e.w_in.in_features, e.w_in.out_features, out_dim=e.w_out.out_features)
        dense_sd = sd
    else:
        dense, dense_sd = proj, sd
    want = dense.state_dict()
    missing = [k for k in want if k not in dense_sd]
    bad = [f"{k}: checkpoint {tuple(dense_sd[k].shape)} vs model {tuple(v.shape)}"
           for k, v in want.items() if k in dense_sd and dense_sd[k].shape != v.shape]
    unexpected = [k for k in dense_sd if k not in want]
    if missing or bad or unexpected:
        raise CheckpointError(
            f"{path} does not fit the {connector.cfg.kind} connector ({connector.proj_in_dim}->{connector.out_dim}): "
            f"missing {missing}; shape mismatch {bad}; unexpected {unexpected}")
    dense.load_state_dict(dense_sd, strict=True)
    if dense is not proj:
        proj.upcycle_(dense)


__all__ = ["load_connector_checkpoint"]

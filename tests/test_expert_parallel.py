"""Expert parallelism on CPU/gloo, fp64, against one process holding every expert.

One 2-process job (module fixture) runs every 2-rank check and returns numbers; the tests below assert on
them, so the suite pays the process start-up once. A 4-process job checks the (edp=2, ep=2) topology.

Each rank feeds different tokens; the reference (a full copy built from the same seed, on every rank) sees
the concatenated global batch with the loss L = (1/W) sum_r L_r that data parallelism optimises.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from _dist_utils import run_distributed

TOL = 1e-10


# =========================================================================== single-process unit tests
def test_rank_major_to_expert_major_permutation():
    from mmoe.parallel.dispatcher import rank_major_to_expert_major

    cases = [[[2, 1], [0, 3]], [[0, 0], [0, 0]], [[5]], [[1, 0, 2]], [[0], [4], [1]], [[3, 3], [3, 3]]]
    for counts in cases:
        c = torch.tensor(counts)
        ep, El = c.shape
        # label each rank-major row by (local expert, source rank, index)
        labels = [(j, r, i) for r in range(ep) for j in range(El) for i in range(int(c[r, j]))]
        perm = rank_major_to_expert_major(c)
        assert sorted(perm.tolist()) == list(range(len(labels)))  # a bijection
        got = [labels[i] for i in perm.tolist()]
        assert got == sorted(labels), counts  # expert-major, then source rank, order kept inside a segment


def test_parallel_dims_layout():
    from mmoe.parallel.mesh import ExpertParallelMesh, ParallelDims

    d = ParallelDims(8, 2)
    assert d.edp_size == 4 and d.dp_size == 8
    assert d.ep_group_ranks(5) == [4, 5] and d.edp_group_ranks(5) == [1, 3, 5, 7]
    assert [d.ep_rank(r) for r in range(8)] == [0, 1, 0, 1, 0, 1, 0, 1]  # contiguous EP groups
    assert [d.edp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    solo = ParallelDims(3)  # no expert parallelism: every rank holds every expert
    assert solo.ep_size == 1 and solo.edp_size == 3
    assert [solo.ep_rank(r) for r in range(3)] == [0, 0, 0] and [solo.edp_rank(r) for r in range(3)] == [0, 1, 2]
    assert solo.ep_group_ranks(2) == [2] and solo.edp_group_ranks(2) == [0, 1, 2]
    with pytest.raises(ValueError) as err:
        ParallelDims(8, 3)
    assert str(err.value) == "model.parallel.ep_size=3 must divide the world size 8 (devices x nodes)"
    with pytest.raises(ValueError) as err:
        ParallelDims(8, 0)
    assert str(err.value) == "model.parallel.ep_size must be >= 1, got 0"
    mesh = ExpertParallelMesh(d, 5, None, None)  # what the strategy logs: the layout of this rank
    assert (mesh.ep_size, mesh.ep_rank, mesh.edp_size, mesh.dp_size) == (2, 1, 4, 8)
    assert repr(mesh) == "ExpertParallelMesh(world=8, ep=2, edp=4, rank=5, ep_ranks=[4, 5], edp_ranks=[1, 3, 5, 7])"


def test_ddp_ignore_list_names_marked_shards_under_every_path_and_refuses_a_shard_on_the_root():
    """What DDP must skip, given the marks enable_expert_parallel leaves (set by hand here: one process): every
    name a shard or a router load buffer is reachable under (DDP walks parameters with duplicates, so a layer
    registered twice appears twice), and a shard on the wrapped module itself is refused (DDP matches ignored
    names as `module.param`, which a root parameter never has)."""
    from mmoe.model.moe import GroupedLinear
    from mmoe.parallel.expert_parallel import SHARD_ATTR, ExpertShard, ddp_ignore_names

    root = _LM(_tiny_decoder(aux_free=True))
    w_in = root.model.layers[1].mlp.experts.w_in
    setattr(w_in, SHARD_ATTR, ExpertShard(num_experts=4, lo=0, hi=2, owner="model.layers.1.mlp"))
    root.alias = root.model.layers[1]  # the same layer under a second name
    assert sorted(ddp_ignore_names(root)) == sorted([
        "model.layers.1.mlp.experts.w_in.weight", "alias.mlp.experts.w_in.weight",
        "model.layers.0.self_attn.router.load_accum", "model.layers.0.mlp.router.load_accum",
        "model.layers.1.mlp.router.load_accum", "alias.mlp.router.load_accum"])

    bare = GroupedLinear(4, 8, 8)
    setattr(bare, SHARD_ATTR, ExpertShard(num_experts=8, lo=0, hi=4, owner="bare"))
    with pytest.raises(ValueError) as err:
        ddp_ignore_names(bare)
    assert str(err.value) == ("expert params ['weight'] sit on the DDP root module; wrap the model in a parent "
                              "module")


# =========================================================================== helpers used inside workers
def _moe_ffn(seed: int = 0, bias: bool = True, shared: int = 1, E: int = 4, k: int = 2):
    from mmoe.model.moe import MoEConfig, MoEFFN

    torch.manual_seed(seed)
    layer = MoEFFN(8, 12, MoEConfig(num_experts=E, top_k=k, num_shared_experts=shared), "swiglu", bias=bias,
                   causal=False, site="ffn", layer=0).double()
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.5)  # peaky routing
    return layer


def _moe_ffn_modality(seed: int = 0):
    """Decoder FFN with modality groups: experts 0-1 serve image tokens, 2-3 text (with ep=2 each EP rank holds one
    modality group, so every token travels to the rank of its own modality)."""
    from mmoe.model.moe import MoEConfig, MoEFFN

    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=4, top_k=1, hierarchy="modality", image_experts=2, num_shared_experts=1)
    layer = MoEFFN(8, 12, cfg, "swiglu", bias=True, causal=True, site="ffn", layer=0).double()
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.5)
    return layer


def _moa(seed: int = 0):
    from mmoe.model.moe import MoEConfig
    from mmoe.model.moe.attention import MoAAttention

    torch.manual_seed(seed)
    layer = MoAAttention(16, 8, 2, 4, MoEConfig(num_experts=4, top_k=2), bias=True, layer=1).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def _rope(B: int, T: int, hd: int):
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    f = torch.arange(T, dtype=torch.float64)[:, None] * inv
    emb = torch.cat([f, f], -1).expand(B, T, hd)
    return emb.cos(), emb.sin()


class _Holder(nn.Module):
    """Keeps the experts off the DDP root (DDP matches ignore names as 'module.param')."""

    def __init__(self, m):
        super().__init__()
        self.m = m


def _grads(module):
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in module.named_parameters()}


def _maxdiff(a, b) -> float:
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def _compare_layer(kind: str, rank: int, world: int, force_rank0: bool) -> dict:
    """Forward + backward of one EP layer vs the full layer on the global batch."""
    from mmoe.model.attention import AttnMask
    from mmoe.parallel import enable_expert_parallel, finalize_expert_grads
    from mmoe.parallel.expert_parallel import sharded_linears

    layer = {"ffn": _moe_ffn, "ffn_modality": _moe_ffn_modality, "moa": _moa}[kind]()
    D = 16 if kind == "moa" else 8
    ref = copy.deepcopy(layer)
    B, T = 2, 5
    g = torch.Generator().manual_seed(123)
    X = torch.randn(world * B, T, D, generator=g, dtype=torch.float64)
    G = torch.randn(world * B, T, D, generator=g, dtype=torch.float64)
    mask = torch.ones(world * B, T, dtype=torch.bool)
    mask[0, -2:] = False  # padding on rank 0 only: uneven token counts across ranks
    mask[-1, -1] = False
    if force_rank0:  # every token prefers experts 0 and 1, held by EP rank 0: rank 1 receives nothing
        X[..., 0] = X[..., 0].abs() + 1.0
        for m in (layer, ref):
            with torch.no_grad():
                m.router.gate.weight[:2, 0] = 20.0
                m.router.gate.weight[2:, 0] = -20.0
    holder = _Holder(layer)
    st = enable_expert_parallel(holder, world)
    st.grad_sync = "manual"
    sl = slice(rank * B, (rank + 1) * B)
    x = X[sl].clone().requires_grad_(True)
    xr = X.clone().requires_grad_(True)

    from mmoe.constants import MODALITY_IMAGE, MODALITY_TEXT

    modality = torch.full((world * B, T), MODALITY_TEXT, dtype=torch.long)
    modality[:, :2] = MODALITY_IMAGE  # two image tokens, then text, in every sequence
    modality[-1, :4] = MODALITY_IMAGE

    def run(m, inp, msk):
        if kind == "ffn":
            return m(inp, msk)
        if kind == "ffn_modality":
            rows = slice(None) if inp.shape[0] == world * B else sl
            return m(inp, msk, modality[rows])
        cos, sin = _rope(inp.shape[0], T, 4)
        return m(inp, cos, sin, AttnMask(None, True), token_mask=msk)

    y, r = run(layer, x, mask[sl])
    yr, rr = run(ref, xr, mask)
    loss = (y * G[sl]).sum()
    loss_ref = (yr * G).sum() / world  # L = (1/W) sum_r L_r
    loss.backward()
    loss_ref.backward()
    out = {"fwd": _maxdiff(y, yr[sl]), "dx": _maxdiff(x.grad / world, xr.grad[sl])}
    # counts: tokens received per local expert == global counts of this rank's experts
    El = 4 // world
    disp = layer.dispatcher
    gcounts = rr.expert_counts("kept")
    out["recv_counts_ok"] = bool(torch.equal(disp.last_recv_tokens_per_expert, gcounts[rank * El:(rank + 1) * El]))
    out["recv_tokens"] = int(disp.last_recv_tokens_per_expert.sum())
    # raw expert grads (negative control: W x the reference), then the gradient rule
    ex = {id(p) for gl in sharded_linears(layer) for p in (gl.weight, gl.bias) if p is not None}
    raw = {n: p.grad.clone() for n, p in layer.named_parameters() if id(p) in ex}
    finalize_expert_grads(holder)
    refg = _grads(ref)
    exp_diff, shared_diff, raw_ratio, none = 0.0, 0.0, [], []
    for n, p in layer.named_parameters():
        if p.grad is None:
            none.append(n)
            continue
        if id(p) in ex:
            rg = refg[n][rank * El:(rank + 1) * El]
            exp_diff = max(exp_diff, _maxdiff(p.grad, rg))
            if rg.abs().max() > 0:
                raw_ratio.append(float(raw[n].norm() / rg.norm()))
            full = [torch.empty_like(p.grad) for _ in range(world)]
            dist.all_gather(full, p.grad)  # gathered expert grads == full reference grad
            exp_diff = max(exp_diff, _maxdiff(torch.cat(full), refg[n]))
        else:
            gg = p.grad.clone()
            dist.all_reduce(gg)
            shared_diff = max(shared_diff, _maxdiff(gg / world, refg[n]))  # DDP average
    out.update(expert_grad=exp_diff, shared_grad=shared_diff, raw_ratio=raw_ratio, none_grads=none)
    out["local_expert_grad_norm"] = float(sum(p.grad.norm() ** 2 for n, p in layer.named_parameters()
                                              if id(p) in ex) ** 0.5)
    out["stats"] = dict(disp.stats)
    return out


# =========================================================================== training equivalence
def _tiny_decoder(seed: int = 0, aux_free: bool = True):
    from mmoe.model.decoder import Decoder, DecoderConfig
    from mmoe.model.moe import MoEConfig

    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=40, dim=16, n_layers=2, n_heads=8, n_kv_heads=2, hidden=24, max_seq_len=32,
                        tie_embeddings=True,
                        attn_moe=MoEConfig(num_experts=4, top_k=2), attn_moe_layers="0",
                        ffn_moe=MoEConfig(num_experts=4, top_k=2, num_shared_experts=1, aux_free_bias=aux_free,
                                          bias_update_rate=0.05),
                        ffn_moe_layers="all")
    m = Decoder(cfg).double()
    m.reset_parameters(std=0.2)
    return m


class _LM(nn.Module):
    def __init__(self, dec):
        super().__init__()
        self.model = dec

    def forward(self, ids):
        logits = self.model(ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _make_opt(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


def _bias_step(model, world: int | None):
    """module.update_router_biases: loads summed over data-parallel ranks, then the bias step."""
    from mmoe.model.moe import Router

    routers = [m for m in model.modules() if isinstance(m, Router) and m.cfg.aux_free_bias]
    if not routers:
        return
    loads = torch.cat([r.load_accum for r in routers])
    if world is not None:
        dist.all_reduce(loads)
    for r, load in zip(routers, loads.split([r.cfg.num_experts for r in routers])):
        r.update_bias(load)


def _train_compare(rank: int, world: int, ep: int, opt_kind: str, *, clip: float | None, steps: int = 3,
                   ckpt_dir: str | None = None, ac: bool = False) -> dict:
    from mmoe.parallel import clip_grad_norm_, enable_expert_parallel, finalize_expert_grads, wrap_ddp
    from mmoe.parallel.checkpoint import (consolidated_model, full_optimizer_state_dict, full_state_dict,
                                          shard_optimizer_state_dict, shard_state_dict)
    from mmoe.parallel.expert_parallel import expert_parameters

    ep_root = _LM(_tiny_decoder())
    ref = copy.deepcopy(ep_root)
    st = enable_expert_parallel(ep_root.model, ep)
    if ac:  # as MMoEModule.configure_model: EP first, then activation checkpointing (recompute in backward)
        from mmoe.training.block_wrappers import apply_activation_checkpointing
        assert apply_activation_checkpointing(ep_root.model) == apply_activation_checkpointing(ref.model) > 0
    ddp = wrap_ddp(ep_root)
    opt = _make_opt(opt_kind, ep_root.parameters())
    opt_ref = _make_opt(opt_kind, ref.parameters())
    B, T = 2, 9
    g = torch.Generator().manual_seed(7)
    out = {"loss": [], "loss_ref": [], "shared": [], "expert": [], "shared_sync": [], "grad_norm": []}
    ex_ids = {id(p) for p in expert_parameters(ep_root)}
    batches = [torch.randint(0, 40, (world * B, T), generator=g) for _ in range(steps + 1)]

    def step(root, model, optim, ids, is_ep):
        optim.zero_grad(set_to_none=True)
        if is_ep:
            loss = model(ids[rank * B:(rank + 1) * B])
            loss.backward()
            finalize_expert_grads(root)
            norm = clip_grad_norm_(root.parameters(), clip, module=root) if clip else None
        else:  # the same objective: mean over ranks of each rank's mean loss
            loss = torch.stack([model(ids[r * B:(r + 1) * B]) for r in range(world)]).mean()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(root.parameters(), clip) if clip else None
        optim.step()
        _bias_step(root, world if is_ep else None)
        return loss.detach(), norm

    def compare(tag_loss, loss, loss_ref):
        lt = loss.clone()
        dist.all_reduce(lt)
        out["loss"].append(float(lt / world))
        out["loss_ref"].append(float(loss_ref))
        refp = dict(ref.named_parameters())
        sd, ed = 0.0, 0.0
        for n, p in ep_root.named_parameters():
            if id(p) in ex_ids:
                sh = p.shape[0]
                lo = (rank % ep) * sh
                ed = max(ed, _maxdiff(p, refp[n][lo:lo + sh]))
            else:
                sd = max(sd, _maxdiff(p, refp[n]))
        for (n, b), (_, br) in zip(ep_root.named_buffers(), ref.named_buffers()):
            if n.endswith("expert_bias"):
                sd = max(sd, _maxdiff(b, br))
        out["shared"].append(sd)
        out["expert"].append(ed)
        # replicated weights bitwise identical across ranks
        flat = torch.cat([p.detach().flatten() for p in ep_root.parameters() if id(p) not in ex_ids])
        allf = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(allf, flat)
        out["shared_sync"].append(max(float((a - flat).abs().max()) for a in allf))

    for i in range(steps):
        loss, norm = step(ep_root, ddp, opt, batches[i], True)
        loss_ref, norm_ref = step(ref, ref, opt_ref, batches[i], False)
        if clip:
            out["grad_norm"].append((float(norm), float(norm_ref)))
        compare("step", loss, loss_ref)
    out["edp_identical"] = True
    if st.mesh.edp_size > 1:  # expert replicas in an EDP group stay identical
        for p in expert_parameters(ep_root):
            parts = [torch.empty_like(p) for _ in range(st.mesh.edp_size)]
            dist.all_gather(parts, p.detach().contiguous(), group=st.edp_group)
            out["edp_identical"] &= all(torch.equal(parts[0], q) for q in parts)
    if ckpt_dir is None:
        return out

    # ---- checkpoint: gather -> one file (rank 0) -> fresh model with other weights -> shard -> identical
    full = full_state_dict(ep_root)
    full_opt = full_optimizer_state_dict(opt, ep_root)
    path = os.path.join(ckpt_dir, "ckpt.pt")
    if rank == 0:
        torch.save({"state_dict": full, "opt": full_opt}, path)
    dist.barrier()
    refsd = ref.state_dict()
    out["ckpt_keys_match"] = sorted(full) == sorted(refsd)
    out["ckpt_vs_ref"] = max(_maxdiff(full[k], refsd[k]) for k in refsd)
    ex_names = [n for n, p in ep_root.named_parameters() if id(p) in ex_ids]
    out["ckpt_expert_shapes"] = sorted({tuple(full[k].shape) for k in ex_names})
    out["local_expert_shapes"] = sorted({tuple(p.shape) for p in expert_parameters(ep_root)})
    fresh = _LM(_tiny_decoder(seed=99))
    enable_expert_parallel(fresh.model, ep)
    fddp = wrap_ddp(fresh)
    fopt = _make_opt(opt_kind, fresh.parameters())
    ck = torch.load(path, weights_only=False)
    fresh.load_state_dict(shard_state_dict(fresh, ck["state_dict"]))
    fopt.load_state_dict(shard_optimizer_state_dict(fopt, fresh, ck["opt"]))
    out["restored_diff"] = max(_maxdiff(a, b) for a, b in zip(fresh.state_dict().values(),
                                                              ep_root.state_dict().values()))
    # one more step on the original and on the restored copy: identical (model + optimizer state restored)
    step(ep_root, ddp, opt, batches[steps], True)
    step(fresh, fddp, fopt, batches[steps], True)
    out["resume_diff"] = max(_maxdiff(a, b) for a, b in zip(fresh.state_dict().values(),
                                                            ep_root.state_dict().values()))
    # consolidated copy == the one-process reference model after the same steps
    step(ref, ref, opt_ref, batches[steps], False)
    cons = consolidated_model(ep_root.model)
    rsd = ref.model.state_dict()
    csd = cons.state_dict()
    out["consolidated_keys_match"] = sorted(csd) == sorted(rsd)
    out["consolidated_diff"] = max(_maxdiff(csd[k], rsd[k]) for k in rsd)
    with torch.no_grad():
        ids = batches[0]
        out["consolidated_fwd"] = _maxdiff(cons(ids).logits, ref.model(ids).logits)
    out["consolidated_dispatchers"] = sorted({type(m.dispatcher).__name__ for m in cons.modules()
                                              if hasattr(m, "dispatcher")})
    return out


# =========================================================================== the 2-process job
def _job2(rank: int, world: int, ckpt_dir: str) -> dict:
    torch.manual_seed(0)
    res = {}
    res["ffn"] = _compare_layer("ffn", rank, world, force_rank0=False)
    res["moa"] = _compare_layer("moa", rank, world, force_rank0=False)
    res["ffn_modality"] = _compare_layer("ffn_modality", rank, world, force_rank0=False)
    res["ffn_zero"] = _compare_layer("ffn", rank, world, force_rank0=True)
    res["moa_zero"] = _compare_layer("moa", rank, world, force_rank0=True)
    res["sgd_clip"] = _train_compare(rank, world, world, "sgd", clip=0.05, ckpt_dir=None)
    res["adamw"] = _train_compare(rank, world, world, "adamw", clip=None, ckpt_dir=ckpt_dir)
    res["adamw_clip"] = _train_compare(rank, world, world, "adamw", clip=0.3, ckpt_dir=None)
    res["adamw_ac"] = _train_compare(rank, world, world, "adamw", clip=0.3, steps=2, ac=True)
    # negative control: a per-rank (local) clip norm differs across ranks -> shared weights would drift
    res["local_norm_differs"] = _local_norm_differs(rank, world)
    res["guard"] = _guard_raises(rank, world)
    res["nonfinite_synced"] = _nonfinite_sync(rank, world)
    return res


def _nonfinite_sync(rank: int, world: int) -> bool:
    """fp16 overflow in rank 1's experts only: after the sync every rank sees it (GradScalers agree)."""
    from mmoe.parallel import enable_expert_parallel, finalize_expert_grads, wrap_ddp
    from mmoe.parallel.expert_parallel import expert_parameters, sync_nonfinite_expert_grads

    root = _LM(_tiny_decoder())
    enable_expert_parallel(root.model, world)
    ddp = wrap_ddp(root)
    ddp(torch.randint(0, 40, (2, 9))).backward()
    finalize_expert_grads(root)
    clean = sync_nonfinite_expert_grads(root)
    if rank == 1:
        expert_parameters(root)[0].grad.view(-1)[0] = float("inf")
    flagged = sync_nonfinite_expert_grads(root)
    grads = torch.cat([p.grad.flatten() for p in expert_parameters(root)])
    return (not clean) and flagged and not bool(torch.isfinite(grads).all())


def _local_norm_differs(rank: int, world: int) -> bool:
    from mmoe.parallel import enable_expert_parallel, finalize_expert_grads, wrap_ddp

    root = _LM(_tiny_decoder())
    enable_expert_parallel(root.model, world)
    ddp = wrap_ddp(root)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(rank))
    ddp(ids).backward()
    finalize_expert_grads(root)
    n = torch.nn.utils.clip_grad_norm_(root.parameters(), 1e9).reshape(1)
    allf = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(allf, n)
    return bool(allf[0] != allf[1])


def _guard_raises(rank: int, world: int) -> bool:
    from mmoe.parallel import enable_expert_parallel

    root = _LM(_tiny_decoder())
    enable_expert_parallel(root.model, world)  # no wrap_ddp / strategy: training must refuse
    try:
        root(torch.randint(0, 40, (2, 9)))
    except RuntimeError as e:
        return "ddp_ep" in str(e)
    return False


@pytest.fixture(scope="module")
def job2():
    with tempfile.TemporaryDirectory() as d:
        res = run_distributed(_job2, 2, d, timeout=150)
    return res


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["ffn", "moa", "ffn_modality"])
def test_layer_forward_backward_equals_single_process(job2, kind):
    """Every site's EP layer equals the full layer on the global batch, modality-aware routing included."""
    for rank, res in enumerate(job2):
        r = res[kind]
        assert r["fwd"] < TOL and r["dx"] < TOL, r
        assert r["shared_grad"] < TOL, r  # routers (+ shared experts, K/V): DDP average == reference
        assert r["expert_grad"] < TOL, r  # SUM over EDP / W == reference (also after gathering)
        assert r["recv_counts_ok"], r
        assert not r["none_grads"], r
        assert all(abs(x - 2.0) < 1e-9 for x in r["raw_ratio"]), r  # raw expert grad is W x reference
    assert job2[0][kind]["recv_tokens"] + job2[1][kind]["recv_tokens"] > 0
    if kind == "ffn_modality":  # top-1: EP rank 0 (experts 0-1) gets the 10 image tokens, rank 1 the 7 real text ones
        assert [job2[r][kind]["recv_tokens"] for r in (0, 1)] == [10, 7]


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["ffn_zero", "moa_zero"])
def test_zero_token_rank_no_hang_and_zero_grads(job2, kind):
    r0, r1 = job2[0][kind], job2[1][kind]
    assert r1["recv_tokens"] == 0 and r0["recv_tokens"] > 0  # all tokens went to rank 0's experts
    for r in (r0, r1):
        assert r["fwd"] < TOL and r["dx"] < TOL and r["shared_grad"] < TOL and r["expert_grad"] < TOL, r
        assert not r["none_grads"], r  # experts without tokens get zero gradients, not None
    assert r1["local_expert_grad_norm"] == 0.0


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["sgd_clip", "adamw", "adamw_clip", "adamw_ac"])
def test_training_steps_equal_single_process(job2, case):
    for res in job2:
        r = res[case]
        assert len(r["loss"]) == (2 if case == "adamw_ac" else 3)
        for a, b in zip(r["loss"], r["loss_ref"]):
            assert abs(a - b) < TOL, r
        assert max(r["shared"]) < TOL and max(r["expert"]) < TOL, r
        assert max(r["shared_sync"]) == 0.0, r  # replicated weights identical across ranks, bitwise
        for n, nr in r["grad_norm"]:
            assert abs(n - nr) < 1e-9 * max(1.0, nr), r  # one global clip norm == single-process norm


@pytest.mark.distributed
def test_clipping_needs_global_norm(job2):
    assert job2[0]["local_norm_differs"]  # negative control: local norms differ -> local clipping desyncs


@pytest.mark.distributed
def test_checkpoint_round_trip_restores_every_expert(job2):
    for res in job2:
        r = res["adamw"]
        assert r["ckpt_keys_match"] and r["ckpt_vs_ref"] < TOL, r  # one file == one-process state dict
        assert len(r["ckpt_expert_shapes"]) >= 3, r  # MoA q/o and FFN w_in/w_out
        assert all(s[0] == 4 for s in r["ckpt_expert_shapes"]), r  # full E=4 in the file ...
        assert all(s[0] == 2 for s in r["local_expert_shapes"]), r  # ... while each rank holds 2
        assert r["restored_diff"] == 0.0, r
        assert r["resume_diff"] == 0.0, r  # optimizer moments of every expert restored too
        assert r["consolidated_keys_match"] and r["consolidated_diff"] < TOL and r["consolidated_fwd"] < TOL, r
        assert r["consolidated_dispatchers"] == ["LocalDispatcher"], r


@pytest.mark.distributed
def test_expert_overflow_seen_by_every_rank(job2):
    assert all(res["nonfinite_synced"] for res in job2)


@pytest.mark.distributed
def test_training_without_gradient_handling_refuses(job2):
    assert all(res["guard"] for res in job2)


# =========================================================================== 4 processes: edp=2 x ep=2
def _job4(rank: int, world: int) -> dict:
    return {"sgd": _train_compare(rank, world, 2, "sgd", clip=0.05, steps=2)}


@pytest.mark.distributed
def test_four_ranks_edp2_ep2_equal_single_process():
    res = run_distributed(_job4, 4, timeout=150)
    for r in res:
        s = r["sgd"]
        assert max(s["shared"]) < TOL and max(s["expert"]) < TOL, s
        assert all(abs(a - b) < TOL for a, b in zip(s["loss"], s["loss_ref"])), s
        assert max(s["shared_sync"]) == 0.0 and s["edp_identical"], s


class _VLMLoss(nn.Module):
    def __init__(self, vlm):
        super().__init__()
        self.model = vlm

    def forward(self, ids, pixels):
        from mmoe.constants import IGNORE_INDEX
        from mmoe.training.module import lm_loss

        labels = ids.masked_fill(ids == 4, IGNORE_INDEX)
        out = self.model(ids, ids != 0, pixels, labels)
        return lm_loss(out.logits, out.labels) + sum(r.probs.sum() * 0 for r in out.routing)


def _text_only_rank_job(rank: int, world: int) -> dict:
    """Rank 0 trains on an image batch, rank 1 on a text-only one: the vision MoE all-to-alls must still pair up."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from test_vlm import tiny_vlm

    from mmoe.parallel import enable_expert_parallel, finalize_expert_grads, wrap_ddp

    root = _VLMLoss(tiny_vlm())
    enable_expert_parallel(root.model, world)
    ddp = wrap_ddp(root)
    g = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(2):
        if rank == 0:
            ids, pixels = torch.tensor([[1, 4, 7, 8, 9], [1, 4, 10, 11, 12]]), torch.randn(2, 3, 32, 32, generator=g)
        else:
            ids, pixels = torch.tensor([[1, 7, 8, 9, 10], [1, 13, 12, 11, 0]]), None
        loss = ddp(ids, pixels)
        loss.backward()
        finalize_expert_grads(root)
        losses.append(float(loss))
        with torch.no_grad():  # generation: same lockstep
            root.model.generate(ids[:1], torch.ones(1, ids.shape[1], dtype=torch.bool),
                                pixels[:1] if pixels is not None else None, max_new_tokens=2)
    vision_grads = [p.grad for p in root.model.vision.parameters()]
    return {"losses": losses, "always": root.model.always_encode_images,
            "vision_grads_present": all(g is not None for g in vision_grads)}


@pytest.mark.distributed
def test_text_only_batch_on_one_rank_does_not_hang_expert_parallel():
    res = run_distributed(_text_only_rank_job, 2, timeout=120)
    for r in res:
        assert r["always"] and r["vision_grads_present"], r
        assert all(math.isfinite(x) for x in r["losses"]), r


def test_ddp_ignore_list_holds_every_router_load_buffer():
    """The routers' per-rank `load_accum` buffers must stay out of DDP: its buffer broadcast at each forward
    would replace every rank's accumulated load with rank 0's (visible with gradient accumulation) before the
    aux-loss-free bias all-reduce. No expert is sharded here, so the list is exactly those buffers."""
    from mmoe.parallel.expert_parallel import ddp_ignore_names

    root = _LM(_tiny_decoder(aux_free=True))
    loads = sorted(n for n, _ in root.named_buffers() if n.endswith("load_accum"))
    assert len(loads) == 3  # every router has one: the two FFN routers and layer 0's MoA router
    assert sorted(ddp_ignore_names(root)) == loads


def test_parallel_package_resolves_its_names_lazily_from_their_modules():
    """`mmoe.parallel.X` is the object its submodule defines; an unknown name is an AttributeError naming it, and
    the torch-level names import without Lightning (seconds per spawned process)."""
    import importlib
    import subprocess
    import sys

    import mmoe.parallel as parallel
    for name in parallel.__all__:
        module = importlib.import_module(f"mmoe.parallel.{parallel._EXPORTS[name]}")
        assert getattr(parallel, name) is getattr(module, name), name
    with pytest.raises(AttributeError) as err:
        parallel.no_such_name  # noqa: B018
    assert str(err.value) == "module 'mmoe.parallel' has no attribute 'no_such_name'"
    code = ("import sys; from mmoe.parallel import enable_expert_parallel, build_mesh; "
            "print('lightning' in sys.modules, 'mmoe.parallel.strategy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]

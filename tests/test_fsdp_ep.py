"""FSDP2 + expert parallelism (`mmoe.parallel.fsdp`, strategy `fsdp_ep`) on CPU gloo processes, float64.

* shard2 x ep1, shard1 x ep2 (2 processes) and shard2 x ep2 (4 processes): the tiny all-MoE VLM (ViT, connector,
  MoA and decoder MoE) trained 3 AdamW steps with global-norm clipping and activation checkpointing equals one
  process holding every weight and stepping on the mean of the ranks' losses (the data-parallel objective),
  losses and every updated parameter; a text-only batch on one rank does not hang.
* sharded DCP checkpoint written at 4 processes (ep 2) resumes at 2 processes (ep 2, other sharding): the next
  step's loss equals the uninterrupted 4-process run's.
* an incompatible checkpoint is refused naming the tensor.
* `train.py fit ... --trainer.strategy fsdp_ep --trainer.devices 2` trains on CPU and exports.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn
from _dist_utils import export_vs_gathered, run_distributed

REPO = Path(__file__).resolve().parents[1]
STEPS, B, T, IMG, CLIP, LR, WD = 3, 2, 10, 16, 0.05, 0.01, 0.1
TOL = 1e-10


def _arch(dim: int = 16, aux_free: bool = False):
    from mmoe.model.connector import ConnectorConfig
    from mmoe.model.decoder import DecoderConfig
    from mmoe.model.moe import MoEConfig
    from mmoe.model.vision import VisionConfig
    from mmoe.model.vlm import VLMConfig

    def moe(**kw):
        return MoEConfig(num_experts=4, top_k=2, aux_free_bias=aux_free, **kw)

    return VLMConfig(
        vision=VisionConfig(image_size=IMG, patch_size=8, dim=16, depth=2, n_heads=2, mlp_ratio=2.0, moe=moe(),
                            moe_layers="all", feature_layer=-1),
        connector=ConnectorConfig(kind="moe_mlp", moe=moe(), pool=1),
        decoder=DecoderConfig(vocab_size=40, dim=dim, n_layers=2, n_heads=8, n_kv_heads=2, hidden=24,
                              max_seq_len=64, ffn_moe=moe(num_shared_experts=1), ffn_moe_layers="all",
                              attn_moe=moe(), attn_moe_layers="0"),
        image_token_id=4, pad_token_id=0, eos_token_id=2)


def _batch(step: int, part: int, images: bool = True):
    """Batch `part` of global step `step` (deterministic): ids, mask, labels, pixels (None: text only)."""
    g = torch.Generator().manual_seed(1000 * step + part)
    ids = torch.randint(5, 40, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    pix = torch.randn(B, 3, IMG, IMG, generator=g, dtype=torch.float64)
    if images:
        ids[:, 1] = 4
    else:
        pix = None
    return ids, torch.ones(B, T, dtype=torch.bool), labels, pix


def _loss(model, b, aux: float = 0.01):
    from mmoe.model.moe import balancing
    from mmoe.training.module import lm_loss
    out = model(b[0], b[1], b[3], b[2], logits_at_labels=True)
    loss = lm_loss(out.logits, out.labels)
    if aux:
        loss = loss + aux * sum(balancing.load_balance_loss(r) for r in out.routing if bool(r.token_mask.any()))
    return loss


def _model():
    from mmoe.model.vlm import MMoEVLM
    torch.manual_seed(0)
    return MMoEVLM(_arch()).double()


def _opt(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)


def _reference(world: int, steps: int = STEPS, aux: float = 0.01):
    """One process, every weight: each step minimises the mean of the `world` ranks' losses."""
    model = _model()
    opt = _opt(model)
    losses = []
    for s in range(steps):
        opt.zero_grad()
        loss = torch.stack([_loss(model, _batch(s, r), aux) for r in range(world)]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sharded(world: int, ep: int):
    from torch.distributed.device_mesh import init_device_mesh

    from mmoe.parallel.expert_parallel import enable_expert_parallel
    from mmoe.parallel.fsdp import apply_fsdp_ep
    model = _model()
    enable_expert_parallel(model, ep)
    info = apply_fsdp_ep(model, init_device_mesh("cpu", (world,)), activation_checkpointing=True)
    return model, info


def _step(model, opt, batch, world: int, aux: float = 0.01) -> float:
    from mmoe.parallel.fsdp import clip_grad_norm_fsdp_
    opt.zero_grad()
    loss = _loss(model, batch, aux)
    loss.backward()
    clip_grad_norm_fsdp_(model.parameters(), CLIP)
    opt.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return float(mean) / world


def _job_train(rank: int, world: int, ep: int, ckpt: str | None) -> dict:
    from torch.distributed.tensor import DTensor

    from mmoe.parallel import fsdp_checkpoint as fc
    model, info = _sharded(world, ep)
    opt = _opt(model)
    res: dict = {"units": info.units, "expert_units": info.expert_units,
                 "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
                 "checkpointed": sum(hasattr(m, "_checkpoint_wrapped_module") for m in model.modules())}
    res["losses"] = [_step(model, opt, _batch(s, rank), world) for s in range(STEPS)]
    res["bytes"] = _state_bytes(model, opt)
    full = fc.full_state_dict(model)
    if rank == 0:
        res["full"] = full
    if ckpt:  # save after STEPS, then the uninterrupted next step on the language loss only
        fc.save(model, [opt], ckpt)
        res["next_loss"] = _step(model, opt, _batch(STEPS, rank), world, aux=0.0)
    # a text-only batch on one rank (others have images): every FSDP unit and all-to-all still meets
    text = _batch(STEPS + 1, rank, images=rank != world - 1)
    res["text_only_loss"] = _step(model, opt, text, world)
    return res


def _state_bytes(model, opt) -> dict:
    """Bytes this rank really holds: parameter shards, gradient shards, optimizer moments."""
    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    params = list(model.parameters())
    return {"params": sum(nbytes(p) for p in params), "grads": sum(nbytes(p.grad) for p in params),
            "optimizer": sum(nbytes(v) for p in params for v in opt.state[p].values() if v.dim() > 0)}


def _job_resume(rank: int, world: int, ep: int, ckpt: str, saved_world: int) -> dict:
    from mmoe.parallel import fsdp_checkpoint as fc
    torch.manual_seed(123)  # different initial weights: everything must come from the checkpoint
    model, _ = _sharded(world, ep)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_()
    opt = _opt(model)
    fc.load_into(model, [opt], ckpt)
    # the same global batch as the saved run's next step: saved_world parts spread over `world` ranks
    per = saved_world // world
    parts = [_batch(STEPS, rank * per + i) for i in range(per)]
    batch = tuple(torch.cat([p[i] for p in parts]) for i in range(4))
    return {"next_loss": _step(model, opt, batch, world, aux=0.0)}


def _assert_equal_reference(res: list[dict], world: int) -> None:
    ref_losses, ref_sd = _reference(world)
    r0 = res[0]
    assert r0["all_dtensor"], "every parameter must be FSDP-sharded"
    assert r0["checkpointed"] == 4, r0["checkpointed"]  # 2 ViT blocks + 2 decoder layers
    for r in res:
        assert max(abs(a - b) for a, b in zip(r["losses"], ref_losses)) < TOL, (r["losses"], ref_losses)
    full = r0["full"]
    assert set(full) == set(ref_sd)
    diffs = {k: float((full[k] - v).abs().max()) for k, v in ref_sd.items()}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < TOL, (worst, diffs[worst])
    moved = max(float((v - _model().state_dict()[k]).abs().max()) for k, v in ref_sd.items())
    assert moved > 1e-3  # the comparison is not between untouched weights
    for r in res:
        assert torch.isfinite(torch.tensor(r["text_only_loss"])), r


@pytest.mark.distributed
@pytest.mark.parametrize("world,ep", [(2, 1), (2, 2)], ids=["fsdp_shard2_ep1", "fsdp_shard1_ep2"])
def test_fsdp_ep_two_processes_equal_single_process(world, ep):
    res = run_distributed(_job_train, world, ep, None, timeout=240)
    _PLANNER_RUN[(world, ep)] = res
    _assert_equal_reference(res, world)
    assert res[0]["expert_units"] == (0 if ep == 1 else 7)  # 2 ViT + connector + 2 decoder FFNs + MoA q, o


def test_fsdp_planner_matches_real_sharded_bytes():
    """mmoe.plan's parameter / gradient / optimizer bytes against what the sharded ranks of
    test_fsdp_ep_two_processes_equal_single_process hold (fp64, ep 2): the totals over ranks are exact, each
    rank within FSDP's uneven-chunk rounding."""
    from mmoe.plan import count_model, plan
    world, ep = 2, 2
    res = _PLANNER_RUN.get((world, ep))
    if res is None:
        res = run_distributed(_job_train, world, ep, None, timeout=240)
    p = plan(count_model(_arch()), world, 80, "fsdp_ep", ep, param_bytes=8)
    for key, want in (("params", p.params), ("grads", p.grads), ("optimizer", p.optimizer)):
        total = sum(r["bytes"][key] for r in res)
        assert total == pytest.approx(want * world, rel=1e-12), (key, total, want * world)
        for r in res:
            assert r["bytes"][key] == pytest.approx(want, rel=0.2), (key, r["bytes"][key], want)
    ddp = plan(count_model(_arch()), world, 80, "ddp_ep", ep, param_bytes=8)
    assert ddp.params > p.params  # ddp_ep replicates every non-expert weight


_PLANNER_RUN: dict = {}


@pytest.fixture(scope="module")
def fsdp_four(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("fsdp_ckpt") / "step3")
    return ckpt, run_distributed(_job_train, 4, 2, ckpt, timeout=400)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_ep_four_processes_shard2_ep2_equal_single_process(fsdp_four):
    _, res = fsdp_four
    _assert_equal_reference(res, 4)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_checkpoint_saved_at_4_resumes_at_2(fsdp_four):
    ckpt, res = fsdp_four
    out = run_distributed(_job_resume, 2, 2, ckpt, 4, timeout=240)
    for r in out:
        assert abs(r["next_loss"] - res[0]["next_loss"]) < 1e-9, (r, res[0]["next_loss"])


def _projected_logits(model, rank: int):
    """Rank `rank`'s loss <logits, gy> on its own token ids and a fixed random direction gy."""
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(rank))
    logits = model(ids).logits
    gy = torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(50 + rank))
    return (logits * gy).sum()


def _job_expert_banks(rank: int, world: int, reshard: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from _ep_models import decoder
    from mmoe.parallel.expert_parallel import SHARD_ATTR, enable_expert_parallel
    from mmoe.parallel.fsdp import apply_fsdp_ep, expert_units, mixed_precision
    from mmoe.parallel.fsdp_checkpoint import clean_name
    model = decoder()
    st = enable_expert_parallel(model, world)
    mp = mixed_precision(None, torch.float64)
    info = apply_fsdp_ep(model, init_device_mesh("cpu", (world,)), mp, reshard_after_forward=reshard)
    banks = expert_units(model)
    loss = _projected_logits(model, rank)
    after_forward = {type(p).__name__ for b in banks for p in b.parameters()}
    loss.backward()
    shards = {clean_name(n): getattr(m, SHARD_ATTR) for n, m in model.named_modules() if hasattr(m, SHARD_ATTR)}
    grads = {}
    for n, p in model.named_parameters():
        n = clean_name(n)
        owner = n.rsplit(".", 1)[0]
        full = p.grad.full_tensor()  # expert banks: full over EDP, i.e. this rank's experts
        grads[n] = (full, (shards[owner].lo, shards[owner].hi) if owner in shards else None)
    return {"units": info.units, "expert_units": info.expert_units, "grad_sync": st.grad_sync, "ep": info.ep is st,
            "policies": [b._get_fsdp_state()._fsdp_param_group.mp_policy == mp for b in banks],
            "placements": {str(p.placements) for b in banks for p in b.parameters() if isinstance(p, DTensor)},
            "after_forward": after_forward, "grads": grads}


@pytest.mark.distributed
@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "keep"])
def test_fsdp_expert_banks_two_processes_are_units_on_their_edp_group_with_data_parallel_mean_grads(reshard):
    """A decoder with MoA and MoE FFNs at ep 2 on 2 gloo processes (edp 1): each expert bank (FFN experts, lone
    MoA projections) is its own FSDP unit with the given policy, sharded on dim 1, resharded after forward as
    asked; every gradient is the one-process gradient of the data-parallel loss (1/W) sum_r L_r (expert banks:
    FSDP's sum over the one-rank EDP group times 1/ep, their rows of it)."""
    from _ep_models import decoder
    res = run_distributed(_job_expert_banks, 2, reshard, timeout=120)
    ref = decoder()
    (sum(_projected_logits(ref, rank) for rank in range(2)) / 2).backward()
    want = dict(ref.named_parameters())
    for r in res:
        assert (r["units"], r["expert_units"], r["grad_sync"], r["ep"]) == (7, 4, "fsdp", True)
        assert r["policies"] == [True] * 4 and r["placements"] == {"(Shard(dim=1),)"}
        assert r["after_forward"] == ({"DTensor"} if reshard else {"Parameter"})
        assert set(r["grads"]) == set(want)
        for n, (g, rows) in r["grads"].items():
            expect = want[n].grad if rows is None else want[n].grad[rows[0]:rows[1]]
            torch.testing.assert_close(g, expect, rtol=1e-10, atol=TOL, msg=n)


def _decoder_loss(model, rank: int):
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(rank))
    return model(ids).logits.square().mean()


def _connector_loss(model, rank: int):
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    return model(x).square().mean()


def _expert_parallel_step(model, rank: int, world: int, loss_fn, path: str):
    """ep = world on a 1-D FSDP mesh, one AdamW step on this rank's loss, DCP-saved to `path`."""
    from torch.distributed.device_mesh import init_device_mesh

    from mmoe.parallel import fsdp_checkpoint as fc
    from mmoe.parallel.expert_parallel import enable_expert_parallel
    from mmoe.parallel.fsdp import apply_fsdp_ep
    enable_expert_parallel(model, world)
    apply_fsdp_ep(model, init_device_mesh("cpu", (world,)))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    loss_fn(model, rank).backward()
    opt.step()
    fc.save(model, [opt], path)
    return model


def _job_expert_checkpoint(rank: int, world: int, path: str) -> dict:
    from _ep_models import Connector, decoder
    from mmoe.parallel import fsdp_checkpoint as fc
    from mmoe.parallel.fsdp import find_fsdp
    from mmoe.parallel.fsdp_strategy import cache_consolidated_fsdp
    _expert_parallel_step(Connector(), rank, world, _connector_loss, path + "_connector")  # experts with biases
    model = _expert_parallel_step(decoder(), rank, world, _decoder_loss, path)
    holder = SimpleNamespace(model=model)
    cache_consolidated_fsdp(holder)
    info = find_fsdp(model)
    copy = info.consolidated
    return {"full": fc.full_state_dict(model), "everywhere": fc.full_state_dict(model, rank0_only=False),
            "elsewhere": info.consolidated_elsewhere,
            "copy": None if copy is None else {k: v.clone() for k, v in copy.state_dict().items()}}


def _loads_the_reference_step(make, loss_fn, path) -> nn.Module:
    """`make()` loaded from the DCP checkpoint at `path` equals, weights and AdamW moments, `make()` after one
    AdamW step on the one-process data-parallel loss of ranks 0 and 1; returns that reference."""
    from mmoe.parallel import fsdp_checkpoint as fc
    ref = make()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05)
    (sum(loss_fn(ref, r) for r in range(2)) / 2).backward()
    ref_opt.step()
    fresh = make()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.05)
    fc.load_into(fresh, [fresh_opt], path)
    for (n, p), q in zip(ref.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=TOL, msg=n)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(fresh_opt.state[q][k], ref_opt.state[p][k], rtol=1e-10, atol=TOL, msg=n)
    return ref


@pytest.mark.distributed
def test_fsdp_expert_parallel_checkpoint_written_by_2_processes_loads_into_one_plain_model(tmp_path):
    """ep 2 on 2 gloo processes, one AdamW step on the data-parallel loss: the DCP checkpoint (experts as global
    tensors) loads into a plain one-process decoder and its AdamW with the weights and moments of the one-process
    reference step (also a connector-like site whose experts have 2-D biases); the gathered state dict (rank 0
    only, or every rank) and the export copy (rank 0) equal it."""
    from _ep_models import Connector, decoder
    res = run_distributed(_job_expert_checkpoint, 2, str(tmp_path / "ck"), timeout=120)
    _loads_the_reference_step(Connector, _connector_loss, tmp_path / "ck_connector")
    want = _loads_the_reference_step(decoder, _decoder_loss, tmp_path / "ck").state_dict()
    assert res[1]["full"] == {} and res[1]["copy"] is None and res[1]["elsewhere"] and not res[0]["elsewhere"]
    for got in (res[0]["full"], res[0]["everywhere"], res[1]["everywhere"], res[0]["copy"]):
        assert list(got) == list(want)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-10, atol=TOL, msg=k)


def test_fsdp_checkpoint_incompatible_model_refused(tmp_path):
    """The DCP layout (one process, no process group): a checkpoint of another model is refused naming the
    tensor; the same model round-trips."""
    from mmoe.model.vlm import MMoEVLM
    from mmoe.parallel import fsdp_checkpoint as fc
    fc.save(_model(), [], tmp_path / "ck")
    other = MMoEVLM(_arch(dim=32)).double()  # wider decoder: shapes differ
    msg = (r"incompatible with this model: 'state_dict\.connector\.proj\.experts\.w_in\.weight' "
           r"has shape \(4, 16, 16\) there, \(4, 16, 32\) here")
    with pytest.raises(ValueError, match=msg):
        fc.load_into(other, [], tmp_path / "ck")
    extra = {"state_dict": {"not.in.the.checkpoint": torch.zeros(2)}}
    with pytest.raises(ValueError) as err:
        fc.check_compatible(tmp_path / "ck", extra)
    assert str(err.value) == (f"checkpoint {tmp_path / 'ck'} is incompatible with this model: it has no tensor "
                              "'state_dict.not.in.the.checkpoint'")
    same = MMoEVLM(_arch()).double()
    fc.load_into(same, [], tmp_path / "ck")
    ref = _model().state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in same.state_dict().items())


@pytest.mark.parametrize("amsgrad", [False, True])
def test_fsdp_checkpoint_optimizer_template_steps_like_a_fresh_adam(amsgrad):
    """The state `ensure_optimizer_state` gives a parameter with none yet (what a checkpoint holds for a parameter
    that never had a gradient) is a fresh Adam(W)'s: stepping from it equals torch's own first step, weights and
    state; a parameter frozen by requires_grad gets none; other optimizers, and an optimizer holding a parameter
    the module lacks, are refused."""
    from mmoe.parallel.fsdp_checkpoint import ensure_optimizer_state
    grads = [torch.randn(3, 2, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(2)]
    runs = []
    for template in (True, False):
        w = nn.Parameter(torch.ones(3, 2, dtype=torch.float64))
        frozen = nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)
        opt = torch.optim.AdamW([w, frozen], lr=0.1, amsgrad=amsgrad)
        if template:
            ensure_optimizer_state(opt)
            assert frozen not in opt.state and float(opt.state[w]["step"]) == 0.0
        for g in grads:
            w.grad = g.clone()
            opt.step()
        runs.append((w.detach().clone(), opt.state[w]))
    (w_t, st_t), (w_ref, st_ref) = runs
    assert torch.equal(w_t, w_ref) and set(st_t) == set(st_ref)
    assert all(torch.equal(st_t[k], st_ref[k]) for k in st_ref)
    with pytest.raises(TypeError) as err:
        ensure_optimizer_state(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1))
    assert str(err.value) == "sharded optimizer checkpoints support Adam/AdamW, got SGD"
    from mmoe.parallel.fsdp_checkpoint import sharded_optimizer_state
    with pytest.raises(ValueError) as err:
        sharded_optimizer_state(nn.Linear(2, 2), torch.optim.AdamW([nn.Parameter(torch.ones(2))]))
    assert str(err.value) == "optimizer holds a parameter that is not in the module"
    frozen_bias = nn.Linear(2, 2)
    frozen_bias.bias.requires_grad_(False)  # in the optimizer, never stepped: saved with no state
    state = sharded_optimizer_state(frozen_bias, torch.optim.AdamW(frozen_bias.parameters()))
    assert state["bias"] == {} and set(state["weight"]) == {"step", "exp_avg", "exp_avg_sq"}


def test_fsdp_checkpoint_round_trips_adamw_state_in_one_process(tmp_path):
    """The DCP layout with an optimizer (one process, no process group): after two AdamW steps, a fresh model and
    optimizer loaded from the checkpoint hold the same weights, moments and step counts."""
    from mmoe.parallel import fsdp_checkpoint as fc
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        sum(p.square().sum() for p in model.parameters()).backward()
        opt.step()
    fc.save(model, [opt], tmp_path / "ck")
    fresh = _model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fc.load_into(fresh, [fresh_opt], tmp_path / "ck")
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    for p, q in zip(model.parameters(), fresh.parameters()):
        want, got = opt.state[p], fresh_opt.state[q]
        assert float(got["step"]) == 2.0 and set(got) == set(want)
        assert torch.equal(got["exp_avg"], want["exp_avg"]) and torch.equal(got["exp_avg_sq"], want["exp_avg_sq"])


def test_fsdp_checkpoint_names_and_strides_match_torch():
    """The DCP layout's helpers against torch: names lose the activation-checkpoint wrapper (what
    `checkpoint_wrapper` inserts), a global expert tensor gets the stride of a contiguous torch tensor, and an
    expert tensor without an expert axis is refused by shape."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from mmoe.parallel.fsdp_checkpoint import _contiguous_stride, _expert_global, clean_name
    wrapped = nn.Sequential(checkpoint_wrapper(nn.Sequential(nn.Linear(2, 2))))
    assert [clean_name(n) for n, _ in wrapped.named_parameters()] == ["0.0.weight", "0.0.bias"]
    assert [n for n, _ in wrapped.named_parameters()] != ["0.0.weight", "0.0.bias"]  # the wrapper is in the name
    for shape in [(4, 16, 32), (3,), (2, 1, 5, 7), ()]:
        assert _contiguous_stride(shape) == torch.empty(shape).stride(), shape
    with pytest.raises(ValueError) as err:
        _expert_global(torch.zeros(4), 4, mesh=None)
    assert str(err.value) == "expert tensor of shape (4,): expected (experts, ...) with >= 2 dims"


# =========================================================================== train.py's CLI
def _job_cli(rank: int, world: int, data_dir: str, config: str, root: str) -> dict:
    from mmoe.training.cli import cli_main

    os.chdir(REPO)
    cli = cli_main(["fit", "--config", str(REPO / "configs/default.yaml"), "--config", config,
                    "--data.data_dir", data_dir, "--trainer.devices", "2", "--trainer.strategy", "fsdp_ep",
                    "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                    "--trainer.gradient_clip_val", "1.0", "--model.activation_checkpointing", "true",
                    "--model.parallel.ep_size", "2", "--trainer.default_root_dir", root,
                    "--export_dir", os.path.join(root, "export")])
    from mmoe.parallel.fsdp_checkpoint import full_state_dict
    full = full_state_dict(cli.model.model)
    out = {"strategy": type(cli.trainer.strategy).__name__, "step": int(cli.trainer.global_step)}
    # Lightning resume from the sharded (DCP) "last" checkpoint ModelCheckpoint wrote, one step further
    ckpts = sorted(str(p.parent) for p in Path(root).rglob(".metadata"))
    out["ckpts"] = ckpts
    if ckpts:
        again = cli_main(["fit", "--config", str(REPO / "configs/default.yaml"), "--config", config,
                          "--data.data_dir", data_dir, "--trainer.devices", "2", "--trainer.strategy", "fsdp_ep",
                          "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                          "--trainer.max_steps", "3", "--model.parallel.ep_size", "2",
                          "--model.parallel.sharded_init", "true",  # meta build, shards filled, then resumed
                          "--trainer.default_root_dir", root + "_resumed", "--ckpt_path", ckpts[-1],
                          "--export_dir", os.path.join(root, "export_resumed")])
        out["resumed_step"] = int(again.trainer.global_step)
    if rank == 0:
        out.update(export_vs_gathered(os.path.join(root, "export"), full))
    return out


@pytest.mark.distributed
def test_train_py_cli_fsdp_ep_two_processes(tiny_data, tiny_config, tmp_path):
    res = run_distributed(_job_cli, 2, str(tiny_data), str(tiny_config), str(tmp_path / "run"), timeout=240,
                          init_pg=False)
    for r in res:
        assert r["strategy"] == "FSDPExpertParallelStrategy" and r["step"] == 2, r
        assert r["ckpts"] and r["resumed_step"] == 3, r  # the DCP checkpoint resumed through Lightning
    assert res[0]["export_diff"] == 0.0 and res[0]["export_expert_rows"] == [4, 8], res[0]


def test_fsdp_bad_sizes_are_refused_naming_the_field():
    from mmoe.parallel.mesh import ParallelDims
    from mmoe.plan import count_model, plan
    with pytest.raises(ValueError, match=r"model.parallel.ep_size=3 must divide the world size 4"):
        ParallelDims(4, 3)
    with pytest.raises(ValueError, match=r"--ep 3 must divide --gpus 8"):
        plan(count_model(_arch()), 8, 80, "fsdp_ep", 3)
    with pytest.raises(ValueError, match=r"--strategy must be ddp_ep or fsdp_ep"):
        plan(count_model(_arch()), 8, 80, "zero3", 2)


def test_fsdp_plan_cli_says_whether_cumo_large_fits(capsys):
    from mmoe.plan import main
    assert main(["--config", str(REPO / "configs/cumo_large.yaml"), "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "strategy fsdp_ep" in out and "FITS" in out and "DOES NOT FIT" not in out
    assert main(["--config", str(REPO / "configs/cumo_large.yaml"), "--gpus", "8", "--gpu-mem", "80",
                 "--strategy", "ddp_ep"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


# =========================================================================== root unit, bf16 compute
def _root_params(model) -> dict:
    """Parameters the FSDP root unit manages itself (not inside a child FSDP unit), by name."""
    from torch.distributed.fsdp import FSDPModule
    inner = {id(p) for m in model.modules() if isinstance(m, FSDPModule) and m is not model for p in m.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) not in inner}


def _job_root_bf16(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from mmoe.parallel.fsdp import apply_fsdp_ep, mixed_precision
    from mmoe.parallel.fsdp_checkpoint import clean_name
    from mmoe.training.module import lm_loss
    model = _model().float()
    apply_fsdp_ep(model, init_device_mesh("cpu", (world,)), mixed_precision(torch.bfloat16, torch.float32),
                  activation_checkpointing=True)
    ids, mask, labels, pix = _batch(0, rank)
    out = model(ids, mask, pix.float(), labels, logits_at_labels=True)  # a VLMOutput dataclass
    root = _root_params(model)
    res = {"root_names": sorted(root), "root_sharded_after_forward": [n for n, p in root.items()
                                                                       if isinstance(p, DTensor)]}
    lm_loss(out.logits, out.labels).backward()
    grads = {clean_name(n): p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    res["missing_grads"] = [n for n, p in model.named_parameters() if p.grad is None]
    if rank == 0:
        res["grads"] = grads
    return res


@pytest.mark.distributed
def test_fsdp_root_unit_keeps_weights_after_forward_bf16_backward_through_dataclass_output():
    """The root FSDP unit (embeddings, head, norms) is not resharded after forward: FSDP2 does not look inside
    the VLMOutput dataclass to unshard the root before backward. Two gloo processes, fp32 master weights, bf16
    compute / fp32 reductions: after forward the root's weights are unsharded, and backward gives every weight
    a gradient close (bf16) to the one-process fp32 gradient of the mean of the ranks' losses."""
    from mmoe.training.module import lm_loss
    res = run_distributed(_job_root_bf16, 2, timeout=240)
    for r in res:
        assert r["root_names"] and not r["root_sharded_after_forward"], r["root_sharded_after_forward"]
        assert not r["missing_grads"], r["missing_grads"]
    assert any("embed" in n for n in res[0]["root_names"]), res[0]["root_names"]
    ref = _model().float()
    loss = 0.0
    for rank in range(2):
        ids, mask, labels, pix = _batch(0, rank)
        out = ref(ids, mask, pix.float(), labels, logits_at_labels=True)
        loss = loss + lm_loss(out.logits, out.labels) / 2
    loss.backward()
    got = res[0]["grads"]
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(got) == set(ref_grads)
    for n, g in ref_grads.items():
        if float(g.norm()) > 1e-6:
            rel = float((got[n] - g).norm() / g.norm())
            assert rel < 0.1, (n, rel)  # bf16 compute; a missing or mis-scaled gradient is >= 0.5 off


@pytest.mark.distributed
@pytest.mark.parametrize("extra", [[], ["--sharded-init"]], ids=["built", "sharded_init"])
def test_fsdp_cuda_check_rehearses_on_cpu(extra):
    """benchmarks/fsdp_ep_cuda_check.py --device cpu (gloo, bf16 compute) runs the GPU check's path and says ok
    (with --sharded-init: the FSDP model filled shard by shard equals the reference's weights)."""
    import subprocess
    import sys

    from _dist_utils import free_port
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(REPO / "benchmarks/fsdp_ep_cuda_check.py"), "--device", "cpu",
                          "--dim", "32", "--layers", "2", *extra], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok", out.stdout
    if extra:
        assert '"sharded_init_equal": true' in out.stdout, out.stdout


# =========================================================================== global-batch balance maths
def _balance_module():
    from mmoe.training.config import BalanceConfig, LossCoefs, ParallelConfig
    from mmoe.training.module import MMoEModule
    torch.manual_seed(0)
    coefs = [LossCoefs(balance=0.0, z=0.0, device=1.0) for _ in range(4)]
    module = MMoEModule(arch=_arch(aux_free=True), balance=BalanceConfig(*coefs), parallel=ParallelConfig(ep_size=2))
    return module.double().train()


def _balance_step(module, batches) -> dict:
    """Device balance losses (per site), router-gate gradients of their sum, router biases after one update."""
    from mmoe.model.moe import Router
    outs = [module.model(b[0], b[1], b[3], b[2], logits_at_labels=True) for b in batches]
    routing = [r for o in outs for r in o.routing]
    aux, parts = module.balancing_loss(routing)
    aux.backward()
    gates = {n: m.gate.weight.grad.clone() for n, m in module.model.named_modules() if isinstance(m, Router)}
    module.update_router_biases()
    biases = {n: m.expert_bias.clone() for n, m in module.model.named_modules()
              if isinstance(m, Router) and m.cfg.aux_free_bias}
    return {"parts": {k: float(v) for k, v in parts.items()}, "gates": gates, "biases": biases}


def _job_balance(rank: int, world: int) -> dict:
    from mmoe.model.moe import balancing_loss
    module = _balance_module()
    batch = _batch(0, rank)
    local = module.model(batch[0], batch[1], batch[3], batch[2], logits_at_labels=True)
    per_rank = [float(balancing_loss("device", r, 2)) for r in local.routing]  # this rank's batch alone
    module.zero_grad()
    for m in module.model.modules():  # forget the loads of the probe forward
        if hasattr(m, "load_accum"):
            m.load_accum.zero_()
    res = _balance_step(module, [batch])
    for g in res["gates"].values():  # the data-parallel mean DDP / FSDP take of every gradient
        dist.all_reduce(g)
        g.div_(world)
    res["per_rank"] = per_rank
    return res


@pytest.mark.distributed
def test_fsdp_ddp_ep_device_balance_loss_and_aux_free_bias_use_the_global_batch():
    """Under ddp_ep / fsdp_ep (ep_size 2) every rank's device balance loss, the data-parallel mean of its
    gradient, and the aux-free bias update equal one process on the concatenated batch (2 gloo processes,
    float64) - the training module reduces expert loads and probability sums over all ranks."""
    res = run_distributed(_job_balance, 2, timeout=240)
    ref_module = _balance_module()
    ref = _balance_step(ref_module, [tuple(torch.cat([_batch(0, r)[i] for r in range(2)]) for i in range(4))])
    assert ref["parts"] and all(k.endswith("/device") for k in ref["parts"])
    for r in res:
        assert set(r["parts"]) == set(ref["parts"])
        for k, v in ref["parts"].items():
            assert abs(r["parts"][k] - v) < TOL, (k, r["parts"][k], v)
        for k, g in ref["gates"].items():
            assert float((r["gates"][k] - g).abs().max()) < TOL, k
        for k, b in ref["biases"].items():
            assert torch.equal(r["biases"][k], b), (k, r["biases"][k], b)
    assert any(float(b.abs().max()) > 0 for b in ref["biases"].values())  # the update moved something
    # the comparison is not vacuous: a rank's own batch gives a different device loss than the global one
    ref_layers = [float(v) for v in ref["parts"].values()]
    assert max(abs(a - b) for a, b in zip(res[0]["per_rank"], res[1]["per_rank"])) > 1e-6, ref_layers


# =========================================================================== sharded init (no rank holds the model)
def _job_sharded_init(rank: int, world: int, ep: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from mmoe.model.vlm import MMoEVLM
    from mmoe.parallel.expert_parallel import enable_expert_parallel
    from mmoe.parallel.fsdp import apply_fsdp_ep
    from mmoe.parallel.fsdp_checkpoint import clean_name, full_state_dict
    from mmoe.parallel.sharded_init import materialize_sharded, record_build
    torch.manual_seed(0)
    rec = record_build(lambda: MMoEVLM(_arch()))
    model = rec.model
    assert all(p.is_meta for p in model.parameters())
    enable_expert_parallel(model, ep)
    apply_fsdp_ep(model, init_device_mesh("cpu", (world,)), activation_checkpointing=True)
    stats = materialize_sharded(model, rec, "cpu")
    res = {"stats": stats, "local_param_bytes": sum(p.to_local().numel() * p.element_size()
                                                    for p in model.parameters())}
    res["full"] = full_state_dict(model)
    res["buffers"] = {clean_name(n): b.clone() for n, b in model.named_buffers()}
    ids, mask, labels, pix = _batch(0, rank)
    out = model(ids, mask, pix.float(), labels, logits_at_labels=True)
    res["loss"] = float(_loss_from(out))
    return res


def _loss_from(out):
    from mmoe.training.module import lm_loss
    return lm_loss(out.logits, out.labels)


@pytest.mark.distributed
def test_fsdp_sharded_init_equals_ordinary_build():
    """model.parallel.sharded_init: built on the meta device, EP-sliced and FSDP-sharded over 2 gloo processes
    (ep 2), then filled shard by shard - the gathered parameters and every buffer equal the ordinary build
    with the same seed exactly, each rank holds ~1/W of the parameter bytes, the replay's scratch never
    exceeds the largest single tensor, and the forward matches the ordinary model."""
    from mmoe.model.vlm import MMoEVLM
    torch.manual_seed(0)
    ref = MMoEVLM(_arch())
    want = ref.state_dict()
    res = run_distributed(_job_sharded_init, 2, 2, timeout=240)
    full = res[0]["full"]
    assert set(full) == set(want)
    bad = [k for k, v in want.items() if not torch.equal(full[k], v)]
    assert not bad, bad[:5]
    total = sum(p.numel() * p.element_size() for p in ref.parameters())
    largest = max(t.numel() * t.element_size() for t in list(ref.parameters()) + list(ref.buffers()))
    for rank, r in enumerate(res):
        assert r["local_param_bytes"] <= 1.2 * total / 2, (r["local_param_bytes"], total)
        assert r["stats"]["peak_bytes"] <= largest, (r["stats"], largest)
        buffers = dict(ref.named_buffers())
        assert set(r["buffers"]) == set(buffers)
        assert all(torch.equal(r["buffers"][k], v) for k, v in buffers.items())
        ids, mask, labels, pix = _batch(0, rank)
        want_loss = float(_loss_from(ref(ids, mask, pix.float(), labels, logits_at_labels=True)))
        assert abs(r["loss"] - want_loss) < 1e-5, (r["loss"], want_loss)
    assert sum(r["local_param_bytes"] for r in res) == total


def test_fsdp_sharded_init_refuses_what_it_cannot_initialise():
    from mmoe.training.config import ParallelConfig, StageConfig
    from mmoe.training.module import MMoEModule
    with pytest.raises(ValueError, match=r"sharded_init=true does not support model.stage.init_from"):
        MMoEModule(arch=_arch(), stage=StageConfig(init_from="x.ckpt"), parallel=ParallelConfig(sharded_init=True))
    module = MMoEModule(arch=_arch(), parallel=ParallelConfig(sharded_init=True))
    assert all(p.is_meta for p in module.model.parameters())
    module._trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace())  # e.g. ddp / single device
    with pytest.raises(ValueError, match=r"model.parallel.sharded_init=true needs --trainer.strategy fsdp_ep"):
        module.configure_model()


# =========================================================================== streaming upcycling into the shards
def _write_dense_checkpoints(root: Path) -> tuple[str, str]:
    """A tiny dense Llama (transformers save_pretrained) and a tiny dense timm ViT (.safetensors) that fit
    `_arch` (decoder dim 16, hidden 24, 8 / 2 heads, vocab 40; ViT dim 16, depth 2, 2 heads, mlp 2x)."""
    import transformers
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, vocab_size=40, max_position_embeddings=64)
    llama = transformers.LlamaForCausalLM(cfg)
    vit = VisionTransformer(img_size=IMG, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                            num_classes=0)
    with torch.no_grad():  # away from the default init, so a tensor left at its init cannot pass as loaded
        for p in list(llama.parameters()) + list(vit.parameters()):
            p.normal_(0.0, 0.15)
    llama.save_pretrained(root / "llama")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(root / "vit.safetensors"))
    return str(root / "llama"), str(root / "vit.safetensors")


def _stream_arch(vit: str):
    arch = _arch()
    arch.decoder.attn_moe = None  # MoA upcycling is not streamed (refused)
    arch.vision.checkpoint = vit
    return arch


def _job_stream(rank: int, world: int, ep: int, llama: str, vit: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from mmoe.parallel.fsdp import apply_fsdp_ep
    from mmoe.parallel.fsdp_checkpoint import full_state_dict
    from mmoe.parallel.sharded_load import fill_sharded_module
    from mmoe.training.config import ParallelConfig, StageConfig
    from mmoe.training.module import MMoEModule
    torch.manual_seed(0)
    module = MMoEModule(arch=_stream_arch(vit), stage=StageConfig(hf_decoder=llama),
                        parallel=ParallelConfig(ep_size=ep, sharded_init=True))
    assert all(p.is_meta for p in module.model.parameters())
    module.configure_model()  # expert parallel (no trainer here)
    apply_fsdp_ep(module.model, init_device_mesh("cpu", (world,)))
    stats = fill_sharded_module(module, "cpu")  # what the fsdp_ep strategy runs after sharding
    return {"stats": stats, "full": full_state_dict(module.model)}


@pytest.mark.distributed
@pytest.mark.parametrize("world,ep", [(2, 1), (2, 2), pytest.param(4, 2, marks=pytest.mark.slow)],
                         ids=["fsdp_shard2_ep1", "fsdp_shard1_ep2", "fsdp_shard2_ep2"])
def test_fsdp_sharded_init_streams_hf_decoder_and_vit_upcycled_equal_ordinary_load(tmp_path, world, ep):
    """sharded_init + stage.hf_decoder (tiny Llama) + vision.checkpoint (tiny timm ViT .safetensors) on 2 (4)
    gloo processes: tensors read one at a time into each rank's shards, dense FFNs / MLPs upcycled slice-wise
    into the (EP- and FSDP-sharded) experts, shared experts silenced - gathered, equal to the ordinary
    unsharded load (MMoEModule without sharded_init, same seed) exactly."""
    from mmoe.training.config import StageConfig
    from mmoe.training.module import MMoEModule
    llama, vit = _write_dense_checkpoints(tmp_path)
    torch.manual_seed(0)
    want = MMoEModule(arch=_stream_arch(vit), stage=StageConfig(hf_decoder=llama)).model.state_dict()
    res = run_distributed(_job_stream, world, ep, llama, vit, timeout=400)
    assert res[0]["stats"]["loaded"]["decoder"]["upcycled"] == 6  # 2 layers x gate, up, down
    assert res[0]["stats"]["loaded"]["vision"]["upcycled"] == 4  # 2 blocks x fc1, fc2
    full = res[0]["full"]
    assert set(full) == set(want)
    bad = [k for k, v in want.items() if not torch.equal(full[k], v)]
    assert not bad, bad[:5]
    from safetensors.torch import load_file
    fc1 = load_file(vit)["blocks.0.mlp.fc1.weight"]
    assert torch.equal(full["vision.vit.blocks.0.mlp.moe.experts.w_in.weight"][3], fc1.t())  # really upcycled


def test_fsdp_sharded_init_refuses_what_it_cannot_stream(tmp_path):
    from mmoe.training.config import ParallelConfig, StageConfig
    from mmoe.training.module import MMoEModule
    llama, vit = _write_dense_checkpoints(tmp_path)
    sharded = ParallelConfig(sharded_init=True)
    with pytest.raises(ValueError, match=r"does not upcycle MoA attention \(model.arch.decoder.attn_moe\)"):
        MMoEModule(arch=_arch(), stage=StageConfig(hf_decoder=llama), parallel=sharded)
    pt = tmp_path / "vit.pt"
    torch.save({}, pt)
    with pytest.raises(ValueError, match=r"streams .safetensors vision checkpoints only; model.arch.vision.checkpoint"):
        MMoEModule(arch=_stream_arch(str(pt)), parallel=sharded)
    redrawn = _stream_arch(vit)
    redrawn.vision.moe.upcycle_reinit = 0.5
    with pytest.raises(ValueError, match=r"streams exact expert copies: model.arch.vision.moe.upcycle_reinit=0.5"):
        MMoEModule(arch=redrawn, parallel=sharded)
    from mmoe.parallel.sharded_load import check_streamable
    redrawn_ffn = _arch()
    redrawn_ffn.decoder.ffn_moe.upcycle_reinit = 0.25
    with pytest.raises(ValueError) as err:
        check_streamable(redrawn_ffn, StageConfig())
    assert str(err.value) == ("model.parallel.sharded_init=true streams exact expert copies: model.arch.decoder."
                              "ffn_moe.upcycle_reinit=0.25 is not supported (load without sharded_init)")
    with_connector = _arch()
    with_connector.connector.checkpoint = str(pt)
    with pytest.raises(ValueError) as err:
        check_streamable(with_connector, StageConfig())
    assert str(err.value) == "model.parallel.sharded_init=true does not stream model.arch.connector.checkpoint"
    import json
    cfg = json.loads((Path(llama) / "config.json").read_text())
    (Path(llama) / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral", "num_local_experts": 4,
                                                         "num_experts_per_tok": 2}))
    with pytest.raises(ValueError, match=r"does not stream MoE sources: model.stage.hf_decoder=.* mixtral"):
        MMoEModule(arch=_stream_arch(vit), stage=StageConfig(hf_decoder=llama), parallel=sharded)


def _replayed(rec) -> tuple[dict, dict]:
    """{state name: final value} as the replay of `rec` hands them over (cloned), and the replay's stats."""
    from mmoe.parallel.sharded_init import replay
    got: dict = {}
    stats = replay(rec, lambda name, v: got.__setitem__(name, v.clone()))
    return got, stats


@pytest.mark.parametrize("preset", ["tiny", "default"])
def test_fsdp_sharded_init_replay_equals_ordinary_build_of_presets(preset):
    """One process: the recorded meta build of a preset (timm ViT, MoE everywhere), replayed, hands every
    parameter and buffer exactly the ordinary build's value (same seed), holding one full tensor at a time."""
    from mmoe.interop.factory import model_preset
    from mmoe.model.vlm import MMoEVLM
    from mmoe.parallel.sharded_init import record_build
    arch = model_preset(preset)
    torch.manual_seed(3)
    ref = MMoEVLM(arch)
    want = {**dict(ref.named_buffers()), **ref.state_dict()}
    torch.manual_seed(3)
    rec = record_build(lambda: MMoEVLM(arch))
    got, stats = _replayed(rec)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    total = sum(v.numel() * v.element_size() for v in want.values())
    assert stats["peak_bytes"] == stats["largest_bytes"] < total / 4, (stats, total)  # one tensor at a time


@pytest.mark.parametrize("view", ["contiguous", "transposed", "every_other_row", "every_other_column", "expanded",
                                  "size_one_dim_smallest_stride", "unsqueezed", "row_slice"])
def test_fsdp_sharded_init_density_matches_the_addressed_elements(view):
    """The replay's dense-view test (`_is_dense`: may a view be filled as the whole tensor?) against brute force:
    a view is dense and non-overlapping exactly when the storage offsets it addresses are 0..numel-1 once each.
    And `_ref` counts a storage's elements for 1-byte dtypes too (bool masks are buffers)."""
    import itertools

    from mmoe.parallel.sharded_init import _is_dense, _ref
    base = torch.empty(64)
    t = {"contiguous": base[:12].view(4, 3), "transposed": base[:12].view(4, 3).t(),
         "every_other_row": base[:12].view(4, 3)[::2], "every_other_column": base[:12].view(3, 4)[:, ::2],
         "expanded": base[:3].view(3, 1).expand(3, 4),
         "size_one_dim_smallest_stride": base.as_strided((1, 3, 2), (0, 4, 2)),
         "unsqueezed": base[:6].view(2, 3).unsqueeze(1), "row_slice": base[:12].view(4, 3)[1:3]}[view]
    offsets = sorted(sum(i * st for i, st in zip(idx, t.stride())) for idx in itertools.product(*map(range, t.shape)))
    assert _is_dense(tuple(t.shape), t.stride()) == (offsets == list(range(t.numel()))), view
    mask = torch.zeros(6, dtype=torch.bool)
    assert _ref(mask).nelem == 6 and _ref(mask).covers_storage and not _ref(mask[2:]).covers_storage


def test_fsdp_sharded_init_replays_outputs_by_keyword_tensor_lists_self_reads_and_freed_temporaries():
    """Build steps the presets do not take, replayed exactly: a parameter written through `out=`, an in-place op
    whose `self` is a tensor list, a fill whose value is read from the tensor it overwrites, and temporaries
    dropped at once (random draws, unread outputs), whose storage addresses would come back for later tensors."""
    from mmoe.parallel.sharded_init import record_build

    class Unusual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            with torch.no_grad():
                for _ in range(30):
                    torch.empty(5).normal_()
                    torch.empty(5)  # made and dropped: an output no later op reads
                self.c = torch.nn.Parameter(torch.ones(5))
                self.a = torch.nn.Parameter(torch.empty(4))
                self.b = torch.nn.Parameter(torch.empty(4))
                torch.mul(torch.arange(4.0), 3.0, out=self.a)
                self.b.normal_()
                torch._foreach_mul_([self.a, self.b], 2.0)
                self.level = torch.nn.Parameter(torch.empty(3))
                self.level.copy_(torch.arange(3.0))
                self.level.fill_(self.level[1])

    torch.manual_seed(1)
    want = dict(Unusual().state_dict())
    assert torch.equal(want["a"], torch.tensor([0.0, 6.0, 12.0, 18.0])) and torch.equal(want["level"], torch.ones(3))
    torch.manual_seed(1)
    got, _ = _replayed(record_build(Unusual))
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())


def test_fsdp_sharded_init_skips_superseded_writes_and_refuses_dtype_views():
    """The liveness pass: a deterministic write overwritten before anything reads it is not replayed (only the
    last fill runs). A storage read under two dtypes cannot be replayed and is refused naming both."""
    from mmoe.parallel.sharded_init import record_build, replay

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(4))
            with torch.no_grad():
                self.w.fill_(1.0)
                self.w.fill_(2.0)

    rec = record_build(Twice)
    assert [e.needed for e in rec.events if e.extract is None and "fill_" in str(e.func)] == [False, True]
    got, _ = _replayed(rec)
    assert torch.equal(got["w"], torch.full((4,), 2.0))

    class Bits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(4))
            with torch.no_grad():
                self.w.normal_()
            self.register_buffer("bits", self.w.detach().view(torch.int32).clone())

    with pytest.raises(NotImplementedError) as err:
        replay(record_build(Bits), lambda n, v: None)
    assert str(err.value) == "sharded init: a storage read as torch.float32 and torch.int32 (dtype views)"


def test_fsdp_sharded_init_replays_constants_and_refuses_outside_meta_tensors():
    """A real tensor the build reads and registers as a buffer is never written by a recorded op: the replay must
    still hand it to the sink (before any op runs). A build reading meta tensors made outside it, or returning a
    module made outside the recording, is refused with a message naming what to do / the tensor."""
    from mmoe.parallel.sharded_init import record_build
    scale = torch.tensor([3.0, 0.5])

    class Scaled(torch.nn.Module):
        def __init__(self, extra=None):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(4, 2))
            torch.nn.init.normal_(self.w)
            with torch.no_grad():
                self.w.mul_(scale if extra is None else extra)
            self.register_buffer("scale", scale if extra is None else extra)  # the factor w was scaled by
            self.twice = torch.nn.Parameter(self.w.detach() * 2)  # reads w after w is complete
            halves = torch.empty(4, dtype=torch.float64)  # filled in two slices, not float32
            halves[:2].fill_(1.0)
            halves[2:].fill_(2.0)
            self.register_buffer("halves", halves)
            self.register_buffer("ones", torch.empty(3, dtype=torch.float64).fill_(1.0))  # one op fills it all
            self.copied = torch.nn.Parameter(torch.empty(4, 2))
            with torch.no_grad():
                self.copied.copy_(self.twice)  # overwrites all of it from another tensor

    torch.manual_seed(1)
    want = dict(Scaled().state_dict())
    assert torch.equal(want["halves"], torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64))
    torch.manual_seed(1)
    got, _ = _replayed(record_build(Scaled))
    assert set(got) == set(want) == {"w", "scale", "twice", "halves", "ones", "copied"}
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in want.items())
    assert torch.equal(got["scale"], scale)
    def only_a_constant():  # one recorded op, which reads the constant and writes nothing of the model
        m = torch.nn.Module()
        m.register_buffer("scale", scale)
        m.scale.sum()
        return m

    got, _ = _replayed(record_build(only_a_constant))
    assert list(got) == ["scale"] and torch.equal(got["scale"], scale)
    outside = torch.ones(4, 2, device="meta")
    with pytest.raises(RuntimeError) as err:
        record_build(lambda: Scaled(outside))
    assert str(err.value) == ("sharded init: the model build reads meta tensors created outside it; build the "
                              "model inside record_build")
    premade = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(RuntimeError) as err:
        record_build(lambda: premade)
    assert str(err.value) == "sharded init: weight was created outside the recorded build"


def _write_open_clip(root: Path) -> str:
    """A tiny open_clip CLIP (ViT 64 wide, 3 layers, 4 heads, patch 8, 32 px) as .safetensors."""
    import json

    import open_clip
    from safetensors.torch import save_file
    name = "mmoe-fsdp-tiny-clip"
    cfg = {"embed_dim": 32, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    (root / "oc_cfg").mkdir()
    (root / "oc_cfg" / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / "oc_cfg")
    torch.manual_seed(7)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(root / "clip.safetensors"))
    return str(root / "clip.safetensors")


def _open_clip_arch(path: str):
    from mmoe.model.moe import MoEConfig
    from mmoe.model.vision import VisionConfig
    arch = _arch()
    arch.decoder.attn_moe = None
    arch.vision = VisionConfig(backend="open_clip", image_size=32, patch_size=8, dim=64, depth=3, n_heads=4,
                               activation="quick_gelu", moe=MoEConfig(num_experts=4, top_k=2), moe_layers="all",
                               feature_layer=-1, checkpoint=path)
    return arch


def _job_stream_open_clip(rank: int, world: int, path: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from mmoe.parallel.fsdp import apply_fsdp_ep
    from mmoe.parallel.fsdp_checkpoint import full_state_dict
    from mmoe.parallel.sharded_load import fill_sharded_module
    from mmoe.training.config import ParallelConfig
    from mmoe.training.module import MMoEModule
    torch.manual_seed(0)
    module = MMoEModule(arch=_open_clip_arch(path), parallel=ParallelConfig(ep_size=2, sharded_init=True))
    module.configure_model()
    apply_fsdp_ep(module.model, init_device_mesh("cpu", (world,)))
    stats = fill_sharded_module(module, "cpu")
    return {"stats": stats, "full": full_state_dict(module.model)}


@pytest.mark.distributed
def test_fsdp_sharded_init_streams_open_clip_tower_equal_ordinary_load(tmp_path):
    """An open_clip .safetensors (OpenAI-CLIP layout, text tower ignored) streamed into the sharded model
    (2 gloo processes, ep 2) equals the ordinary upcycled load exactly."""
    pytest.importorskip("open_clip")
    from mmoe.training.module import MMoEModule
    path = _write_open_clip(tmp_path)
    torch.manual_seed(0)
    want = MMoEModule(arch=_open_clip_arch(path)).model.state_dict()
    res = run_distributed(_job_stream_open_clip, 2, path, timeout=240)
    assert res[0]["stats"]["loaded"]["vision"]["upcycled"] == 6  # 3 blocks x c_fc, c_proj
    full = res[0]["full"]
    assert set(full) == set(want)
    bad = [k for k, v in want.items() if not torch.equal(full[k], v)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("box", [None, (), (slice(1, 3),), (slice(2, 3),), (slice(None), slice(2, None)),
                                 (slice(-2, None), slice(None, -1)), (slice(0, 9), slice(1, 2), slice(None))])
def test_fsdp_streamed_box_write_into_a_plain_tensor_equals_indexing(box):
    """sharded_load.write_box on one process (a plain tensor holds all of it): the box, given for leading dims
    only and with open, negative or overlong bounds as in `t[box] = value`, lands exactly where indexing puts it."""
    from mmoe.parallel.sharded_load import write_box
    t = torch.arange(4 * 5 * 3, dtype=torch.float64).view(4, 5, 3)
    want = t.clone()
    want[() if box is None else box] = -1.0
    write_box(t, torch.tensor(-1.0, dtype=torch.float64), box)
    assert torch.equal(t, want)
    assert (t == -1).any()


def test_fsdp_streamed_vision_checkpoint_is_planned_from_shapes_without_reading_data(tmp_path):
    """The streaming load plans from the file's header: every tensor is a meta tensor of the stored shape
    (allocating them would hold the whole checkpoint on every rank)."""
    from safetensors.torch import save_file

    from mmoe.parallel.sharded_load import _safetensors_meta
    save_file({"a": torch.ones(3, 4), "b": torch.zeros(2, dtype=torch.float64)}, str(tmp_path / "x.safetensors"))
    meta = _safetensors_meta(tmp_path / "x.safetensors")
    assert {k: (tuple(v.shape), v.is_meta) for k, v in meta.items()} == {"a": ((3, 4), True), "b": ((2,), True)}


def test_fsdp_streamed_write_to_a_tensor_the_model_lacks_is_refused_naming_it():
    from mmoe.interop.checkpoint import CheckpointError
    from mmoe.parallel.sharded_load import _Targets
    targets = _Targets(nn.Linear(2, 3))
    targets.write("bias", torch.tensor(5.0))
    assert torch.equal(targets.sd["bias"], torch.full((3,), 5.0))
    with pytest.raises(CheckpointError) as err:
        targets.write("fc1.weight", torch.zeros(3, 2))
    assert str(err.value) == "streaming load: the model has no tensor fc1.weight"


def test_fsdp_streamed_box_writes_land_where_a_full_tensor_assignment_puts_them():
    """sharded_load.write_local: a rank holding `region` of a global tensor, written a broadcast value into
    `box`, ends up with exactly region of (full tensor after full[box] = value) - for random regions and boxes,
    empty intersections included."""
    from mmoe.parallel.sharded_load import write_local
    g = torch.Generator().manual_seed(0)
    shape = (4, 6, 10)

    def rand_slice(n):
        a, b = sorted(torch.randint(0, n + 1, (2,), generator=g).tolist())
        return slice(a, b)

    for _ in range(200):
        region = tuple(rand_slice(n) for n in shape)
        box = tuple(rand_slice(n) for n in shape)
        box_shape = tuple(b.stop - b.start for b in box)
        value = torch.randn(box_shape[1:], generator=g)[None]  # broadcast over dim 0, as expert upcycling does
        full = torch.randn(shape, generator=g)
        local = full[region].clone()
        full[box] = value.expand(box_shape)
        write_local(local, region, value, box)
        assert torch.equal(local, full[region])

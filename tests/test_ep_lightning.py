"""Expert parallelism through Lightning: 2 CPU processes (gloo), `strategy="ddp_ep"`, the real MMoEModule.

1. Trainer + MMoEModule (tiny VLM with MoE at every site: ViT, connector, MoA, decoder FFN), fp64, 3 steps
   with gradient clipping, AdamW + warmup/cosine, balancing losses (device-level included, over the global
   batch) and the aux-loss-free bias: parameters equal a one-process reference that sees each rank's batches
   (the objective DDP optimises: mean over ranks, the device balance of all ranks' tokens); ranks read different batches; replicated weights are
   bitwise identical across ranks and experts differ only by shard; the checkpoint written by rank 0 holds
   every expert (model and Adam moments) and restores them; the rank-0-only export equals the gathered
   experts and loads into a one-process MMoEVLM.
2. `train.py`'s CLI (`cli_main`) with configs/default.yaml + the tiny overrides, `--trainer.strategy ddp_ep
   --model.parallel.ep_size 2`, validation (generation) included: runs, exports the full model.

The processes get the torchrun environment (MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE), so Lightning
treats them as launched externally, exactly as under torchrun/SLURM.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from _dist_utils import export_vs_gathered, run_distributed

REPO = Path(__file__).resolve().parents[1]
STEPS, B, T, IMG = 3, 2, 10, 16
TOL = 1e-9
DEVICE_COEF = 0.01


def _tiny_arch():
    from mmoe.model.connector import ConnectorConfig
    from mmoe.model.decoder import DecoderConfig
    from mmoe.model.moe import MoEConfig
    from mmoe.model.vision import VisionConfig
    from mmoe.model.vlm import VLMConfig

    def moe(**kw):
        return MoEConfig(num_experts=4, top_k=2, **kw)

    return VLMConfig(
        vision=VisionConfig(image_size=IMG, patch_size=8, dim=16, depth=2, n_heads=2, mlp_ratio=2.0, moe=moe(),
                            moe_layers="all", feature_layer=-1),
        connector=ConnectorConfig(kind="moe_mlp", moe=moe(), pool=1),
        decoder=DecoderConfig(vocab_size=40, dim=16, n_layers=2, n_heads=8, n_kv_heads=2, hidden=24, max_seq_len=64,
                              ffn_moe=moe(num_shared_experts=1, aux_free_bias=True, bias_update_rate=0.01),
                              ffn_moe_layers="all", attn_moe=moe(), attn_moe_layers="0"),
        image_token_id=4, pad_token_id=0, eos_token_id=2)


def _samples(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(n):
        ids = torch.randint(5, 40, (T,), generator=g)
        ids[1] = 4  # one <image> placeholder
        labels = ids.clone()
        labels[:5] = -100  # answer tokens only
        out.append({"input_ids": ids, "attention_mask": torch.ones(T, dtype=torch.bool), "labels": labels,
                    "pixel_values": torch.randn(1, 3, IMG, IMG, generator=g), "idx": torch.tensor(i)})
    return out


def _collate(items: list[dict]) -> dict:
    batch = {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask", "labels", "idx")}
    batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])
    return batch


def _module_cls():
    from mmoe.training.module import MMoEModule

    class Recording(MMoEModule):
        """MMoEModule that remembers which samples each rank trained on."""

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["idx"].tolist())
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):  # logits of the model evaluation runs (experts gathered)
            out = self.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
            self.val_seen.append((batch["idx"].tolist(), out.logits.detach().clone()))

        def on_validation_epoch_end(self):  # no VQA annotations here: the logits are checked instead
            pass

    return Recording


def _make_module(seed: int):
    from mmoe.training.config import BalanceConfig, LossCoefs, OptimConfig, ParallelConfig

    torch.manual_seed(seed)
    coefs = LossCoefs(balance=0.01, z=0.001, device=DEVICE_COEF)
    m = _module_cls()(arch=_tiny_arch(), optim=OptimConfig(lr=0.01, warmup_steps=2),
                      balance=BalanceConfig(vision=coefs, connector=coefs, attention=coefs, ffn=coefs),
                      parallel=ParallelConfig(ep_size=2), log_routing_every=1)
    m.seen, m.val_seen = [], []
    return m


def _trainer(root: str, steps: int = STEPS):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=2, strategy="ddp_ep", max_steps=steps, precision="64-true",
                     gradient_clip_val=0.5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root)


def _device_balance_global(routing_per_rank: list[list], coef: float, num_devices: int = 2) -> torch.Tensor:
    """Sum over MoE layers of coef x the DeepSeek-V2 device balance D * sum_d f_d P_d of the GLOBAL batch: f_d
    the share of every rank's selected assignments that land on device d's experts, P_d the router probability
    mass on them averaged over every rank's real tokens (plain float64 sums over the ranks' routing)."""
    total = torch.zeros((), dtype=torch.float64)
    for layer in zip(*routing_per_rank):
        E = layer[0].num_experts
        counts = sum(torch.bincount(r.expert_idx[r.selected & r.token_mask[:, None]], minlength=E).double()
                     for r in layer)
        mass = sum((r.probs.double() * r.token_mask[:, None]).sum(0) for r in layer)
        tokens = sum(r.token_mask.sum() for r in layer)
        f = counts.view(num_devices, -1).sum(-1) / counts.sum()
        P = mass.view(num_devices, -1).sum(-1) / tokens
        total = total + coef * num_devices * (f * P).sum()
    return total


def _reference(seen: list[list[list[int]]], samples: list[dict]):
    """One process, every expert: loss = mean over ranks of each rank's MMoEModule loss without the device
    balance term, plus the device balance of the global batch (every rank's tokens); the same optimizer,
    schedule, clipping and bias update as the Lightning run."""
    from mmoe.model.moe import Router
    from mmoe.training.module import lm_loss

    ref = _make_module(0).double()
    ref._trainer = types.SimpleNamespace(estimated_stepping_batches=STEPS)  # for configure_optimizers
    cfg = ref.configure_optimizers()
    ref._trainer = None
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    for step in range(STEPS):
        opt.zero_grad()
        losses, routing = [], []
        for r in range(len(seen)):
            b = _collate([samples[i] for i in seen[r][step]])
            out = ref.model(b["input_ids"], b["attention_mask"], b["pixel_values"].double(), b["labels"])
            ref.parallel_cfg.ep_size = 1  # the module skips the device term on one device: added globally below
            aux, _ = ref.balancing_loss(out.routing)
            ref.parallel_cfg.ep_size = 2
            losses.append(lm_loss(out.logits, out.labels) + aux)
            routing.append(out.routing)
        (torch.stack(losses).mean() + _device_balance_global(routing, DEVICE_COEF)).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        sched.step()
        for router in ref.model.modules():
            if isinstance(router, Router) and router.cfg.aux_free_bias:
                router.update_bias(router.load_accum)
    return ref


def _job_fit(rank: int, world: int, root: str) -> dict:
    import safetensors.torch as st
    from torch.utils.data import DataLoader

    import mmoe.parallel.strategy  # noqa: F401  registers strategy="ddp_ep"
    from mmoe.model.vlm import MMoEVLM
    from mmoe.parallel import ep_load_metrics, expert_parameters, full_state_dict
    from mmoe.interop.export import export_model

    samples = _samples(STEPS * world * B)
    loader = DataLoader(samples, batch_size=B, collate_fn=_collate)  # Lightning adds a DistributedSampler
    module = _make_module(0)
    trainer = _trainer(root)
    trainer.fit(module, loader)
    res: dict = {"strategy": type(trainer.strategy).__name__}

    # rank-0-only export right after fit (as the CLI's after_fit does): the consolidated copy comes from the
    # experts the strategy gathered at the end of fit, so rank 0 needs no collective here
    export_dir = os.path.join(root, "export")
    if rank == 0:
        export_model(module.consolidated_model(), export_dir)
    full = full_state_dict(module.model)  # gathered live weights (collective)
    if rank == 0:
        exported = st.load_file(os.path.join(export_dir, "model.safetensors"))
        res["export_diff"] = max(float((exported[k] - full[k]).abs().max()) for k in exported)
        res["export_keys_subset"] = set(exported) <= set(full)
        one = MMoEVLM(_tiny_arch()).double()
        missing, unexpected = st.load_model(one, os.path.join(export_dir, "model.safetensors"), strict=True)
        res["export_loads"] = not missing and not unexpected

    # different batches per rank, then the one-process reference on exactly those batches
    seen = [None] * world
    dist.all_gather_object(seen, module.seen)
    res["disjoint_batches"] = not (set(sum(seen[0], [])) & set(sum(seen[1], [])))
    ref = _reference(seen, samples)
    refp = dict(ref.model.named_parameters())
    ex = {id(p) for p in expert_parameters(module)}
    sd, ed = 0.0, 0.0
    for n, p in module.model.named_parameters():
        q = refp[n]
        if id(p) in ex:
            El = p.shape[0]
            q = q[rank * El:(rank + 1) * El]
            ed = max(ed, float((p - q).detach().abs().max()))
        else:
            sd = max(sd, float((p - q).detach().abs().max()))
    res["shared_vs_ref"], res["expert_vs_ref"] = sd, ed
    res["full_vs_ref"] = max(float((full[k] - v).abs().max()) for k, v in ref.model.state_dict().items())
    res["bias_moved"] = any(float(b.abs().max()) > 0 for n, b in module.model.named_buffers()
                            if n.endswith("expert_bias"))
    refb = dict(ref.model.named_buffers())
    res["bias_vs_ref"] = max(float((b - refb[n]).abs().max()) for n, b in module.model.named_buffers()
                             if n.endswith("expert_bias"))

    # replicated weights bitwise identical; experts differ across ranks (different shards)
    shared = torch.cat([p.detach().flatten() for p in module.parameters() if id(p) not in ex])
    exp = torch.cat([p.detach().flatten() for p in expert_parameters(module)])
    both = [torch.empty_like(shared) for _ in range(world)]
    dist.all_gather(both, shared)
    res["shared_identical"] = all(torch.equal(both[0], x) for x in both)
    bothe = [torch.empty_like(exp) for _ in range(world)]
    dist.all_gather(bothe, exp)
    res["experts_differ"] = not torch.equal(bothe[0], bothe[1])
    res["ep_metrics"] = ep_load_metrics(module)

    # checkpoint written by rank 0 holds every expert; a fresh module restores its own shard + Adam moments
    path = os.path.join(root, "ep.ckpt")
    trainer.save_checkpoint(path)
    dist.barrier()
    ck = torch.load(path, weights_only=False, map_location="cpu")
    ckm = {k[len("model."):]: v for k, v in ck["state_dict"].items() if k.startswith("model.")}
    res["ckpt_vs_full"] = max(float((ckm[k] - full[k]).abs().max()) for k in full)
    res["ckpt_shapes_like_one_process"] = all(tuple(ckm[k].shape) == tuple(v.shape)
                                              for k, v in ref.model.state_dict().items())
    opt_state = ck["optimizer_states"][0]["state"]
    order = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    ex_idx = [i for i, p in enumerate(order) if id(p) in ex]
    res["ckpt_opt_full_experts"] = sorted({tuple(opt_state[i]["exp_avg"].shape)[0] for i in ex_idx})
    fresh = _make_module(5).double()  # 64-true converts after restoring: start in fp64 to load exactly
    trainer2 = _trainer(root)
    trainer2.fit(fresh, loader, ckpt_path=path, weights_only=False)  # restores, then stops: max_steps already reached
    res["restored_diff"] = max(float((a - b).abs().max()) for a, b in
                               zip(fresh.state_dict().values(), module.state_dict().values()))
    o1, o2 = trainer.optimizers[0], trainer2.optimizers[0]
    diffs = [float((o1.state[p1]["exp_avg"] - o2.state[p2]["exp_avg"]).abs().max())
             for p1, p2 in zip(module.parameters(), fresh.parameters()) if p1 in o1.state]
    res["restored_opt_diff"] = max(diffs)

    # evaluation under EP gathers every expert onto every rank (local dispatch): logits equal the one-process
    # model's on the same batches (duplicated local experts, or a missed gather, would not)
    import lightning as L
    validator = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_ep", precision="64-true", logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=root)
    validator.validate(module, DataLoader(samples[:2 * B], batch_size=B, collate_fn=_collate), verbose=False)
    res["val_batches"] = len(module.val_seen)
    val_diff = 0.0
    ref.eval()
    with torch.no_grad():
        for idx, got in module.val_seen:
            b = _collate([samples[i] for i in idx])
            want = ref.model(b["input_ids"], b["attention_mask"], b["pixel_values"].double(), b["labels"]).logits
            val_diff = max(val_diff, float((got - want).abs().max()))
    res["val_logits_vs_ref"] = val_diff
    res["dispatchers_after_val"] = sorted({type(m.dispatcher).__name__ for m in module.modules()
                                           if hasattr(m, "dispatcher")})
    return res


@pytest.mark.distributed
def test_lightning_ddp_ep_fit_equals_single_process_and_checkpoints(tmp_path):
    res = run_distributed(_job_fit, 2, str(tmp_path), timeout=150, init_pg=False)
    r0 = res[0]
    assert r0["strategy"] == "ExpertParallelStrategy"
    assert r0["disjoint_batches"], "EP ranks must read different batches"
    for r in res:
        assert r["shared_vs_ref"] < TOL and r["expert_vs_ref"] < TOL, r
        assert r["full_vs_ref"] < TOL, r
        assert r["bias_moved"], r  # aux-loss-free bias updated from all-reduced loads ...
        assert r["bias_vs_ref"] < TOL, r  # ... exactly as the one-process run updates it
        assert r["val_batches"] == 1 and r["val_logits_vs_ref"] < TOL, r  # evaluation sees every expert
        assert r["dispatchers_after_val"] == ["_GuardedDispatcher"], r  # and the shards come back after it
        assert r["shared_identical"] and r["experts_differ"], r
        assert r["ckpt_vs_full"] == 0.0 and r["ckpt_shapes_like_one_process"], r
        assert r["ckpt_opt_full_experts"] == [4], r  # Adam moments of all 4 experts in the one file
        assert r["restored_diff"] == 0.0 and r["restored_opt_diff"] == 0.0, r
        m = r["ep_metrics"]
        assert m["ep/a2a_sent_bytes_remote"] > 0, m
        layers = {k[len("ep/"):-len("/recv_imbalance")] for k in m if k.endswith("/recv_imbalance")}
        assert {n.split(".")[0] for n in layers} == {"vision", "connector", "attention", "ffn"}, m
        for n in layers:
            recv = [m[f"ep/{n}/recv_tokens_rank{q}"] for q in range(2)]
            assert m[f"ep/{n}/recv_imbalance"] == pytest.approx(max(recv) / (sum(recv) / 2)), (n, m)
            if n.split(".")[0] in ("attention", "ffn"):
                # dropless top-2 over the last step's decoder tokens of both ranks: B x (T - 1 + 4 image tokens)
                assert sum(recv) == 2 * 2 * B * (T - 1 + (IMG // 8) ** 2), (n, recv)
    assert r0["export_keys_subset"] and r0["export_diff"] == 0.0 and r0["export_loads"], r0


# =========================================================================== train.py's CLI
def _job_cli(rank: int, world: int, data_dir: str, config: str, root: str) -> dict:
    from mmoe.parallel import expert_parameters, full_state_dict
    from mmoe.training.cli import cli_main  # registers --trainer.strategy ddp_ep

    os.chdir(REPO)
    from mmoe.training.module import MMoEModule
    module_seen = {}
    orig_val_step = MMoEModule.validation_step

    def val_step(self, batch, batch_idx):  # record that validation generated under EP without deadlock
        module_seen["val_batches"] = module_seen.get("val_batches", 0) + 1
        return orig_val_step(self, batch, batch_idx)

    MMoEModule.validation_step = val_step
    cli = cli_main(["fit", "--config", str(REPO / "configs/default.yaml"), "--config", config,
                    "--data.data_dir", data_dir, "--trainer.devices", "2",  # ep_size > 1 selects the ddp_ep strategy
                    "--model.parallel.ep_size", "2", "--trainer.default_root_dir", root,
                    "--export_dir", os.path.join(root, "export")])
    module = cli.model
    full = full_state_dict(module.model)
    out = {"strategy": type(cli.trainer.strategy).__name__, "step": int(cli.trainer.global_step),
           "val_batches": module_seen.get("val_batches", 0),
           "dispatchers_restored": sorted({type(m.dispatcher).__name__ for m in module.modules()
                                           if hasattr(m, "dispatcher")}),
           "local_experts": sorted({tuple(p.shape)[0] for p in expert_parameters(module)})}
    if rank == 0:
        out.update(export_vs_gathered(os.path.join(root, "export"), full))
    return out


@pytest.mark.distributed
def test_train_py_cli_ddp_ep_two_processes(tiny_data, tiny_config, tmp_path):
    res = run_distributed(_job_cli, 2, str(tiny_data), str(tiny_config), str(tmp_path / "run"), timeout=180,
                          init_pg=False)
    for r in res:
        assert r["strategy"] == "ExpertParallelStrategy" and r["step"] == 2, r
        assert r["local_experts"] == [2, 4], r  # 4-expert sites hold 2 per rank, the 8-expert FFN 4
        assert r["val_batches"] >= 1, r  # generation ran under EP (experts gathered for evaluation) ...
        assert r["dispatchers_restored"] == ["_GuardedDispatcher"], r  # ... and the shards came back
    assert res[0]["export_diff"] == 0.0 and res[0]["export_expert_rows"] == [4, 8], res[0]

"""Training: every YAML runs, staged recipe upcycles exactly, resume reproduces losses, bad keys fail."""

from __future__ import annotations

import csv
import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY_OVERRIDES

from mmoe.config_io import from_dict, merge_dicts
from mmoe.model.vlm import MMoEVLM, VLMConfig
from mmoe.training.cli import cli_main
from mmoe.training.module import MMoEModule, lm_loss

VISION_PRETRAIN = Path("configs/stages/stage0_vision.yaml")  # its own CLI: tests/test_main_job.py runs it
CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml") if p.relative_to(REPO) != VISION_PRETRAIN)
RUNNABLE = [p for p in CONFIGS if p.name != "cumo_large.yaml" and p.parent.name != "model"]  # model/: presets, not recipes


def _args(cfgs: list[str], data: Path, tiny: Path, run: Path, *extra: str) -> list[str]:
    # tiny sizes go right after the base config so a stage file's choices (dense / MoE) still win
    args = ["fit", "--config", str(REPO / cfgs[0]), "--config", str(tiny)]
    for c in cfgs[1:]:
        args += ["--config", str(REPO / c)]
    return args + ["--data.data_dir", str(data), "--trainer.default_root_dir", str(run),
                   "--export_dir", str(run / "export"), "--trainer.max_steps", "2", *extra]


def _losses(run: Path) -> dict[int, float]:
    out = {}
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/lm_loss"):
                out[int(row["step"])] = float(row["train/lm_loss"])
    return out


def _column(run: Path, name: str) -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r[name]) for r in csv.DictReader(f) if r.get(name)}


def test_grad_norm_is_logged_before_clipping(tiny_data, tiny_config, tmp_path):
    """The logged norm is the one clipping sees: equal to an unclipped run's and far above a tiny clip value."""
    norms = {}
    for clip in ("0.0", "1e-6"):
        run = tmp_path / f"clip{clip}"
        cli_main(_args([RUNNABLE[0]], tiny_data, tiny_config, run, "--trainer.log_every_n_steps", "1",
                       "--trainer.gradient_clip_val", clip, "--trainer.max_steps", "1"))
        norms[clip] = _column(run, "train/grad_norm")
    assert norms["0.0"].keys() == norms["1e-6"].keys() and norms["0.0"]
    for step, value in norms["0.0"].items():
        assert value > 1e-3
        assert norms["1e-6"][step] == pytest.approx(value, rel=1e-5)


def test_every_config_parses_and_large_config_counts_on_meta():
    for cfg in CONFIGS:
        extra = [] if cfg.parent.name != "stages" else ["--config", str(REPO / cfg)]
        base = str(REPO / ("configs/default.yaml" if cfg.parent.name == "stages" else cfg))
        buf = io.StringIO()
        with redirect_stdout(buf), pytest.raises(SystemExit) as e:
            cli_main(["fit", "--config", base, *extra, "--print_config"])
        assert e.value.code in (0, None), cfg
        printed = yaml.safe_load(buf.getvalue())
        arch = from_dict(VLMConfig, printed["model"]["arch"], "model.arch")
        assert arch.decoder.vocab_size > 0
    # the CuMo-like 7B config is built on the meta device only
    printed = yaml.safe_load(_print(REPO / "configs/cumo_large.yaml"))
    arch = from_dict(VLMConfig, printed["model"]["arch"], "model.arch")
    with torch.device("meta"):
        model = MMoEVLM(arch)
    total = sum(p.numel() for p in model.parameters())
    # 32 layers x 4 SwiGLU experts of 4096x14336 dominate: ~22B total; ViT-L with 4 experts ~0.9B
    assert 20e9 < total < 30e9, total
    assert model.num_image_tokens == 576


def _print(cfg: Path) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(cfg), "--print_config"])
    return buf.getvalue()


@pytest.mark.parametrize("cfg", [str(p) for p in RUNNABLE if p.parent.name != "stages"])
def test_fit_runs_exports_and_validates(cfg, tiny_data, tiny_config, tmp_path):
    run = tmp_path / "run"
    fit = cli_main(_args([cfg], tiny_data, tiny_config, run))
    assert (run / "export" / "config.json").exists() and (run / "export" / "model.safetensors").exists()
    assert (run / "export" / "tokenizer.json").exists()
    text = (run / "metrics.csv").read_text()
    assert "val/vqa_acc" in text
    for site in ("vision", "connector", "attention", "ffn"):  # per-layer routing health of every MoE site
        assert f"routing/{site}." in text
    # the logged MaxVio of every layer and step is (max load - mean) / mean of the load shares recorded then
    history = fit.model.expert_load_history
    assert {h["layer"].split(".")[0] for h in history} >= {"vision", "connector", "attention", "ffn"}
    for h in history:
        logged = _column(run, f"routing/{h['layer']}/max_violation")
        load = torch.tensor(h["load"], dtype=torch.float64)
        assert logged[h["step"]] == pytest.approx(float((load.max() - load.mean()) / load.mean()), rel=1e-4,
                                                  abs=1e-6), h
    assert "routing/ffn.1/image/load_cv" in text  # per modality
    assert all(v > 0 for v in _column(run, "train/grad_norm").values())
    assert (run / "expert_load.png").exists() and (run / "training_curves.png").exists()
    # `train.py test` scores every test question from the checkpoint
    test_run = tmp_path / "test_run"
    cli = cli_main(["test", "--config", str(REPO / cfg), "--config", str(tiny_config), "--data.data_dir",
                    str(tiny_data), "--trainer.default_root_dir", str(test_run), "--ckpt_path",
                    str(run / "checkpoints" / "last.ckpt")])
    assert "test/vqa_acc" in cli.trainer.callback_metrics
    assert 0.0 <= float(cli.trainer.callback_metrics["test/vqa_acc"]) <= 100.0


def test_staged_recipe_round_trip(tiny_data, tiny_config, tmp_path):
    """stage 1 (connector only) -> stage 2 (dense, all) -> stage 3 (upcycled MoE) through the CLI."""
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    cli_main(_args(["configs/default.yaml", "configs/stages/stage1_connector.yaml"], tiny_data, tiny_config, s1))
    ck1 = s1 / "checkpoints" / "last.ckpt"
    assert ck1.exists()
    sd0 = torch.load(ck1, map_location="cpu", weights_only=True)["state_dict"]
    cli_main(_args(["configs/default.yaml", "configs/stages/stage2_dense.yaml"], tiny_data, tiny_config, s2,
                   "--model.stage.init_from", str(ck1)))
    ck2 = s2 / "checkpoints" / "last.ckpt"
    sd2 = torch.load(ck2, map_location="cpu", weights_only=True)["state_dict"]
    vis = [k for k in sd0 if k.startswith("model.vision.") and sd0[k].is_floating_point()]
    assert any(not torch.equal(sd0[k], sd2[k]) for k in vis), "stage 2 must train the vision tower"
    cli_main(_args(["configs/default.yaml", "configs/stages/stage3_moe.yaml"], tiny_data, tiny_config, s3,
                   "--model.stage.init_from", str(ck2)))
    assert (s3 / "export" / "config.json").exists()


def test_stage1_trains_only_the_connector(tiny_data, tiny_config, tmp_path, monkeypatch):
    """Frozen weights (and buffers) are bitwise unchanged after the optimizer steps; the connector moved."""
    start = {}

    def remember(self):
        start.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
    monkeypatch.setattr(MMoEModule, "on_train_start", remember, raising=False)
    run = tmp_path / "s1"
    cli = cli_main(_args(["configs/default.yaml", "configs/stages/stage1_connector.yaml"], tiny_data, tiny_config,
                         run))
    trainable = {n.split(".")[0] for n, p in cli.model.model.named_parameters() if p.requires_grad}
    assert trainable == {"connector"}
    assert cli.trainer.global_step == 2 and start
    end = cli.model.model.state_dict()
    params = dict(cli.model.model.named_parameters())
    for k, v in start.items():
        if k.split(".")[0] != "connector" and k in params:
            assert torch.equal(v, end[k]), f"frozen {k} changed"
    moved = [k for k in start if k.startswith("connector.") and k in params and not torch.equal(start[k], end[k])]
    assert moved, "the connector must train"


def _dense_and_moe(tiny_data):
    moe = TINY_OVERRIDES["model"]["arch"]  # overrides every field of configs/default.yaml (tests/test_presets.py)
    dense = merge_dicts(moe, {"vision": {"moe": None}, "connector": {"kind": "mlp", "moe": None},
                              "decoder": {"ffn_moe": None, "attn_moe": None}})
    return from_dict(VLMConfig, dense), from_dict(VLMConfig, moe)


def test_upcycled_stage3_loss_equals_dense_loss(tiny_data, tmp_path):
    """Every MoE FFN (vision, connector, decoder) upcycled from dense reproduces the dense loss at step 0.

    MoA is exact only with every expert selected at unit weight (tests/test_decoder.py proves that), so
    this check keeps attention dense and makes every other site MoE."""
    from mmoe.data.datamodule import MMoEDataModule

    dense_cfg, moe_cfg = _dense_and_moe(tiny_data)
    moe_cfg.decoder.attn_moe = None
    moe_cfg.decoder.ffn_moe.expert_hidden = 0  # as in configs/stages/stage3_moe.yaml: experts as wide as dense
    torch.manual_seed(0)
    dense = MMoEModule(arch=dense_cfg)
    ckpt = tmp_path / "dense.ckpt"
    torch.save({"state_dict": dense.state_dict()}, ckpt)
    from mmoe.training.config import StageConfig
    moe = MMoEModule(arch=moe_cfg, stage=StageConfig(init_from=str(ckpt)))
    dm = MMoEDataModule(data_dir=str(tiny_data), batch_size=4, max_len=128)
    batch = next(iter(dm.train_dataloader()))
    dense.eval(), moe.eval()
    with torch.no_grad():
        out_d = dense.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
        out_m = moe.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    assert len(out_m.routing) >= 3 and not out_d.routing
    torch.testing.assert_close(lm_loss(out_m.logits, out_m.labels), lm_loss(out_d.logits, out_d.labels),
                               rtol=1e-5, atol=1e-5)
    real = out_d.attention_mask  # MoE layers skip padding tokens; dense ones compute them
    torch.testing.assert_close(out_m.logits[real], out_d.logits[real], rtol=1e-4, atol=1e-4)


def test_resume_reproduces_uninterrupted_losses(tiny_data, tiny_config, tmp_path):
    # 24 train conversations / batch 4 = 6 steps per epoch: checkpoint at the end of epoch 1, resume
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--trainer.max_steps=10", "--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0",
              "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
              "--trainer.callbacks.dirpath", "CKPT", "--trainer.callbacks.every_n_train_steps", "6",
              "--trainer.callbacks.save_top_k", "-1"]
    cli_main(_args(["configs/default.yaml"], tiny_data, tiny_config, full,
                   *[str(full / "ck") if a == "CKPT" else a for a in common]))
    ck = sorted((full / "ck").glob("*step=6*.ckpt"))
    assert ck, list((full / "ck").glob("*"))
    cli_main(_args(["configs/default.yaml"], tiny_data, tiny_config, part,
                   *[str(part / "ck") if a == "CKPT" else a for a in common], "--ckpt_path", str(ck[0])))
    a, b = _losses(full), _losses(part)
    resumed = [s for s in b if s >= 6]
    assert resumed, b
    for s in resumed:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])


def test_loss_falls_on_small_overfit_batch(tiny_data):
    from mmoe.data.datamodule import MMoEDataModule

    _, cfg = _dense_and_moe(tiny_data)
    torch.manual_seed(0)
    module = MMoEModule(arch=cfg)
    dm = MMoEDataModule(data_dir=str(tiny_data), batch_size=4, max_len=128)
    batch = next(iter(dm.train_dataloader()))
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = module.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
        aux, _ = module.balancing_loss(out.routing)
        loss = lm_loss(out.logits, out.labels) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        module.update_router_biases()
        losses.append(lm_loss(out.logits, out.labels).item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]


def test_bad_config_key_and_value_fail_naming_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  arch:\n    decoder:\n      n_layer: 3\n")
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(REPO / "configs/default.yaml"), "--config", str(bad), "--print_config"])
    assert e.value.code != 0
    assert "n_layer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(REPO / "configs/default.yaml"), "--model.arch.decoder.dim", "big",
                  "--print_config"])
    assert e.value.code != 0
    assert "dim" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(REPO / "configs/default.yaml"), "--model.optim.schedule", "linear",
                  "--print_config"])
    assert e.value.code != 0
    assert "model.optim.schedule" in capsys.readouterr().err


def test_balancing_loss_uses_site_coefficients():
    from mmoe.training.config import BalanceConfig, LossCoefs
    _, cfg = _dense_and_moe(None)
    torch.manual_seed(0)
    zero = MMoEModule(arch=cfg, balance=BalanceConfig(*(LossCoefs(balance=0, z=0) for _ in range(4))))
    only_ffn = MMoEModule(arch=cfg, balance=BalanceConfig(LossCoefs(0, 0), LossCoefs(0, 0), LossCoefs(0, 0),
                                                          LossCoefs(balance=1.0, z=0)))
    only_ffn.load_state_dict(zero.state_dict())
    ids = torch.randint(5, 60, (2, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    out = only_ffn.model(ids, mask)
    total0, _ = zero.balancing_loss(out.routing)
    total, parts = only_ffn.balancing_loss(out.routing)
    assert total0.item() == 0.0
    from mmoe.model.moe import load_balance_loss
    expected = sum(load_balance_loss(r) for r in out.routing if r.site == "ffn")
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"ffn/balance"}


def test_loss_reduction_weights_answer_turns():
    """Loop reference: token = mean over answer tokens; turn = mean over turns of each turn's mean; sqrt weighs
    tokens by 1/sqrt(turn length). Turns are maximal runs of supervised labels, also across rows."""
    from mmoe.constants import IGNORE_INDEX

    torch.manual_seed(0)
    I = IGNORE_INDEX
    labels = torch.tensor([[I, I, 5, 6, 7, I, I, 3, I],     # turns of 3 and 1 tokens (after the shift)
                           [I, 2, I, I, 4, 4, 4, 4, 4]])    # turns of 1 and 5 tokens (ends at the row end)
    logits = torch.randn(2, 9, 11, dtype=torch.float64)
    tgt = labels[:, 1:]
    lp = -torch.log_softmax(logits[:, :-1], -1)
    turns, cur = [], []
    for b in range(2):
        for t in range(8):
            if tgt[b, t] != I:
                cur.append(lp[b, t, tgt[b, t]])
            elif cur:
                turns.append(cur)
                cur = []
        if cur:
            turns.append(cur)
            cur = []
    assert [len(t) for t in turns] == [3, 1, 1, 5]
    tokens = [x for t in turns for x in t]
    ref = {"token": sum(tokens) / len(tokens),
           "turn": sum(sum(t) / len(t) for t in turns) / len(turns),
           "sqrt": sum(sum(t) / len(t) ** 0.5 for t in turns) / sum(len(t) ** 0.5 for t in turns)}
    for name, value in ref.items():
        # float64 logits keep a float64 loss (not rounded to float32: fp64 equivalence tests rely on it)
        torch.testing.assert_close(lm_loss(logits, labels, name), value, rtol=1e-12, atol=1e-12)
        # the same loss from logits kept only where a label is supervised (what training computes)
        kept = logits[:, :-1][tgt != I]
        torch.testing.assert_close(lm_loss(kept, labels, name), value, rtol=1e-12, atol=1e-12)
        # bf16 logits: the softmax and the mean run in float32
        low = lm_loss(logits.bfloat16(), labels, name)
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, value.float(), rtol=2e-2, atol=2e-2)
    assert lm_loss(logits, torch.full_like(labels, I), "turn").isnan()  # nothing supervised: nan, like the mean
    with pytest.raises(ValueError, match="logits for 3 positions, but the labels supervise 10"):
        lm_loss(logits[0, :3], labels)
    with pytest.raises(ValueError, match="loss_reduction"):
        lm_loss(logits, labels, "sample")


def test_param_groups_scale_the_vision_tower_lr_and_keep_the_decay_rules():
    """vision_lr_scale multiplies the LR of every tower parameter (router scale stacks on the tower's routers);
    norms, biases and routers stay undecayed; nothing is left out or counted twice."""
    import types

    from mmoe.training.config import OptimConfig
    from mmoe.training.module import skips_weight_decay
    _, cfg = _dense_and_moe(None)
    module = MMoEModule(arch=cfg, optim=OptimConfig(lr=1e-3, weight_decay=0.1, router_lr_scale=0.5,
                                                    vision_lr_scale=0.1))
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=10)
    opt = module.configure_optimizers()["optimizer"]
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(module.model.named_parameters())
    assert len(group_of) == sum(len(g["params"]) for g in opt.param_groups) == len(named)
    for name, p in named.items():
        g = group_of[id(p)]
        router = ".router." in name
        expected = 1e-3 * (0.5 if router else 1.0) * (0.1 if name.startswith("vision.") else 1.0)
        assert g["initial_lr"] == pytest.approx(expected), name
        assert g["weight_decay"] == (0.0 if router or skips_weight_decay(name, p) else 0.1), name
    assert any(n.startswith("vision.") and ".router." in n for n in named)  # the stacked case is exercised


def test_the_vit_routers_can_have_their_own_lr_and_a_model_without_them_refuses_it():
    """vision_router_lr_scale replaces the stacked vision x router scale on the ViT's routers only: the other
    sites' routers and the rest of the tower keep theirs. Set on a model whose ViT has no router it would do
    nothing, so it is refused, naming the field."""
    import types

    from mmoe.training.config import OptimConfig
    _, cfg = _dense_and_moe(None)
    optim = OptimConfig(lr=1e-3, router_lr_scale=0.5, vision_lr_scale=0.1, vision_router_lr_scale=2.0)
    module = MMoEModule(arch=cfg, optim=optim)
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=10)
    opt = module.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}
    seen = set()
    for name, p in module.model.named_parameters():
        where = ("vision" if name.startswith("vision.") else "rest", ".router." in name)
        expected = {("vision", True): 2e-3, ("vision", False): 1e-4, ("rest", True): 5e-4, ("rest", False): 1e-3}
        assert lr_of[id(p)] == pytest.approx(expected[where]), name
        seen.add(where)
    assert len(seen) == 4  # every kind of parameter exercised
    dense_vit = from_dict(VLMConfig, merge_dicts(TINY_OVERRIDES["model"]["arch"], {"vision": {"moe": None}}))
    module = MMoEModule(arch=dense_vit, optim=optim)
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=10)
    with pytest.raises(ValueError, match="model.optim.vision_router_lr_scale=2.0 has no effect"):
        module.configure_optimizers()


def test_upcycle_reinit_is_refused_on_a_site_nothing_upcycles():
    """The tiny arch has no vision checkpoint, connector checkpoint or HF decoder: drop-upcycling would do
    nothing at any site, so each is refused naming the field and what would upcycle it."""
    arch = TINY_OVERRIDES["model"]["arch"]
    for site, path, source in (("vision", ("vision", "moe"), "model.arch.vision.checkpoint"),
                               ("connector", ("connector", "moe"), "model.arch.connector.checkpoint"),
                               ("decoder", ("decoder", "ffn_moe"), "model.stage.hf_decoder")):
        over = {path[0]: {path[1]: {"upcycle_reinit": 0.5}}}
        cfg = from_dict(VLMConfig, merge_dicts(arch, over))
        with pytest.raises(ValueError, match=rf"model.arch.{path[0]}.{path[1]}.upcycle_reinit=0.5 has no effect: "
                                             rf"nothing upcycles this site .*set {source} or model.stage.init_from"):
            MMoEModule(arch=cfg)


def test_logits_at_labels_are_the_full_logits_at_the_supervised_positions():
    from mmoe.constants import IGNORE_INDEX
    _, cfg = _dense_and_moe(None)
    torch.manual_seed(0)
    model = MMoEVLM(cfg).eval()
    ids = torch.randint(5, 60, (2, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX
    labels[1, 9] = IGNORE_INDEX
    full = model(ids, mask, labels=labels)
    kept = model(ids, mask, labels=labels, logits_at_labels=True)
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert kept.logits.shape == (int(where.sum()), cfg.decoder.vocab_size) == (9, cfg.decoder.vocab_size)  # 5 + 4
    torch.testing.assert_close(kept.logits, full.logits[where])
    torch.testing.assert_close(lm_loss(kept.logits, kept.labels), lm_loss(full.logits, full.labels))
    with pytest.raises(ValueError, match="needs labels"):
        model(ids, mask, logits_at_labels=True)


@pytest.mark.parametrize("ep_size", [1, 2])
def test_balancing_loss_total_applies_every_coefficient(ep_size):
    """Non-trivial, distinct coefficients per site and kind: the module's total equals sum coef * loss written
    out here from the coefficient table (a coefficient ignored, swapped or applied to the wrong site fails).
    The device loss only counts with expert parallelism (ep_size > 1)."""
    from mmoe.model.moe import balancing
    from mmoe.training.config import BalanceConfig, LossCoefs, ParallelConfig

    table = {"vision": dict(balance=0.37, z=0.011, group=0.0, modality=0.23, device=0.05, sequence=0.0),
             "connector": dict(balance=0.13, z=0.029, group=0.0, modality=0.0, device=0.31, sequence=0.41),
             "attention": dict(balance=0.07, z=0.003, group=0.0, modality=0.19, device=0.0, sequence=0.0),
             "ffn": dict(balance=0.53, z=0.017, group=0.61, modality=0.11, device=0.43, sequence=0.29)}
    _, cfg = _dense_and_moe(None)
    torch.manual_seed(0)
    module = MMoEModule(arch=cfg, balance=BalanceConfig(**{s: LossCoefs(**c) for s, c in table.items()}),
                        parallel=ParallelConfig(ep_size=ep_size))
    ids = torch.randint(5, 60, (2, 12))
    ids[:, 1] = cfg.image_token_id
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    out = module.model(ids, torch.ones_like(ids, dtype=torch.bool), pixels)
    assert {r.site for r in out.routing} == set(table)
    fns = {"balance": balancing.load_balance_loss, "z": balancing.z_loss, "group": balancing.group_balance_loss,
           "modality": balancing.modality_balance_loss, "sequence": balancing.sequence_balance_loss,
           "device": lambda r: balancing.device_balance_loss(r, ep_size)}
    expected = 0.0
    for r in out.routing:
        for kind, coef in table[r.site].items():
            if coef and not (kind == "device" and ep_size == 1):
                value = float(fns[kind](r).detach())
                assert value > 0, (r.name, kind)  # every used term contributes, so dropping one shows
                expected += coef * value
    total, parts = module.balancing_loss(out.routing)
    assert float(total) == pytest.approx(expected, rel=1e-5)
    unscaled = sum(float(v) for v in parts.values())
    assert float(total) != pytest.approx(unscaled, rel=1e-3)  # the parts are logged unscaled
    assert ("ffn/device" in parts) == (ep_size > 1) and "vision/group" not in parts


def test_validation_vqa_score_is_exact_on_a_crafted_case(tmp_path):
    """The module's VQA logging on answers whose official accuracy is known by hand: 'red' vs 10 x red = 100;
    'two' vs 2 x two + 8 x three = mean over the 10 leave-one-out subsets of min(1, matches / 3)
    = (2 x 1/3 + 8 x 2/3) / 10 = 60; 'no' vs 10 x yes = 0. Overall 53.33, and per answer type."""
    import json

    def ann(qid, answers, kind):
        return {"question_id": qid, "image_id": qid, "answer_type": kind, "question_type": "what",
                "multiple_choice_answer": answers[-1],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
    annotations = {"annotations": [ann(1, ["red"] * 10, "other"), ann(2, ["two"] * 2 + ["three"] * 8, "number"),
                                   ann(3, ["yes"] * 10, "yes/no"), ann(4, ["blue"] * 10, "other")]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(annotations))
    _, cfg = _dense_and_moe(None)
    module = MMoEModule(arch=cfg)
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    module._val_results = [{"question_id": 1, "answer": "red"}, {"question_id": 2, "answer": "two"},
                           {"question_id": 3, "answer": "no"}]  # question 4 unanswered: scored on the answered
    module._score_vqa("val", path)
    assert logged["val/vqa_acc"] == pytest.approx(160 / 3, abs=0.01)
    assert logged["val/vqa_acc/other"] == pytest.approx(100.0)
    assert logged["val/vqa_acc/number"] == pytest.approx(60.0)
    assert logged["val/vqa_acc/yes/no"] == pytest.approx(0.0)
    assert module._val_results == []

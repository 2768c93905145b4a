"""LoRA through peft: adapters on attention, MoA expert projections and packed expert weights; only they train
(routers by choice); merging reproduces the adapted model; a LoRA fine-tune from an export on a converted
dataset lowers its loss; the export after a LoRA fit is the plain format."""

from __future__ import annotations

import copy
import csv
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_OVERRIDES
from safetensors.torch import load_file

from mmoe.config_io import from_dict
from mmoe.model.vlm import MMoEVLM, VLMConfig
from mmoe.training.lora import LoraSettings, apply_lora, has_lora, lora_targets, merge_lora


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        base[k] = _deep_update(base.get(k) or {}, v) if isinstance(v, dict) and v else v
    return base


def tiny_arch(**decoder) -> VLMConfig:
    """configs/default.yaml's architecture with the tiny overrides, as the CLI composes them."""
    arch = yaml.safe_load((REPO / "configs/default.yaml").read_text())["model"]["arch"]
    _deep_update(arch, yaml.safe_load(yaml.safe_dump(TINY_OVERRIDES["model"]["arch"])))
    arch["decoder"].update(decoder)
    return from_dict(VLMConfig, arch, "arch")


def _inputs(vocab: int = 60):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (2, 10), generator=g)
    ids[:, 1] = 4  # one <image> token per sample
    return ids, torch.ones_like(ids, dtype=torch.bool), torch.randn(2, 3, 64, 64, generator=g)


def test_lora_targets_cover_attention_moa_and_packed_experts():
    model = MMoEVLM(tiny_arch())
    modules, params = lora_targets(model, ["attention", "moa", "experts"])
    assert "decoder.layers.0.self_attn.q_proj" in modules and "decoder.layers.1.self_attn.k_proj" in modules
    assert {"decoder.layers.1.self_attn.q_proj.weight", "decoder.layers.1.self_attn.o_proj.weight",
            "decoder.layers.1.mlp.experts.w_in.weight", "decoder.layers.1.mlp.experts.w_out.weight"} == set(params)
    assert not any("router" in n or n.startswith(("vision", "connector")) for n in modules + params)
    with pytest.raises(ValueError, match="model.lora.targets: unknown"):
        apply_lora(model, LoraSettings(r=2, targets=["attn"]))


@pytest.mark.parametrize("target", ["attention", "moa", "experts"])
def test_lora_merged_outputs_equal_unmerged(target):
    torch.manual_seed(0)
    model = MMoEVLM(tiny_arch()).eval()
    ids, am, px = _inputs()
    with torch.no_grad():
        base = model(ids, am, px).logits
        apply_lora(model, LoraSettings(r=4, targets=[target]))
        assert torch.allclose(model(ids, am, px).logits, base, atol=1e-6)  # B starts at zero: no change
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
        adapted = model(ids, am, px).logits
        assert (adapted - base).abs().max() > 1e-2  # the adapters on this target are active in forward
        merged = merge_lora(model)
        assert not has_lora(merged) and has_lora(model)  # merged a copy
        assert set(merged.state_dict()) == set(MMoEVLM(tiny_arch()).state_dict())  # plain names
        torch.testing.assert_close(merged(ids, am, px).logits, adapted, atol=1e-4, rtol=1e-4)


def _export_base(tmp_path: Path, tokenizer_dir: Path, vocab: int | None = None) -> Path:
    from mmoe.interop.export import export_model

    torch.manual_seed(0)
    arch = tiny_arch(**({"vocab_size": vocab} if vocab else {}))
    return export_model(MMoEVLM(arch), tmp_path / "base", tokenizer=tokenizer_dir)


def _fit(args: list[str]):
    from mmoe.training.cli import cli_main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", sys.argv[:1])
        return cli_main(["fit", *args])


@pytest.mark.parametrize("train_routers,checkpointing", [(False, False), (True, False), (False, True)])
def test_lora_only_adapter_params_change(train_routers, checkpointing, tiny_data, tiny_config, tmp_path):
    """Also with model.activation_checkpointing (the packed-weight adapters re-run in the recompute)."""
    base = _export_base(tmp_path, tiny_data)
    cli = _fit(["--config", str(REPO / "configs/default.yaml"), "--config", str(tiny_config),
                "--data.data_dir", str(tiny_data), "--trainer.default_root_dir", str(tmp_path / "run"),
                "--trainer.limit_val_batches=0", "--trainer.max_steps=3", "--model.optim.warmup_steps=0",
                "--model.stage.init_from", str(base), "--model.lora.r=4",
                f"--model.lora.train_routers={str(train_routers).lower()}",
                f"--model.activation_checkpointing={str(checkpointing).lower()}",
                "--export_dir", str(tmp_path / "out")])
    if checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
        assert all(isinstance(b, CheckpointWrapper) for b in cli.model.model.decoder.layers)
    before = load_file(str(base / "model.safetensors"))
    after = {k: v.detach() for k, v in cli.model.model.state_dict().items()}
    changed_base, changed_routers = [], []
    for name, value in after.items():
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer", "")
        if plain not in before:  # the tied lm_head (saved once, as embed_tokens)
            assert plain == "decoder.lm_head.weight"
            continue
        if not torch.equal(value, before[plain]):
            (changed_routers if ".router." in plain else changed_base).append(plain)
    assert changed_base == []
    assert bool(changed_routers) == train_routers, changed_routers
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in after.items() if "lora_B" in k)
    # the export after fit is the plain format with the adapters merged in
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(exported) == set(before)
    merged = merge_lora(cli.model.model).state_dict()
    assert all(torch.equal(exported[k], merged[k]) for k in exported)
    assert any(not torch.equal(exported[k], before[k]) for k in exported if "experts.w_in" in k)


@pytest.mark.slow  # 30 CPU training steps
def test_lora_finetune_from_export_on_converted_data_improves_loss(tmp_path):
    from test_own_data import convert, write_vqa_dataset

    from mmoe.data.tokenizer import load_tokenizer

    files = write_vqa_dataset(tmp_path / "src", n_images=24)
    data = tmp_path / "data"
    assert convert(files, data).returncode == 0
    vocab = -(-len(load_tokenizer(data)) // 64) * 64
    base = _export_base(tmp_path, data, vocab)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY_OVERRIDES))
    _fit(["--config", str(REPO / "configs/default.yaml"), "--config", str(cfg), "--data.data_dir", str(data),
          "--data.train_json", "train2014_llava.json", "--data.val_split", "train2014_val",
          "--model.arch.decoder.vocab_size", str(vocab), "--trainer.default_root_dir", str(tmp_path / "run"),
          "--trainer.limit_val_batches=0", "--trainer.max_steps=30", "--model.optim.lr=0.01",
          "--model.optim.warmup_steps=0", "--model.stage.init_from", str(base), "--model.lora.r=8",
          "--model.lora.targets=[attention,moa,experts]", "--export_dir", str(tmp_path / "out")])
    with open(tmp_path / "run" / "metrics.csv") as f:
        losses = [float(r["train/lm_loss"]) for r in csv.DictReader(f) if r.get("train/lm_loss")]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_lora_with_expert_parallel_is_refused_naming_the_fields():
    from mmoe.training.config import ParallelConfig
    from mmoe.training.module import MMoEModule

    with pytest.raises(ValueError, match=r"model.lora.r > 0 with model.parallel.ep_size > 1"):
        MMoEModule(arch=tiny_arch(), parallel=ParallelConfig(ep_size=2), lora=LoraSettings(r=2))


@pytest.mark.slow  # aot_eager compile of every block
def test_lora_linear_targets_compiled_with_checkpointing_match_eager():
    """model.compile + model.activation_checkpointing + LoRA on the nn.Linear targets: the compiled,
    checkpointed model gives the eager LoRA model's logits and adapter gradients (fp32, 1e-5)."""
    from mmoe.training.block_wrappers import apply_activation_checkpointing
    from mmoe.training.compile import compile_blocks

    torch.manual_seed(0)
    eager = MMoEVLM(tiny_arch()).train()
    apply_lora(eager, LoraSettings(r=4, targets=["attention", "mlp"]))
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # adapters that change the output
    compiled = copy.deepcopy(eager)
    apply_activation_checkpointing(compiled, compiled=True)
    torch._dynamo.reset()
    try:
        assert compile_blocks(compiled, backend="aot_eager") > 0
        assert all(b._compiled_call_impl is not None for b in compiled.decoder.layers)
        ids, am, px = _inputs()
        outs = {}
        for name, model in (("eager", eager), ("compiled", compiled)):
            logits = model(ids, am, px).logits
            logits.float().pow(2).mean().backward()
            grads = {k.replace("._checkpoint_wrapped_module", ""): p.grad for k, p in model.named_parameters()
                     if p.requires_grad}
            outs[name] = (logits.detach(), grads)
    finally:
        torch._dynamo.reset()
    (le, ge), (lc, gc) = outs["eager"], outs["compiled"]
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    assert ge.keys() == gc.keys() and ge and all("lora_" in k for k in ge)
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], rtol=1e-5, atol=1e-5, msg=k)
    assert any(g.abs().sum() > 0 for k, g in ge.items() if "mlp" in k)


@pytest.mark.parametrize("targets", [["moa"], ["attention", "experts"]])
def test_lora_on_packed_weights_with_compile_is_refused_naming_the_fields(targets):
    """peft's ParamWrapper (target_parameters: MoA projections, MoE experts) registers a parametrization in
    every forward, which torch.compile(fullgraph=True) cannot trace: refused, not a failure at the first step."""
    from mmoe.training.module import MMoEModule

    with pytest.raises(ValueError, match=r"model.compile=true with model.lora.targets .*model.lora.targets from "
                                         r"\[attention, mlp\]"):
        MMoEModule(arch=tiny_arch(), compile=True, lora=LoraSettings(r=2, targets=targets))
    MMoEModule(arch=tiny_arch(), compile=True, lora=LoraSettings(r=2, targets=["attention", "mlp"]))  # allowed
    MMoEModule(arch=tiny_arch(), compile=True, lora=LoraSettings(r=0, targets=targets))  # LoRA off

"""Reliability catalogue: bad inputs end in a clear error naming the problem (or a counted skip), faults
in training are caught and named, and a killed run resumes to the same losses."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO

from mmoe.data.images import ImageLoadError, load_image


# --------------------------------------------------------------------------- images
def _write(tmp: Path, name: str, make) -> Path:
    p = tmp / name
    make(p)
    return p


IMAGE_CASES = {
    "missing": (lambda p: None, "error"),
    "zero_byte": (lambda p: p.write_bytes(b""), "error"),
    "truncated": (lambda p: (Image.new("RGB", (64, 64), "red").save(p), p.write_bytes(p.read_bytes()[:60])), "error"),
    "not_an_image": (lambda p: p.write_text("this is text, not a PNG"), "error"),
    "cmyk": (lambda p: Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(p.with_suffix(".jpg"), "JPEG") or
             p.write_bytes(p.with_suffix(".jpg").read_bytes()), "ok"),
    "16bit": (lambda p: Image.new("I;16", (16, 16), 40000).save(p), "ok"),
    "1x1": (lambda p: Image.new("RGB", (1, 1), "blue").save(p), "ok"),
    "10000x10000": (lambda p: Image.new("L", (10000, 10000), 7).save(p, compress_level=1), "error"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_images_give_a_clear_error_or_load_as_rgb(case, tmp_path):
    make, expect = IMAGE_CASES[case]
    p = tmp_path / f"{case}.png"
    make(p)
    if expect == "ok":
        img = load_image(p)
        assert img.mode == "RGB" and img.size[0] >= 1
    else:
        with pytest.raises(ImageLoadError) as e:
            load_image(p)
        assert p.name in str(e.value)


def test_eval_skips_and_counts_unreadable_images(tmp_path, tiny_data):
    """eval/vqa.py: an unreadable image is skipped and counted; nothing else is lost."""
    qs = json.loads((tiny_data / "test_questions.json").read_text())
    first_img = qs["questions"][0]["image_id"]
    caps = json.loads((tiny_data / "test_captions.json").read_text())
    name = next(i["file_name"] for i in caps["images"] if i["id"] == first_img)
    data = tmp_path / "data"
    import shutil
    shutil.copytree(tiny_data, data)
    (data / name).write_bytes(b"")  # zero-byte image
    export = _tiny_export(tmp_path, tiny_data)
    out = subprocess.run([sys.executable, "eval/vqa.py", "--model", str(export), "--questions",
                          str(data / "test_questions.json"), "--annotations", str(data / "test_annotations.json"),
                          "--images", str(data), "--image-index", str(data / "test_captions.json"),
                          "--out", str(tmp_path / "r.json")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    n_skipped_q = sum(q["image_id"] == first_img for q in qs["questions"])
    assert m["skipped_images"] == 1 and m["skipped_questions"] == n_skipped_q
    assert m["num_questions"] == len(qs["questions"]) - n_skipped_q


def _tiny_export(tmp_path: Path, data: Path) -> Path:
    from conftest import TINY_ARCH
    from mmoe.config_io import from_dict
    from mmoe.model.vlm import MMoEVLM, VLMConfig
    from mmoe.interop.export import export_model
    torch.manual_seed(0)  # TINY_ARCH overrides every field of configs/default.yaml (tests/test_presets.py)
    model = MMoEVLM(from_dict(VLMConfig, TINY_ARCH))
    return export_model(model, tmp_path / "export", tokenizer=data)


# --------------------------------------------------------------------------- questions and conversations
@pytest.mark.parametrize("question", ["", "   \n\t "])
def test_empty_questions_are_refused(question, tiny_data):
    from mmoe.data.template import build_prompt
    from mmoe.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_data)
    with pytest.raises(ValueError, match="empty|whitespace"):
        build_prompt(tok, question)


def test_over_long_question_gets_a_clear_error(tiny_data, tmp_path):
    from mmoe.inference import VLMPipeline, load_model
    from mmoe.data.tokenizer import load_tokenizer
    export = _tiny_export(tmp_path, tiny_data)
    pipe = VLMPipeline(load_model(export, "cpu"), load_tokenizer(export))
    long_q = "what color is the circle " * 200
    with pytest.raises(ValueError, match=r"max_seq_len|context|longer"):
        pipe.answer([Image.new("RGB", (64, 64))], [long_q])


@pytest.mark.parametrize("record,field", [
    ({"id": "a", "image": "x.png"}, "conversations"),
    ({"id": "a", "conversations": "not a list"}, "conversations"),
    ({"id": "a", "conversations": [{"from": "human"}]}, "turns"),
    ({"id": "a", "conversations": [{"from": "human"}, {"from": "gpt", "value": "red"}]}, "value"),
    ({"id": "a", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "red"}]}, "value"),
    ({"id": "a", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "red"}]}, "from"),
])
def test_conversation_json_errors_name_the_field(record, field, tiny_data, tmp_path):
    from mmoe.data.dataset import LlavaJsonDataset
    from mmoe.data.images import build_image_transform
    from mmoe.data.tokenizer import load_tokenizer
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([record]))
    with pytest.raises(ValueError) as e:
        LlavaJsonDataset(p, tmp_path, load_tokenizer(tiny_data), build_image_transform(64, (0.5,) * 3, (0.5,) * 3),
                         max_len=64)
    assert field in str(e.value) and "bad.json" in str(e.value)


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("args,needle", [
    (["--model.arch.decoder.n_layer", "3"], "--model.arch.decoder.n_layer"),
    (["--model.arch.decoder.dim", "wide"], "dim"),
    (["--model.arch.decoder.ffn_moe.top_k", "9"], "top_k"),
    (["--model.arch.decoder.ffn_moe.router", "expert_choice"], "expert_choice"),
    (["--model.arch.decoder.ffn_moe.hierarchy", "group_limited", "--model.arch.decoder.ffn_moe.num_groups", "3"],
     "num_groups"),
])
def test_bad_configs_fail_naming_the_field(args, needle, capsys, tmp_path, tiny_data):
    from mmoe.training.cli import cli_main
    with pytest.raises((SystemExit, ValueError)) as e:
        cli_main(["--config", str(REPO / "configs/default.yaml"), "--data.data_dir", str(tiny_data),
                  "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path), *args], run=False)
    if isinstance(e.value, SystemExit):
        assert e.value.code != 0
        # only the error line counts: the usage text lists every field name
        message = "\n".join(line for line in capsys.readouterr().err.splitlines() if "error" in line.lower())
    else:
        message = str(e.value)
    assert needle in message, message[-1500:]


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_from_another_config_names_the_tensors(tmp_path, tiny_data):
    from mmoe.interop.checkpoint import CheckpointError
    from mmoe.training.stage_init import load_stage_weights
    export = _tiny_export(tmp_path, tiny_data)
    import yaml
    from mmoe.config_io import from_dict
    from mmoe.model.vlm import MMoEVLM, VLMConfig
    other = MMoEVLM(from_dict(VLMConfig, yaml.safe_load((REPO / "configs/default.yaml").read_text())["model"]["arch"]))
    with pytest.raises(CheckpointError) as e:
        load_stage_weights(other, export)
    assert "shapes do not match" in str(e.value) and "model.safetensors" in str(e.value)
    from mmoe.inference import load_model
    (export / "config.json").write_text((export / "config.json").read_text().replace('"dim": 32', '"dim": 48', 1))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(export, "cpu")


def test_truncated_checkpoints_are_refused(tmp_path, tiny_data):
    from mmoe.inference import load_model
    from mmoe.interop.checkpoint import CheckpointError, read_state_dict
    export = _tiny_export(tmp_path, tiny_data)
    st = export / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(export, "cpu")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_state_dict(st)
    ck = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"model.a": torch.ones(3)}}, ck)
    ck.write_bytes(ck.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="x.ckpt"):
        read_state_dict(ck)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_with_arbitrary_objects_are_refused(tmp_path):
    from mmoe.interop.checkpoint import CheckpointError, read_state_dict
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "payload": _Evil()}, p)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(p)
    ok = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(2)}}, ok)
    assert torch.equal(read_state_dict(ok)["w"], torch.ones(2))


# --------------------------------------------------------------------------- training faults
def test_nonfinite_forward_is_reported_with_the_layer(tiny_data):
    from mmoe.data.datamodule import MMoEDataModule
    from mmoe.training.reliability import NonFiniteError, NonFiniteGuard, locate_nonfinite

    from test_training import _dense_and_moe
    from mmoe.training.module import MMoEModule
    _, cfg = _dense_and_moe(tiny_data)
    module = MMoEModule(arch=cfg)
    with torch.no_grad():
        module.model.decoder.layers[1].mlp.experts.w_out.weight.fill_(float("inf"))
    dm = MMoEDataModule(data_dir=str(tiny_data), batch_size=4, max_len=128)
    batch = next(iter(dm.train_dataloader()))
    where = locate_nonfinite(module, lambda: module.training_step(batch, 0))
    assert where is not None and where.startswith("model.decoder.layers.1.mlp"), where

    class _T:
        global_step = 7
    guard = NonFiniteGuard()
    guard.on_train_batch_start(_T(), module, batch, 0)
    with pytest.raises(NonFiniteError, match=r"step 7.*model\.decoder\.layers\.1\.mlp"):
        guard.on_before_backward(_T(), module, torch.tensor(float("nan")))
    guard.on_before_backward(_T(), module, torch.tensor(1.0))  # finite: no error


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    from mmoe.training.reliability import AtomicCheckpointIO
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}}, target)
    good = target.read_bytes()

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(4)}}, target)
    assert target.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def _losses(metrics: Path) -> dict[int, float]:
    with open(metrics) as f:
        return {int(r["step"]): float(r["train/lm_loss"]) for r in csv.DictReader(f) if r.get("train/lm_loss")}


def test_sigkilled_run_resumes_to_the_same_losses(tiny_data, tiny_config, tmp_path):
    """A run killed with SIGKILL after a checkpoint resumes from it and logs the same losses as a run
    that was never interrupted."""
    def cmd(run: Path, *extra: str) -> list[str]:
        return [sys.executable, "train.py", "fit", "--config", "configs/default.yaml", "--config", str(tiny_config),
                "--data.data_dir", str(tiny_data), "--trainer.default_root_dir", str(run), "--export_dir",
                str(run / "export"), "--trainer.max_steps=12", "--trainer.val_check_interval", "null",
                "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
                "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                "--trainer.callbacks.dirpath", str(run / "ck"), "--trainer.callbacks.every_n_train_steps", "6",
                "--trainer.callbacks.save_top_k", "-1", *extra]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cmd(full), cwd=REPO, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd(killed, "--trainer.max_steps=1000"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((killed / "ck").glob("*step=6*.ckpt")):
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ck = sorted((killed / "ck").glob("*step=6*.ckpt"))
    assert ck, "no checkpoint before the kill"
    torch.load(ck[0], map_location="cpu", weights_only=False)  # complete, loadable
    resumed = tmp_path / "resumed"
    subprocess.run(cmd(resumed, "--ckpt_path", str(ck[0])), cwd=REPO, check=True, capture_output=True, timeout=600)
    a, b = _losses(full / "metrics.csv"), _losses(resumed / "metrics.csv")
    steps = [s for s in b if s >= 6]
    assert len(steps) >= 5, b
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])

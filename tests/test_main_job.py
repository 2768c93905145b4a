"""`make train` end to end on tiny sizes: stage-0 vision pretraining, its tower upcycled into the VLM, export,
evaluation, and the final JSON line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_OVERRIDES

from mmoe.training.main_job import main


def _check_summary_against_predictions(summary: dict, run: Path, data: Path, summary_out: Path) -> None:
    """The summary's numbers are the scores of the predictions main_job saved: VQA re-scored here from the saved
    answers, CIDEr recomputed with pycocoevalcap's own scorer; the summary file carries date, commit, machine."""
    from mmoe.metrics.vqa import vqa_accuracy

    answers = json.loads((run / "vqa_test.json").read_text())
    assert len(answers) == 4  # --eval-limit
    ann = json.loads((data / "test_annotations.json").read_text())
    wanted = {a["question_id"] for a in answers}
    ann = dict(ann, annotations=[a for a in ann["annotations"] if a["question_id"] in wanted])
    assert summary["vqa_test"] == pytest.approx(vqa_accuracy(answers, ann)["overall"], abs=1e-9)
    if shutil.which("java"):
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        caps = json.loads((run / "captions_test.json").read_text())
        gt = json.loads((data / "test_captions.json").read_text())
        ids = {c["image_id"] for c in caps}
        gts = {i: [{"caption": a["caption"]} for a in gt["annotations"] if a["image_id"] == i] for i in ids}
        res = {c["image_id"]: [{"caption": c["caption"]}] for c in caps}
        tok = PTBTokenizer()
        cider, _ = Cider().compute_score(tok.tokenize(gts), tok.tokenize(res))
        assert summary["caption_CIDEr"] == pytest.approx(cider, abs=1e-9)
    record = json.loads(summary_out.read_text())
    prov = record.pop("provenance")
    assert record == summary and prov["date"] and "machine" in prov
    assert json.loads((run / "summary.json").read_text())["provenance"]["machine"] == prov["machine"]


def test_make_train_runs_stage0_then_the_vlm_on_its_tower(tiny_data, tmp_path, capsys):
    tiny_vision = {k: v for k, v in TINY_OVERRIDES["model"]["arch"]["vision"].items() if k not in ("moe", "moe_layers")}
    stage0 = tmp_path / "stage0.yaml"  # the shipped stage-0 recipe at tiny sizes
    cfg = yaml.safe_load((REPO / "configs/stages/stage0_vision.yaml").read_text())
    cfg["trainer"].update(max_steps=3, val_check_interval=3, limit_val_batches=1, enable_progress_bar=False,
                          enable_model_summary=False)
    cfg["model"]["vision"].update(tiny_vision)
    stage0.write_text(yaml.safe_dump(cfg))
    vlm = tmp_path / "vlm.yaml"
    vlm.write_text(yaml.safe_dump(TINY_OVERRIDES))
    run = tmp_path / "run"
    summary = main(["--config", str(REPO / "configs/default.yaml"), "--data", str(tiny_data), "--run-dir", str(run),
                    "--vision-pretrain", str(stage0), "--eval-limit", "4", "--summary-out", str(tmp_path / "s.json"),
                    "--",
                    "--config", str(vlm), "--trainer.max_steps=2", "--model.arch.vision.stem=conv",
                    "--model.arch.vision.feature_layer=-1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == summary
    tower = run / "stage0_vision" / "export" / "vision.safetensors"
    assert tower.is_file() and summary["stage0_vision_minutes"] > 0
    _check_summary_against_predictions(summary, run, tiny_data, tmp_path / "s.json")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["arch"]["vision"]["checkpoint"] == str(tower)
    # the VLM started from the stage-0 tower: its (2-step) stem is still close to the pretrained one
    from safetensors.torch import load_file

    s0 = load_file(str(tower))
    vlm_sd = load_file(str(run / "export" / "model.safetensors"))
    key = "patch_embed.inner.proj.0.weight"
    fresh = torch.nn.Conv2d(3, s0[key].shape[0], 3, bias=False).weight
    assert (vlm_sd[f"vision.vit.{key}"] - s0[key]).abs().max() < (fresh - s0[key]).abs().max() / 4
    assert saved["model"]["optim"]["vision_lr_scale"] == 0.1  # the pretrained tower is tuned gently


def test_make_train_without_stage0_trains_the_tower_from_scratch_at_the_full_lr(tiny_data, tmp_path, capsys):
    vlm = tmp_path / "vlm.yaml"
    vlm.write_text(yaml.safe_dump(TINY_OVERRIDES))
    run = tmp_path / "run"
    main(["--config", str(REPO / "configs/default.yaml"), "--data", str(tiny_data), "--run-dir", str(run),
          "--vision-pretrain", "none", "--eval-limit", "2", "--summary-out", "none", "--", "--config", str(vlm), "--trainer.max_steps=1"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["optim"]["vision_lr_scale"] == 1.0
    assert saved["model"]["arch"]["vision"].get("checkpoint") is None and not (run / "stage0_vision").exists()

"""Bring your own data: a VQAv2-format dataset (PNG images, no validation split) converted with
data_scripts/ and trained, validated and evaluated by `python -m mmoe.training.main_job --data DIR`, plus the
pieces that make that work (tokenizer with the template's strings, truncation report, atomic conversion,
--help text of every data.* option, progress lines in logs, SIGTERM checkpoints)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_OVERRIDES
from lightning.pytorch.callbacks import Callback
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_vqa_dataset(root: Path, n_images: int = 12) -> dict[str, Path]:
    """VQAv2 questions + annotations for `n_images` PNG images (the default pattern expects .jpg), no val split."""
    images = root / "images"
    images.mkdir(parents=True)
    questions, annotations = [], []
    for i in range(1, n_images + 1):
        color = list(COLORS)[i % 3]
        Image.new("RGB", (32, 32), COLORS[color]).save(images / f"COCO_train2014_{i:012d}.png")
        for k, (text, answer, kind) in enumerate([("What color is the image?", color, "other"),
                                                  (f"Is the image {color}?", "yes", "yes/no")]):
            qid = i * 10 + k
            questions.append({"image_id": i, "question": text, "question_id": qid})
            annotations.append({"question_id": qid, "image_id": i, "question_type": "what", "answer_type": kind,
                                "multiple_choice_answer": answer,
                                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": j + 1}
                                            for j in range(10)]})
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}}
    q = root / "q.json"
    q.write_text(json.dumps({**header, "data_subtype": "train2014", "questions": questions}))
    a = root / "a.json"
    a.write_text(json.dumps({"info": {}, "license": {}, "annotations": annotations}))
    return {"images": images, "questions": q, "annotations": a}


def convert(files: dict[str, Path], out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "data_scripts/prepare_vqav2.py"), "--questions",
                           str(files["questions"]), "--annotations", str(files["annotations"]), "--images",
                           str(files["images"]), "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("own")
    files = write_vqa_dataset(root)
    out = root / "converted"
    proc = convert(files, out, "--val-fraction", "0.25", "--max-len", "20")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_own_data_converter_carves_val_detects_png_and_trains_a_tokenizer(own_data):
    from mmoe.data.tokenizer import load_tokenizer, template_strings

    out, proc = own_data
    assert "image_extension_detected: .png (12 images" in proc.stdout
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["splits"]["train2014"]["role"] == "train"
    val = manifest["splits"]["train2014_val"]
    assert val["role"] == "val" and val["task"] == "vqa"
    train_ids = {s["question_ids"][0] // 10 for s in json.loads((out / "train2014_llava.json").read_text())}
    val_qs = json.loads((out / val["questions"]).read_text())["questions"]
    val_ids = {q["image_id"] for q in val_qs}
    assert len(val_ids) == 3 and not train_ids & val_ids and len(train_ids) == 9  # carved by image, 25 %
    index = json.loads((out / val["images"]).read_text())["images"]
    assert {im["id"] for im in index} == val_ids
    assert all(Path(q["file_name"]).is_file() and q["file_name"].endswith(".png") for q in val_qs)
    tok = load_tokenizer(out)
    for text in template_strings():  # the chat template's strings never map to <unk>
        assert tok.unk_token_id not in tok.encode(text, add_special_tokens=False), text
    assert "red" in tok.decode(tok.encode("What color? red", add_special_tokens=False))
    # the length distribution against data.max_len (20 here: every 2-question conversation is longer)
    report = manifest["length_report"]
    assert report["samples"] == 9 and report["over_max_len"] == 9 and report["p50"] > 20
    assert "exceed data.max_len=20" in proc.stdout


def test_own_data_failed_conversion_writes_nothing(tmp_path):
    files = write_vqa_dataset(tmp_path / "src", n_images=2)
    out = tmp_path / "out"
    proc = convert(files, out, "--image-pattern", "nothing_{image_id}.gif")
    assert proc.returncode == 2 and "nothing was written" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.convert-*"))


def test_own_data_template_string_mapping_to_unk_is_an_error(tmp_path):
    from mmoe.data.tokenizer import check_template_tokens, train_dataset_tokenizer, train_tokenizer

    bare = train_tokenizer(["what color is it", "red"], tmp_path / "bare")  # dataset text only
    with pytest.raises(ValueError, match="'USER: '.*<unk>"):
        check_template_tokens(bare)
    # many distinct words with a small cap: byte-pair pieces, still no <unk> for the template or the data
    words = [f"word{i}x{i * 7}" for i in range(400)]
    bpe = train_dataset_tokenizer(words, tmp_path / "bpe", vocab_size=300)
    assert len(bpe) <= 300
    ids = bpe.encode("word12x84 ASSISTANT:", add_special_tokens=False)
    assert bpe.unk_token_id not in ids and bpe.decode(ids) == "word12x84 assistant:"


def test_own_data_datamodule_honours_file_name_and_reports_truncation(own_data, capsys):
    from mmoe.data.datamodule import MMoEDataModule

    out, _ = own_data
    dm = MMoEDataModule(data_dir=str(out), train_json="train2014_llava.json", val_split="train2014_val",
                        image_size=32, max_len=20, batch_size=2)
    dm.setup("fit")
    assert dm.truncation == {"checked": 9, "truncated": 9, "max_len": 20, "longest": dm.truncation["longest"],
                             "percent": 100.0} and dm.truncation["longest"] > 20
    assert "9 of 9 training samples checked (100.0 %) exceed data.max_len=20" in capsys.readouterr().out
    # the carved split has no pattern-named files: the questions' file_name must be used
    item = dm.val_dataset[0]
    assert item["pixel_values"].shape == (1, 3, 32, 32)
    qs = {q["question_id"]: q for q in json.loads((out / "train2014_val_questions.json").read_text())["questions"]}
    assert dm.val_dataset.image_path(item["image_id"], qs[item["question_id"]]["file_name"]).suffix == ".png"
    from mmoe.data.images import load_image
    expected = dm.image_transform(load_image(qs[item["question_id"]]["file_name"]))
    assert (item["pixel_values"][0] - expected).abs().max() == 0


def test_own_data_every_data_option_has_help(capsys):
    import inspect

    from mmoe.data.datamodule import MMoEDataModule
    from mmoe.training.cli import cli_main

    with pytest.raises(SystemExit), pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", sys.argv[:1])
        cli_main(["fit", "--help"])
    text = capsys.readouterr().out
    linked = {"image_size", "image_mean", "image_std"}  # set from model.arch.vision.* (documented there)
    for name in inspect.signature(MMoEDataModule.__init__).parameters:
        if name == "self" or name in linked:
            continue
        block = text.split(f"  --data.{name} ", 1)[1].split("\n  --", 1)[0]
        described = block.split(None, 1)[1].split("(type:", 1)[0]  # drop the metavar, keep the text before (type:
        assert len(described.split()) >= 3, f"--data.{name} has no help text: {block!r}"


def _benchmark_results_state() -> dict[str, bytes]:
    """The committed benchmark records (main_job wrote make_train.json there by default once)."""
    return {str(p): p.read_bytes() for p in sorted((REPO / "benchmarks" / "results").rglob("*")) if p.is_file()}


@pytest.mark.slow  # two eval subprocesses: ~1 min on 2 CPU cores
def test_own_data_main_job_trains_validates_and_evaluates(own_data, tmp_path, capsys):
    from mmoe.training.main_job import main

    out, _ = own_data
    vlm = tmp_path / "vlm.yaml"
    vlm.write_text(yaml.safe_dump(TINY_OVERRIDES))
    run = tmp_path / "run"
    before = _benchmark_results_state()
    summary = main(["--data", str(out), "--run-dir", str(run), "--eval-limit", "4", "--",
                    "--config", str(vlm), "--trainer.max_steps=2", "--trainer.enable_progress_bar=true",
                    "--data.val_max_questions=2"])
    stdout = capsys.readouterr().out
    assert _benchmark_results_state() == before  # no --summary-out: nothing written outside the run directory
    assert json.loads((run / "summary.json").read_text())["provenance"]["machine"]
    assert summary["evals_skipped"] == {}
    assert "stage 0 (vision pretraining on object boxes) skipped" in stdout
    assert "a tower trained from scratch inside the VLM" in stdout
    assert "training samples checked" in stdout and "exceed data.max_len=128" in stdout
    assert "[mmoe] step 1/2 (50.0 %)" in stdout and "[mmoe] step 2/2" in stdout  # lines, stdout is no tty
    assert "Epoch 0/-" not in stdout
    assert 0 <= summary["vqa_train2014_val"] <= 100 and summary["export"] == str(run / "export")
    assert not (run / "stage0_vision").exists()
    with open(run / "metrics.csv") as f:
        vals = [r["val/vqa_acc"] for r in csv.DictReader(f) if r.get("val/vqa_acc")]
    assert vals, "validation on the carved split never ran"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["val_split"] == "train2014_val" and saved["data"]["train_json"] == "train2014_llava.json"
    from mmoe.data.tokenizer import load_tokenizer
    assert saved["model"]["arch"]["decoder"]["vocab_size"] >= len(load_tokenizer(out))
    assert json.loads((run / "vqa_train2014_val.metrics.json").read_text())["overall"] == summary["vqa_train2014_val"]


class SigtermAtStep(Callback):
    """Sends this process SIGTERM after optimizer step `step`, as a cluster scheduler would."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow  # two short CLI fits
def test_own_data_sigterm_saves_a_resumable_checkpoint(tiny_data, tiny_config, tmp_path, capsys):
    import torch

    from mmoe.training.cli import cli_main

    root = tmp_path / "run"
    base = ["--config", str(REPO / "configs/default.yaml"), "--config", str(tiny_config),
            "--data.data_dir", str(tiny_data), "--trainer.default_root_dir", str(root),
            "--trainer.limit_val_batches=0", "--trainer.callbacks+=test_own_data.SigtermAtStep"]
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exc:
            cli_main(["fit", *base, "--trainer.max_steps=50"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exc.value.code == 143
    ckpt = root / "checkpoints" / "last.ckpt"
    assert f"saved {ckpt}" in capsys.readouterr().out
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    resumed = cli_main(["fit", *base[:-1], "--trainer.max_steps=5", "--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == 5


def convert_gqa_and_captions(root: Path, n_images: int = 12) -> Path:
    """A GQA-format and a COCO-captions source (PNG images, no val split) converted into one directory by
    data_scripts/prepare_gqa.py and prepare_coco_captions.py (the captions' file_name say .jpg)."""
    images = root / "img"
    images.mkdir(parents=True)
    for i in range(n_images):
        Image.new("RGB", (16, 16), list(COLORS.values())[i % 3]).save(images / f"n{i}.png")
    gqa = {f"q{i}": {"imageId": f"n{i}", "question": "Which color is the zebra?", "answer": list(COLORS)[i % 3]}
           for i in range(n_images)}
    (root / "g.json").write_text(json.dumps(gqa))
    out = root / "out"
    run = [sys.executable, str(REPO / "data_scripts/prepare_gqa.py"), "--questions", str(root / "g.json"),
           "--images", str(images), "--out", str(out), "--split", "train", "--val-fraction", "0.25"]
    proc = subprocess.run(run, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    coco = {"images": [{"id": i, "file_name": f"n{i}.jpg"} for i in range(n_images)],
            "annotations": [{"id": i, "image_id": i, "caption": f"a {list(COLORS)[i % 3]} quokka square"}
                            for i in range(n_images)]}
    (root / "c.json").write_text(json.dumps(coco))
    run = [sys.executable, str(REPO / "data_scripts/prepare_coco_captions.py"), "--captions", str(root / "c.json"),
           "--images", str(images), "--out", str(out), "--split", "captions_train", "--val-fraction", "0.25"]
    proc = subprocess.run(run, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "image_extension_detected: .png" in proc.stdout
    return out


@pytest.fixture(scope="module")
def gqa_captions_data(tmp_path_factory) -> Path:
    return convert_gqa_and_captions(tmp_path_factory.mktemp("gqa_captions"))


@pytest.mark.slow  # two converter subprocesses that train tokenizers
def test_own_data_gqa_and_captions_share_one_manifest_and_tokenizer(gqa_captions_data):
    """A second source converted into the same directory joins the manifest and gets its own carved validation
    split when its task has none yet (each task's evaluation needs one), and the tokenizer is retrained on all
    training text."""
    from mmoe.data.tokenizer import load_tokenizer

    out = gqa_captions_data
    splits = json.loads((out / "dataset.json").read_text())["splits"]
    assert {k: (v["role"], v["task"]) for k, v in splits.items()} == {
        "train": ("train", "gqa"), "val": ("val", "gqa"), "captions_train": ("train", "caption"),
        "captions_train_val": ("val", "caption")}
    gqa_val = json.loads((out / "val_questions.json").read_text())
    assert len({q["imageId"] for q in gqa_val.values()}) == 3  # 25 % of 12 images
    assert all(Path(q["file_name"]).is_file() for q in gqa_val.values())
    # the caption GT names the files that exist (.png), as eval/caption.py --images OUT opens them
    caps = json.loads((out / "captions_train_val_captions.json").read_text())
    assert len(caps["images"]) == 3 and all(Path(im["file_name"]).is_file() for im in caps["images"])
    vocab = load_tokenizer(out).get_vocab()
    assert "▁quokka" in vocab and "▁zebra" in vocab  # both sources' training text


def test_own_data_eval_skip_reasons(monkeypatch):
    """Splits main_job cannot score are named with the reason; caption metrics need Java (PTB tokenizer),
    so without it the caption evaluation is skipped, not the run failed."""
    import mmoe.training.main_job as mj

    assert mj._eval_skip_reason({"task": "gqa", "questions": "q.json"}) is None
    assert "free-form" in mj._eval_skip_reason({"task": "chat", "llava": "x.json"})
    assert "annotations" in mj._eval_skip_reason({"task": "vqa", "questions": "q.json"})
    monkeypatch.setattr(mj.shutil, "which", lambda name: None)
    assert "`java` is not on PATH" in mj._eval_skip_reason({"task": "caption", "captions": "c.json"})


def test_own_data_plan_evaluates_each_task_on_its_test_else_val_splits(tmp_path):
    from mmoe.training.main_job import _own_data_plan

    splits = {"a": ("train", "vqa"), "a_val": ("val", "vqa"), "a_test": ("test", "vqa"), "g": ("train", "gqa"),
              "g_val": ("val", "gqa"), "c_val": ("val", "caption"), "chat": ("train", "chat")}
    manifest = {"splits": {k: {"role": r, "task": t, "llava": f"{k}_llava.json"} for k, (r, t) in splits.items()}}
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    (tmp_path / "tokenizer.json").write_text("{}")
    for name in ("a", "g", "chat"):
        (tmp_path / f"{name}_llava.json").write_text("[]")
    plan = _own_data_plan(tmp_path, tmp_path / "run")
    assert sorted(name for name, _ in plan["evals"]) == ["a_test", "c_val", "g_val"]
    assert plan["val"] == "a_val" and plan["train"] == ["a", "g", "chat"]


@pytest.mark.slow  # converters, 2 training steps, a GQA and a caption eval subprocess
def test_own_data_main_job_runs_the_gqa_and_caption_evals(gqa_captions_data, tmp_path, capsys):
    """`main_job --data DIR` on converted GQA + COCO-captions data: both sources train together, GQA and the
    caption metrics are computed on their carved validation splits, and the summary's numbers are the scores of
    the predictions it saved. Without --summary-out nothing is written outside the run directory."""
    from mmoe.metrics.gqa_pope import gqa_accuracy
    from mmoe.training.main_job import main

    out = gqa_captions_data
    vlm = tmp_path / "vlm.yaml"
    vlm.write_text(yaml.safe_dump(TINY_OVERRIDES))
    run = tmp_path / "run"
    before = _benchmark_results_state()
    summary = main(["--data", str(out), "--run-dir", str(run), "--eval-limit", "2", "--",
                    "--config", str(vlm), "--trainer.max_steps=2"])
    stdout = capsys.readouterr().out
    assert _benchmark_results_state() == before  # the committed benchmark records are untouched
    record = json.loads((run / "summary.json").read_text())
    assert record.pop("provenance")["commit"] and record == summary
    assert "training on train, captions_train; evaluating on val, captions_train_val" in stdout
    assert "no VQA validation split: no validation during training" in stdout
    mixed = json.loads((run / "train_mix_llava.json").read_text())
    n_train = sum(len(json.loads((out / f"{n}_llava.json").read_text())) for n in ("train", "captions_train"))
    assert len(mixed) == n_train
    answers = json.loads((run / "gqa_val.json").read_text())
    assert len(answers) == 2  # --eval-limit
    assert summary["gqa_val"] == pytest.approx(
        gqa_accuracy(answers, json.loads((out / "val_questions.json").read_text()))["accuracy"], abs=1e-9)
    if shutil.which("java"):
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        caps = json.loads((run / "captions_captions_train_val.json").read_text())
        gt = json.loads((out / "captions_train_val_captions.json").read_text())
        ids = {c["image_id"] for c in caps}
        assert len(ids) == 2
        gts = {i: [{"caption": a["caption"]} for a in gt["annotations"] if a["image_id"] == i] for i in ids}
        res = {c["image_id"]: [{"caption": c["caption"]}] for c in caps}
        tok = PTBTokenizer()
        cider, _ = Cider().compute_score(tok.tokenize(gts), tok.tokenize(res))
        assert summary["caption_captions_train_val_CIDEr"] == pytest.approx(cider, abs=1e-9)
        assert summary["evals_skipped"] == {}
    else:
        assert "java" in summary["evals_skipped"]["captions_train_val"]

"""Dataset converters (data_scripts/) and the VQA eval CLI on tiny official-format fixtures.

Converters and the score-mode CLI run as subprocesses, exactly as users call them; the generation path
of eval/vqa.py runs in-process with a fake ``mmoe.inference`` pipeline (the real one is another module's
job) to check batching, image skipping and subset scoring.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SUFFIX = "\nAnswer the question using a single word or phrase."


def run(script: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          check=False, cwd=REPO, timeout=120)


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def make_image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def answers(*values: str) -> list[dict]:
    return [{"answer": v, "answer_confidence": "yes", "answer_id": i + 1} for i, v in enumerate(values)]


# ------------------------------------------------------------------ VQAv2 fixture (image 3 missing)

@pytest.fixture()
def vqa_files(tmp_path: Path) -> dict[str, Path]:
    images = tmp_path / "images"
    make_image(images / "COCO_val2014_000000000001.jpg")
    make_image(images / "COCO_val2014_000000000002.jpg", (10, 200, 10))
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {}}
    questions = {**header, "questions": [
        {"image_id": 1, "question": "Is it red?", "question_id": 11},
        {"image_id": 1, "question": "How many squares?", "question_id": 12},
        {"image_id": 2, "question": "What color is it?", "question_id": 21},
        {"image_id": 3, "question": "Where is this?", "question_id": 31},
    ]}
    anns = [
        {"question_id": 11, "image_id": 1, "question_type": "is it", "answer_type": "yes/no",
         "multiple_choice_answer": "yes", "answers": answers(*["yes"] * 10)},
        {"question_id": 12, "image_id": 1, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "3", "answers": answers(*(["2"] * 3 + ["3"] * 7))},
        {"question_id": 21, "image_id": 2, "question_type": "what color", "answer_type": "other",
         "multiple_choice_answer": "red", "answers": answers(*["red"] * 10)},
        {"question_id": 31, "image_id": 3, "question_type": "where", "answer_type": "other",
         "multiple_choice_answer": "kitchen", "answers": answers(*["kitchen"] * 10)},
    ]
    return {"images": images, "questions": write(tmp_path / "q.json", questions),
            "annotations": write(tmp_path / "a.json", {"info": {}, "license": {}, "annotations": anns}),
            "out": tmp_path / "out"}


def test_prepare_vqav2_round_trip(vqa_files: dict[str, Path]) -> None:
    f = vqa_files
    proc = run("data_scripts/prepare_vqav2.py", "--questions", f["questions"], "--annotations", f["annotations"],
               "--images", f["images"], "--out", f["out"])
    assert proc.returncode == 0, proc.stderr
    assert "missing_images: 1" in proc.stdout and "questions_skipped_missing_image: 1" in proc.stdout
    llava = json.loads((f["out"] / "val2014_llava.json").read_text())
    assert [s["question_ids"] for s in llava] == [[11, 12], [21]]
    first = llava[0]["conversations"]
    assert first[0] == {"from": "human", "value": "<image>\nIs it red?" + SUFFIX}
    assert first[1] == {"from": "gpt", "value": "yes"}
    assert first[2]["value"] == "How many squares?" + SUFFIX and first[3]["value"] == "3"  # no 2nd <image>
    assert Path(llava[1]["image"]).is_absolute() and Path(llava[1]["image"]).is_file()
    qs = json.loads((f["out"] / "val2014_questions.json").read_text())
    original_anns = {a["question_id"]: a for a in json.loads(f["annotations"].read_text())["annotations"]}
    assert [q["question_id"] for q in qs["questions"]] == [11, 12, 21]
    assert qs["data_subtype"] == "val2014" and qs["questions"][2]["file_name"] == str((f["images"] / "COCO_val2014_000000000002.jpg").resolve())
    anns = json.loads((f["out"] / "val2014_annotations.json").read_text())["annotations"]
    assert anns == [original_anns[q] for q in (11, 12, 21)]


def test_prepare_vqav2_malformed_names_field(vqa_files: dict[str, Path], tmp_path: Path) -> None:
    bad = json.loads(vqa_files["annotations"].read_text())
    del bad["annotations"][1]["answers"]
    proc = run("data_scripts/prepare_vqav2.py", "--questions", vqa_files["questions"], "--annotations",
               write(tmp_path / "bad.json", bad), "--images", vqa_files["images"], "--out", tmp_path / "o")
    assert proc.returncode == 2
    assert "bad.json: annotations[1]: missing field 'answers'" in proc.stderr


def test_prepare_textvqa(tmp_path: Path) -> None:
    make_image(tmp_path / "img" / "abc.jpg")
    data = {"dataset_type": "val", "data": [
        {"question": "What brand?", "question_id": 5, "image_id": "abc",
         "answers": ["nike"] * 6 + ["Nike"] * 4},
        {"question": "What number?", "question_id": 6, "image_id": "abc",
         "answers": ["12", "12", "21", "21", "21", "12", "7", "8", "9", "10"]},  # 3-3 tie: first seen ("12") wins
        {"question": "Gone?", "question_id": 7, "image_id": "zzz", "answers": ["x"] * 10},
    ]}
    proc = run("data_scripts/prepare_vqav2.py", "--format", "textvqa", "--questions", write(tmp_path / "t.json", data),
               "--images", tmp_path / "img", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "missing_images: 1" in proc.stdout
    anns = json.loads((tmp_path / "out" / "val_annotations.json").read_text())["annotations"]
    assert [a["question_id"] for a in anns] == [5, 6]
    assert [a["answer"] for a in anns[0]["answers"]] == data["data"][0]["answers"]
    assert [a["answer_id"] for a in anns[0]["answers"]] == list(range(1, 11))
    assert anns[0]["multiple_choice_answer"] == "nike" and anns[1]["multiple_choice_answer"] == "12"
    qs = json.loads((tmp_path / "out" / "val_questions.json").read_text())
    assert qs["questions"][0] == {"question_id": 5, "image_id": "abc", "question": "What brand?",
                               "file_name": str((tmp_path / "img" / "abc.jpg").resolve())}

    del data["data"][1]["answers"]
    proc = run("data_scripts/prepare_vqav2.py", "--format", "textvqa", "--questions", write(tmp_path / "t2.json", data),
               "--images", tmp_path / "img", "--out", tmp_path / "out2")
    assert proc.returncode == 2 and "data[1]: missing field 'answers'" in proc.stderr


def test_prepare_gqa(tmp_path: Path) -> None:
    make_image(tmp_path / "img" / "n1.jpg")
    questions = {
        "q1": {"imageId": "n1", "question": "Is the ball red?", "answer": "yes", "fullAnswer": "Yes, it is."},
        "q2": {"imageId": "n1", "question": "What is on the left?", "answer": "cup", "fullAnswer": "A cup."},
        "q3": {"imageId": "n2", "question": "Who?", "answer": "man", "fullAnswer": "A man."},
    }
    proc = run("data_scripts/prepare_gqa.py", "--questions", write(tmp_path / "g.json", questions),
               "--images", tmp_path / "img", "--out", tmp_path / "out", "--split", "testdev")
    assert proc.returncode == 0, proc.stderr
    assert "missing_images: 1" in proc.stdout
    kept = json.loads((tmp_path / "out" / "testdev_questions.json").read_text())
    assert sorted(kept) == ["q1", "q2"] and kept["q2"]["answer"] == "cup"
    llava = json.loads((tmp_path / "out" / "testdev_llava.json").read_text())
    assert len(llava) == 1 and llava[0]["question_ids"] == ["q1", "q2"]
    assert [t["value"] for t in llava[0]["conversations"][1::2]] == ["yes", "cup"]

    del questions["q2"]["imageId"]
    proc = run("data_scripts/prepare_gqa.py", "--questions", write(tmp_path / "g2.json", questions),
               "--images", tmp_path / "img", "--out", tmp_path / "out2")
    assert proc.returncode == 2 and "['q2']: missing field 'imageId'" in proc.stderr


def test_prepare_coco_captions(tmp_path: Path) -> None:
    make_image(tmp_path / "img" / "val" / "x1.jpg")
    coco = {"info": {"year": 2014}, "images": [{"id": 1, "file_name": "val/x1.jpg"}, {"id": 2, "file_name": "val/x2.jpg"}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "A red square."},
                            {"id": 2, "image_id": 1, "caption": "a small red image "},
                            {"id": 3, "image_id": 2, "caption": "Missing image."}]}
    cpath = write(tmp_path / "captions_val.json", coco)
    proc = run("data_scripts/prepare_coco_captions.py", "--captions", cpath, "--images", tmp_path / "img",
               "--out", tmp_path / "out", "--split", "val")
    assert proc.returncode == 0, proc.stderr
    assert "missing_images: 1" in proc.stdout
    llava = json.loads((tmp_path / "out" / "val_llava.json").read_text())
    assert [s["conversations"][1]["value"] for s in llava] == ["A red square.", "a small red image"]
    assert llava[0]["conversations"][0]["value"] == "<image>\nDescribe the image briefly."
    gt = json.loads((tmp_path / "out" / "val_captions.json").read_text())
    # file_name as found on disk, like the LLaVA samples' image: eval/caption.py --images OUT opens it
    assert gt["images"] == [{"id": 1, "file_name": str((tmp_path / "img" / "val" / "x1.jpg").resolve())}]
    assert gt["annotations"] == coco["annotations"][:2] and llava[0]["image"] == gt["images"][0]["file_name"]
    assert gt["info"] == {"year": 2014}

    proc = run("data_scripts/prepare_coco_captions.py", "--captions", cpath, "--images", tmp_path / "img",
               "--out", tmp_path / "out1", "--split", "val", "--mode", "per-image")
    assert proc.returncode == 0 and len(json.loads((tmp_path / "out1" / "val_llava.json").read_text())) == 1

    del coco["annotations"][0]["caption"]
    proc = run("data_scripts/prepare_coco_captions.py", "--captions", write(tmp_path / "bad.json", coco),
               "--images", tmp_path / "img", "--out", tmp_path / "out2")
    assert proc.returncode == 2 and "annotations[0]: missing field 'caption'" in proc.stderr


def test_prepare_llava(tmp_path: Path) -> None:
    make_image(tmp_path / "img" / "coco" / "a.jpg")
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]
    samples = [
        {"id": "ok", "image": "coco/a.jpg", "conversations": conv},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "gone", "image": "coco/missing.jpg", "conversations": conv},
        {"id": "roles", "image": "coco/a.jpg", "conversations": [conv[1], conv[0]]},
        {"id": "tokens", "image": "coco/a.jpg", "conversations": [{"from": "human", "value": "no token"}, conv[1]]},
    ]
    jpath = write(tmp_path / "llava.json", samples)
    proc = run("data_scripts/prepare_llava.py", "--json", jpath, "--images", tmp_path / "img", "--out", tmp_path / "out",
               "--val-fraction", "0")
    assert proc.returncode == 0, proc.stderr
    assert "malformed: 2" in proc.stdout and "samples_missing_image: 1" in proc.stdout
    assert "conversations[k]: field 'from'" in proc.stdout
    cleaned = json.loads((tmp_path / "out" / "train_llava.json").read_text())
    assert [s["id"] for s in cleaned] == ["ok", "text-only"]
    assert cleaned[0]["image"] == str((tmp_path / "img" / "coco" / "a.jpg").resolve())
    assert cleaned[0]["conversations"] == conv

    strict = run("data_scripts/prepare_llava.py", "--json", jpath, "--images", tmp_path / "img",
                 "--out", tmp_path / "o2", "--strict")
    assert strict.returncode == 2 and "2 malformed samples" in strict.stderr
    not_list = run("data_scripts/prepare_llava.py", "--json", write(tmp_path / "d.json", {"a": 1}),
                   "--images", tmp_path / "img", "--out", tmp_path / "o3")
    assert not_list.returncode == 2 and "expected a JSON list" in not_list.stderr


# ------------------------------------------------------------------ eval/vqa.py

@pytest.fixture()
def converted(vqa_files: dict[str, Path]) -> dict[str, Path]:
    f = vqa_files
    proc = run("data_scripts/prepare_vqav2.py", "--questions", f["questions"], "--annotations", f["annotations"],
               "--images", f["images"], "--out", f["out"])
    assert proc.returncode == 0, proc.stderr
    return {**f, "q": f["out"] / "val2014_questions.json", "a": f["out"] / "val2014_annotations.json"}


def test_eval_vqa_score_end_to_end(converted: dict[str, Path], tmp_path: Path) -> None:
    # q11: 10x"yes", "yes" -> 1.0 | q12: 3x"2"+7x"3", "two" -> normalised -> 3 humans -> 0.9
    # q21: 10x"red", "Red" -> unanimous GT compared raw -> 0.   overall = 100 * 1.9 / 3 = 63.33
    results = write(tmp_path / "res.json", [{"question_id": 11, "answer": "yes"}, {"question_id": 12, "answer": "two"},
                                            {"question_id": 21, "answer": "Red"}])
    proc = run("eval/vqa.py", "--score", "--results", results, "--questions", converted["q"],
               "--annotations", converted["a"])
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["overall"] == 63.33 and last["num_questions"] == 3
    assert last["per_answer_type"] == {"yes/no": 100.0, "number": 90.0, "other": 0.0}
    assert json.loads((tmp_path / "res.metrics.json").read_text()) == last

    partial = write(tmp_path / "partial.json", [{"question_id": 11, "answer": "yes"}])
    proc = run("eval/vqa.py", "--score", "--results", partial, "--questions", converted["q"],
               "--annotations", converted["a"])
    assert proc.returncode == 2 and "2 annotation question ids have no result" in proc.stderr
    proc = run("eval/vqa.py", "--score", "--results", partial, "--questions", converted["q"],
               "--annotations", converted["a"], "--allow-subset")
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[-1])["overall"] == 100.0


def test_eval_vqa_score_gqa_and_pope(tmp_path: Path) -> None:
    gqa = write(tmp_path / "gqa.json", {"1": {"imageId": "n1", "question": "?", "answer": "yes"},
                                        "2": {"imageId": "n1", "question": "?", "answer": "cup"}})
    res = write(tmp_path / "gres.json", [{"questionId": "1", "prediction": "Yes."}, {"questionId": "2", "prediction": "mug"}])
    proc = run("eval/vqa.py", "--format", "gqa", "--score", "--results", res, "--questions", gqa)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["accuracy"] == 50.0
    pope = tmp_path / "pope.jsonl"
    pope.write_text("\n".join(json.dumps({"question_id": i, "image": "x.jpg", "text": "?", "label": lab})
                              for i, lab in enumerate(["yes", "no", "no", "yes"])))
    res = write(tmp_path / "pres.json", [{"question_id": i, "answer": a} for i, a in enumerate(["Yes", "No.", "yes", "no"])])
    proc = run("eval/vqa.py", "--format", "pope", "--score", "--results", res, "--questions", pope)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.splitlines()[-1])
    assert (m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]) == (50.0, 50.0, 50.0, 50.0)


def test_eval_vqa_generation_with_fake_pipeline(converted: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    sys.path.insert(0, str(REPO))
    from eval import vqa as eval_vqa

    (converted["images"] / "COCO_val2014_000000000002.jpg").write_bytes(b"not an image")  # unreadable -> skipped
    calls: list[int] = []

    class FakePipe:
        def answer(self, images, questions, max_new_tokens=8, short_answer=True):
            assert all(isinstance(im, Image.Image) for im in images) and short_answer
            calls.append(len(images))
            return ["Yes." if "red" in q else "Two\nbecause" for q in questions]

    fake = types.ModuleType("mmoe.inference")
    fake.load_pipeline = lambda export_dir, device=None: FakePipe()
    monkeypatch.setitem(sys.modules, "mmoe.inference", fake)
    model_dir = tmp_path / "export"
    model_dir.mkdir()
    out = tmp_path / "gen" / "results.json"
    rc = eval_vqa.main(["--model", str(model_dir), "--questions", str(converted["q"]), "--annotations",
                        str(converted["a"]), "--images", str(converted["images"]), "--out", str(out), "--batch-size", "2"])
    assert rc == 0
    assert json.loads(out.read_text()) == [{"question_id": 11, "answer": "yes"}, {"question_id": 12, "answer": "2"}]
    assert calls == [2]  # batch 1: both image-1 questions; batch 2: only the unreadable image -> no call
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["skipped_images"] == 1 and last["skipped_questions"] == 1 and last["subset"] is True
    assert last["overall"] == 95.0  # (1.0 + 0.9) / 2

    rc = eval_vqa.main(["--model", str(tmp_path / "nope"), "--questions", str(converted["q"]), "--annotations",
                        str(converted["a"]), "--images", str(converted["images"]), "--out", str(out)])
    assert rc == 2 and "model export directory not found" in capsys.readouterr().err

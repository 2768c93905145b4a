"""caption_metrics must equal pycocoevalcap's scorers called directly, and behave sanely.

Java runs here (PTB tokenizer + METEOR), so each caption_metrics call costs a few seconds: the fixtures
are module-scoped and each scorer set is run once.
"""

from __future__ import annotations

import shutil

import pytest

from mmoe.metrics import caption as caption_mod
from mmoe.metrics.caption import JavaNotFoundError, caption_metrics

# Only the tests that tokenize or score need Java; input validation and the missing-Java error do not.
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")

GT = {
    "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
    "annotations": [
        {"id": 10, "image_id": 1, "caption": "A brown dog runs across the green grass."},
        {"id": 11, "image_id": 1, "caption": "a dog running on a lawn"},
        {"id": 12, "image_id": 1, "caption": "The dog is playing outside in a park."},
        {"id": 20, "image_id": 2, "caption": "Two people ride their bikes down a city street."},
        {"id": 21, "image_id": 2, "caption": "people riding bicycles on a road"},
        {"id": 30, "image_id": 3, "caption": "A plate of pasta with tomato sauce on a table."},
        {"id": 31, "image_id": 3, "caption": "a bowl of spaghetti and red sauce"},
    ],
}
RESULTS = [
    {"image_id": 1, "caption": "A dog running on the grass."},
    {"image_id": 2, "caption": "two people riding bikes on a street"},
    {"image_id": 3, "caption": "a plate of food on a table"},
]
PERFECT = [{"image_id": 1, "caption": "A brown dog runs across the green grass."},
           {"image_id": 2, "caption": "Two people ride their bikes down a city street."},
           {"image_id": 3, "caption": "A plate of pasta with tomato sauce on a table."}]


def direct_scores(gt: dict, results: list[dict]) -> dict[str, float]:
    """The pycocoevalcap pipeline written out independently of mmoe (what COCOEvalCap does, minus SPICE)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = [r["image_id"] for r in results]
    gts = {i: [{"caption": a["caption"]} for a in gt["annotations"] if a["image_id"] == i] for i in ids}
    res = {r["image_id"]: [{"caption": r["caption"]}] for r in results}
    gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
    out["METEOR"] = Meteor().compute_score(gts, res)[0]
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


@pytest.fixture(scope="module")
def ours() -> dict:
    return caption_metrics(RESULTS, GT)


@needs_java
def test_equals_pycocoevalcap_scorers_exactly(ours: dict) -> None:
    expected = direct_scores(GT, RESULTS)
    for key, value in expected.items():
        assert ours[key] == value, key
    assert ours["SPICE"] is None and "download" in ours["notes"]["SPICE"]
    assert ours["num_images"] == 3 and ours["num_gt_images"] == 3
    assert ours["scale"] == "raw pycocoevalcap (0-1, CIDEr-D 0-10); multiply by 100 for paper-style numbers"


@needs_java
def test_perfect_captions_sanity(ours: dict, capsys: pytest.CaptureFixture) -> None:
    perfect = caption_metrics(PERFECT, GT, meteor=False)  # METEOR's Java start-up costs ~10 s
    assert capsys.readouterr().out == ""  # BLEU's corpus statistics do not reach stdout (a CLI's JSON goes there)
    assert perfect["METEOR"] is None and perfect["notes"]["METEOR"] == "skipped: meteor=False"
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)  # candidate equals one reference exactly
    assert perfect["ROUGE-L"] == pytest.approx(1.0)
    assert perfect["CIDEr"] > perfect["BLEU-4"]
    for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert perfect[key] > ours[key], key


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_every_input_refusal_names_the_problem_in_full() -> None:
    """Input checks run before Java starts: whole messages, so a field or index named wrongly shows."""
    gt_message = "captions GT: expected a COCO captions JSON object with an 'annotations' list"
    for bad_gt, message in [
        ([GT], gt_message), ({"images": GT["images"]}, gt_message),
        ({"annotations": [5]}, "captions GT['annotations'][0]: expected an object"),
        ({"annotations": [{"caption": "x"}]}, "captions GT['annotations'][0]: missing field 'image_id'"),
        ({"annotations": [{"image_id": 1}]}, "captions GT['annotations'][0]: missing string field 'caption'"),
        ({"annotations": []}, "captions GT['annotations'] is empty: nothing to score against"),
    ]:
        assert _message(caption_metrics, RESULTS, bad_gt) == message
    for bad_results, message in [
        ("a dog", "caption results: expected a list of {'image_id', 'caption'} objects, got str"),
        ([5], "caption results[0]: missing field 'image_id'"),
        ([{"caption": "x"}], "caption results[0]: missing field 'image_id'"),
        ([{"image_id": 1}], "caption results[0]: missing string field 'caption'"),
        (RESULTS[:2] + RESULTS[:1], "caption results[2]: duplicate image_id 1 "
                                    "(COCO caption evaluation needs exactly one caption per image)"),
        ([], "caption results: empty list, nothing to score"),
    ]:
        assert _message(caption_metrics, bad_results, GT) == message
    # ids of mixed types are listed in repr order (a plain sort would fail on int vs str), the first five only
    extra = [{"image_id": i, "caption": "x"} for i in ("x", 99, 98, 97, 96, 95)]
    assert _message(caption_metrics, RESULTS + extra, GT) == (
        "caption results do not match the GT: 6 result image ids have no reference captions "
        "(e.g. ['x', 95, 96, 97, 98]). Note: image id types differ between results and GT (e.g. str vs int).")
    gt_more = {"annotations": GT["annotations"] + [{"image_id": i, "caption": "x"} for i in range(4, 10)]}
    assert _message(caption_metrics, RESULTS[1:], gt_more) == (
        "caption results do not match the GT: 7 GT images have no result caption (e.g. [1, 4, 5, 6, 7]); pass "
        "allow_subset=True to score only the captioned images (CIDEr then uses the subset's IDF and is not "
        "comparable to full-split numbers).")
    gt_mixed = {"annotations": GT["annotations"] + [{"image_id": "z", "caption": "x"}]}
    assert _message(caption_metrics, RESULTS[1:] + [{"image_id": 98, "caption": "x"}], gt_mixed) == (
        "caption results do not match the GT: 1 result image ids have no reference captions (e.g. [98]); "
        "2 GT images have no result caption (e.g. ['z', 1]); pass allow_subset=True to score only the captioned "
        "images (CIDEr then uses the subset's IDF and is not comparable to full-split numbers). "
        "Note: image id types differ between results and GT (e.g. str vs int).")


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caption_mod.shutil, "which", lambda name: None)
    with pytest.raises(JavaNotFoundError) as info:
        caption_metrics(RESULTS, GT)
    assert str(info.value) == ("`java` was not found on PATH: pycocoevalcap's PTBTokenizer and METEOR run on Java. "
                               "Install a JRE (e.g. `apt-get install openjdk-17-jre-headless`) and retry.")


@needs_java
def test_eval_caption_cli_score(ours: dict, tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    gt, res = tmp_path / "gt.json", tmp_path / "res.json"
    gt.write_text(json.dumps(GT))
    res.write_text(json.dumps(RESULTS))
    proc = subprocess.run([sys.executable, str(repo / "eval/caption.py"), "--score", "--results", str(res),
                           "--captions", str(gt), "--no-meteor"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert last[key] == ours[key], key
    assert last["METEOR"] is None and last["SPICE"] is None
    assert json.loads((tmp_path / "res.metrics.json").read_text()) == last


@needs_java
def test_eval_caption_generation_with_fake_pipeline(tmp_path, monkeypatch, capsys) -> None:
    import json
    import sys
    import types
    from pathlib import Path

    from PIL import Image

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    from eval import caption as eval_caption

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.jpg")
    (tmp_path / "img" / "b.jpg").write_bytes(b"broken")  # unreadable -> skipped and counted
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(GT))  # c.jpg does not exist at all -> skipped too

    class FakePipe:
        def caption(self, images, max_new_tokens=24):
            return ["a dog running on the grass\nextra line"] * len(images)

    fake = types.ModuleType("mmoe.inference")
    fake.load_pipeline = lambda export_dir, device=None: FakePipe()
    monkeypatch.setitem(sys.modules, "mmoe.inference", fake)
    (tmp_path / "export").mkdir()
    out = tmp_path / "caps.json"
    rc = eval_caption.main(["--model", str(tmp_path / "export"), "--captions", str(gt), "--images",
                            str(tmp_path / "img"), "--out", str(out), "--no-meteor"])
    assert rc == 0
    assert json.loads(out.read_text()) == [{"image_id": 1, "caption": "a dog running on the grass"}]
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["skipped_images"] == 2 and last["subset"] is True and last["num_images"] == 1
    assert last["BLEU-1"] > 0.5

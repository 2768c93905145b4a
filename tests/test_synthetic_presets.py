"""Synthetic presets: the default's files are pinned byte for byte; ``--preset hard`` is deterministic, its new
questions are answered correctly (checked against the scene records, not the generator's rules), its held-out
combinations stay held out, and its words and lengths fit the tokenizer and the default VLM config."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from mmoe.data.synthetic import PRESETS, generate_dataset

REPO = Path(__file__).resolve().parents[1]
SIZES = {"n_train": 40, "n_val": 10, "n_test": 10, "n_heldout": 10}
# sha256 over (relative path, bytes) of every file generate_dataset(seed=0, **SIZES) wrote, computed with the
# generator of main at 6089f68 (before presets existed): the default world must never drift.
DEFAULT_SEED0_SHA256 = "3aaeb6122cc21960edd65e0049f506d0c8284541c34f9a9d5dc1a1ff30caec68"


def _tree_sha256(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode())
            h.update(b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _load(d: Path, name: str):
    return json.loads((d / name).read_text())


def _make_cli():
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "data_scripts" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hard(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hard")
    args = ["--out", str(out), "--seed", "0", "--preset", "hard"]
    for k, v in SIZES.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    assert _make_cli().main(args) == 0
    return out


def test_default_preset_output_is_byte_identical_to_the_pre_preset_generator(tmp_path):
    generate_dataset(tmp_path / "a", 0, log=lambda _m: None, **SIZES)
    assert _tree_sha256(tmp_path / "a") == DEFAULT_SEED0_SHA256
    generate_dataset(tmp_path / "b", 0, log=lambda _m: None, preset="default", **SIZES)
    assert _tree_sha256(tmp_path / "b") == DEFAULT_SEED0_SHA256
    assert "preset" not in _load(tmp_path / "a", "meta.json")
    # rendering in several processes writes the same files
    generate_dataset(tmp_path / "c", 0, log=lambda _m: None, workers=3, **SIZES)
    assert _tree_sha256(tmp_path / "c") == DEFAULT_SEED0_SHA256


def test_hard_preset_same_seed_byte_identical_other_seed_differs(hard, tmp_path):
    again = tmp_path / "again"
    generate_dataset(again, 0, log=lambda _m: None, preset="hard", workers=2, **SIZES)
    first, second = _files(hard), _files(again)
    assert sorted(first) == sorted(second)
    assert [n for n in first if first[n] != second[n]] == []
    other = tmp_path / "other"
    generate_dataset(other, 1, log=lambda _m: None, preset="hard", **SIZES)
    assert _files(other)["train_questions.json"] != first["train_questions.json"]


def test_hard_preset_world_objects_and_heldout_combos(hard):
    meta = _load(hard, "meta.json")
    p = PRESETS["hard"]
    assert meta["preset"] == "hard" and len(meta["shapes"]) == 7 and len(meta["colors"]) == 9
    assert meta["sizes"] == ["small", "medium", "large"]
    heldout = {tuple(c) for c in meta["heldout_combos"]}
    assert len(heldout) == 13  # round(0.2 * 63), against 4 of 30 in the default world
    assert max(Counter(s for s, _ in heldout).values()) <= 2 and max(Counter(c for _, c in heldout).values()) <= 2
    train_objs = [o for s in _load(hard, "train_scenes.json")["scenes"] for o in s["objects"]]
    # every shape and every colour is still seen in training (with other partners)
    assert {o["shape"] for o in train_objs} == set(p.shapes) and {o["color"] for o in train_objs} == set(p.colors)
    counts = Counter(len(s["objects"]) for split in ("train", "val", "test", "heldout")
                     for s in _load(hard, f"{split}_scenes.json")["scenes"])
    assert min(counts) >= 2 and max(counts) <= 6 and max(counts) >= 5
    for split in ("train", "val", "test"):
        for scene in _load(hard, f"{split}_scenes.json")["scenes"]:
            assert not {(o["shape"], o["color"]) for o in scene["objects"]} & heldout
        for q in _load(hard, f"{split}_questions.json")["questions"]:
            assert not any(f"{c} {s}" in q["question"].lower() for s, c in heldout), q["question"]
    for scene in _load(hard, "heldout_scenes.json")["scenes"]:
        assert {(o["shape"], o["color"]) for o in scene["objects"]} & heldout
    cats = {c["name"] for c in _load(hard, "train_instances.json")["categories"]}
    assert len(cats) == 63 and "pink star" in cats


def _find(objects: list[dict], phrase: str) -> dict:
    """The one object the phrase ("[size] [colour] shape") names; fails if it names none or several."""
    words = phrase.split()
    hits = [o for o in objects if all(w in (o["size"], o["color"], o["shape"]) for w in words)]
    assert len(hits) == 1, f"{phrase!r} names {len(hits)} objects"
    return hits[0]


def test_hard_preset_size_compare_and_relation_answers_match_the_scene(hard):
    seen = Counter()
    for split in ("train", "test", "heldout"):
        scenes = {s["image_id"]: s["objects"] for s in _load(hard, f"{split}_scenes.json")["scenes"]}
        answers = {a["question_id"]: a for a in _load(hard, f"{split}_annotations.json")["annotations"]}
        for q in _load(hard, f"{split}_questions.json")["questions"]:
            objs, text = scenes[q["image_id"]], q["question"]
            ann = answers[q["question_id"]]
            answer = ann["multiple_choice_answer"]
            if m := re.fullmatch(r"(?:What size is|How big is) the (.+)\?", text):
                assert answer == _find(objs, m[1])["size"], text
                assert ann["question_type"] == "what size"
                seen["size"] += 1
            elif m := re.fullmatch(r"Is the (.+) (larger|smaller) than the (.+)\?", text):
                a, b = _find(objs, m[1]), _find(objs, m[3])
                truth = a["radius"] > b["radius"] if m[2] == "larger" else a["radius"] < b["radius"]
                assert a["radius"] != b["radius"] and answer == ("yes" if truth else "no"), text
                seen["compare"] += 1
            elif m := re.fullmatch(r"What (color|shape) is the object (left of|right of|above|below) the (.+)\?", text):
                b = _find(objs, m[3])
                axis, sign = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}[m[2]]
                side = [o for o in objs if o is not b and sign * (o[axis] - b[axis]) > 0]
                assert len(side) == 1, f"{text}: {len(side)} objects on that side"
                assert abs(side[0][axis] - b[axis]) >= 0.12 * 64 and answer == side[0][m[1]], text
                seen["relation"] += 1
    assert min(seen[k] for k in ("size", "compare", "relation")) >= 5, seen


def test_hard_preset_tokenizer_covers_every_word_and_default_vlm_config_fits(hard):
    from mmoe.data.dataset import LlavaJsonDataset
    from mmoe.data.images import build_image_transform
    from mmoe.data.tokenizer import load_tokenizer

    tok = load_tokenizer(hard)
    unk = tok.convert_tokens_to_ids("<unk>")
    texts = []
    for split in ("train", "val", "test", "heldout"):
        texts += [q["question"] for q in _load(hard, f"{split}_questions.json")["questions"]]
        texts += [a["answer"] for ann in _load(hard, f"{split}_annotations.json")["annotations"]
                  for a in ann["answers"]]
        texts += [c["caption"] for c in _load(hard, f"{split}_captions.json")["annotations"]]
    texts += ["a pink star and a cyan hexagon", "six objects", "how many brown stars are there? 5 6 medium"]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert unk not in ids, f"unknown word in {t!r}"
        assert tok.decode(ids) == t.lower()
    cfg = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    image_size, max_len = cfg["model"]["arch"]["vision"]["image_size"], cfg["data"]["max_len"]
    assert _load(hard, "meta.json")["image_size"] == image_size
    transform = build_image_transform(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    ds = LlavaJsonDataset(hard / "train_llava.json", hard, tok, transform, max_len=10_000)
    raw = _load(hard, "train_llava.json")
    for i in range(len(ds)):
        item = ds[i]
        assert item["input_ids"].numel() <= max_len, "a hard training conversation would be truncated"
        n_answers = sum(1 for t in raw[i]["conversations"] if t["from"] == "gpt")
        assert int((item["labels"] == tok.eos_token_id).sum()) == n_answers


def test_unknown_preset_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _make_cli().main(["--out", str(tmp_path), "--seed", "0", "--preset", "extreme"])
    assert "extreme" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown synthetic preset 'extreme'"):
        generate_dataset(tmp_path, 0, preset="extreme", log=lambda _m: None, **SIZES)

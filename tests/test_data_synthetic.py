"""Synthetic dataset generator: determinism, held-out split, VQAv2 / COCO / LLaVA formats, DataModule on top."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mmoe.constants import IGNORE_INDEX, IMAGE_TOKEN
from mmoe.data.dataset import LlavaJsonDataset
from mmoe.data.images import build_image_transform, load_image
from mmoe.data.synthetic import INFLECTIONS, SPLITS, generate_dataset
from mmoe.data.template import CAPTION_PROMPT, SHORT_ANSWER_SUFFIX
from mmoe.data.tokenizer import load_tokenizer

SIZES = {"n_train": 40, "n_val": 10, "n_test": 10, "n_heldout": 10}
REPO = Path(__file__).resolve().parents[1]


def _generate(out: Path, seed: int) -> Path:
    generate_dataset(out, seed, image_size=64, questions_per_image=3, log=lambda _msg: None, **SIZES)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("synth_a"), seed=0)


def _load(d: Path, name: str):
    return json.loads((d / name).read_text())


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _scenes(d: Path, split: str) -> dict[int, list[dict]]:
    return {s["image_id"]: s["objects"] for s in _load(d, f"{split}_scenes.json")["scenes"]}


def test_same_seed_is_byte_identical_and_other_seed_differs(data, tmp_path):
    again = _files(_generate(tmp_path / "again", seed=0))
    first = _files(data)
    assert sorted(first) == sorted(again)
    assert len([f for f in first if f.endswith(".png")]) == sum(SIZES.values())
    for name, content in first.items():
        assert content == again[name], f"{name} differs between two runs with the same seed"

    other = _files(_generate(tmp_path / "other", seed=1))
    assert other["train_questions.json"] != first["train_questions.json"]
    differing_pngs = [n for n in first if n.endswith(".png") and first[n] != other.get(n)]
    assert len(differing_pngs) > 0.9 * sum(SIZES.values())


def test_heldout_combos_never_in_train_val_test_and_in_every_heldout_image(data):
    meta = _load(data, "meta.json")
    heldout = {tuple(c) for c in meta["heldout_combos"]}
    assert 1 <= len(heldout) <= 0.25 * len(meta["shapes"]) * len(meta["colors"])
    for split in ("train", "val", "test"):
        for image_id, objects in _scenes(data, split).items():
            combos = {(o["shape"], o["color"]) for o in objects}
            assert not combos & heldout, f"{split} image {image_id} contains held-out {combos & heldout}"
        for q in _load(data, f"{split}_questions.json")["questions"]:
            text = q["question"].lower()
            assert not any(f"{c} {s}" in text for s, c in heldout), (
                f"{split} question mentions a held-out combo: {text}"
            )
    ho_scenes = _scenes(data, "heldout")
    assert len(ho_scenes) == SIZES["n_heldout"]
    for image_id, objects in ho_scenes.items():
        assert {(o["shape"], o["color"]) for o in objects} & heldout, (
            f"heldout image {image_id} has no held-out combo"
        )
    # compositional: every shape and every colour is still seen in training, just not in the held-out pairing
    train_objs = [o for objs in _scenes(data, "train").values() for o in objs]
    assert {s for s, _ in heldout} <= {o["shape"] for o in train_objs}
    assert {c for _, c in heldout} <= {o["color"] for o in train_objs}


def test_images_exist_open_and_match_scene_records(data):
    for split in SPLITS:
        caps = _load(data, f"{split}_captions.json")
        scenes = _scenes(data, split)
        for im in caps["images"]:
            assert re.fullmatch(rf"images/{split}/{split}_\d{{6}}\.png", im["file_name"])
            img = load_image(data / im["file_name"])
            assert img.size == (im["width"], im["height"]) == (64, 64)
            arr = np.asarray(img, dtype=np.int64)
            for o in scenes[
                im["id"]
            ]:  # object centres are drawn with the recorded colour (noise is a few levels)
                px = arr[int(o["y"]), int(o["x"])]
                assert np.abs(px - np.array(o["rgb"])).max() < 40, (im["file_name"], o, px)


def test_vqa_files_follow_official_format(data):
    all_qids: list[int] = []
    qtypes = {
        "what color": "other",
        "what shape": "other",
        "how many": "number",
        "is there": "yes/no",
        "is the": "yes/no",
    }
    for split in SPLITS:
        qf, af = _load(data, f"{split}_questions.json"), _load(data, f"{split}_annotations.json")
        assert set(qf) == {"info", "task_type", "data_type", "data_subtype", "license", "questions"}
        assert qf["task_type"] == "Open-Ended" and qf["data_subtype"] == split == af["data_subtype"]
        assert {"info", "data_subtype", "annotations"} <= set(af)
        assert len(qf["questions"]) == (6 if split == "train" else 3) * SIZES[f"n_{split}"]
        for q in qf["questions"]:
            assert set(q) == {"image_id", "question", "question_id"}
            assert isinstance(q["question_id"], int) and q["question"].endswith("?")
        anns = {a["question_id"]: a for a in af["annotations"]}
        assert set(anns) == {q["question_id"] for q in qf["questions"]}
        scenes = _scenes(data, split)
        for q in qf["questions"]:
            a = anns[q["question_id"]]
            assert a["image_id"] == q["image_id"]
            assert qtypes[a["question_type"]] == a["answer_type"]
            assert re.match(QTYPE_PATTERNS[a["question_type"]], q["question"]), (
                q["question"],
                a["question_type"],
            )
            assert len(a["answers"]) == 10
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert all(x["answer_confidence"] == "yes" for x in a["answers"])
            votes = Counter(x["answer"] for x in a["answers"])
            assert votes[a["multiple_choice_answer"]] >= 8  # annotator noise never flips the majority
            _check_answer(q["question"], a["multiple_choice_answer"], scenes[q["image_id"]])
        all_qids += [q["question_id"] for q in qf["questions"]]
    assert len(all_qids) == len(set(all_qids)), "question ids must be unique across splits"


QTYPE_PATTERNS = {
    "what color": r"What (color is|is the color of) the ",
    "what shape": r"What (shape is|is the shape of) the ",
    "how many": r"How many ",
    "is there": r"Is there an? ",
    "is the": r"Is the ",
}


def _check_answer(question: str, answer: str, objects: list[dict]) -> None:
    """Recompute the answer of the question forms that are easy to parse from the scene records."""
    if question == "How many objects are there?":
        assert answer == str(len(objects))
    elif m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        word = m.group(1)
        assert answer == str(sum(word in (o["color"], o["size"]) for o in objects)), question
    elif m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        color, shape = m.groups()
        assert answer == ("yes" if any((o["color"], o["shape"]) == (color, shape) for o in objects) else "no")
    elif m := re.fullmatch(r"What (?:color is|is the color of) the (\w+)\?", question):
        matches = [o for o in objects if o["shape"] == m.group(1)]
        assert len(matches) == 1 and answer == matches[0]["color"], question
    elif m := re.fullmatch(r"What (?:shape is|is the shape of) the (\w+) object\?", question):
        matches = [o for o in objects if o["color"] == m.group(1)]
        assert len(matches) == 1 and answer == matches[0]["shape"], question


def test_coco_captions_and_unique_ids(data):
    cap_ids: list[int] = []
    img_ids: list[int] = []
    tok = load_tokenizer(data)
    for split in SPLITS:
        caps = _load(data, f"{split}_captions.json")
        assert {"info", "images", "annotations"} <= set(caps)
        per_image = Counter(a["image_id"] for a in caps["annotations"])
        assert set(per_image) == {im["id"] for im in caps["images"]}
        assert set(per_image.values()) == {5}
        for a in caps["annotations"]:
            assert set(a) == {"id", "image_id", "caption"} and a["caption"] == a["caption"].lower()
            assert tok.decode(tok.encode(a["caption"], add_special_tokens=False)) == a["caption"]
        cap_ids += [a["id"] for a in caps["annotations"]]
        img_ids += [im["id"] for im in caps["images"]]
    assert len(cap_ids) == len(set(cap_ids)) and len(img_ids) == len(set(img_ids))
    for plural, singular in INFLECTIONS.items():  # "circles" asks with the same token as "circle"
        assert tok.convert_ids_to_tokens(tok.encode(plural, add_special_tokens=False))[0] == "▁" + singular


def test_llava_json_parses_through_dataset(data):
    tok = load_tokenizer(data)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == 4 and len(tok) < 512
    transform = build_image_transform(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    for split in SPLITS:
        raw = _load(data, f"{split}_llava.json")
        assert len(raw) == SIZES[f"n_{split}"]
        ds = LlavaJsonDataset(data / f"{split}_llava.json", data, tok, transform, max_len=256)
        for i in range(len(ds)):
            item = ds[i]
            assert item["pixel_values"].shape == (1, 3, 64, 64)
            assert int((item["input_ids"] == 4).sum()) == 1
            n_answers = sum(1 for t in raw[i]["conversations"] if t["from"] == "gpt")
            assert int((item["labels"] == tok.eos_token_id).sum()) == n_answers
        convs = raw[0]["conversations"]
        assert convs[0]["value"].startswith(IMAGE_TOKEN + "\n")
        prompts = [t["value"].replace(IMAGE_TOKEN + "\n", "") for t in convs[::2]]
        has_caption = CAPTION_PROMPT in prompts
        assert has_caption == (split == "train")

        assert all(p.endswith(SHORT_ANSWER_SUFFIX) for p in prompts if p != CAPTION_PROMPT)


def test_datamodule_batches(data):
    from mmoe.data.datamodule import MMoEDataModule

    dm = MMoEDataModule(data_dir=str(data), batch_size=4, val_max_questions=7)
    assert dm._tokenizer is not None, "tokenizer should load eagerly when it exists"
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["image_counts"].tolist() == [1, 1, 1, 1]
    assert ((batch["labels"] != IGNORE_INDEX) <= batch["attention_mask"]).all()
    val = list(dm.val_dataloader())
    qids = torch.cat([b["question_ids"] for b in val]).tolist()
    assert len(qids) == 7 and len(set(qids)) == 7
    known = {q["question_id"] for q in _load(data, "val_questions.json")["questions"]}
    assert set(qids) <= known and dm.val_annotations_path.is_file() and dm.val_questions_path.is_file()
    b = val[0]
    assert b["attention_mask"][:, -1].all(), "generation prompts must be left-padded"
    assert (
        b["prompt_ids"][:, -2:] == torch.tensor(dm.tokenizer.convert_tokens_to_ids(["▁assistant", ":"]))
    ).all()
    assert b["pixel_values"].shape[0] == b["prompt_ids"].shape[0]
    first_epoch = [x["ids"] for x in dm.train_dataloader()]
    dm2 = MMoEDataModule(data_dir=str(data), batch_size=4)
    dm2.setup("fit")
    assert first_epoch == [x["ids"] for x in dm2.train_dataloader()], "seeded shuffling must be reproducible"


def test_cli_refuses_to_overwrite_without_flag(data, capsys):
    spec = importlib.util.spec_from_file_location(
        "make_synthetic", REPO / "data_scripts" / "make_synthetic.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.main(["--out", str(data), "--seed", "0", "--n-train", "2"])
    assert "--overwrite" in capsys.readouterr().err


def test_main_job_regenerates_only_our_stale_datasets(tmp_path):
    """`make train` replaces a synthetic dataset written by an older generator (its conversations differ), and
    never touches a directory that is not ours or is current."""
    from mmoe.data.synthetic import GENERATOR_VERSION
    from mmoe.training.main_job import _stale_synthetic_version

    assert _stale_synthetic_version(tmp_path) is None  # nothing there: plain generation, no overwrite
    (tmp_path / "meta.json").write_text(json.dumps({"generator_version": GENERATOR_VERSION}))
    assert _stale_synthetic_version(tmp_path) is None
    (tmp_path / "meta.json").write_text(json.dumps({"generator_version": "1.0"}))
    assert "1.0" in _stale_synthetic_version(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"name": "someone else's data"}))
    assert _stale_synthetic_version(tmp_path) is None


def test_independent_turns_train_each_question_as_evaluation_asks_it(data):
    """Shared-prefix packing: prefix + segment k is token for token the evaluation prompt of question k plus its
    answer; whole segments that do not fit are dropped; non-image conversations fall back to plain chats."""
    from mmoe.data.template import build_prompt, encode_independent_turns

    tok = load_tokenizer(data)
    raw = _load(data, "train_llava.json")[0]
    ds = LlavaJsonDataset(data / "train_llava.json", data, tok, build_image_transform(64, (0.5,) * 3, (0.5,) * 3),
                          max_len=256, independent_turns=True)
    item = ds[0]
    ids, labels, seg = item["input_ids"].tolist(), item["labels"].tolist(), item["segment_ids"].tolist()
    n_prefix = seg.count(0)
    convs = raw["conversations"]
    assert max(seg) == len(convs) // 2 and seg == sorted(seg)
    for k in range(len(convs) // 2):
        q = convs[2 * k]["value"].replace(IMAGE_TOKEN, "").strip()
        a = convs[2 * k + 1]["value"]
        tokens = ids[:n_prefix] + [t for t, s in zip(ids, seg) if s == k + 1]
        answer = tok.encode(a, add_special_tokens=False) + [tok.eos_token_id]
        assert tokens == build_prompt(tok, IMAGE_TOKEN + "\n" + q) + answer
        assert [lab for lab, s in zip(labels, seg) if s == k + 1][-len(answer):] == answer
    assert sum(lab != IGNORE_INDEX for lab in labels) == sum(
        len(tok.encode(t["value"], add_special_tokens=False)) + 1 for t in convs[1::2])
    # a budget for the prefix and one segment keeps exactly the first segment (never a cut one)
    first = seg.index(2)
    short = encode_independent_turns(tok, convs, max_len=first + 1)
    assert short["input_ids"] == ids[:first] and max(short["segment_ids"]) == 1
    with pytest.raises(ValueError, match="no whole question-answer pair fits"):
        encode_independent_turns(tok, convs, max_len=n_prefix + 1)
    text_only = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]
    assert encode_independent_turns(tok, text_only, max_len=64) is None


def test_instances_files_label_every_object_and_feed_the_label_dataset(data, tmp_path):
    """COCO instances per split (class = colour + shape, box from the scene) and the stage-0 dataset's
    multi-hot targets agree with the scene records; a broken file fails naming the file and the field."""
    from mmoe.data.instances import ImageLabelsDataset, InstancesFormatError

    for split in SPLITS:
        inst = _load(data, f"{split}_instances.json")
        scenes = {s["image_id"]: s for s in _load(data, f"{split}_scenes.json")["scenes"]}
        names = {c["id"]: c["name"] for c in inst["categories"]}
        assert len(names) == 30 and {im["id"] for im in inst["images"]} == set(scenes)
        per_image = Counter(a["image_id"] for a in inst["annotations"])
        assert all(per_image[i] == len(s["objects"]) for i, s in scenes.items())
        for a in inst["annotations"][:20]:
            objs = scenes[a["image_id"]]["objects"]
            x, y, w, h = a["bbox"]
            assert any(f"{o['color']} {o['shape']}" == names[a["category_id"]] and abs(x + w / 2 - o["x"]) < 0.02
                       and abs(y + h / 2 - o["y"]) < 0.02 for o in objs)
    ds = ImageLabelsDataset(data / "val_instances.json", data, build_image_transform(64, (0.5,) * 3, (0.5,) * 3))
    item = ds[0]
    scene = _load(data, "val_scenes.json")["scenes"][0]
    want = {f"{o['color']} {o['shape']}" for o in scene["objects"]}
    assert {ds.class_names[i] for i in item["targets"].nonzero().flatten().tolist()} == want
    assert item["pixel_values"].shape == (3, 64, 64)
    # per-patch targets of the file's boxes; computed once and cached, so a caller editing an item changes nothing
    from mmoe.data.instances import patch_boxes, patch_targets
    dense = ImageLabelsDataset(data / "val_instances.json", data, build_image_transform(64, (0.5,) * 3, (0.5,) * 3),
                               patch_grid=8)
    objects = dense.labels[dense.images[0]["id"]]
    first = dense[0]
    torch.testing.assert_close(first["patch_targets"], patch_targets(objects, len(dense.class_names), 8, 64, 64))
    torch.testing.assert_close(first["patch_boxes"], patch_boxes(objects, 8, 64, 64))
    assert first["patch_targets"].amax(0).bool().tolist() == item["targets"].bool().tolist()
    first["patch_targets"].zero_()
    first["patch_boxes"].zero_()
    again = dense[0]
    assert again["patch_targets"].sum() > 0 and again["patch_boxes"][:, 4].sum() > 0
    bad = _load(data, "val_instances.json")
    bad["annotations"][0]["category_id"] = 999
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(InstancesFormatError, match=r"bad.json: annotations\[0\].category_id 999"):
        ImageLabelsDataset(tmp_path / "bad.json", data, lambda im: im)


def test_patch_targets_mark_the_patches_an_object_covers():
    """Per-patch targets (stage 0's token loss) follow the box: covered patches, the centre's patch, nothing else."""
    from mmoe.data.instances import patch_targets

    # 64 px image, 8x8 grid of 8 px patches; a box over x 8..24, y 16..28 (covers 2 columns x 1.5 rows)
    t = patch_targets([(2, [8.0, 16.0, 16.0, 12.0]), (0, None)], num_classes=3, grid=8, width=64, height=64)
    hit = {(i // 8, i % 8) for i in t[:, 2].nonzero().flatten().tolist()}
    assert hit == {(2, 1), (2, 2), (3, 1), (3, 2)}  # row 3 is half covered (>= 25 %)
    assert t[:, :2].sum() == 0  # other classes, and an object without a box, mark nothing
    tiny = patch_targets([(1, [30.0, 30.0, 2.0, 2.0])], num_classes=3, grid=8, width=64, height=64)
    assert tiny[:, 1].nonzero().flatten().tolist() == [3 * 8 + 3]  # too small to cover 25 %: its centre's patch


def test_patch_boxes_give_each_covered_patch_its_objects_box_and_the_smallest_where_boxes_overlap():
    from mmoe.data.instances import patch_boxes

    big, small = [8.0, 16.0, 16.0, 12.0], [16.0, 16.0, 8.0, 8.0]  # small sits inside big, over patch (2, 2)
    b = patch_boxes([(2, big), (0, small), (1, None)], grid=8, width=64, height=64)
    covered = {(i // 8, i % 8) for i in b[:, 4].nonzero().flatten().tolist()}
    assert covered == {(2, 1), (2, 2), (3, 1), (3, 2)}  # the same patches patch_targets marks; none elsewhere
    assert b[b[:, 4] == 0, :4].abs().sum() == 0
    torch.testing.assert_close(b[2 * 8 + 1, :4], torch.tensor([16 / 64, 22 / 64, 16 / 64, 12 / 64]))
    torch.testing.assert_close(b[2 * 8 + 2, :4], torch.tensor([20 / 64, 20 / 64, 8 / 64, 8 / 64]))  # smallest wins

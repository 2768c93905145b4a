"""Tokenizer, chat template masks, collate padding, robust image loading and LLaVA JSON validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmoe.constants import IGNORE_INDEX, IMAGE_TOKEN
from mmoe.data.collate import collate_batch, collate_for_generation
from mmoe.data.dataset import LlavaJsonDataset
from mmoe.data.images import ImageLoadError, build_image_transform, load_image
from mmoe.data.template import SHORT_ANSWER_SUFFIX, build_prompt, decode_answer, encode_conversation
from mmoe.data.tokenizer import load_tokenizer, train_tokenizer

CORPUS = [
    "What color is the circle?",
    "How many objects are there?",
    "Is there a red square?",
    "there are two objects: a red circle, and a small blue square",
    "red green blue yes no 1 2 3",
    "Describe the image briefly." + SHORT_ANSWER_SUFFIX,
    "USER: ASSISTANT:",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok"))


def ids(tok, tokens: list[str]) -> list[int]:
    out = tok.convert_tokens_to_ids(tokens)
    assert tok.unk_token_id not in out, f"test vocabulary is missing one of {tokens}"
    return out


# ----------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_and_loaders(tok, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = tmp_path / "t"
    train_tokenizer(CORPUS, path)
    assert {f.name for f in path.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    for loaded in (AutoTokenizer.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path), tok):
        assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (
            0,
            1,
            2,
            3,
        )
        assert loaded.convert_tokens_to_ids(IMAGE_TOKEN) == 4
        assert loaded.encode(f"a {IMAGE_TOKEN} b", add_special_tokens=False)[1] == 4
        assert len(loaded.encode(IMAGE_TOKEN, add_special_tokens=False)) == 1
        assert len(loaded) < 512
    train_tokenizer(CORPUS, tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (path / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_a_fixed_phrase_is_one_token_wherever_it_occurs_and_its_words_stay_words(tmp_path):
    from transformers import AutoTokenizer

    from mmoe.data.template import encode_conversation as encode

    train_tokenizer(CORPUS, tmp_path / "t", phrases=[SHORT_ANSWER_SUFFIX])
    plain = train_tokenizer(CORPUS, tmp_path / "plain")
    for loaded in (load_tokenizer(tmp_path / "t"), AutoTokenizer.from_pretrained(tmp_path / "t")):
        q = loaded.encode("What color is the circle?" + SHORT_ANSWER_SUFFIX, add_special_tokens=False)
        bare = loaded.encode("What color is the circle?", add_special_tokens=False)
        assert q[:-1] == bare == plain.encode("What color is the circle?", add_special_tokens=False)
        assert loaded.convert_ids_to_tokens(q[-1]) == SHORT_ANSWER_SUFFIX.strip().lower()
        # any case or spacing the normaliser folds; the words on their own are still words
        assert loaded.encode("ANSWER  the question using a single word or phrase.", add_special_tokens=False) == q[-1:]
        assert loaded.encode("answer the question", add_special_tokens=False) == plain.encode(
            "answer the question", add_special_tokens=False)
    conv = [{"from": "human", "value": "<image>\nWhat color is the circle?" + SHORT_ANSWER_SUFFIX},
            {"from": "gpt", "value": "red"}]
    short = encode(load_tokenizer(tmp_path / "t"), conv, max_len=64)["input_ids"]
    long_ = encode(plain, conv, max_len=64)["input_ids"]
    assert len(long_) - len(short) == 9  # nine words and "." -> one token
    with pytest.raises(ValueError, match="at least two words"):
        train_tokenizer(CORPUS, tmp_path / "bad", phrases=["hello"])


def test_inflections_split_into_the_stems_token_and_a_suffix_and_decode_back(tmp_path):
    from transformers import AutoTokenizer

    corpus = CORPUS + ["how many circles or crosses are there? a cross, two objects"]
    inflections = {"circles": "circle", "crosses": "cross", "objects": "object"}
    train_tokenizer(corpus, tmp_path / "t", inflections=inflections)
    plain = train_tokenizer(corpus, tmp_path / "plain")
    for loaded in (load_tokenizer(tmp_path / "t"), AutoTokenizer.from_pretrained(tmp_path / "t")):
        for text, stem, suffix in (("circles", "▁circle", "s"), ("crosses", "▁cross", "es"),
                                   ("objects", "▁object", "s")):
            enc = loaded.encode(f"how many {text} are there?", add_special_tokens=False)
            assert loaded.convert_ids_to_tokens(enc)[2:4] == [stem, suffix]
            assert enc[2] == loaded.encode(stem.lstrip("▁"), add_special_tokens=False)[0]  # same id as the word
            assert loaded.decode(enc) == f"how many {text} are there?"
        # only whole inflected words: the stem alone, other words ending in "s" and a suffix inside a word stay
        for text in ("a circle", "is yes", "crosses, circles."):
            enc = loaded.encode(text, add_special_tokens=False)
            assert loaded.unk_token_id not in enc and loaded.decode(enc) == text
        assert loaded.tokenize("is yes") == plain.tokenize("is yes") == ["▁is", "▁yes"]
    for bad in ({"circles": "square"}, {"circle": "circle"}, {"two words": "two"}):
        with pytest.raises(ValueError, match="inflection"):
            train_tokenizer(corpus, tmp_path / "bad", inflections=bad)


def test_tokenizer_round_trip(tok):
    for text in ["red circle", "there are two objects: a red circle, and a small blue square", "2", "yes"]:
        enc = tok.encode(text, add_special_tokens=False)
        assert tok.decode(enc) == text
        assert tok.decode(enc, skip_special_tokens=True) == text
    assert tok.decode(tok.encode("What   COLOR\nis", add_special_tokens=False)) == "what color is"
    assert tok.encode("zebra", add_special_tokens=False) == [tok.unk_token_id]


def test_load_tokenizer_adds_image_token_and_pad(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>").save_pretrained(
        tmp_path
    )
    t = load_tokenizer(tmp_path)
    assert t.pad_token == "</s>"
    assert t.convert_tokens_to_ids(IMAGE_TOKEN) == 3 and len(t) == 4
    assert t.encode(f"hello {IMAGE_TOKEN} hello", add_special_tokens=False) == [2, 3, 2]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------- template


CONV = [
    {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat color is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many objects are there?"},
    {"from": "gpt", "value": "2"},
]


def test_encode_conversation_labels_by_hand(tok):
    out = encode_conversation(tok, CONV, max_len=64)
    turn1 = [
        "<bos>",
        "▁user",
        ":",
        IMAGE_TOKEN,
        "▁what",
        "▁color",
        "▁is",
        "▁the",
        "▁circle",
        "?",
        "▁assistant",
        ":",
    ]
    turn2 = ["▁user", ":", "▁how", "▁many", "▁objects", "▁are", "▁there", "?", "▁assistant", ":"]
    expected = ids(tok, turn1) + ids(tok, ["▁red", "<eos>"]) + ids(tok, turn2) + ids(tok, ["▁2", "<eos>"])
    assert out["input_ids"] == expected
    i1, i2 = len(turn1), len(turn1) + 2 + len(turn2)
    supervised = {i1, i1 + 1, i2, i2 + 1}  # answer token + its <eos>, for both answers
    for i, (x, y) in enumerate(zip(out["input_ids"], out["labels"])):
        assert y == (x if i in supervised else IGNORE_INDEX), f"position {i}"
    # the pieces-wise encoding equals tokenising the rendered template string in one go
    rendered = f"<bos>USER: {CONV[0]['value']} ASSISTANT: red<eos>USER: {CONV[2]['value']} ASSISTANT: 2<eos>"
    assert tok.encode(rendered, add_special_tokens=False) == expected


def test_template_encodes_with_the_rust_tokenizer_exactly_like_tokenizer_encode(tok, tmp_path):
    """The fast path (`backend_tokenizer`) must give tokenizer.encode's ids; tokenizers without one use encode."""
    from transformers import AutoTokenizer

    from mmoe.data.template import _encode_text

    texts = [c["value"] for c in CONV] + ["USER: ", " ASSISTANT:", "\n  odd   spacing ", "unknownword!", "é ü"]
    assert tok.is_fast and tok.backend_tokenizer is not None
    for t in texts:
        assert _encode_text(tok, t) == tok.encode(t, add_special_tokens=False), t

    # a backend left padding / truncating (as some tokenizer.json files ship) is reset by encode, never used raw
    stateful = train_tokenizer(CORPUS, tmp_path / "stateful")
    stateful.backend_tokenizer.enable_padding(length=40, pad_id=stateful.pad_token_id)
    stateful.backend_tokenizer.enable_truncation(max_length=3)
    for t in texts:
        assert _encode_text(stateful, t) == tok.encode(t, add_special_tokens=False), t

    class SlowOnly:  # a tokenizer with only the generic API (no Rust backend)
        is_fast = False

        def __init__(self):
            self.calls = 0

        def encode(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            self.calls += 1
            return tok.encode(text, add_special_tokens=False)

    slow = SlowOnly()
    assert _encode_text(slow, texts[0]) == tok.encode(texts[0], add_special_tokens=False) and slow.calls == 1
    assert _encode_text(slow, "") == [] and slow.calls == 1


def test_build_prompt_is_prefix_of_training_encoding(tok):
    full = encode_conversation(tok, CONV, max_len=64)["input_ids"]
    p1 = build_prompt(tok, CONV[0]["value"])
    assert full[: len(p1)] == p1 and tok.convert_ids_to_tokens(p1[-2:]) == ["▁assistant", ":"]
    p2 = build_prompt(tok, CONV[2]["value"], history=[(CONV[0]["value"], "red")])
    assert full[: len(p2)] == p2 and len(p2) == len(full) - 2
    assert decode_answer(tok, full[len(p2) :] + [0, 0]) == "2"


def test_truncation_and_errors(tok):
    full = encode_conversation(tok, CONV, max_len=64)
    cut = encode_conversation(tok, CONV, max_len=len(full["input_ids"]) - 1)
    assert cut["input_ids"] == full["input_ids"][:-1] and cut["labels"] == full["labels"][:-1]
    with pytest.raises(ValueError, match="no answer tokens"):
        encode_conversation(tok, CONV, max_len=5)
    late_image = [CONV[0], CONV[1], {"from": "human", "value": f"{IMAGE_TOKEN} again?"}, CONV[3]]
    late_ids = encode_conversation(tok, late_image, max_len=64)["input_ids"]
    second_image = [i for i, x in enumerate(late_ids) if x == 4][1]
    assert (
        len(encode_conversation(tok, late_image, max_len=second_image + 1)["input_ids"]) == second_image + 1
    )
    with pytest.raises(ValueError, match="cut an <image>"):
        encode_conversation(tok, late_image, max_len=second_image)
    for bad in ("", "   \n "):
        with pytest.raises(ValueError, match="sample 's7'.*empty question"):
            encode_conversation(tok, [{"from": "human", "value": bad}, CONV[1]], 64, sample_id="s7")
    with pytest.raises(ValueError, match="expected 'gpt'"):
        encode_conversation(tok, [CONV[0], CONV[0]], 64)


# ----------------------------------------------------------------------------------------------- collate


def test_collate_right_pads_and_orders_images():
    a = {
        "input_ids": torch.tensor([5, 6, 7]),
        "labels": torch.tensor([-100, 6, 7]),
        "pixel_values": torch.full((2, 3, 4, 4), 1.0),
        "id": "a",
    }
    b = {
        "input_ids": torch.tensor([8, 9, 10, 11, 12]),
        "labels": torch.tensor([-100, -100, -100, 11, 12]),
        "pixel_values": torch.empty(0, 3, 4, 4),
        "id": "b",
    }
    c = {
        "input_ids": torch.tensor([13]),
        "labels": torch.tensor([13]),
        "pixel_values": torch.full((1, 3, 4, 4), 3.0),
        "id": "c",
    }
    out = collate_batch([a, b, c], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, -100, 11, 12], [13] + [-100] * 4]
    assert out["attention_mask"].dtype == torch.bool
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]
    assert out["image_counts"].tolist() == [2, 0, 1]
    assert out["pixel_values"].shape == (3, 3, 4, 4)
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 1.0, 3.0]
    assert out["ids"] == ["a", "b", "c"]
    none = collate_batch([b], pad_id=0)
    assert none["pixel_values"].shape == (0, 3, 4, 4) and none["image_counts"].tolist() == [0]


def test_collate_for_generation_left_pads():
    out = collate_for_generation([[1, 5, 6], [1, 7], [1, 2, 3, 4]], pad_id=0)
    assert out["input_ids"].tolist() == [[0, 1, 5, 6], [0, 0, 1, 7], [1, 2, 3, 4]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError):
        collate_for_generation([], pad_id=0)


# ----------------------------------------------------------------------------------------------- images


def _rgb(path: Path) -> np.ndarray:
    img = load_image(path)
    assert img.mode == "RGB"
    return np.asarray(img)


def test_load_image_converts_modes(tmp_path):
    Image.new("L", (3, 2), 77).save(tmp_path / "gray.png")
    assert (_rgb(tmp_path / "gray.png") == 77).all()

    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.save(tmp_path / "rgba.png")
    assert _rgb(tmp_path / "rgba.png").tolist() == [[[255, 0, 0], [255, 255, 255]]]

    Image.new("LA", (1, 1), (0, 0)).save(tmp_path / "la.png")
    assert _rgb(tmp_path / "la.png").tolist() == [[[255, 255, 255]]]

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "pal.png")
    assert _rgb(tmp_path / "pal.png").tolist() == [[[0, 0, 255], [10, 20, 30]]]
    pal.save(tmp_path / "pal_t.png", transparency=1)
    assert _rgb(tmp_path / "pal_t.png").tolist() == [[[0, 0, 255], [255, 255, 255]]]

    deep = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    deep.save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode.startswith("I")
    assert _rgb(tmp_path / "16bit.png")[0, :, 0].tolist() == [0, 128, 255]

    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    r, g, b = _rgb(tmp_path / "cmyk.jpg")[0, 0].tolist()
    assert r > 200 and g < 60 and b < 60  # CMYK (0,255,255,0) is red

    Image.new("1", (4, 4), 1).save(tmp_path / "bw.png")
    assert (_rgb(tmp_path / "bw.png") == 255).all()

    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "one.png")
    assert _rgb(tmp_path / "one.png").tolist() == [[[1, 2, 3]]]


def test_load_image_errors_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "notes.png").write_text("this is not an image")
    Image.new("L", (20000, 1)).save(tmp_path / "huge.png")
    for name in ("missing.png", "empty.png", "truncated.png", "notes.png", "huge.png"):
        with pytest.raises(ImageLoadError, match=name) as info:
            load_image(tmp_path / name)
        assert isinstance(info.value, ValueError)


def test_image_transform_shapes_and_normalisation():
    t = build_image_transform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = t(Image.new("RGB", (80, 40), (255, 255, 255)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))
    assert torch.allclose(t(Image.new("RGB", (32, 32), (0, 0, 0))), -torch.ones(3, 32, 32))


def test_image_transform_gives_the_pixels_of_the_torchvision_compose_it_replaces():
    """Pinned against v2.Compose([ToImage, Resize(bicubic, antialias), CenterCrop, ToDtype, Normalize]) for images
    already at size (the fast path skips resize and crop), wider, taller, smaller (upsampled) and odd-sized."""
    from torchvision.transforms import v2

    mean, std = (0.48, 0.45, 0.41), (0.27, 0.26, 0.28)
    rng = np.random.default_rng(0)
    for size, (w, h) in ((32, (32, 32)), (32, (80, 40)), (32, (40, 80)), (32, (17, 23)), (24, (33, 31))):
        reference = v2.Compose([v2.ToImage(), v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC,
                                                        antialias=True),
                                v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True),
                                v2.Normalize(mean=list(mean), std=list(std))])
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out = build_image_transform(size, mean, std)(img)
        want = reference(img)
        assert out.shape == (3, size, size) and torch.equal(out, want), (size, w, h)


def test_image_transform_takes_any_pil_mode_as_rgb_and_names_other_inputs():
    t = build_image_transform(8, (0.5,) * 3, (0.5,) * 3)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent: composited on white, as load_image does
    assert torch.equal(t(rgba), torch.ones(3, 8, 8))
    assert torch.equal(t(Image.new("L", (8, 8), 0)), -torch.ones(3, 8, 8))
    with pytest.raises(TypeError, match="expects a PIL image.*Tensor"):
        t(torch.zeros(3, 8, 8))


def test_load_image_applies_the_exif_orientation(tmp_path):
    arr = np.zeros((2, 4, 3), dtype=np.uint8)  # 4 wide, 2 high; one red pixel at top-left
    arr[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the camera was turned, display rotated 90 degrees clockwise
    Image.fromarray(arr).save(tmp_path / "turned.png", exif=exif)
    Image.fromarray(arr).save(tmp_path / "plain.png")
    turned = np.asarray(load_image(tmp_path / "turned.png"))
    assert turned.shape == (4, 2, 3) and turned[0, 1].tolist() == [255, 0, 0]  # top-left went to top-right
    assert np.array_equal(np.asarray(load_image(tmp_path / "plain.png")), arr)


# ----------------------------------------------------------------------------------------------- LLaVA JSON


def _write(tmp_path: Path, records) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def _ds(tok, path: Path, **kw) -> LlavaJsonDataset:
    return LlavaJsonDataset(
        path, path.parent, tok, build_image_transform(16, (0.5,) * 3, (0.5,) * 3), 64, **kw
    )


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"id": "x"}, r"sample 1 \(id='x'\): missing field 'conversations'"),
        ({"id": "x", "conversations": "hi"}, r"sample 1 .*field 'conversations' must be a non-empty list"),
        (
            {"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
            r"conversations\[0\]\.from is 'gpt'",
        ),
        (
            {"id": "x", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
            r"conversations\[0\]\.value must be a string",
        ),
        (
            {"id": "x", "conversations": [{"from": "human", "value": " \n"}, {"from": "gpt", "value": "a"}]},
            r"conversations\[0\]\.value is an empty question",
        ),
        (
            {"id": "x", "conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": ""}]},
            r"conversations\[1\]\.value is an empty answer",
        ),
        ({"id": "x", "image": 5, "conversations": CONV[:2]}, r"field 'image' must be a string"),
        (
            {"id": "x", "image": ["a.png", "b.png"], "conversations": CONV[:2]},
            r"1 <image> tokens .* 2 images",
        ),
    ],
)
def test_bad_llava_json_names_file_index_and_field(tok, tmp_path, record, match):
    ok = {"id": "ok", "conversations": [{"from": "human", "value": "hi?"}, {"from": "gpt", "value": "yes"}]}
    path = _write(tmp_path, [ok, record])
    with pytest.raises(ValueError, match=match) as info:
        _ds(tok, path)
    assert str(path) in str(info.value)


def test_llava_dataset_images_and_text_only(tok, tmp_path):
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (20, 20), 0).save(tmp_path / "b.png")
    records = [
        {
            "id": "no_token",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "What color is the circle?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {"id": "text", "conversations": CONV[2:]},
        {
            "id": "two",
            "image": ["a.png", "b.png"],
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN} {IMAGE_TOKEN} same?"},
                {"from": "gpt", "value": "no"},
            ],
        },
    ]
    ds = _ds(tok, _write(tmp_path, records), short_answer=True)
    first = ds[0]
    assert (
        int((first["input_ids"] == 4).sum()) == 1 and first["input_ids"][3].item() == 4
    )  # prepended <image>
    assert first["pixel_values"].shape == (1, 3, 16, 16) and torch.allclose(
        first["pixel_values"][0, 0], torch.ones(16, 16)
    )
    answer = ds.samples[0]["conversations"][0]["value"]
    assert answer.endswith(SHORT_ANSWER_SUFFIX) and answer.startswith(IMAGE_TOKEN + "\n")
    assert ds[1]["pixel_values"].shape == (0, 3, 16, 16)
    two = ds[2]
    assert two["pixel_values"].shape == (2, 3, 16, 16) and int((two["input_ids"] == 4).sum()) == 2
    assert two["pixel_values"][1].max().item() == -1.0  # second image (black) second
    batch = collate_batch([ds[0], ds[1], ds[2]], pad_id=tok.pad_token_id)
    assert batch["image_counts"].tolist() == [1, 0, 2] and batch["pixel_values"].shape == (3, 3, 16, 16)


def test_cache_tokens_encodes_each_sample_once_and_returns_the_same_items(tok, tmp_path, monkeypatch):
    import mmoe.data.dataset as dataset_module

    Image.new("RGB", (20, 20), (0, 255, 0)).save(tmp_path / "a.png")
    records = [{"id": f"s{i}", "image": "a.png", "conversations": CONV} for i in range(3)]
    path = _write(tmp_path, records)
    calls = []
    real = dataset_module.encode_conversation
    monkeypatch.setattr(dataset_module, "encode_conversation", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain, cached = _ds(tok, path), _ds(tok, path, cache_tokens=True)
    for _ in range(3):
        for i in range(3):
            want, got = plain[i], cached[i]
            assert set(got) == set(want) and got["id"] == want["id"]
            for key in ("input_ids", "labels", "pixel_values"):
                assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert len(calls) == 3 * 3 + 3  # the uncached dataset every time, the cached one once per sample
    got = cached[0]
    got["input_ids"][0] = -1  # a caller writing into an item must not corrupt the cache
    assert cached[0]["input_ids"][0] != -1


def test_cache_images_decodes_each_file_once_and_returns_the_same_pixels(tok, tmp_path, monkeypatch):
    import mmoe.data.images as images_module

    Image.new("RGB", (20, 28), (0, 255, 0)).save(tmp_path / "a.png")  # resized and cropped: not at size
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    records = [{"id": f"s{i}", "image": ["a.png", "b.png"][i % 2], "conversations": CONV} for i in range(4)]
    records.append({"id": "two", "image": ["b.png", "a.png"],
                    "conversations": [{"from": "human", "value": "<image>\n<image>\nSame?"},
                                      {"from": "gpt", "value": "no"}]})
    path = _write(tmp_path, records)
    decoded = []
    real = images_module.load_image
    monkeypatch.setattr(images_module, "load_image", lambda p: decoded.append(Path(p).name) or real(p))
    plain, cached = _ds(tok, path), _ds(tok, path, cache_images=True)
    for _ in range(2):
        for i in range(len(records)):
            want, got = plain[i], cached[i]
            assert got["pixel_values"].dtype == torch.float32
            assert torch.equal(got["pixel_values"], want["pixel_values"]), i
    assert sorted(decoded) == ["a.png", "b.png"] and len(cached.image_cache) == 2  # the uncached set reads its own
    cached[1]["pixel_values"][0, 0, 0, 0] = 99.0  # a caller writing into an item must not corrupt the cache
    assert torch.equal(cached[1]["pixel_values"], plain[1]["pixel_values"])


def test_image_cache_needs_the_projects_transform():
    from mmoe.data.images import ImageCache

    with pytest.raises(TypeError, match="custom transform"):
        ImageCache(lambda img: img)


def test_cached_labelled_images_equal_uncached_ones_including_sizes_from_the_file(tmp_path):
    """Stage 0's dataset: the per-patch boxes need the file's size when the instances JSON omits it."""
    from mmoe.data.instances import ImageLabelsDataset

    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (48, 40), (0, 0, 255)).save(tmp_path / "b.png")
    inst = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
            "categories": [{"id": 1, "name": "red square"}, {"id": 2, "name": "blue circle"}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 16, 16]},
                            {"image_id": 2, "category_id": 2, "bbox": [24, 20, 24, 20]}]}
    (tmp_path / "inst.json").write_text(json.dumps(inst))
    transform = build_image_transform(16, (0.5,) * 3, (0.5,) * 3)
    plain = ImageLabelsDataset(tmp_path / "inst.json", tmp_path, transform, patch_grid=2)
    cached = ImageLabelsDataset(tmp_path / "inst.json", tmp_path, transform, patch_grid=2, cache_images=True)
    for _ in range(2):
        for i in range(2):
            want, got = plain[i], cached[i]
            for key in ("pixel_values", "targets", "patch_targets", "patch_boxes"):
                assert torch.equal(got[key], want[key]), (i, key)
    # b.png: the box fills the bottom-right quarter of a 48x40 file -> centre (0.75, 0.75), size (0.5, 0.5)
    assert cached[1]["patch_boxes"][3].tolist() == [0.75, 0.75, 0.5, 0.5, 1.0]
    assert len(cached.image_cache) == 2

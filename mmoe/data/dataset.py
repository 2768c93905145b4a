"""Datasets: LLaVA-style conversations for training, VQA questions for generation-based evaluation.

Both validate their JSON up front so a malformed record fails at construction with the file, index and field,
not hours into training. Items are plain dicts of tensors / lists; see :mod:`mmoe.data.collate` for batching.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmoe.constants import IMAGE_TOKEN
from mmoe.data.images import ImageCache, load_image
from mmoe.data.template import (
    GPT_ROLES,
    HUMAN_ROLES,
    build_prompt,
    encode_conversation,
    encode_independent_turns,
    with_short_answer,
)

DEFAULT_IMAGE_PATTERN = "images/{split}/{split}_{image_id:06d}.png"  # the synthetic generator's layout


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _empty_pixels(image_transform) -> torch.Tensor:
    size = getattr(image_transform, "image_size", None)
    return torch.empty(0, 3, size, size) if size else torch.empty(0, 3, 0, 0)


def _load_pixels(paths: list[Path], image_transform, cache: ImageCache | None = None) -> torch.Tensor:
    if not paths:
        return _empty_pixels(image_transform)
    if cache is not None:
        return torch.stack([cache.load(p)[0] for p in paths])
    return torch.stack([image_transform(load_image(p)) for p in paths])


class LlavaJsonDataset(Dataset):
    """LLaVA-format conversations -> ``dict(input_ids, labels, pixel_values, id)``.

    ``json_path`` holds a list of ``{"id", "image" (str | list[str], optional), "conversations": [{"from", "value"}]}``;
    image paths are relative to ``image_root``. Items: ``input_ids`` / ``labels`` LongTensor [T], ``pixel_values``
    FloatTensor [n_img, 3, S, S] (n_img may be 0), ``id`` str. A sample with images but no ``<image>`` in its
    text gets one ``<image>\\n`` per image prepended to its first human turn (as LLaVA does); otherwise the number of
    ``<image>`` tokens must equal the number of images. ``short_answer=True`` appends the short-answer suffix to
    every human turn that lacks it (for raw VQA-style data; the synthetic data already carries it).
    ``cache_tokens=True`` keeps each sample's token ids (int32) after its first encoding: later epochs skip the
    tokenizer (timings in docs/results.md) at ~12 bytes per token per worker.
    ``cache_images=True`` decodes each image file once (`ImageCache`: resized uint8 pixels, for small image sets).
    """

    def __init__(
        self,
        json_path: str | Path,
        image_root: str | Path,
        tokenizer,
        image_transform: Callable,
        max_len: int,
        *,
        short_answer: bool = False,
        independent_turns: bool = False,
        cache_tokens: bool = False,
        cache_images: bool = False,
    ) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.json_path, self.image_root = Path(json_path), Path(image_root)
        self.tokenizer, self.image_transform = tokenizer, image_transform
        self.max_len, self.short_answer = int(max_len), short_answer
        self.independent_turns = independent_turns
        self._token_cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache_tokens else None
        self.image_cache = ImageCache(image_transform) if cache_images else None
        records = _read_json(self.json_path, "LLaVA JSON")
        if not isinstance(records, list):
            raise ValueError(
                f"{self.json_path}: expected a JSON list of samples, got {type(records).__name__}"
            )
        self.samples = [self._validate(i, r) for i, r in enumerate(records)]

    def _validate(self, index: int, rec: object) -> dict:
        where = f"{self.json_path}: sample {index}"
        if not isinstance(rec, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
        sid = rec.get("id", index)
        if not isinstance(sid, (str, int)):
            raise ValueError(f"{where}: field 'id' must be a string or int, got {type(sid).__name__}")
        where = f"{where} (id={sid!r})"
        image = rec.get("image")
        if image is None:
            images: list[str] = []
        elif isinstance(image, str):
            images = [image]
        elif isinstance(image, list) and all(isinstance(x, str) for x in image):
            images = list(image)
        else:
            raise ValueError(
                f"{where}: field 'image' must be a string or a list of strings, got {image!r:.80}"
            )
        if "conversations" not in rec:
            raise ValueError(f"{where}: missing field 'conversations'")
        convs = rec["conversations"]
        if not isinstance(convs, list) or not convs:
            raise ValueError(
                f"{where}: field 'conversations' must be a non-empty list, got {type(convs).__name__}"
            )
        if len(convs) % 2:
            raise ValueError(
                f"{where}: field 'conversations' has {len(convs)} turns; expected human/gpt pairs"
            )
        n_tokens = 0
        for t, turn in enumerate(convs):
            if not isinstance(turn, Mapping):
                raise ValueError(f"{where}: conversations[{t}] must be an object, got {type(turn).__name__}")
            role, value = turn.get("from"), turn.get("value")
            roles = HUMAN_ROLES if t % 2 == 0 else GPT_ROLES
            if role not in roles:
                raise ValueError(
                    f"{where}: conversations[{t}].from is {role!r}; expected one of {sorted(roles)} "
                    "(turns alternate human, gpt)"
                )
            if not isinstance(value, str):
                raise ValueError(
                    f"{where}: conversations[{t}].value must be a string, got {type(value).__name__}"
                )
            if not value.replace(IMAGE_TOKEN, "").strip() and (t % 2 or IMAGE_TOKEN not in value):
                what = "answer" if t % 2 else "question"
                raise ValueError(f"{where}: conversations[{t}].value is an empty {what}")
            if t % 2 and IMAGE_TOKEN in value:
                raise ValueError(f"{where}: conversations[{t}] (gpt) contains {IMAGE_TOKEN!r}")
            n_tokens += value.count(IMAGE_TOKEN)
        if n_tokens and n_tokens != len(images):
            raise ValueError(f"{where}: {n_tokens} {IMAGE_TOKEN} tokens in the text but {len(images)} images")
        convs = [
            {"from": "human" if t % 2 == 0 else "gpt", "value": turn["value"]} for t, turn in enumerate(convs)
        ]
        if images and not n_tokens:
            convs[0]["value"] = f"{IMAGE_TOKEN}\n" * len(images) + convs[0]["value"]
        if self.short_answer:
            for turn in convs[::2]:
                turn["value"] = with_short_answer(turn["value"])
        return {"id": str(sid), "images": images, "conversations": convs}

    def __len__(self) -> int:
        return len(self.samples)

    def _encode(self, index: int) -> dict[str, torch.Tensor]:
        s = self.samples[index]
        try:
            enc = None
            if self.independent_turns:
                enc = encode_independent_turns(self.tokenizer, s["conversations"], self.max_len, sample_id=s["id"])
            if enc is None:
                enc = encode_conversation(self.tokenizer, s["conversations"], self.max_len, sample_id=s["id"])
        except ValueError as e:
            raise ValueError(f"{self.json_path}: sample {index}: {e}") from e
        # segment_ids only for shared-prefix packing: collate fills segment 0 (plain causal) for conversations
        return {k: torch.tensor(v, dtype=torch.int32) for k, v in enc.items()}

    def truncation_report(self, limit: int = 2000, seed: int = 0) -> dict:
        """How many training samples ``max_len`` cuts (checked on a seeded subset of at most ``limit`` samples):
        ``{"checked", "truncated", "percent", "longest", "max_len"}``. Truncation drops answer tokens (or whole
        packed questions) silently otherwise."""
        n = len(self.samples)
        picked = range(n) if n <= limit else np.sort(np.random.default_rng(seed).permutation(n)[:limit]).tolist()
        truncated, longest = 0, 0
        for i in picked:
            s = self.samples[i]
            try:
                enc = None
                if self.independent_turns:
                    enc = encode_independent_turns(self.tokenizer, s["conversations"], 10 ** 9, sample_id=s["id"])
                if enc is None:
                    enc = encode_conversation(self.tokenizer, s["conversations"], 10 ** 9, sample_id=s["id"])
            except ValueError as e:
                raise ValueError(f"{self.json_path}: sample {i}: {e}") from e
            length = len(enc["input_ids"])
            longest = max(longest, length)
            truncated += length > self.max_len
        checked = len(picked)
        return {"checked": checked, "truncated": truncated, "max_len": self.max_len, "longest": longest,
                "percent": round(100.0 * truncated / max(1, checked), 2)}

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        cache = self._token_cache
        enc = cache.get(index) if cache is not None else None
        if enc is None:
            enc = self._encode(index)
            if cache is not None:
                cache[index] = enc
        pixel_values = _load_pixels([self.image_root / p for p in s["images"]], self.image_transform,
                                    self.image_cache)
        item = {k: v.long() for k, v in enc.items()}
        item.update(pixel_values=pixel_values, id=s["id"])
        return item


class VqaGenerationDataset(Dataset):
    """VQAv2-format questions -> generation prompts ``<bos>USER: <image>\\n{q}{suffix} ASSISTANT:`` plus the image.

    Image files come from the question's own ``file_name`` (written by the converters in data_scripts/), else
    ``image_files`` (image_id -> path relative to ``image_root``, e.g. from an image index or a COCO captions
    file), else ``image_pattern`` formatted with ``split`` (the file's ``data_subtype``) and ``image_id``.
    ``max_questions`` keeps a seeded random subset (in file order) for quick validation. Items:
    ``prompt_ids`` list[int], ``pixel_values`` [1, 3, S, S], ``question_id``, ``image_id``, ``question``.
    """

    def __init__(
        self,
        questions_path: str | Path,
        image_root: str | Path,
        tokenizer,
        image_transform: Callable,
        *,
        image_files: Mapping[int, str] | None = None,
        image_pattern: str = DEFAULT_IMAGE_PATTERN,
        max_questions: int | None = None,
        seed: int = 0,
        short_answer: bool = True,
    ) -> None:
        self.questions_path, self.image_root = Path(questions_path), Path(image_root)
        self.tokenizer, self.image_transform = tokenizer, image_transform
        self.short_answer = short_answer
        data = _read_json(self.questions_path, "VQA questions")
        if not isinstance(data, Mapping) or not isinstance(data.get("questions"), list):
            raise ValueError(
                f"{self.questions_path}: expected an object with a 'questions' list (VQAv2 format)"
            )
        split = str(data.get("data_subtype", ""))
        questions = []
        for i, q in enumerate(data["questions"]):
            for field, typ in (("question_id", int), ("image_id", int), ("question", str)):
                if not isinstance(q, Mapping) or not isinstance(q.get(field), typ):
                    raise ValueError(
                        f"{self.questions_path}: questions[{i}]: field {field!r} missing or not {typ.__name__}"
                    )
            if "file_name" in q and not isinstance(q["file_name"], str):
                raise ValueError(f"{self.questions_path}: questions[{i}]: field 'file_name' must be a string")
            if not q["question"].strip():
                raise ValueError(
                    f"{self.questions_path}: questions[{i}] (question_id={q['question_id']}): empty question"
                )
            questions.append(q)
        if max_questions is not None and max_questions < len(questions):
            keep = np.sort(np.random.default_rng(seed).permutation(len(questions))[: max(0, max_questions)])
            questions = [questions[int(k)] for k in keep]
        self.questions = questions
        self._files = {int(qid): p for qid, p in image_files.items()} if image_files is not None else None
        self._pattern, self._split = image_pattern, split

    def image_path(self, image_id: int, file_name: str | None = None) -> Path:
        if file_name is not None:
            return self.image_root / file_name  # an absolute file_name stays absolute
        if self._files is not None:
            if image_id not in self._files:
                raise KeyError(f"{self.questions_path}: no image file known for image_id {image_id}")
            return self.image_root / self._files[image_id]
        return self.image_root / self._pattern.format(split=self._split, image_id=image_id)

    @property
    def question_ids(self) -> list[int]:
        return [int(q["question_id"]) for q in self.questions]

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict:
        q = self.questions[index]
        text = f"{IMAGE_TOKEN}\n{q['question']}"
        prompt = build_prompt(self.tokenizer, with_short_answer(text) if self.short_answer else text)
        return {
            "prompt_ids": prompt,
            "pixel_values": _load_pixels([self.image_path(q["image_id"], q.get("file_name"))],
                                         self.image_transform),
            "question_id": int(q["question_id"]),
            "image_id": int(q["image_id"]),
            "question": q["question"],
        }


def image_files_from_coco(captions_path: str | Path) -> dict[int, str]:
    """image_id -> file_name from a COCO-format file (e.g. ``<split>_captions.json``)."""
    path = Path(captions_path)
    data = _read_json(path, "COCO captions")
    if not isinstance(data, Mapping) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected an object with an 'images' list (COCO format)")
    out = {}
    for i, im in enumerate(data["images"]):
        if (
            not isinstance(im, Mapping)
            or not isinstance(im.get("id"), int)
            or not isinstance(im.get("file_name"), str)
        ):
            raise ValueError(f"{path}: images[{i}]: needs int 'id' and str 'file_name'")
        out[im["id"]] = im["file_name"]
    return out

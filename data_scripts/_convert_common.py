"""Helpers shared by the dataset converters in ``data_scripts/`` (no downloads, stdlib only).

Conventions every converter follows, so the training loader and the eval CLIs can rely on them:

* Outputs go to ``OUT/<split>_llava.json`` (LLaVA conversation format) plus the filtered evaluation
  inputs (``OUT/<split>_questions.json`` / ``_annotations.json`` / ``_captions.json``).
* Every image path a converter writes (LLaVA ``"image"``, a question's ``file_name``, the image index
  ``OUT/<split>_images.json``) is absolute by default so the JSON works wherever it is read from;
  ``--relative`` writes them relative to OUT instead. Either way they resolve against OUT, which is the
  image root of the training DataModule (``data.data_dir``) and of the eval scripts (``--images OUT``).
* Image files whose name (from a pattern) does not exist are looked up with the other usual extensions
  (``.png`` for a ``.jpg`` pattern, ...), so a wrong extension guess is detected and reported, not fatal.
* Records whose image file is missing are skipped and counted; malformed records abort with exit code 2
  and a message naming the file, the record and the field.
* Nothing is written until the whole conversion succeeded (all outputs are staged and moved into OUT at
  the end), so a failed conversion never leaves empty or partial files.
* A training split (``--role train``, the default unless the split name says val/test) gets a validation
  split carved out by image (``--val-fraction``) when OUT has no validation split of its task (vqa, gqa,
  caption, chat) yet; ``OUT/dataset.json`` records every split and its role; a tokenizer is trained on the
  training text plus the chat template's strings (``OUT/tokenizer.json``) and the token-length distribution
  is reported against ``data.max_len``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "dataset.json"
DEFAULT_MAX_LEN = 192  # data.max_len of configs/default.yaml
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
IMAGE_TOKEN = "<image>"


class ConversionError(Exception):
    """Malformed input; the message names the file and the field. Converted to exit code 2."""


def fail(message: str) -> NoReturn:
    raise ConversionError(message)


def load_json(path: str | os.PathLike, what: str) -> Any:
    """Load a JSON (or JSON-lines) file, turning I/O and syntax errors into :class:`ConversionError`."""
    p = Path(path)
    if not p.is_file():
        fail(f"{what} file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as first_error:
        # JSON lines (LLaVA eval question files, POPE) -- accept if every non-empty line parses.
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            fail(f"{what} file {p} is not valid JSON: {first_error}")


def require(record: Any, field: str, types: type | tuple[type, ...], where: str) -> Any:
    """Return ``record[field]`` or fail naming ``where`` and the field when absent / wrongly typed."""
    if not isinstance(record, dict):
        fail(f"{where}: expected an object, got {type(record).__name__}")
    if field not in record:
        fail(f"{where}: missing field '{field}'")
    value = record[field]
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        fail(f"{where}: field '{field}' must be {names}, got {type(value).__name__}")
    return value


def format_image_name(pattern: str, *, image_id: Any, subtype: str | None, where: str) -> str:
    """Fill an image file-name pattern such as ``COCO_{subtype}_{image_id:012d}.jpg``.

    ``{data_subtype}`` is accepted as a synonym of ``{subtype}`` (the VQA JSON field's own name).
    """
    try:
        return pattern.format(image_id=image_id, subtype=subtype or "", data_subtype=subtype or "")
    except (ValueError, KeyError, IndexError) as e:
        fail(f"{where}: cannot build the image file name from --image-pattern {pattern!r} "
             f"with image_id={image_id!r}: {e}")


def image_field(path: Path, out_dir: Path, relative: bool) -> str:
    """Value of the LLaVA ``"image"`` field for an existing file (see module docstring)."""
    if relative:
        return os.path.relpath(path.resolve(), out_dir.resolve())
    return str(path.resolve())


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def print_summary(title: str, items: Iterable[tuple[str, Any]], missing_examples: list[str]) -> None:
    print(f"== {title}")
    for key, value in items:
        print(f"  {key}: {value}")
    if missing_examples:
        print(f"  first missing images: {', '.join(missing_examples[:5])}")


def check_images_dir(images: str | os.PathLike) -> Path:
    p = Path(images)
    if not p.is_dir():
        fail(f"--images directory not found: {p}")
    return p


def run_main(main_impl, argv: list[str] | None) -> int:
    """Run a converter body, mapping :class:`ConversionError` to a message on stderr and exit code 2."""
    try:
        main_impl(argv)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------- image files with a detected extension

class ImageFinder:
    """Finds ``images_dir / name``; when absent, tries the same name with the other usual extensions (the first
    extension that works is tried first from then on) and counts the substitutions for the summary."""

    def __init__(self, images_dir: Path):
        self.dir, self.detected, self.substituted = images_dir, None, 0

    def find(self, name: str) -> Path | None:
        path = self.dir / name
        if path.is_file():
            return path
        candidates = ([self.detected] if self.detected else []) + [
            s for s in IMAGE_SUFFIXES for s in (s, s.upper()) if s != self.detected]
        for suffix in candidates:
            if suffix != path.suffix and path.with_suffix(suffix).is_file():
                self.detected = suffix
                self.substituted += 1
                return path.with_suffix(suffix)
        return None

    def summary(self) -> list[tuple[str, Any]]:
        if not self.substituted:
            return []
        return [("image_extension_detected", f"{self.detected} ({self.substituted} images did not match the "
                 "pattern's extension; pass --image-pattern to silence)")]


# ---------------------------------------------------------------- splits, manifest, tokenizer, atomic writes

def add_common_args(p, *, default_val_fraction: float = 0.05) -> None:
    g = p.add_argument_group("splits, tokenizer and lengths (shared by all converters)")
    g.add_argument("--role", choices=("auto", "train", "val", "test"), default="auto",
                   help="what the split is for; auto: 'test' if its name contains test, 'val' if val or dev, "
                        "else 'train'")
    g.add_argument("--val-fraction", type=float, default=default_val_fraction,
                   help="a training split gets this fraction of its images carved out as '<split>_val' (or 'val' "
                        "for split 'train') when OUT has no validation split of its task yet; 0 disables")
    g.add_argument("--val-seed", type=int, default=0, help="seed of the validation carve-out")
    g.add_argument("--tokenizer", choices=("auto", "word", "bpe", "none"), default="auto",
                   help="train OUT/tokenizer.json on the training text of OUT plus the chat template's strings "
                        "(auto: word-level when the words fit --vocab-size, else BPE); none: keep OUT's")
    g.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary size cap")
    g.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN,
                   help="data.max_len to report the token-length distribution against")


def resolve_role(role: str, split: str) -> str:
    if role != "auto":
        return role
    name = split.lower()
    if "test" in name:
        return "test"
    if re.search(r"val|dev", name):
        return "val"
    return "train"


def val_split_name(split: str) -> str:
    return "val" if split == "train" else f"{split}_val"


def carve_val(keys: list, fraction: float, seed: int) -> set:
    """Keys (image ids) that go to the validation split: a seeded ``fraction`` of them, at least one, and
    never all (at least two keys needed)."""
    if fraction <= 0 or len(keys) < 2:
        return set()
    if fraction >= 1:
        fail(f"--val-fraction must be < 1, got {fraction}")
    n = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    return set(random.Random(seed).sample(sorted(keys, key=str), n))


def read_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST
    if not path.is_file():
        return {"version": 1, "splits": {}}
    data = load_json(path, "dataset manifest")
    if not isinstance(data, dict) or not isinstance(data.get("splits"), dict):
        fail(f"{path}: not an mmoe dataset manifest (expected an object with 'splits')")
    return data


def wants_val_carve(args, role: str, out_dir: Path, task: str) -> bool:
    """A training split gets a validation part unless OUT already has one for the same task: each task's
    evaluation (VQA, GQA, captions) needs its own, and one per task is enough."""
    has_val = any(s.get("role") == "val" and s.get("task") == task
                  for s in read_manifest(out_dir)["splits"].values())
    return role == "train" and args.val_fraction > 0 and not has_val


def split_parts(args, out_dir: Path, split: str, items: list, *, task: str,
                key: Callable[[Any], Any] = lambda item: item) -> list[tuple[str, str, list]]:
    """(name, role, items) of every split to write: `split` itself and, when it is a training split and OUT has no
    validation split of `task` yet, ``<split>_val`` holding a seeded --val-fraction of the items (drawn by `key`)."""
    role = resolve_role(args.role, split)
    carve = wants_val_carve(args, role, out_dir, task)
    val_keys = carve_val([key(x) for x in items], args.val_fraction, args.val_seed) if carve else set()
    parts = [(split, role, [x for x in items if key(x) not in val_keys])]
    if val_keys:
        parts.append((val_split_name(split), "val", [x for x in items if key(x) in val_keys]))
    return parts


@dataclass
class SplitOutput:
    """One converted split: its name, role, task and the JSON files (file kind -> data) to write."""

    name: str
    role: str
    task: str  # vqa | gqa | caption | chat
    files: dict[str, Any] = field(default_factory=dict)  # kind (llava, questions, ...) -> JSON data

    def file_name(self, kind: str) -> str:
        return f"{self.name}_{kind}.json"


def image_index(images: dict[Any, str]) -> dict:
    """COCO-style image index ``{"images": [{"id", "file_name"}]}`` (paths as every converter writes them)."""
    return {"images": [{"id": k, "file_name": v} for k, v in images.items()]}


def _training_texts(splits: list[SplitOutput], manifest: dict, out_dir: Path) -> list[str]:
    """Every turn of every training split: the new ones from memory, earlier ones from OUT."""
    samples: list = []
    new = {s.name for s in splits}
    for s in splits:
        if s.role == "train":
            samples += s.files["llava"]
    for name, entry in manifest["splits"].items():
        if name not in new and entry.get("role") == "train" and entry.get("llava"):
            samples += load_json(out_dir / entry["llava"], "training LLaVA")
    return [t["value"] for smp in samples for t in smp["conversations"]]


def _length_report(tokenizer, samples: list[dict], max_len: int, limit: int = 20000) -> dict:
    from mmoe.data.template import encode_conversation

    picked = samples if len(samples) <= limit else random.Random(0).sample(samples, limit)
    lengths = sorted(len(encode_conversation(tokenizer, s["conversations"], 10 ** 9, s.get("id"))["input_ids"])
                     for s in picked)
    if not lengths:
        return {}
    pct = {f"p{q}": lengths[min(len(lengths) - 1, int(q / 100 * len(lengths)))] for q in (50, 90, 99)}
    over = sum(n > max_len for n in lengths)
    return {"samples": len(lengths), **pct, "max": lengths[-1], "max_len": max_len, "over_max_len": over,
            "over_max_len_percent": round(100 * over / len(lengths), 2)}


def finish(args, out_dir: Path, splits: list[SplitOutput], summary: list[tuple[str, Any]],
           missing_examples: list[str], title: str) -> None:
    """Train the tokenizer, report lengths, update the manifest and write every output atomically."""
    manifest = read_manifest(out_dir)
    for s in splits:
        manifest["splits"][s.name] = {"role": s.role, "task": s.task, **{k: s.file_name(k) for k in s.files}}
    summary = list(summary) + [(f"split {s.name}", f"role={s.role} task={s.task} "
                                f"samples={len(s.files.get('llava', []))}") for s in splits]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.convert-", dir=out_dir.parent))
    try:
        for s in splits:
            for kind, data in s.files.items():
                write_json(stage / s.file_name(kind), data)
        report = {}
        texts = _training_texts(splits, manifest, out_dir) if args.tokenizer != "none" else []
        if args.tokenizer != "none" and not texts:
            if args.tokenizer != "auto":
                fail(f"no training split in {out_dir} to train a tokenizer on (convert one with --role train, "
                     "or pass --tokenizer none)")
            summary.append(("tokenizer", "not trained: no training split in OUT yet (converting one trains it)"))
        elif texts:
            if str(REPO) not in sys.path:
                sys.path.insert(0, str(REPO))
            from mmoe.data.tokenizer import train_dataset_tokenizer

            try:
                tok = train_dataset_tokenizer(texts, stage, kind=args.tokenizer, vocab_size=args.vocab_size)
            except ValueError as e:
                fail(str(e))
            manifest["tokenizer"] = {"kind": args.tokenizer, "size": len(tok)}
            summary.append(("tokenizer", f"{len(tok)} tokens -> {out_dir / 'tokenizer.json'}"))
            train = [smp for s in splits if s.role == "train" for smp in s.files["llava"]]
            try:
                report = _length_report(tok, train, args.max_len)
            except ValueError as e:
                fail(f"cannot tokenize a training conversation: {e}")
        if report:
            manifest["length_report"] = report
            summary.append(("tokens per training conversation", (
                f"p50 {report['p50']}, p90 {report['p90']}, p99 {report['p99']}, max {report['max']}; "
                f"{report['over_max_len']} of {report['samples']} ({report['over_max_len_percent']} %) exceed "
                f"data.max_len={report['max_len']} and would be truncated")))
        write_json(stage / MANIFEST, manifest)
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(stage.iterdir()):
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print_summary(title, summary, missing_examples)

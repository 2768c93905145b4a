"""Helpers shared by the dataset converters in ``data_scripts/`` (no downloads, stdlib only).

Conventions every converter follows, so the training loader and the eval CLIs can rely on them:

* Outputs go to ``OUT/<split>_llava.json`` (LLaVA conversation format) plus the filtered evaluation
  inputs (``OUT/<split>_questions.json`` / ``_annotations.json`` / ``_captions.json``).
* ``"image"`` paths are absolute by default so the JSON works wherever it is read from;
  ``--relative`` writes them relative to OUT instead (then the loader's image root must be OUT).
* Records whose image file is missing are skipped and counted; malformed records abort with exit code 2
  and a message naming the file, the record and the field.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

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

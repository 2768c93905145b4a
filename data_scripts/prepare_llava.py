#!/usr/bin/env python
"""Validate an existing LLaVA instruction JSON and write a cleaned copy.

    python data_scripts/prepare_llava.py --json llava_v1_5_mix665k.json --images DIR --out OUT
        [--split train] [--strict] [--relative]

A sample is kept when:
  * it is an object whose ``conversations`` is a non-empty list of ``{"from", "value": str}`` turns with
    ``from`` alternating human, gpt, human, ... and ending with gpt (what the LLaVA trainer masks on);
  * ``image`` (optional; text-only samples are valid) is a path string relative to --images or a list of
    them, every file exists, and the number of ``<image>`` tokens in the human turns equals the number
    of images (the model splices one image per token; a mismatch silently misaligns training).
Samples with missing images are dropped and counted separately from malformed ones (a partial image
download is common and not a format error). A missing ``id`` is filled with the sample index.

Writes ``OUT/<split>_llava.json`` with absolute image paths (``--relative``: relative to OUT). Exits 2 if
the file is not a JSON list, if nothing valid remains, or with ``--strict`` if any sample is malformed.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _convert_common import (  # noqa: E402
    IMAGE_TOKEN,
    check_images_dir,
    fail,
    image_field,
    load_json,
    SplitOutput,
    add_common_args,
    finish,
    run_main,
    split_parts,
)

ROLES = ("human", "gpt")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="LLaVA instruction JSON (list of samples)")
    p.add_argument("--images", required=True, help="image root the samples' 'image' paths are relative to")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", default="train", help="output name prefix (default: train)")
    p.add_argument("--strict", action="store_true", help="fail (exit 2) if any sample is malformed")
    p.add_argument("--relative", action="store_true", help="write image paths relative to --out")
    add_common_args(p)
    return p


def check_sample(sample: Any) -> tuple[str | None, list[str]]:
    """Return (problem or None, image paths) for one sample; the problem names the offending field."""
    if not isinstance(sample, dict):
        return f"sample is {type(sample).__name__}, not an object", []
    convs = sample.get("conversations")
    if not isinstance(convs, list) or not convs:
        return "field 'conversations' missing or not a non-empty list", []
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"conversations[{k}]: missing string field 'value'", []
        if turn.get("from") != ROLES[k % 2]:
            return f"conversations[{k}]: field 'from' is {turn.get('from')!r}, expected {ROLES[k % 2]!r}", []
    if convs[-1]["from"] != "gpt":
        return "conversations: last turn must be from 'gpt'", []
    image = sample.get("image")
    if image is None:
        images: list[str] = []
    elif isinstance(image, str) and image:
        images = [image]
    elif isinstance(image, list) and image and all(isinstance(x, str) and x for x in image):
        images = list(image)
    else:
        return "field 'image' must be a non-empty path string or list of them", []
    n_tokens = sum(t["value"].count(IMAGE_TOKEN) for t in convs if t["from"] == "human")
    n_gpt_tokens = sum(t["value"].count(IMAGE_TOKEN) for t in convs if t["from"] == "gpt")
    if n_gpt_tokens:
        return f"field 'conversations': {IMAGE_TOKEN} appears in a gpt turn", images
    if n_tokens != len(images):
        return f"field 'conversations' has {n_tokens} {IMAGE_TOKEN} tokens but 'image' lists {len(images)}", images
    return None, images


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    images_dir = check_images_dir(args.images)
    out_dir = Path(args.out)
    data = load_json(args.json, "LLaVA")
    if not isinstance(data, list):
        fail(f"{args.json}: expected a JSON list of samples, got {type(data).__name__}")

    cleaned: list[dict] = []
    problems: Counter[str] = Counter()
    examples: list[str] = []
    missing_files: list[str] = []
    samples_missing_image = 0
    ids_added = 0
    for i, sample in enumerate(data):
        problem, images = check_sample(sample)
        if problem is not None:
            problems[re.sub(r"\[\d+\]|\d+", "[k]", problem)] += 1  # group e.g. turn indices / counts
            if len(examples) < 5:
                examples.append(f"#{i}: {problem}")
            continue
        absent = [p for p in images if not (images_dir / p).is_file()]
        if absent:
            samples_missing_image += 1
            missing_files.extend(absent)
            continue
        out = dict(sample)
        if "id" not in out:
            out["id"] = str(i)
            ids_added += 1
        if images:
            paths = [image_field(images_dir / p, out_dir, args.relative) for p in images]
            out["image"] = paths[0] if isinstance(sample["image"], str) else paths
        cleaned.append(out)

    n_malformed = sum(problems.values())
    summary = [
        ("samples_in", len(data)), ("samples_kept", len(cleaned)), ("malformed", n_malformed),
        ("samples_missing_image", samples_missing_image), ("missing_images", len(set(missing_files))),
        ("ids_added", ids_added),
    ]
    for reason, count in problems.most_common():
        summary.append((f"malformed ({count})", reason))
    summary += [("e.g.", line) for line in examples]
    if args.strict and n_malformed:
        fail(f"{args.json}: {n_malformed} malformed samples (--strict); first: {examples[0]}; nothing was written")
    if not cleaned:
        fail(f"{args.json}: no valid sample with existing images remains; nothing was written")
    outputs = [SplitOutput(name, role, "chat", {"llava": [cleaned[i] for i in indices]})
               for name, role, indices in split_parts(args, out_dir, args.split, list(range(len(cleaned))),
                                                                   task="chat")]
    finish(args, out_dir, outputs, summary, sorted(set(missing_files)), f"llava -> {out_dir}")


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

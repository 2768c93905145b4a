#!/usr/bin/env python
"""Convert GQA questions to LLaVA training JSON + a filtered GQA questions file for evaluation.

    python data_scripts/prepare_gqa.py --questions Q.json --images DIR --out OUT [--split testdev_balanced]
        [--image-pattern "{image_id}.jpg"]

GQA questions JSON: ``{question_id: {"imageId", "question", "answer", "fullAnswer", "types", ...}}``.
Writes ``OUT/<split>_llava.json`` (one sample per image, multi-turn, short answer ``answer`` after the
lmms-eval suffix; ``fullAnswer`` is not used because GQA is scored on the short answer) and
``OUT/<split>_questions.json`` (same dict restricted to questions whose image exists, each entry with an
added ``file_name`` relative to --images, for ``eval/vqa.py --format gqa``). Missing images are skipped
and counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _convert_common import (  # noqa: E402
    IMAGE_TOKEN,
    SHORT_ANSWER_SUFFIX,
    check_images_dir,
    fail,
    format_image_name,
    image_field,
    load_json,
    print_summary,
    require,
    run_main,
    write_json,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", required=True, help="GQA questions JSON (dict id -> question)")
    p.add_argument("--images", required=True, help="directory holding the GQA images")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", default="gqa", help="output name prefix (default: gqa)")
    p.add_argument("--image-pattern", default="{image_id}.jpg", help="image file name pattern ({image_id})")
    p.add_argument("--relative", action="store_true", help="write LLaVA image paths relative to --out")
    return p


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    images_dir = check_images_dir(args.images)
    out_dir = Path(args.out)
    questions = load_json(args.questions, "GQA questions")
    if not isinstance(questions, dict):
        fail(f"{args.questions}: expected a JSON object mapping question id -> question, "
             f"got {type(questions).__name__}")

    kept: dict[str, dict] = {}
    per_image: dict[str, list[tuple[str, dict]]] = {}
    missing: dict[str, str] = {}
    found: dict[str, Path] = {}
    for qid, q in questions.items():
        where = f"{args.questions}: [{qid!r}]"
        image_id = str(require(q, "imageId", (str, int), where))
        require(q, "question", str, where)
        require(q, "answer", str, where)
        if image_id not in found and image_id not in missing:
            name = format_image_name(args.image_pattern, image_id=image_id, subtype=None, where=where)
            if (images_dir / name).is_file():
                found[image_id] = images_dir / name
            else:
                missing[image_id] = name
        if image_id in missing:
            continue
        kept[qid] = {**q, "file_name": str(found[image_id].relative_to(images_dir))}
        per_image.setdefault(image_id, []).append((qid, q))

    samples = []
    for image_id, items in per_image.items():
        conversations = []
        for k, (_, q) in enumerate(items):
            prefix = IMAGE_TOKEN + "\n" if k == 0 else ""
            conversations.append({"from": "human", "value": prefix + q["question"] + SHORT_ANSWER_SUFFIX})
            conversations.append({"from": "gpt", "value": q["answer"]})
        image = image_field(found[image_id], out_dir, args.relative)
        samples.append({"id": f"{args.split}_{image_id}", "image": image,
                        "question_ids": [qid for qid, _ in items], "conversations": conversations})
    write_json(out_dir / f"{args.split}_llava.json", samples)
    write_json(out_dir / f"{args.split}_questions.json", kept)
    print_summary(f"gqa -> {out_dir}", [
        ("split", args.split), ("questions_in", len(questions)), ("questions_kept", len(kept)),
        ("images_kept", len(samples)), ("missing_images", len(missing)),
        ("questions_skipped_missing_image", len(questions) - len(kept)),
    ], list(missing.values()))
    if not kept:
        fail(f"no question has an existing image under {images_dir} (pattern {args.image_pattern!r})")


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

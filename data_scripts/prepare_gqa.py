#!/usr/bin/env python
"""Convert GQA questions to LLaVA training JSON + a filtered GQA questions file for evaluation.

    python data_scripts/prepare_gqa.py --questions Q.json --images DIR --out OUT [--split testdev_balanced]
        [--image-pattern "{image_id}.jpg"]

GQA questions JSON: ``{question_id: {"imageId", "question", "answer", "fullAnswer", "types", ...}}``.
Writes ``OUT/<split>_llava.json`` (one sample per image, multi-turn, short answer ``answer`` after the
lmms-eval suffix; ``fullAnswer`` is not used because GQA is scored on the short answer) and
``OUT/<split>_questions.json`` (same dict restricted to questions whose image exists, each entry with an
added ``file_name`` (the image path as in the LLaVA JSON), for ``eval/vqa.py --format gqa``). Missing images are skipped
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
    ImageFinder,
    SplitOutput,
    add_common_args,
    finish,
    image_index,
    require,
    run_main,
    split_parts,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", required=True, help="GQA questions JSON (dict id -> question)")
    p.add_argument("--images", required=True, help="directory holding the GQA images")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", default="gqa", help="output name prefix (default: gqa)")
    p.add_argument("--image-pattern", default="{image_id}.jpg", help="image file name pattern ({image_id})")
    p.add_argument("--relative", action="store_true", help="write image paths relative to --out")
    add_common_args(p)
    return p


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    images_dir = check_images_dir(args.images)
    out_dir = Path(args.out)
    questions = load_json(args.questions, "GQA questions")
    if not isinstance(questions, dict):
        fail(f"{args.questions}: expected a JSON object mapping question id -> question, "
             f"got {type(questions).__name__}")

    finder = ImageFinder(images_dir)
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
            path = finder.find(name)
            if path is not None:
                found[image_id] = path
            else:
                missing[image_id] = name
        if image_id in missing:
            continue
        per_image.setdefault(image_id, []).append((qid, q))
    n_kept = sum(len(v) for v in per_image.values())
    if not n_kept:
        fail(f"no question has an existing image under {images_dir} (pattern {args.image_pattern!r}, e.g. "
             f"{list(missing.values())[:3]}); nothing was written")

    outputs = []
    for name, part_role, image_ids in split_parts(args, out_dir, args.split, list(per_image), task="gqa"):
        samples, kept, index = [], {}, {}
        for image_id in image_ids:
            items = per_image[image_id]
            image = image_field(found[image_id], out_dir, args.relative)
            index[image_id] = image
            conversations = []
            for k, (qid, q) in enumerate(items):
                prefix = IMAGE_TOKEN + "\n" if k == 0 else ""
                conversations.append({"from": "human", "value": prefix + q["question"] + SHORT_ANSWER_SUFFIX})
                conversations.append({"from": "gpt", "value": q["answer"]})
                kept[qid] = {**q, "file_name": image}
            samples.append({"id": f"{name}_{image_id}", "image": image,
                            "question_ids": [qid for qid, _ in items], "conversations": conversations})
        outputs.append(SplitOutput(name, part_role, "gqa",
                                   {"llava": samples, "questions": kept, "images": image_index(index)}))
    finish(args, out_dir, outputs, [
        ("split", args.split), ("questions_in", len(questions)), ("questions_kept", n_kept),
        ("images_kept", len(per_image)), ("missing_images", len(missing)),
        ("questions_skipped_missing_image", len(questions) - n_kept), *finder.summary(),
    ], list(missing.values()), f"gqa -> {out_dir}")


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Convert VQAv2 / OK-VQA / TextVQA to LLaVA training JSON + filtered official-format eval files.

    python data_scripts/prepare_vqav2.py --questions Q.json --annotations A.json --images DIR --out OUT \
        [--split val2014] [--format vqav2|okvqa|textvqa] [--image-pattern "COCO_{subtype}_{image_id:012d}.jpg"]

Writes into OUT:
  <split>_llava.json        one sample per image, a multi-turn conversation over its questions; the first
                            human turn starts with "<image>\\n" (LLaVA convention), every question ends with
                            the lmms-eval short-answer suffix, the answer is ``multiple_choice_answer``.
  <split>_questions.json    official VQA questions JSON restricted to questions whose image exists; each
                            question also gets ``file_name`` (the image path, as in the LLaVA JSON) so
                            ``eval/vqa.py --images OUT`` and the training DataModule need no file-name pattern.
  <split>_annotations.json  official VQA annotations JSON restricted the same way.
  <split>_images.json       image index {"images": [{"id", "file_name"}]} (eval/vqa.py --image-index).
  dataset.json, tokenizer*  manifest of the splits in OUT and a tokenizer trained on its training text
                            (see data_scripts/_convert_common.py: validation carve-out, lengths, atomicity).

OK-VQA uses the VQAv2 file format (``--format okvqa`` behaves exactly like vqav2). TextVQA
(``{"data": [{"question", "question_id", "image_id", "answers": [10 strings]}]}``, one file, no
``--annotations``) is converted to VQAv2-style questions/annotations: answer_type "other", question_type
"unknown", ``multiple_choice_answer`` = most frequent answer (first seen wins ties). TextVQA's reported
metric (m4c / lmms-eval) normalises both sides, so score it with ``eval/vqa.py --always-normalize``
(official punctuation + digit/article rules on both sides; m4c's EvalAI processor additionally deletes
"," and "?" first and splits "'s", so numbers can differ slightly from the TextVQA leaderboard's).

Image file names: ``--image-pattern`` with ``{subtype}`` (``data_subtype`` of the questions file, or
``--subtype``) and ``{image_id}``; defaults: COCO ``COCO_{subtype}_{image_id:012d}.jpg``, TextVQA
``{image_id}.jpg``; ``{data_subtype}`` is a synonym of ``{subtype}``. The synthetic dataset (already in
these formats) lays images out as ``images/{data_subtype}/{data_subtype}_{image_id:06d}.png``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _convert_common import (  # noqa: E402
    IMAGE_TOKEN,
    SHORT_ANSWER_SUFFIX,
    ImageFinder,
    SplitOutput,
    add_common_args,
    check_images_dir,
    fail,
    finish,
    format_image_name,
    image_field,
    image_index,
    load_json,
    require,
    run_main,
    split_parts,
)

DEFAULT_PATTERNS = {"vqav2": "COCO_{subtype}_{image_id:012d}.jpg", "okvqa": "COCO_{subtype}_{image_id:012d}.jpg",
                    "textvqa": "{image_id}.jpg"}
# Keys the official ``loadRes`` deep-copies from the questions file: they must exist.
_QUESTION_HEADER_DEFAULTS = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "",
                             "license": {}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", required=True, help="VQA questions JSON (TextVQA: the TextVQA JSON)")
    p.add_argument("--annotations", help="VQA annotations JSON (not used for --format textvqa)")
    p.add_argument("--images", required=True, help="directory holding the image files")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", help="output name prefix (default: data_subtype of the questions file)")
    p.add_argument("--format", choices=sorted(DEFAULT_PATTERNS), default="vqav2")
    p.add_argument("--subtype", help="value for {subtype} in --image-pattern (default: data_subtype)")
    p.add_argument("--image-pattern", help="image file name pattern, relative to --images")
    p.add_argument("--relative", action="store_true", help="write image paths relative to --out")
    add_common_args(p)
    return p


def textvqa_to_vqa(data: Any, path: str) -> tuple[dict, dict]:
    """TextVQA JSON -> (VQAv2-style questions JSON, annotations JSON)."""
    records = require(data, "data", list, f"{path}")
    subtype = str(data.get("dataset_type", "")) if isinstance(data, dict) else ""
    questions, annotations = [], []
    for i, rec in enumerate(records):
        where = f"{path}: data[{i}]"
        qid = require(rec, "question_id", (int, str), where)
        image_id = require(rec, "image_id", (int, str), where)
        question = require(rec, "question", str, where)
        answers = require(rec, "answers", list, where)
        if not answers or not all(isinstance(a, str) for a in answers):
            fail(f"{where}: field 'answers' must be a non-empty list of strings")
        counts = Counter(answers)
        top = max(counts.values())
        mc_answer = next(a for a in answers if counts[a] == top)
        questions.append({"question_id": qid, "image_id": image_id, "question": question})
        annotations.append({
            "question_id": qid, "image_id": image_id, "question_type": "unknown", "answer_type": "other",
            "multiple_choice_answer": mc_answer,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)],
        })
    header = {"info": {"source": "TextVQA", "converted_by": "data_scripts/prepare_vqav2.py"},
              "task_type": "Open-Ended", "data_type": "textvqa", "data_subtype": subtype, "license": {}}
    return ({**header, "questions": questions},
            {k: header[k] for k in ("info", "license", "data_type", "data_subtype")} | {"annotations": annotations})


def validate_vqa(questions: Any, annotations: Any, qpath: str, apath: str) -> dict[Any, dict]:
    """Validate official-format files; return annotations indexed by question id."""
    qs = require(questions, "questions", list, qpath)
    anns = require(annotations, "annotations", list, apath)
    for i, q in enumerate(qs):
        where = f"{qpath}: questions[{i}]"
        require(q, "question_id", (int, str), where)
        require(q, "image_id", (int, str), where)
        require(q, "question", str, where)
    by_qid: dict[Any, dict] = {}
    for i, a in enumerate(anns):
        where = f"{apath}: annotations[{i}]"
        qid = require(a, "question_id", (int, str), where)
        require(a, "multiple_choice_answer", str, where)
        answers = require(a, "answers", list, where)
        for j, ans in enumerate(answers):
            require(ans, "answer", str, f"{where}.answers[{j}]")
        by_qid[qid] = a
    missing = [q["question_id"] for q in qs if q["question_id"] not in by_qid]
    if missing:
        fail(f"{apath}: {len(missing)} question ids of {qpath} have no annotation (e.g. {missing[:5]})")
    return by_qid


def convert(questions: dict, ann_by_qid: dict[Any, dict], annotations: dict, args: argparse.Namespace,
            images_dir: Path, out_dir: Path) -> tuple[list[SplitOutput], dict[str, Any], ImageFinder]:
    subtype = args.subtype if args.subtype is not None else str(questions.get("data_subtype", ""))
    split = args.split or subtype or "vqa"
    pattern = args.image_pattern or DEFAULT_PATTERNS[args.format]
    finder = ImageFinder(images_dir)

    per_image: dict[Any, list[dict]] = {}
    image_paths: dict[Any, Path] = {}
    missing_images: dict[Any, str] = {}
    for i, q in enumerate(questions["questions"]):
        image_id = q["image_id"]
        if image_id not in image_paths and image_id not in missing_images:
            name = format_image_name(pattern, image_id=image_id, subtype=subtype,
                                     where=f"{args.questions}: questions[{i}]")
            found = finder.find(name)
            if found is not None:
                image_paths[image_id] = found
            else:
                missing_images[image_id] = name
        if image_id in missing_images:
            continue
        per_image.setdefault(image_id, []).append(q)

    outputs = []
    for name, part_role, image_ids in split_parts(args, out_dir, split, list(per_image), task="vqa"):
        samples, kept_questions, index = [], [], {}
        for image_id in image_ids:
            qs = per_image[image_id]
            image = image_field(image_paths[image_id], out_dir, args.relative)
            index[image_id] = image
            conversations = []
            for k, q in enumerate(qs):
                prefix = IMAGE_TOKEN + "\n" if k == 0 else ""
                conversations.append({"from": "human", "value": prefix + q["question"] + SHORT_ANSWER_SUFFIX})
                conversations.append({"from": "gpt",
                                      "value": ann_by_qid[q["question_id"]]["multiple_choice_answer"]})
                kept_questions.append({**q, "file_name": image})
            samples.append({"id": f"{name}_{image_id}", "image": image,
                            "question_ids": [q["question_id"] for q in qs], "conversations": conversations})
        kept_ids = {q["question_id"] for q in kept_questions}
        q_out = {**_QUESTION_HEADER_DEFAULTS, **{k: v for k, v in questions.items() if k != "questions"},
                 "questions": kept_questions}
        a_out = {**{k: v for k, v in annotations.items() if k != "annotations"},
                 "annotations": [a for a in annotations["annotations"] if a["question_id"] in kept_ids]}
        outputs.append(SplitOutput(name, part_role, "vqa", {"llava": samples, "questions": q_out,
                                                             "annotations": a_out, "images": image_index(index)}))
    n_kept = sum(len(qs) for qs in per_image.values())
    return outputs, {
        "split": split,
        "questions_in": len(questions["questions"]),
        "questions_kept": n_kept,
        "images_kept": len(per_image),
        "missing_images": len(missing_images),
        "questions_skipped_missing_image": len(questions["questions"]) - n_kept,
        "missing_examples": list(missing_images.values())[:5],
    }, finder


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    images_dir = check_images_dir(args.images)
    out_dir = Path(args.out)
    if args.format == "textvqa":
        questions, annotations = textvqa_to_vqa(load_json(args.questions, "TextVQA"), args.questions)
        apath = args.questions
    else:
        if not args.annotations:
            fail(f"--annotations is required for --format {args.format}")
        questions = load_json(args.questions, "questions")
        annotations = load_json(args.annotations, "annotations")
        apath = args.annotations
    ann_by_qid = validate_vqa(questions, annotations, args.questions, apath)
    outputs, summary, finder = convert(questions, ann_by_qid, annotations, args, images_dir, out_dir)
    examples = summary.pop("missing_examples")
    if summary["questions_kept"] == 0:
        fail(f"no question has an existing image under {images_dir} (pattern "
             f"{args.image_pattern or DEFAULT_PATTERNS[args.format]!r}, e.g. {examples[:3]}); check --images / "
             "--image-pattern; nothing was written")
    finish(args, out_dir, outputs, [*summary.items(), *finder.summary()], examples, f"{args.format} -> {out_dir}")


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

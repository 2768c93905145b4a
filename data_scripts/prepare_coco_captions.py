#!/usr/bin/env python
"""Convert COCO-format captions (COCO, Flickr30k in COCO format) to LLaVA JSON + filtered caption GT.

    python data_scripts/prepare_coco_captions.py --captions C.json --images DIR --out OUT [--split val2014]
        [--mode per-caption|per-image] [--seed 0]

Input: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "id", "caption"}]}``, file names
relative to --images. (The Karpathy ``dataset_coco.json`` layout with ``sentences`` is a different format
and is rejected with a message.)

Writes ``OUT/<split>_llava.json`` and ``OUT/<split>_captions.json`` (the COCO captions JSON restricted to
images whose file exists and that have captions; the GT for ``eval/caption.py``).

Training samples, ``--mode``:
  per-caption (default)  one single-turn sample per reference caption ("<image>\\nDescribe the image
                         briefly." -> caption): uses every human caption, so the model sees the spread
                         of valid descriptions instead of one arbitrary pick.
  per-image              one sample per image with one caption drawn with ``random.Random(--seed)``:
                         one sample per image, deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _convert_common import (  # noqa: E402
    IMAGE_TOKEN,
    check_images_dir,
    fail,
    image_field,
    load_json,
    ImageFinder,
    SplitOutput,
    add_common_args,
    finish,
    require,
    run_main,
    split_parts,
)

CAPTION_PROMPT = "Describe the image briefly."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True, help="COCO-format captions JSON")
    p.add_argument("--images", required=True, help="directory the images' file_name are relative to")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", help="output name prefix (default: captions file stem)")
    p.add_argument("--mode", choices=("per-caption", "per-image"), default="per-caption")
    p.add_argument("--seed", type=int, default=0, help="caption choice for --mode per-image")
    p.add_argument("--relative", action="store_true", help="write image paths relative to --out")
    add_common_args(p)
    return p


def _validate(data: Any, path: str) -> tuple[list[dict], list[dict]]:
    images = require(data, "images", list, path)
    if images and isinstance(images[0], dict) and "sentences" in images[0]:
        fail(f"{path}: looks like a Karpathy split file (images[].sentences); convert it to COCO captions "
             "format ({'images': [{'id','file_name'}], 'annotations': [{'image_id','caption'}]}) first")
    anns = require(data, "annotations", list, path)
    for i, img in enumerate(images):
        require(img, "id", (int, str), f"{path}: images[{i}]")
        require(img, "file_name", str, f"{path}: images[{i}]")
    for i, ann in enumerate(anns):
        require(ann, "image_id", (int, str), f"{path}: annotations[{i}]")
        require(ann, "caption", str, f"{path}: annotations[{i}]")
    return images, anns


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    images_dir = check_images_dir(args.images)
    out_dir = Path(args.out)
    split = args.split or Path(args.captions).stem
    data = load_json(args.captions, "captions")
    images, anns = _validate(data, args.captions)

    known_ids = {img["id"] for img in images}
    orphans = [a["image_id"] for a in anns if a["image_id"] not in known_ids]
    if orphans:
        fail(f"{args.captions}: {len(orphans)} annotations refer to image ids missing from 'images' "
             f"(e.g. {orphans[:5]})")
    caps: dict[Any, list[dict]] = {}
    for ann in anns:
        caps.setdefault(ann["image_id"], []).append(ann)

    finder = ImageFinder(images_dir)
    kept_images, paths, missing, no_caption = [], {}, [], 0
    for img in images:
        path = finder.find(img["file_name"])
        if path is None:
            missing.append(img["file_name"])
        elif img["id"] not in caps:
            no_caption += 1
        else:
            kept_images.append(img)
            paths[img["id"]] = image_field(path, out_dir, args.relative)
    if not kept_images:
        fail(f"no image listed in {args.captions} exists under {images_dir} with captions; nothing was written")

    rng = random.Random(args.seed)
    outputs, n_samples, n_captions = [], 0, 0
    for name, part_role, part_images in split_parts(args, out_dir, split, kept_images, task="caption",
                                                        key=lambda img: img["id"]):
        samples = []
        for img in part_images:
            chosen = caps[img["id"]] if args.mode == "per-caption" else [rng.choice(caps[img["id"]])]
            for ann in chosen:
                samples.append({
                    "id": f"{name}_{img['id']}_{ann.get('id', len(samples))}", "image": paths[img["id"]],
                    "image_id": img["id"],
                    "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"},
                                      {"from": "gpt", "value": ann["caption"].strip()}],
                })
        kept_ids = {img["id"] for img in part_images}
        # file_name as found on disk (extension detected, path as --relative says), so eval/caption.py --images OUT
        # opens the same file the training samples name
        gt = {**{k: v for k, v in data.items() if k not in ("images", "annotations")},
              "images": [{**img, "file_name": paths[img["id"]]} for img in part_images],
              "annotations": [a for a in anns if a["image_id"] in kept_ids]}
        outputs.append(SplitOutput(name, part_role, "caption", {"llava": samples, "captions": gt}))
        n_samples, n_captions = n_samples + len(samples), n_captions + len(gt["annotations"])
    finish(args, out_dir, outputs, [
        ("split", split), ("mode", args.mode), ("images_in", len(images)), ("images_kept", len(kept_images)),
        ("missing_images", len(missing)), ("images_without_captions", no_caption),
        ("captions_kept", n_captions), ("llava_samples", n_samples), *finder.summary(),
    ], missing, f"captions -> {out_dir}")


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

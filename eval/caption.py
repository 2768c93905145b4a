#!/usr/bin/env python
"""Generate captions with an exported model and/or score them with COCO caption metrics (offline).

Generation (writes results, then scores them):
    python eval/caption.py --model EXPORT_DIR --captions C.json --images DIR --out results.json \
        [--batch-size 16 --max-new-tokens 24 --limit N]
Scoring only:
    python eval/caption.py --score --results R.json --captions C.json [--allow-subset]

``C.json`` is COCO captions format (``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
"caption"}]}``, file names relative to --images), e.g. ``OUT/<split>_captions.json`` written by
``data_scripts/prepare_coco_captions.py``. Only images that have reference captions are captioned.
Unreadable images are skipped and counted (``skipped_images``); with skips or ``--limit`` the score is on
the captioned subset (``subset: true``; CIDEr's IDF then comes from that subset).

Metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr via pycocoevalcap's scorers after its PTB tokenizer (Java
required), raw 0-1 scale; SPICE is null (needs a download). Output ends with exactly one JSON line of
the metrics, also saved to ``<out stem>.metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run as `python eval/caption.py` without an installed package
    sys.path.insert(0, str(_REPO_ROOT))

from eval.vqa import (  # noqa: E402
    add_run_args,
    CLIError,
    ImageCache,
    batched,
    emit_metrics,
    load_json_file,
    load_pipeline_lazily,
    metrics_path_for,
    require_model_dir,
    run_cli,
)
from mmoe.metrics.caption import JavaNotFoundError, caption_metrics, index_references  # noqa: E402


def images_to_caption(gt: Any, path: str, limit: int | None) -> list[tuple[Any, str]]:
    """(image_id, file_name) for every GT image that has at least one reference caption, in file order."""
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list):
        raise CLIError(f"{path}: expected a COCO captions JSON with an 'images' list")
    refs = index_references(gt)
    out = []
    for i, img in enumerate(gt["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise CLIError(f"{path}: images[{i}] needs fields 'id' and 'file_name'")
        if img["id"] in refs:
            out.append((img["id"], img["file_name"]))
    return out[:limit] if limit is not None else out


def generate(images: list[tuple[Any, str]], args: argparse.Namespace) -> tuple[list[dict], dict[str, Any]]:
    from tqdm import tqdm

    model_dir = require_model_dir(args.model)
    if not args.images or not Path(args.images).is_dir():
        raise CLIError(f"--images directory not found: {args.images}")
    pipe = load_pipeline_lazily(model_dir, args.device, args.quantize)
    cache = ImageCache(Path(args.images), capacity=args.batch_size)
    results: list[dict] = []
    for batch in tqdm(list(batched(images, args.batch_size)), desc="captions", unit="batch", file=sys.stderr):
        ok = [(image_id, img) for image_id, name in batch if (img := cache.get(name)) is not None]
        if not ok:
            continue
        captions = pipe.caption([img for _, img in ok], max_new_tokens=args.max_new_tokens)
        if len(captions) != len(ok):
            raise CLIError(f"pipeline returned {len(captions)} captions for {len(ok)} images")
        for (image_id, _), text in zip(ok, captions):
            lines = [line.strip() for line in str(text).splitlines() if line.strip()]
            results.append({"image_id": image_id, "caption": lines[0] if lines else ""})
    if cache.bad:
        print(f"skipped {len(cache.bad)} unreadable images; first: " + "; ".join(list(cache.bad.values())[:3]),
              file=sys.stderr)
    stats = {"skipped_images": len(cache.bad),
             "generation": {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                            "decoding": "greedy", "limit": args.limit}}
    return results, stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True, help="COCO-format captions GT JSON")
    add_run_args(p, results_help="results JSON [{image_id, caption}] to score (with --score)",
                 images_help="image directory the GT file_name are relative to (generation)", max_new_tokens=24,
                 unit="images")
    p.add_argument("--allow-subset", action="store_true", help="--score: score only the captioned images")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (~10 s Java start-up) for smoke runs")
    return p


def _score(results: Any, gt: Any, allow_subset: bool, meteor: bool) -> dict[str, Any]:
    try:
        metrics = caption_metrics(results, gt, allow_subset=allow_subset, meteor=meteor)
    except JavaNotFoundError as err:
        raise CLIError(str(err)) from None
    metrics["subset"] = metrics["num_images"] < metrics["num_gt_images"]
    return metrics


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise CLIError("--batch-size and --limit must be positive")
    gt = load_json_file(args.captions, "captions GT")
    if args.score:
        results = load_json_file(args.results, "results")
        metrics = _score(results, gt, args.allow_subset, not args.no_meteor)
        metrics_path = Path(args.metrics_out) if args.metrics_out else metrics_path_for(args.out or args.results)
    else:
        if not args.out:
            raise CLIError("--out results.json is required for generation")
        results, stats = generate(images_to_caption(gt, args.captions, args.limit), args)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")
        print(f"wrote {len(results)} captions to {out}")
        if not results:
            raise CLIError("no image could be captioned (all images unreadable?)")
        metrics = _score(results, gt, allow_subset=True, meteor=not args.no_meteor)
        metrics.update(stats)
        metrics_path = Path(args.metrics_out) if args.metrics_out else metrics_path_for(out)
    keys = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
    lines = [f"{k}: {metrics[k]:.4f}" if metrics[k] is not None else f"{k}: {metrics['notes'][k]}" for k in keys]
    lines.append(f"SPICE: {metrics['notes']['SPICE']}  ({metrics['num_images']} images)")
    emit_metrics(metrics, metrics_path, lines)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

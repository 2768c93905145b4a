#!/usr/bin/env python
"""Generate answers with an exported model and/or score them: VQAv2 (official), GQA, POPE.

Generation (writes results, then scores them):
    python eval/vqa.py --model EXPORT_DIR --questions Q.json --annotations A.json --images DIR \
        --out results.json [--format vqav2|gqa|pope] [--batch-size 16 --max-new-tokens 8 --limit N]
Scoring only:
    python eval/vqa.py --score --results R.json --questions Q.json --annotations A.json [--format ...]

Inputs per ``--format``:
  vqav2  official questions + annotations JSON (also OK-VQA, and TextVQA converted by
         ``data_scripts/prepare_vqav2.py``; add ``--always-normalize`` for TextVQA-style scoring).
  gqa    GQA questions JSON (dict id -> {"imageId", "question", "answer"}); no --annotations.
  pope   POPE question file (JSON list or JSON lines of {"question_id", "image", "text"|"question",
         "label"|"answer", "category"?}); no --annotations.

Image file for a question, first match wins: the question's ``file_name`` (written by our converters)
or ``image`` (POPE) relative to --images; ``--image-index`` (a COCO-style JSON whose "images" map id ->
file_name; ``--captions`` is an alias); ``--image-pattern`` with ``{subtype}`` / ``{data_subtype}``
(questions ``data_subtype`` or ``--subtype``) and ``{image_id}``. Pattern defaults: VQAv2
``COCO_{subtype}_{image_id:012d}.jpg``, GQA ``{image_id}.jpg``. For the synthetic dataset pass
``--images data/synthetic --captions data/synthetic/val_captions.json`` (its file names are
``images/{data_subtype}/{data_subtype}_{image_id:06d}.png`` relative to the dataset directory).
Unreadable/missing images are skipped and counted (``skipped_images``); their questions are not scored,
so the score is then on a subset (``subset: true``), as with ``--limit``.

VQAv2 predictions are cleaned before they are written (first line, lowercase, official normalisation,
see ``mmoe.metrics.vqa.clean_prediction``) because the official scorer compares raw strings when all
humans agree; ``--no-clean`` writes the raw text. Results are official ``[{"question_id", "answer"}]``.

Output: human-readable metrics, then exactly one JSON line with the metrics as the last line of stdout;
the same JSON is saved to ``<out stem>.metrics.json`` (``results.json`` -> ``results.metrics.json``;
``--metrics-out`` overrides). Progress bars go to stderr. Exit code 2 on bad input with a message naming
the file/field.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run as `python eval/vqa.py` without an installed package
    sys.path.insert(0, str(_REPO_ROOT))

from mmoe.metrics.gqa_pope import gqa_accuracy, pope_metrics  # noqa: E402
from mmoe.metrics.vqa import clean_prediction, vqa_accuracy  # noqa: E402

DEFAULT_PATTERNS = {"vqav2": "COCO_{subtype}_{image_id:012d}.jpg", "gqa": "{image_id}.jpg", "pope": "{image_id}"}


# ---------------------------------------------------------------------------------------------------
# Helpers shared with eval/caption.py
# ---------------------------------------------------------------------------------------------------

class CLIError(Exception):
    """Bad input or environment; printed as ``error: ...`` with exit code 2."""


def load_json_file(path: str | Path | None, what: str) -> Any:
    """Load JSON (or JSON lines) and name the file in every error."""
    if path is None:
        raise CLIError(f"{what} file is required (see --help)")
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{what} file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise CLIError(f"{what} file {p} is not valid JSON: {err}") from None


def require_model_dir(path: str | None) -> Path:
    if not path:
        raise CLIError("--model EXPORT_DIR is required for generation (or pass --score --results R.json)")
    p = Path(path)
    if not p.is_dir():
        raise CLIError(f"model export directory not found: {p}")
    return p


def load_pipeline_lazily(model_dir: Path, device: str | None, quantize: str | None = None):
    """Import the inference stack only for generation, so scoring works without torch/model code."""
    try:
        from mmoe.inference import load_pipeline
    except ImportError as err:
        raise CLIError(f"cannot import mmoe.inference.load_pipeline (needed for generation): {err}") from err
    extra = {"quantize": quantize} if quantize else {}  # plain calls stay plain (tests pass fake pipelines)
    return load_pipeline(str(model_dir), device=device, **extra)


def metrics_path_for(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.stem + ".metrics.json")


def emit_metrics(metrics: dict[str, Any], metrics_path: Path, headline: Sequence[str]) -> None:
    """Print a readable summary, save the JSON, and print it as the very last stdout line."""
    for line in headline:
        print(line)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"metrics saved to {metrics_path}")
    sys.stdout.flush()
    print(json.dumps(metrics, ensure_ascii=False), flush=True)


class ImageCache:
    """Loads images via ``mmoe.data.images.load_image``; unreadable ones are remembered and counted once."""

    def __init__(self, root: Path, capacity: int = 64) -> None:
        from mmoe.data.images import ImageLoadError, load_image

        self._load, self._error_type = load_image, ImageLoadError
        self.root, self.capacity = root, capacity
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.bad: dict[str, str] = {}

    def get(self, rel_path: str):
        """PIL image, or ``None`` if the file is missing/unreadable (reason kept in ``self.bad``)."""
        if rel_path in self.bad:
            return None
        if rel_path in self._cache:
            self._cache.move_to_end(rel_path)
            return self._cache[rel_path]
        try:
            img = self._load(self.root / rel_path)
        except (self._error_type, OSError) as err:
            self.bad[rel_path] = str(err)
            return None
        self._cache[rel_path] = img
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return img


def batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_cli(body: Callable[[list[str] | None], None], argv: list[str] | None) -> int:
    try:
        body(argv)
    except (CLIError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------------
# VQA-specific
# ---------------------------------------------------------------------------------------------------

@dataclass
class Item:
    question_id: Any
    question: str
    image: str  # path relative to --images


def _image_index(path: str | None) -> dict[Any, str]:
    if path is None:
        return {}
    data = load_json_file(path, "image index")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise CLIError(f"{path}: image index must be a JSON object with an 'images' list")
    out = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise CLIError(f"{path}: images[{i}] needs fields 'id' and 'file_name'")
        out[img["id"]] = img["file_name"]
    return out


def _image_name(rec: dict, image_id: Any, index: dict, pattern: str, subtype: str, where: str) -> str:
    for key in ("file_name", "image"):
        if isinstance(rec.get(key), str):
            return rec[key]
    if image_id in index:
        return index[image_id]
    try:
        return pattern.format(image_id=image_id, subtype=subtype, data_subtype=subtype)
    except (ValueError, KeyError, IndexError) as err:
        raise CLIError(f"{where}: cannot build image file name from pattern {pattern!r} and "
                       f"image_id={image_id!r}: {err}") from None


def build_items(fmt: str, questions: Any, args: argparse.Namespace) -> list[Item]:
    """Questions of any supported format -> list of (question id, text, image file)."""
    index = _image_index(args.image_index)
    pattern = args.image_pattern or DEFAULT_PATTERNS[fmt]
    items: list[Item] = []
    if fmt == "vqav2":
        if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
            raise CLIError(f"{args.questions}: expected a VQA questions JSON with a 'questions' list")
        subtype = args.subtype if args.subtype is not None else str(questions.get("data_subtype", ""))
        for i, q in enumerate(questions["questions"]):
            where = f"{args.questions}: questions[{i}]"
            ok = isinstance(q, dict) and {"question_id", "image_id"} <= q.keys() and isinstance(q.get("question"), str)
            if not ok:
                raise CLIError(f"{where}: needs fields 'question_id', 'image_id' and string 'question'")
            image = _image_name(q, q["image_id"], index, pattern, subtype, where)
            items.append(Item(q["question_id"], q["question"], image))
    elif fmt == "gqa":
        if not isinstance(questions, dict):
            raise CLIError(f"{args.questions}: expected a GQA questions JSON object (id -> question)")
        for qid, q in questions.items():
            where = f"{args.questions}: [{qid!r}]"
            if not isinstance(q, dict) or "imageId" not in q or not isinstance(q.get("question"), str):
                raise CLIError(f"{where}: needs fields 'imageId' and string 'question'")
            items.append(Item(qid, q["question"], _image_name(q, q["imageId"], index, pattern, "", where)))
    else:  # pope
        if not isinstance(questions, list):
            raise CLIError(f"{args.questions}: expected a POPE question list (JSON or JSON lines)")
        for i, q in enumerate(questions):
            where = f"{args.questions}: [{i}]"
            text = q.get("text", q.get("question")) if isinstance(q, dict) else None
            if not isinstance(text, str) or "question_id" not in q:
                raise CLIError(f"{where}: needs fields 'question_id' and string 'text' (or 'question')")
            image_id = q.get("image", q.get("image_id"))
            items.append(Item(q["question_id"], text, _image_name(q, image_id, index, pattern, "", where)))
    if args.limit is not None:
        items = items[: args.limit]
    return items


def generate(items: list[Item], args: argparse.Namespace) -> tuple[list[dict], dict[str, Any]]:
    """Answer ``items`` in batches; returns results and skip statistics."""
    from tqdm import tqdm

    model_dir = require_model_dir(args.model)
    if not args.images or not Path(args.images).is_dir():
        raise CLIError(f"--images directory not found: {args.images}")
    pipe = load_pipeline_lazily(model_dir, args.device, args.quantize)
    cache = ImageCache(Path(args.images))
    results: list[dict] = []
    skipped_questions = 0
    for batch in tqdm(list(batched(items, args.batch_size)), desc=f"{args.format} answers", unit="batch",
                      file=sys.stderr):
        loaded = [(it, cache.get(it.image)) for it in batch]
        ok = [(it, img) for it, img in loaded if img is not None]
        skipped_questions += len(loaded) - len(ok)
        if not ok:
            continue
        answers = pipe.answer([img for _, img in ok], [it.question for it, _ in ok],
                              max_new_tokens=args.max_new_tokens, short_answer=True)
        if len(answers) != len(ok):
            raise CLIError(f"pipeline returned {len(answers)} answers for {len(ok)} questions")
        for (it, _), raw in zip(ok, answers):
            text = raw.strip() if args.format != "vqav2" or args.no_clean else clean_prediction(raw)
            results.append({"question_id": it.question_id, "answer": text})
    if cache.bad:
        print(f"skipped {len(cache.bad)} unreadable images ({skipped_questions} questions); first: "
              + "; ".join(list(cache.bad.values())[:3]), file=sys.stderr)
    stats = {"skipped_images": len(cache.bad), "skipped_questions": skipped_questions,
             "generation": {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                            "decoding": "greedy", "short_answer": True, "limit": args.limit}}
    return results, stats


def score(fmt: str, results: Any, questions: Any, annotations: Any, args: argparse.Namespace,
          subset_ok: bool) -> dict[str, Any]:
    """Score results; ``subset_ok`` restricts the GT to answered questions (limit / skipped images)."""
    if not isinstance(results, list):
        raise CLIError(f"{args.results or args.out}: results must be a JSON list")
    if fmt == "vqav2":
        if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
            raise CLIError(f"{args.annotations}: expected a VQA annotations JSON with an 'annotations' list")
        total = len(annotations["annotations"])
        if subset_ok:
            answered = {r.get("question_id") for r in results if isinstance(r, dict)}
            annotations = {**annotations, "annotations": [a for a in annotations["annotations"]
                                                          if isinstance(a, dict) and a.get("question_id") in answered]}
        try:
            metrics = vqa_accuracy(results, annotations, questions, always_normalize=args.always_normalize)
        except ValueError as err:
            hint = " (eval/vqa.py: add --allow-subset to score only the answered questions)" \
                if "do not match" in str(err) and not subset_ok else ""
            raise CLIError(f"{args.results or args.out}: {err}{hint}") from None
        metrics.pop("per_question")
        metrics["subset"] = metrics["num_questions"] < total
        metrics["num_questions_total"] = total
        return metrics
    if fmt == "gqa":
        return gqa_accuracy(results, questions, normalization=args.gqa_normalization, require_all=not subset_ok)
    return pope_metrics(results, questions)


def headline(fmt: str, m: dict[str, Any]) -> list[str]:
    if fmt == "vqav2":
        lines = [f"VQA accuracy: {m['overall']:.2f}  ({m['num_questions']} questions, {m['normalization']})"]
        lines += [f"  {k}: {v:.2f}" for k, v in sorted(m["per_answer_type"].items())]
        return lines
    if fmt == "gqa":
        return [f"GQA accuracy: {m['accuracy']:.2f}  ({m['num_questions']} questions, {m['normalization']})"]
    return [f"POPE accuracy {m['accuracy']:.2f}  precision {m['precision']:.2f}  recall {m['recall']:.2f}  "
            f"F1 {m['f1']:.2f}  yes-ratio {m['yes_ratio']:.2f}  ({m['num_questions']} questions)"]


def add_run_args(p: argparse.ArgumentParser, results_help: str, images_help: str, max_new_tokens: int,
                 unit: str) -> None:
    """Flags shared by eval/vqa.py and eval/caption.py: score-only mode, generation inputs and outputs."""
    p.add_argument("--score", action="store_true", help="only score an existing --results file")
    p.add_argument("--results", help=results_help)
    p.add_argument("--model", help="exported model directory (generation)")
    p.add_argument("--images", help=images_help)
    p.add_argument("--out", help="results JSON to write (generation)")
    p.add_argument("--metrics-out", help="metrics JSON path (default: <results stem>.metrics.json)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--limit", type=int, help=f"only the first N {unit} (scored as a subset)")
    p.add_argument("--device", help="device for the pipeline (default: its choice)")
    p.add_argument("--quantize", choices=["int8"], help="int8 weight-only linears (torchao) for generation")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=("vqav2", "gqa", "pope"), default="vqav2")
    p.add_argument("--questions", required=True, help="questions file (see formats above)")
    p.add_argument("--annotations", help="VQA annotations JSON (--format vqav2)")
    add_run_args(p, results_help="results JSON to score (with --score)", images_help="image directory (generation)",
                 max_new_tokens=8, unit="questions")
    p.add_argument("--image-pattern", help="image file name pattern with {subtype} and {image_id}")
    p.add_argument("--image-index", "--captions", dest="image_index",
                   help="COCO-style JSON with images [{id, file_name}] (e.g. the captions file) for image lookup")
    p.add_argument("--subtype", help="{subtype} value (default: questions data_subtype)")
    p.add_argument("--always-normalize", action="store_true",
                   help="VQA: normalise even unanimous GT (lmms-eval / TextVQA style) instead of the official rule")
    p.add_argument("--no-clean", action="store_true", help="VQA: write raw model answers (no clean_prediction)")
    p.add_argument("--allow-subset", action="store_true",
                   help="--score: score only the answered questions instead of requiring all of them")
    p.add_argument("--gqa-normalization", choices=("lmms-eval", "llava", "official"), default="lmms-eval")
    return p


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise CLIError("--batch-size and --limit must be positive")
    fmt = args.format
    questions = load_json_file(args.questions, "questions")
    annotations = load_json_file(args.annotations, "annotations") if fmt == "vqav2" else None
    if args.score:
        results = load_json_file(args.results, "results")
        metrics = score(fmt, results, questions, annotations, args, subset_ok=args.allow_subset)
        metrics_path = Path(args.metrics_out) if args.metrics_out else metrics_path_for(args.out or args.results)
    else:
        if not args.out:
            raise CLIError("--out results.json is required for generation")
        items = build_items(fmt, questions, args)
        results, stats = generate(items, args)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")
        print(f"wrote {len(results)} answers to {out}")
        if not results:
            raise CLIError("no question could be answered (all images unreadable?)")
        subset = args.limit is not None or stats["skipped_questions"] > 0
        metrics = score(fmt, results, questions, annotations, args, subset_ok=subset)
        metrics.update(stats)
        metrics_path = Path(args.metrics_out) if args.metrics_out else metrics_path_for(out)
    metrics = {"format": fmt, **metrics}
    emit_metrics(metrics, metrics_path, headline(fmt, metrics))


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) through pycocoevalcap, offline.

Why not ``COCOEvalCap.evaluate()``: it always constructs ``Spice()``, which downloads Stanford CoreNLP
on first use (no network here) and is reported broken on Java >= 9. So we run the same pipeline by
hand: PTBTokenizer on references and candidates, then the ``Bleu(4)``, ``Meteor()``, ``Rouge()`` and
``Cider()`` scorers individually. SPICE is reported as ``None`` with a note.

Scale: raw pycocoevalcap scale (0-1, CIDEr 0-10); papers usually print x100. CIDEr's IDF comes from the
references of the images being scored, so a subset's CIDEr is not comparable to the full split's --
which is why scoring a subset must be asked for explicitly (``allow_subset=True``).

The PTB tokenizer and METEOR are Java programs; without ``java`` on PATH we fail early with a clear
message instead of pycocoevalcap's opaque ``FileNotFoundError``/broken pipe.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["JavaNotFoundError", "caption_metrics", "index_references", "index_results", "tokenize"]

SPICE_NOTE = "skipped: needs download (Stanford CoreNLP models) and is broken on Java >= 9"


class JavaNotFoundError(RuntimeError):
    """Raised when the ``java`` executable needed by PTBTokenizer/METEOR is missing."""


def _require_java() -> None:
    if shutil.which("java") is None:
        raise JavaNotFoundError(
            "`java` was not found on PATH: pycocoevalcap's PTBTokenizer and METEOR run on Java. "
            "Install a JRE (e.g. `apt-get install openjdk-17-jre-headless`) and retry.")


def index_references(coco_gt: Mapping[str, Any]) -> dict[Any, list[str]]:
    """``{image_id: [reference captions]}`` from a COCO-format captions JSON, validating fields.

    Images listed in ``"images"`` without any caption are ignored (they cannot be scored).
    """
    if not isinstance(coco_gt, Mapping) or not isinstance(coco_gt.get("annotations"), list):
        raise ValueError("captions GT: expected a COCO captions JSON object with an 'annotations' list")
    refs: dict[Any, list[str]] = {}
    for i, ann in enumerate(coco_gt["annotations"]):
        if not isinstance(ann, Mapping):
            raise ValueError(f"captions GT['annotations'][{i}]: expected an object")
        if "image_id" not in ann:
            raise ValueError(f"captions GT['annotations'][{i}]: missing field 'image_id'")
        if not isinstance(ann.get("caption"), str):
            raise ValueError(f"captions GT['annotations'][{i}]: missing string field 'caption'")
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    if not refs:
        raise ValueError("captions GT['annotations'] is empty: nothing to score against")
    return refs


def index_results(results: Sequence[Mapping[str, Any]]) -> dict[Any, str]:
    """``{image_id: caption}``; exactly one caption per image (METEOR's own assertion)."""
    if not isinstance(results, (list, tuple)):
        raise ValueError(f"caption results: expected a list of {{'image_id', 'caption'}} objects, "
                         f"got {type(results).__name__}")
    out: dict[Any, str] = {}
    for i, r in enumerate(results):
        if not isinstance(r, Mapping) or "image_id" not in r:
            raise ValueError(f"caption results[{i}]: missing field 'image_id'")
        if not isinstance(r.get("caption"), str):
            raise ValueError(f"caption results[{i}]: missing string field 'caption'")
        if r["image_id"] in out:
            raise ValueError(f"caption results[{i}]: duplicate image_id {r['image_id']!r} "
                             "(COCO caption evaluation needs exactly one caption per image)")
        out[r["image_id"]] = r["caption"]
    if not out:
        raise ValueError("caption results: empty list, nothing to score")
    return out


def _check_ids(res_ids: set, ref_ids: set, allow_subset: bool) -> None:
    unknown = res_ids - ref_ids
    missing = ref_ids - res_ids
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} result image ids have no reference captions "
                        f"(e.g. {sorted(unknown, key=repr)[:5]})")
    if missing and not allow_subset:
        problems.append(f"{len(missing)} GT images have no result caption (e.g. {sorted(missing, key=repr)[:5]}); "
                        "pass allow_subset=True to score only the captioned images (CIDEr then uses the "
                        "subset's IDF and is not comparable to full-split numbers)")
    if problems:
        hint = ""
        if {type(i) for i in res_ids} != {type(i) for i in ref_ids}:
            hint = " Note: image id types differ between results and GT (e.g. str vs int)."
        raise ValueError("caption results do not match the GT: " + "; ".join(problems) + "." + hint)


def tokenize(captions: Mapping[Any, list[str]]) -> dict[Any, list[str]]:
    """Run pycocoevalcap's PTBTokenizer (Java) on ``{image_id: [captions]}``."""
    _require_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def caption_metrics(results: Sequence[Mapping[str, Any]], coco_gt: Mapping[str, Any], *,
                    allow_subset: bool = False, meteor: bool = True) -> dict[str, Any]:
    """Score ``[{"image_id", "caption"}]`` against a COCO-format captions GT.

    Args:
        results: one caption per image.
        coco_gt: loaded COCO captions JSON (``{"images", "annotations": [{"image_id", "caption"}]}``).
        allow_subset: score only the images that have a result (default: every GT image must have one).
        meteor: set False to skip METEOR (its Java start-up loads a 62 MB paraphrase table) for
            quick smoke evaluations; it is then reported as ``None`` with a note.

    Returns:
        ``{"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE": None, "num_images",
        "num_gt_images", "notes"}`` on the raw pycocoevalcap scale.

    Raises:
        ValueError: malformed inputs or image ids that do not match.
        JavaNotFoundError: ``java`` missing (needed by the tokenizer and METEOR).
    """
    refs = index_references(coco_gt)
    cands = index_results(results)
    _check_ids(set(cands), set(refs), allow_subset)
    _require_java()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(cands)
    gts = tokenize({i: refs[i] for i in ids})
    res = tokenize({i: [cands[i]] for i in ids})

    scores: dict[str, Any] = {}
    # Bleu prints corpus statistics on stdout; keep stdout for our own report.
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
    for n, value in enumerate(bleu, start=1):
        scores[f"BLEU-{n}"] = float(value)
    notes = {"SPICE": SPICE_NOTE}
    if meteor:
        scorer = Meteor()
        try:
            scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer  # its __del__ closes the Java process now rather than at interpreter exit
    else:
        scores["METEOR"] = None
        notes["METEOR"] = "skipped: meteor=False"
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    scores["SPICE"] = None
    scores.update({
        "num_images": len(ids),
        "num_gt_images": len(refs),
        "scale": "raw pycocoevalcap (0-1, CIDEr-D 0-10); multiply by 100 for paper-style numbers",
        "notes": notes,
    })
    return scores

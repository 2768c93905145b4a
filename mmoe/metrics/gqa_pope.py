"""GQA exact-match accuracy and POPE yes/no metrics.

GQA: the official ``eval.py`` compares ``prediction == answer`` with no
normalisation at all; LLaVA lower-cases and strips trailing periods before writing predictions
(``convert_gqa_for_eval.py``); lmms-eval's ``exact_match`` ignores case and deletes every ASCII
punctuation character on both sides. A generative model's raw text ("Yes.") needs one of the latter, so
the default here is the lmms-eval rule; ``normalization="llava"`` and ``"official"`` are available for
comparison. Articles are *not* removed by any of them, so neither do we.

POPE: the official parser (RUC-AIBOX POPE ``evaluate.py`` = LLaVA ``eval_pope.py``) keeps the text before
the first ".", deletes ",", splits on single spaces, and answers "no" if any word is exactly "No", "no"
or "not", else "yes" -- so an empty or off-topic answer counts as "yes". Metrics treat "yes" as the
positive class; ``yes_ratio`` is the share of *predictions* that are "yes" (lmms-eval reports the GT
ratio instead). Where the official script would divide by zero (no predicted or no actual positives)
we report 0.0 and say so in ``notes``.

All accuracies/ratios are returned in percent (x100, unrounded) to match the VQA metric's scale.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

__all__ = ["gqa_accuracy", "normalize_gqa_answer", "parse_pope_answer", "pope_metrics"]

GQANormalization = Literal["lmms-eval", "llava", "official"]
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_gqa_answer(text: str, normalization: GQANormalization = "lmms-eval") -> str:
    """Normalise one GQA answer/prediction under the chosen convention (see module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"GQA answers must be strings, got {type(text).__name__}: {text!r}")
    if normalization == "official":
        return text
    if normalization == "llava":
        return text.rstrip(".").lower()
    if normalization == "lmms-eval":
        return text.strip().lower().translate(_PUNCT_TABLE)
    raise ValueError(f"unknown GQA normalization {normalization!r} (expected lmms-eval, llava or official)")


def _predictions_by_id(predictions: Sequence[Mapping[str, Any]] | Mapping[Any, str],
                       what: str) -> dict[str, str]:
    """Accept ``[{"question_id","answer"}]``, official GQA ``[{"questionId","prediction"}]`` or a dict.

    Ids are compared as strings because GQA question ids are strings in the questions JSON but often
    become ints in model output files.
    """
    if isinstance(predictions, Mapping):
        return {str(k): v for k, v in predictions.items()}
    if not isinstance(predictions, (list, tuple)):
        raise ValueError(f"{what}: expected a list of prediction objects, got {type(predictions).__name__}")
    out: dict[str, str] = {}
    for i, p in enumerate(predictions):
        if not isinstance(p, Mapping):
            raise ValueError(f"{what}[{i}]: expected an object, got {type(p).__name__}")
        qid = p.get("question_id", p.get("questionId"))
        ans = p.get("answer", p.get("prediction", p.get("text")))
        if qid is None:
            raise ValueError(f"{what}[{i}]: missing field 'question_id' (or 'questionId')")
        if not isinstance(ans, str):
            raise ValueError(f"{what}[{i}]: missing string field 'answer' (or 'prediction'/'text')")
        out[str(qid)] = ans
    return out


def _id_mismatch(pred_ids: Iterable[str], gt_ids: Iterable[str], what: str) -> None:
    pred, gt = set(pred_ids), set(gt_ids)
    unknown = sorted(pred - gt)
    if unknown:
        raise ValueError(f"{what}: {len(unknown)} predicted question ids are not in the ground truth "
                         f"(e.g. {unknown[:5]})")
    if not pred:
        raise ValueError(f"{what}: no predictions to score")


def gqa_accuracy(predictions: Sequence[Mapping[str, Any]] | Mapping[Any, str],
                 questions: Mapping[str, Mapping[str, Any]], *,
                 normalization: GQANormalization = "lmms-eval",
                 require_all: bool = False) -> dict[str, Any]:
    """Exact-match accuracy (percent) of GQA predictions.

    Args:
        predictions: see :func:`_predictions_by_id` for the accepted forms.
        questions: the GQA questions JSON (``{question_id: {"answer", "types"?, ...}}``).
        normalization: "lmms-eval" (default), "llava" or "official" (none).
        require_all: if True every question must have a prediction (the official eval requires it);
            otherwise only predicted questions are scored and ``num_unanswered`` is reported.

    Returns ``accuracy``, ``binary``/``open`` accuracy and ``per_structural_type`` when the questions
    carry ``types.structural`` (official split: "query" questions are open, the rest binary).
    """
    if not isinstance(questions, Mapping):
        raise ValueError("GQA questions: expected a JSON object mapping question id -> question")
    gt = {str(k): v for k, v in questions.items()}
    preds = _predictions_by_id(predictions, "GQA predictions")
    _id_mismatch(preds, gt, "GQA predictions")
    unanswered = len(gt) - len(preds)
    if require_all and unanswered:
        missing = sorted(set(gt) - set(preds))[:5]
        raise ValueError(f"GQA predictions: {unanswered} questions have no prediction (e.g. {missing})")
    correct: list[int] = []
    by_kind: dict[str, list[int]] = {}  # "binary" / "open"
    by_structural: dict[str, list[int]] = {}  # GQA's structural type (verify, query, logical, ...)
    for qid, pred in preds.items():
        q = gt[qid]
        if not isinstance(q, Mapping) or not isinstance(q.get("answer"), str):
            raise ValueError(f"GQA questions[{qid!r}]: missing string field 'answer'")
        hit = int(normalize_gqa_answer(pred, normalization) == normalize_gqa_answer(q["answer"], normalization))
        correct.append(hit)
        types = q.get("types")
        structural = types.get("structural") if isinstance(types, Mapping) else None
        if structural is not None:
            by_structural.setdefault(str(structural), []).append(hit)
            by_kind.setdefault("open" if structural == "query" else "binary", []).append(hit)
    out: dict[str, Any] = {
        "accuracy": 100.0 * sum(correct) / len(correct),
        "num_questions": len(correct),
        "num_unanswered": unanswered,
        "normalization": normalization,
    }
    for key in ("binary", "open"):
        if key in by_kind:
            out[key] = 100.0 * sum(by_kind[key]) / len(by_kind[key])
    if by_structural:
        out["per_structural_type"] = {k: 100.0 * sum(v) / len(v) for k, v in by_structural.items()}
    return out


def parse_pope_answer(text: str) -> str:
    """Official POPE parser: first sentence, drop commas, "no" iff a word is No/no/not, else "yes"."""
    if not isinstance(text, str):
        raise TypeError(f"POPE answers must be strings, got {type(text).__name__}: {text!r}")
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _pope_counts(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Confusion counts and metrics (percent) for (parsed prediction, label) pairs; yes = positive."""
    tp = sum(1 for p, g in pairs if p == "yes" and g == "yes")
    fp = sum(1 for p, g in pairs if p == "yes" and g != "yes")
    tn = sum(1 for p, g in pairs if p == "no" and g != "yes")
    fn = sum(1 for p, g in pairs if p == "no" and g == "yes")
    notes: list[str] = []

    def ratio(num: int, den: int, name: str) -> float:
        if den == 0:
            notes.append(f"{name} undefined (0 denominator), reported as 0")
            return 0.0
        return num / den

    precision = ratio(tp, tp + fp, "precision")
    recall = ratio(tp, tp + fn, "recall")
    if precision + recall == 0:
        notes.append("f1 undefined (precision + recall = 0), reported as 0")
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    out = {
        "accuracy": 100.0 * (tp + tn) / len(pairs),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / len(pairs),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "num_questions": len(pairs),
    }
    if notes:
        out["notes"] = notes
    return out


def pope_metrics(predictions: Sequence[Mapping[str, Any]] | Mapping[Any, str],
                 labels: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """POPE accuracy / precision / recall / F1 / yes-ratio (percent), overall and per ``category``.

    Args:
        predictions: ``[{"question_id", "answer"}]`` (raw model text; ``"text"`` also accepted) or a dict.
        labels: POPE question records with ``question_id`` and ``label`` (LLaVA/POPE files) or ``answer``
            (lmms-eval) = "yes"/"no", optionally ``category`` (random / popular / adversarial).
    Every predicted id must be labelled; unanswered labelled questions are not scored (counted).
    """
    if not isinstance(labels, (list, tuple)):
        raise ValueError("POPE labels: expected a list of question records")
    gt: dict[str, tuple[str, str | None]] = {}
    for i, rec in enumerate(labels):
        if not isinstance(rec, Mapping) or "question_id" not in rec:
            raise ValueError(f"POPE labels[{i}]: missing field 'question_id'")
        label = rec.get("label", rec.get("answer"))
        if not isinstance(label, str) or label.lower().strip() not in ("yes", "no"):
            raise ValueError(f"POPE labels[{i}]: field 'label' (or 'answer') must be 'yes' or 'no', got {label!r}")
        gt[str(rec["question_id"])] = (label.lower().strip(), rec.get("category"))
    preds = _predictions_by_id(predictions, "POPE predictions")
    _id_mismatch(preds, gt, "POPE predictions")
    pairs_by_cat: dict[str, list[tuple[str, str]]] = {}
    all_pairs: list[tuple[str, str]] = []
    for qid, text in preds.items():
        label, category = gt[qid]
        pair = (parse_pope_answer(text), label)
        all_pairs.append(pair)
        if category is not None:
            pairs_by_cat.setdefault(str(category), []).append(pair)
    out = _pope_counts(all_pairs)
    out["num_unanswered"] = len(gt) - len(preds)
    if pairs_by_cat:
        out["per_category"] = {c: _pope_counts(p) for c, p in sorted(pairs_by_cat.items())}
        out["mean_f1_over_categories"] = sum(m["f1"] for m in out["per_category"].values()) / len(pairs_by_cat)
    return out

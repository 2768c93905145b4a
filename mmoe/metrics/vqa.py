"""Official VQA accuracy (VQA v1/v2, OK-VQA, VizWiz; TextVQA with ``always_normalize``).

Re-implementation of the behaviour of GT-Vision-Lab/VQA ``vqaEval.py`` (commit a013f00) so that our
numbers are the numbers the official script prints. Written from a reading of the official code; nothing is
copied.

Metric: for a question with human answers g_1..g_n (n = 10 in VQA) and prediction p,
``acc = mean_j min(1, #{k != j : g_k == p} / 3)`` -- the "10 choose 9" leave-one-out average of
``min(#humans / 3, 1)``. Overall / per answer type / per question type are plain means over the
questions, times 100, rounded to 2 decimals.

Quirks of the official code that are reproduced on purpose (each would change numbers if "fixed"):

1. **Conditional normalisation.** Answers and prediction only get ``\\n``/``\\t`` -> space and
   ``strip()``. Punctuation and digit/article processing is applied (to GT *and* prediction) only when
   the n stripped GT answers are not all identical. If all ten humans wrote "yes", the prediction
   "Yes" or "yes." scores 0 (maintainers, GT-Vision-Lab/VQA#14: intended, to not touch OCR answers).
2. **Punctuation rule checks the input, not the running output.** For each of the 21 punctuation
   marks, the mark is *deleted* if the original text contains "mark+space", "space+mark", or anywhere
   a comma between two digits ("100,978"); otherwise it is *replaced by a space*. A single
   digit-comma-digit therefore makes every punctuation mark in the answer disappear.
3. **Period rule.** The official regex ``(?!<=\\d)(\\.)(?!\\d)`` has a look-ahead typo where a
   look-behind was meant, so it deletes every "." not followed by a digit ("1." -> "1",
   "3.5" stays), and ``re.UNICODE`` is passed as the *count* argument: at most 32 periods are removed.
4. **ASCII digits.** The official code ran on Python 2 with byte-string patterns, where ``\\d`` only
   matches 0-9; we use ``re.ASCII`` to match that (Python 3's ``\\d`` would also match e.g. Arabic-Indic
   digits).
5. **Digit/article step.** Lowercase, split on whitespace, map none/zero..ten -> "0".."10" ("none"
   becomes "0", GT-Vision-Lab/VQA#7), drop a/an/the, then apply the contractions table, whose keys
   include capitalised entries ("Im", "Ive", ...) that can never match after lowercasing, and the odd
   entry "somebody'd" -> "somebodyd". Apostrophes and colons are never touched.
6. **Leave-one-out removes answer dicts, not strings.** The official loop drops every answer dict
   equal to the held-out one (answer *and* answer_id/confidence), so normally exactly one. We compare
   whole dicts the same way.
7. **Results file.** The result question ids must be exactly the annotation question ids (official
   ``loadRes`` assertion); with duplicate result ids the last one wins (official index building).
8. **Rounding.** Python 2.7's ``round`` (correctly rounded, ties away from zero) -- Python 3's ``round``
   rounds ties to even and would print 0.12 where the official script printed 0.13 for an exact
   0.125. Sums are accumulated left to right in file order, as Python 2's ``sum`` did (Python >= 3.12's
   ``sum`` uses compensated summation and could differ in the last bit).

Deviations (only where the official code would crash): an annotation without ``question_type`` /
``answer_type`` is grouped under ``"unknown"``; an empty answer list or a duplicate annotation question
id raises ``ValueError`` (the official code divides by zero / silently double counts).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "clean_prediction",
    "normalize_answer",
    "official_round",
    "process_digit_article",
    "process_punctuation",
    "question_accuracy",
    "vqa_accuracy",
]

# The 21 marks handled by the official punctuation step (apostrophe, colon, period and
# * # $ % & ^ ~ | are deliberately absent).
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Official contractions table, entry for entry (including the unreachable capitalised keys and the
# reversed "somebody'd" entry) -- changing any entry changes scores.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)", re.ASCII)
# A period not followed by a digit (quirk 3: the intended look-behind never worked).
_PERIOD = re.compile(r"\.(?!\d)", re.ASCII)
_MAX_PERIODS_REMOVED = 32  # quirk 3: re.UNICODE (== 32) passed as the `count` argument
_PRECISION = 2


def _clean_whitespace(text: str) -> str:
    """Step applied to every answer and prediction unconditionally: tabs/newlines -> space, strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Official punctuation step (quirks 2 and 3 in the module docstring)."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # Decision is made on the *input* text, the replacement on the running output.
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """Official lowercase / number-word / article / contraction step (quirk 5)."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(s: str) -> str:
    """Full official normalisation of one answer: whitespace cleanup, punctuation, digits/articles.

    This is what the official code applies to GT and prediction when the GT answers disagree; it is
    *not* applied when they all agree (see :func:`question_accuracy`).
    """
    if not isinstance(s, str):
        raise TypeError(f"normalize_answer expects a str, got {type(s).__name__}: {s!r}")
    return process_digit_article(process_punctuation(_clean_whitespace(s)))


def clean_prediction(raw: str) -> str:
    """Turn raw model text into a VQA answer before it is written to a results file.

    Why: because of quirk 1, the official scorer compares the prediction *raw* to unanimous GT
    answers, so "Yes." scores 0 against ten "yes". Following LLaVA's submission converter we keep the
    first non-empty line, lowercase it and apply the official normalisation. Side effect shared with LLaVA (LLaVA#618): a bare article such as "a"
    becomes "".
    """
    lines = [line.strip() for line in str(raw).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return normalize_answer(first.lower())


def official_round(value: float, ndigits: int = _PRECISION) -> float:
    """Python 2.7 ``round``: correctly rounded decimal, exact ties away from zero (quirk 8)."""
    quantum = Decimal(1).scaleb(-ndigits)
    return float(Decimal(value).quantize(quantum, rounding=ROUND_HALF_UP))


def _sequential_mean_percent(values: Sequence[float]) -> float:
    """``100 * sum / len`` with a left-to-right sum, the official operation order (quirk 8)."""
    total: float = 0
    for v in values:
        total = total + v
    return 100 * float(total) / len(values)


def question_accuracy(prediction: str, gt_answers: Sequence[Mapping[str, Any]],
                      always_normalize: bool = False) -> float:
    """Accuracy in [0, 1] of one prediction against the human answer dicts of one question.

    ``gt_answers`` are the annotation's ``answers`` entries (dicts with at least ``"answer"``).
    ``always_normalize=True`` normalises regardless of agreement (lmms-eval VQAv2 since PR #794);
    the default reproduces the official conditional behaviour (quirk 1).
    """
    if not gt_answers:
        raise ValueError("question has an empty 'answers' list; the official formula is undefined")
    gts = [dict(a, answer=_clean_whitespace(a["answer"])) for a in gt_answers]
    pred = _clean_whitespace(prediction)
    if always_normalize or len({g["answer"] for g in gts}) > 1:
        for g in gts:
            g["answer"] = process_digit_article(process_punctuation(g["answer"]))
        pred = process_digit_article(process_punctuation(pred))
    per_subset: list[float] = []
    for held_out in gts:
        # Quirk 6: dict comparison, so every dict equal to the held-out one is removed.
        matches = sum(1 for g in gts if g != held_out and g["answer"] == pred)
        per_subset.append(min(1, float(matches) / 3))
    total: float = 0
    for v in per_subset:
        total = total + v
    return float(total) / len(per_subset)


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------

def _examples(ids: Iterable[Any], k: int = 5) -> str:
    items = sorted(ids, key=repr)[:k]
    return ", ".join(repr(i) for i in items)


def _index_annotations(annotations: Mapping[str, Any]) -> dict[Any, dict]:
    """Validate the annotations JSON and index it by question id, keeping file order."""
    if not isinstance(annotations, Mapping) or "annotations" not in annotations:
        raise ValueError("annotations: expected the VQA annotations JSON object with an 'annotations' list")
    anns = annotations["annotations"]
    if not isinstance(anns, list):
        raise ValueError(f"annotations['annotations']: expected a list, got {type(anns).__name__}")
    index: dict[Any, dict] = {}
    for i, ann in enumerate(anns):
        where = f"annotations['annotations'][{i}]"
        if not isinstance(ann, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(ann).__name__}")
        for field in ("question_id", "answers"):
            if field not in ann:
                raise ValueError(f"{where}: missing field '{field}'")
        answers = ann["answers"]
        if not isinstance(answers, list) or not answers:
            raise ValueError(f"{where}['answers']: expected a non-empty list of answer objects")
        for j, a in enumerate(answers):
            if not isinstance(a, Mapping) or not isinstance(a.get("answer"), str):
                raise ValueError(f"{where}['answers'][{j}]: expected an object with a string 'answer'")
        qid = ann["question_id"]
        if qid in index:
            raise ValueError(f"{where}: duplicate question_id {qid!r} in annotations")
        index[qid] = ann
    if not index:
        raise ValueError("annotations['annotations'] is empty: nothing to evaluate")
    return index


def _index_results(results: Sequence[Mapping[str, Any]]) -> tuple[dict[Any, str], int]:
    """Validate results and index answers by question id; duplicates: last wins (quirk 7)."""
    if not isinstance(results, (list, tuple)):
        raise ValueError(f"results: expected a list of {{'question_id', 'answer'}} objects, "
                         f"got {type(results).__name__}")
    index: dict[Any, str] = {}
    duplicates = 0
    for i, r in enumerate(results):
        if not isinstance(r, Mapping):
            raise ValueError(f"results[{i}]: expected an object, got {type(r).__name__}")
        for field in ("question_id", "answer"):
            if field not in r:
                raise ValueError(f"results[{i}]: missing field '{field}'")
        if not isinstance(r["answer"], str):
            raise ValueError(f"results[{i}]['answer']: expected a string, got {type(r['answer']).__name__}")
        if r["question_id"] in index:
            duplicates += 1
        index[r["question_id"]] = r["answer"]
    return index, duplicates


def _check_same_ids(result_ids: set, ann_ids: set) -> None:
    """Official ``loadRes`` requires set(result ids) == set(annotation ids); explain any difference."""
    missing = ann_ids - result_ids
    unknown = result_ids - ann_ids
    if not missing and not unknown:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} annotation question ids have no result (e.g. {_examples(missing)})")
    if unknown:
        parts.append(f"{len(unknown)} result question ids are not in the annotations (e.g. {_examples(unknown)})")
    hint = ""
    if {type(i) for i in result_ids} != {type(i) for i in ann_ids}:
        hint = " Note: question id types differ between results and annotations (e.g. str vs int)."
    raise ValueError("results do not match the annotations: " + "; ".join(parts) + "." + hint
                     + " Score a subset by filtering the annotation file to the answered questions.")


def _check_questions(questions: Mapping[str, Any], ann_ids: set, results: Mapping[Any, str]) -> None:
    """Check the optional questions JSON covers the annotations; enforce multiple-choice answers."""
    qs = questions.get("questions") if isinstance(questions, Mapping) else None
    if not isinstance(qs, list):
        raise ValueError("questions: expected the VQA questions JSON object with a 'questions' list")
    by_id: dict[Any, Mapping] = {}
    for i, q in enumerate(qs):
        if not isinstance(q, Mapping) or "question_id" not in q:
            raise ValueError(f"questions['questions'][{i}]: missing field 'question_id'")
        by_id[q["question_id"]] = q
    absent = ann_ids - by_id.keys()
    if absent:
        raise ValueError(f"questions: {len(absent)} annotation question ids are not in the questions file "
                         f"(e.g. {_examples(absent)})")
    if questions.get("task_type") == "Multiple Choice":
        for qid, ans in results.items():
            choices = by_id[qid].get("multiple_choices", [])
            if ans not in choices:
                raise ValueError(f"results: answer {ans!r} for question {qid!r} is not one of its "
                                 "multiple_choices (Multiple Choice task)")


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------

def vqa_accuracy(results: Sequence[Mapping[str, Any]], annotations: Mapping[str, Any],
                 questions: Mapping[str, Any] | None = None, *, always_normalize: bool = False,
                 precision: int = _PRECISION) -> dict[str, Any]:
    """Score VQA results exactly as the official ``vqaEval.py`` does.

    Args:
        results: ``[{"question_id", "answer"}]`` -- must cover exactly the annotation question ids.
        annotations: the loaded annotations JSON (``{"annotations": [...]}``).
        questions: optional loaded questions JSON; when given, it must contain every annotated question
            and, for the Multiple Choice task, answers must be among the choices (as officially).
        always_normalize: normalise even when GT answers agree (lmms-eval style); default official.
        precision: decimals of the reported percentages (official ``n=2``).

    Returns:
        ``{"overall", "per_answer_type", "per_question_type"}`` in percent rounded like the official
        code, plus ``num_questions``, ``per_question`` (percent per question id, rounded),
        ``duplicate_result_ids``, ``questions_not_10_answers`` and ``normalization``.

    Raises:
        ValueError: malformed inputs (naming the field) or result ids that do not match annotations.
    """
    ann_index = _index_annotations(annotations)
    res_index, duplicates = _index_results(results)
    _check_same_ids(set(res_index), set(ann_index))
    if questions is not None:
        _check_questions(questions, set(ann_index), res_index)

    all_acc: list[float] = []
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    per_question: dict[Any, float] = {}
    not_10 = 0
    for qid, ann in ann_index.items():  # annotation-file order, like the official getQuesIds()
        acc = question_accuracy(res_index[qid], ann["answers"], always_normalize=always_normalize)
        not_10 += len(ann["answers"]) != 10
        all_acc.append(acc)
        by_qtype.setdefault(str(ann.get("question_type", "unknown")), []).append(acc)
        by_atype.setdefault(str(ann.get("answer_type", "unknown")), []).append(acc)
        per_question[qid] = official_round(100 * acc, precision)

    def pct(values: Sequence[float]) -> float:
        return official_round(_sequential_mean_percent(values), precision)

    return {
        "overall": pct(all_acc),
        "per_answer_type": {k: pct(v) for k, v in by_atype.items()},
        "per_question_type": {k: pct(v) for k, v in by_qtype.items()},
        "num_questions": len(all_acc),
        "per_question": per_question,
        "duplicate_result_ids": duplicates,
        "questions_not_10_answers": not_10,
        "normalization": "always (lmms-eval style)" if always_normalize
        else "official vqaEval (conditional on GT disagreement)",
    }

"""Hand-computed checks of the official VQA accuracy re-implementation (plus GQA / POPE).

Every expected value below was worked out by hand from the official rules (see the docstring of
``mmoe.metrics.vqa``); none comes from running our code.
"""

from __future__ import annotations

import pytest

from mmoe.metrics.gqa_pope import gqa_accuracy, parse_pope_answer, pope_metrics
from mmoe.metrics.vqa import (
    clean_prediction,
    normalize_answer,
    official_round,
    process_punctuation,
    question_accuracy,
    vqa_accuracy,
)


def answers(*values: str) -> list[dict]:
    return [{"answer": v, "answer_confidence": "yes", "answer_id": i + 1} for i, v in enumerate(values)]


def ann(qid: int, gt: list[dict], answer_type: str = "other", question_type: str = "what") -> dict:
    return {"question_id": qid, "image_id": qid, "answer_type": answer_type, "question_type": question_type,
            "multiple_choice_answer": gt[0]["answer"], "answers": gt}


# ------------------------------------------------------------------ normalisation

@pytest.mark.parametrize("raw, expected", [
    ("Hello, world!", "hello world"),      # ", " present -> comma deleted; "!" not next to a space -> space
    ("red/white", "red white"),            # "/" not next to a space -> replaced by a space
    ("red / white", "red white"),          # " /" present -> deleted, double space collapses on split
    ("a-b -c", "ab c"),                    # " -" anywhere -> every "-" deleted, also the one inside "a-b"
    ("a-b- c", "ab c"),                    # "- " anywhere -> the same
    ("100,978", "100978"),                 # comma between digits -> deleted
    ("x(y) 1000", "x y 1000"),             # "(" and ")" not next to a space -> spaces
    ("x(y) 1,000", "xy 1000"),             # digit-comma-digit anywhere -> ALL marks deleted (quirk)
    ("3.5", "3.5"),                        # period before a digit kept
    ("1.", "1"),                           # period not before a digit removed (look-behind typo)
    ("e.g.", "eg"),
    ("2:50", "2:50"),                      # colon untouched
    ("it's", "it's"),                      # apostrophe untouched
    ("two dogs", "2 dogs"),
    ("None", "0"),                         # "none" -> "0" (official number map)
    ("The cat", "cat"),
    ("an apple a day", "apple day"),
    ("dont", "don't"),
    ("isnt it", "isn't it"),
    ("Im", "im"),                          # capitalised table keys never match after lowercasing
    ("  yes\tno\n", "yes no"),
    ("50%", "50%"),                        # % is not in the punctuation list
])
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_period_removal_is_capped_at_32() -> None:
    # re.UNICODE (32) is passed as `count` in the official code: 40 periods -> 8 survive
    assert process_punctuation("." * 40) == "." * 8


def test_clean_prediction_takes_first_line_and_normalises() -> None:
    assert clean_prediction("Two.\nBecause I counted") == "2"
    assert clean_prediction("  \nYes!") == "yes"
    assert clean_prediction("") == "" and clean_prediction(" \n\t\n") == ""  # nothing generated: empty answer


def test_normalize_rejects_non_string() -> None:
    with pytest.raises(TypeError):
        normalize_answer(3)  # type: ignore[arg-type]


# ------------------------------------------------------------------ per-question formula

@pytest.mark.parametrize("humans, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out(humans: int, expected: float) -> None:
    # k of 10 humans said "cat": leaving out a "cat" answer leaves k-1 matches, leaving out another leaves k;
    # acc = (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10 -> 0.3, 0.6, 0.9, 1.0 for k = 1..4
    gt = answers(*(["cat"] * humans + ["dog"] * (10 - humans)))
    assert question_accuracy("cat", gt) == pytest.approx(expected, abs=1e-12)


def test_eight_yes_two_no() -> None:
    gt = answers(*(["yes"] * 8 + ["no"] * 2))
    assert question_accuracy("yes", gt) == pytest.approx(1.0)
    assert question_accuracy("no", gt) == pytest.approx(0.6)


def test_unanimous_gt_is_compared_raw() -> None:
    """Official quirk: no normalisation at all when the 10 stripped GT answers are identical."""
    assert question_accuracy("yes", answers(*["yes"] * 10)) == 1.0
    assert question_accuracy(" yes\n", answers(*["yes"] * 10)) == 1.0  # whitespace cleanup still applies
    assert question_accuracy("Yes", answers(*["yes"] * 10)) == 0.0
    assert question_accuracy("yes.", answers(*["yes"] * 10)) == 0.0
    assert question_accuracy("two", answers(*["2"] * 10)) == 0.0
    # one disagreeing human switches normalisation on for both sides: "two" -> "2" matches 9 humans
    assert question_accuracy("two", answers(*(["2"] * 9 + ["3"]))) == 1.0
    assert question_accuracy("Yes", answers(*["yes"] * 10), always_normalize=True) == 1.0


def test_identical_answer_dicts_are_all_left_out() -> None:
    """Leave-one-out removes every dict equal to the held-out one (answer_id included)."""
    gt = [{"answer": "cat", "answer_id": 1}] * 3 + [{"answer": "dog", "answer_id": k} for k in range(2, 9)]
    # holding out any of the 3 identical "cat" dicts removes all 3 -> 0 matches; holding out a "dog" -> 3 matches
    assert question_accuracy("cat", gt) == pytest.approx(7 / 10)


# ------------------------------------------------------------------ dataset level

def _three_question_set() -> tuple[list[dict], dict]:
    anns = [
        ann(1, answers(*(["yes"] * 9 + ["no"])), "yes/no", "is the"),    # pred yes -> 1.0
        ann(2, answers(*(["2"] * 2 + ["3"] * 8)), "number", "how many"),  # pred "two" -> 2 humans -> 0.6
        ann(3, answers(*(["red"] * 10)), "other", "what color"),           # pred "Red" -> raw compare -> 0
    ]
    results = [{"question_id": 3, "answer": "Red"}, {"question_id": 1, "answer": "yes"},
               {"question_id": 2, "answer": "two"}]
    return results, {"annotations": anns}


def test_overall_and_breakdowns() -> None:
    results, annotations = _three_question_set()
    m = vqa_accuracy(results, annotations)
    assert m["overall"] == 53.33  # 100 * (1 + 0.6 + 0) / 3 = 53.333...
    assert m["per_answer_type"] == {"yes/no": 100.0, "number": 60.0, "other": 0.0}
    assert m["per_question_type"] == {"is the": 100.0, "how many": 60.0, "what color": 0.0}
    assert m["num_questions"] == 3
    assert m["per_question"] == {1: 100.0, 2: 60.0, 3: 0.0}


def test_rounding_is_python2_half_away_from_zero() -> None:
    # 1 correct question out of 800 -> exactly 0.125 %; Python 2 printed 0.13 (Python 3 round gives 0.12)
    anns = [ann(q, answers(*["x"] * 10)) for q in range(800)]
    results = [{"question_id": q, "answer": "x" if q == 0 else "y"} for q in range(800)]
    assert vqa_accuracy(results, {"annotations": anns})["overall"] == 0.13
    assert official_round(2.675) == 2.67  # binary value is below the tie: no upward bias
    assert official_round(23.125) == 23.13


def test_report_fields_count_and_name_the_run() -> None:
    """Every field of the report, on a set with a 3-answer question lacking question and answer types."""
    anns = [ann(1, answers(*["yes"] * 10), "yes/no", "is the"),
            {"question_id": 2, "answers": answers("cat", "cat", "dog")}]  # no types: grouped under "unknown"
    results = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "cat"},
               {"question_id": 2, "answer": "dog"}]
    # q2 with "dog" (last wins): holding out either "cat" leaves 1 match (1/3), the "dog" 0 -> 2/9 = 22.22 %
    assert vqa_accuracy(results, {"annotations": anns}) == {
        "overall": 61.11, "per_answer_type": {"yes/no": 100.0, "unknown": 22.22},
        "per_question_type": {"is the": 100.0, "unknown": 22.22}, "num_questions": 2,
        "per_question": {1: 100.0, 2: 22.22}, "duplicate_result_ids": 1, "questions_not_10_answers": 1,
        "normalization": "official vqaEval (conditional on GT disagreement)"}
    m = vqa_accuracy(results[:2], {"annotations": anns[:1] + [dict(anns[1], answers=answers(*["cat"] * 10))]},
                     always_normalize=True)
    assert m["questions_not_10_answers"] == 0 and m["duplicate_result_ids"] == 0
    assert m["normalization"] == "always (lmms-eval style)"


def test_duplicate_results_last_wins() -> None:
    anns = [ann(1, answers(*["cat"] * 10))]
    m = vqa_accuracy([{"question_id": 1, "answer": "cat"}, {"question_id": 1, "answer": "dog"}], {"annotations": anns})
    assert m["overall"] == 0.0 and m["duplicate_result_ids"] == 1


def test_mismatched_ids_raise_with_counts_and_examples() -> None:
    results, annotations = _three_question_set()
    with pytest.raises(ValueError, match=r"1 annotation question ids have no result \(e.g. 2\)"):
        vqa_accuracy([r for r in results if r["question_id"] != 2], annotations)
    with pytest.raises(ValueError, match=r"2 result question ids are not in the annotations"):
        vqa_accuracy(results + [{"question_id": 7, "answer": "a"}, {"question_id": 8, "answer": "b"}], annotations)
    with pytest.raises(ValueError, match="id types differ"):
        vqa_accuracy([{**r, "question_id": str(r["question_id"])} for r in results], annotations)


def test_malformed_inputs_name_the_field() -> None:
    results, annotations = _three_question_set()
    with pytest.raises(ValueError, match=r"results\[0\]: missing field 'answer'"):
        vqa_accuracy([{"question_id": 3}], annotations)
    with pytest.raises(ValueError, match=r"results\[0\]\['answer'\]: expected a string"):
        vqa_accuracy([{"question_id": 3, "answer": 3}] + results[1:], annotations)
    bad = {"annotations": [{"question_id": 1, "answers": []}]}
    with pytest.raises(ValueError, match=r"annotations\['annotations'\]\[0\]\['answers'\]"):
        vqa_accuracy([{"question_id": 1, "answer": "x"}], bad)


def test_questions_file_must_cover_annotations() -> None:
    results, annotations = _three_question_set()
    with pytest.raises(ValueError, match="not in the questions file"):
        vqa_accuracy(results, annotations, {"questions": [{"question_id": 1}]})


# ------------------------------------------------------------------ GQA / POPE

def test_gqa_exact_match_normalisations() -> None:
    questions = {"1": {"answer": "yes", "types": {"structural": "verify"}},
                 "2": {"answer": "left", "types": {"structural": "query"}},
                 "3": {"answer": "t-shirt", "types": {"structural": "query"}}}
    preds = [{"question_id": 1, "answer": "Yes."}, {"question_id": "2", "answer": "the left"},
             {"question_id": 3, "answer": "tshirt"}]
    m = gqa_accuracy(preds, questions)  # lmms-eval: lowercase + delete punctuation, articles kept
    assert m["accuracy"] == pytest.approx(200 / 3)  # 1 and 3 correct
    assert m["binary"] == 100.0 and m["open"] == 50.0
    assert gqa_accuracy(preds, questions, normalization="official")["accuracy"] == 0.0
    assert gqa_accuracy(preds, questions, normalization="llava")["accuracy"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="not in the ground truth"):
        gqa_accuracy([{"question_id": "9", "answer": "x"}], questions)


@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("No", "no"), ("no.", "no"), ("There is not a dog.", "no"), ("Yes, there is no doubt.", "no"),
    ("Yes. No dog though", "yes"),  # only the first sentence counts
    ("Nope", "yes"), ("", "yes"), ("NO", "yes"),  # exact words No/no/not only; anything else is "yes"
])
def test_pope_parser(text: str, parsed: str) -> None:
    assert parse_pope_answer(text) == parsed


def test_pope_metrics_by_hand() -> None:
    labels = [{"question_id": i, "label": lab, "category": "random" if i < 3 else "popular"}
              for i, lab in enumerate(["yes", "yes", "no", "no", "yes"])]
    preds = [{"question_id": i, "answer": a} for i, a in enumerate(["Yes", "No", "Yes.", "no", "yes"])]
    m = pope_metrics(preds, labels)  # TP=2 (0,4) FN=1 (1) FP=1 (2) TN=1 (3)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["precision"] == pytest.approx(200 / 3) and m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["yes_ratio"] == pytest.approx(60.0)
    assert m["per_category"]["popular"]["accuracy"] == 100.0
    with pytest.raises(ValueError, match="'label'"):
        pope_metrics(preds, [{"question_id": 0, "label": "maybe"}])
    # asymmetric counts (TP=2 FP=1 TN=3 FN=1), so no two confusion cells can be swapped unnoticed
    labels = [{"question_id": i, "label": lab} for i, lab in enumerate(["yes", "no", "no", "no", "yes", "yes", "no"])]
    preds = [{"question_id": i, "answer": a}
             for i, a in enumerate(["Yes", "Yes", "No", "no", "No", "Yes", "There is not one."])]
    m = pope_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 3, 1)
    assert m["accuracy"] == pytest.approx(500 / 7) and m["yes_ratio"] == pytest.approx(300 / 7)
    assert m["precision"] == pytest.approx(200 / 3) and m["recall"] == pytest.approx(200 / 3)


def test_disagreeing_gt_answers_are_normalised_too() -> None:
    """Official: when the humans disagree, the GT answers get the same punctuation / digit / article processing as
    the prediction ("Two." and "two" count as "2"), and their whitespace is cleaned first."""
    gt = answers(*(["Two."] * 4 + ["two"] * 2 + ["2"] + ["three"] * 3))
    assert question_accuracy("2", gt) == pytest.approx(1.0)
    assert question_accuracy("3", gt) == pytest.approx(0.9)  # 3 humans: min(1, 3/3) in 7 of 10 subsets, 2/3 in 3
    gt_ws = answers(*([" yes "] * 2 + ["no"] * 8))
    assert question_accuracy("yes", gt_ws) == pytest.approx(0.6)
    assert question_accuracy("yes", answers(*[" yes\n"] * 10)) == 1.0  # unanimous: compared raw, but whitespace-cleaned

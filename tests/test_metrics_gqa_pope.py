"""GQA exact match and POPE metrics: the input forms, the whole error messages, and the edge cases.

The main hand-computed checks live in test_metrics_vqa.py; these cover what a mutation run of
``mmoe.metrics.gqa_pope`` showed untested (docs/mutation.md "gqa_pope.py"). Every expected value was worked
out by hand from the rules in the module docstring.
"""

from __future__ import annotations

import pytest

from mmoe.metrics.gqa_pope import gqa_accuracy, normalize_gqa_answer, parse_pope_answer, pope_metrics


def _message(exc: type[Exception], fn, *args, **kwargs) -> str:
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------ GQA

def test_gqa_normalisations_of_single_answers() -> None:
    assert normalize_gqa_answer(" Yes! ") == "yes"  # default lmms-eval: strip, lower-case, delete punctuation
    assert normalize_gqa_answer("T-Shirt.", "lmms-eval") == "tshirt"
    assert normalize_gqa_answer("BOX.", "llava") == "box"  # LLaVA: trailing periods, lower-case
    assert normalize_gqa_answer("t-shirt..", "llava") == "t-shirt"
    assert normalize_gqa_answer(" Yes. ", "official") == " Yes. "  # official eval.py: untouched
    assert _message(TypeError, normalize_gqa_answer, 3) == "GQA answers must be strings, got int: 3"
    assert _message(ValueError, normalize_gqa_answer, "a", "vqa") == (
        "unknown GQA normalization 'vqa' (expected lmms-eval, llava or official)")


@pytest.mark.parametrize("predictions", [
    [{"question_id": 1, "answer": "Red"}, {"question_id": 2, "answer": "ball"}],
    [{"questionId": "1", "prediction": "red"}, {"questionId": "2", "prediction": "ball"}],  # official GQA
    [{"question_id": "1", "text": "red"}, {"question_id": "2", "text": "ball"}],  # LLaVA answers file
    {1: "red", 2: "ball"},  # int ids match the questions' string ids
], ids=["question_id-answer", "official", "text", "dict"])
def test_gqa_prediction_forms_score_alike(predictions) -> None:
    questions = {"1": {"answer": "red"}, "2": {"answer": "cube"}}
    assert gqa_accuracy(predictions, questions) == {
        "accuracy": 50.0, "num_questions": 2, "num_unanswered": 0, "normalization": "lmms-eval"}


def test_gqa_unanswered_questions_are_counted_or_refused() -> None:
    questions = {"1": {"answer": "yes"}, "2": {"answer": "no"}, "3": {"answer": "left"}}
    preds = {"1": "yes", "3": "right"}
    m = gqa_accuracy(preds, questions)  # by default only the predicted questions are scored
    assert (m["accuracy"], m["num_questions"], m["num_unanswered"]) == (50.0, 2, 1)
    assert _message(ValueError, gqa_accuracy, preds, questions, require_all=True) == (
        "GQA predictions: 1 questions have no prediction (e.g. ['2'])")
    assert gqa_accuracy({**preds, "2": "no"}, questions, require_all=True)["accuracy"] == pytest.approx(200 / 3)
    many = {str(i): {"answer": "yes"} for i in range(8)}  # seven unanswered: the first five, sorted, are named
    assert _message(ValueError, gqa_accuracy, {"0": "yes"}, many, require_all=True) == (
        "GQA predictions: 7 questions have no prediction (e.g. ['1', '2', '3', '4', '5'])")


def test_gqa_structural_types_and_binary_open_split() -> None:
    def q(answer, types):
        return {"answer": answer, **({"types": types} if types is not None else {})}

    questions = {"1": q("yes", {"structural": "verify"}), "2": q("no", {"structural": "verify"}),
                 "3": q("left", {"structural": "query"}), "4": q("cat", {"structural": "query"}),
                 "5": q("cat", {"structural": "query"}), "6": q("yes", {"structural": "logical"}),
                 "7": q("red", ["query"]),  # malformed types (not an object): scored, in no group
                 "8": q("blue", None)}
    preds = {"1": "yes", "2": "yes", "3": "left", "4": "dog", "5": "dog", "6": "yes", "7": "red", "8": "green"}
    m = gqa_accuracy(preds, questions)  # hits: 1, 3, 6, 7
    assert m["accuracy"] == 50.0 and m["num_questions"] == 8
    assert m["binary"] == pytest.approx(200 / 3)  # verify 1/2, logical 1/1
    assert m["open"] == pytest.approx(100 / 3)  # query 1/3
    assert m["per_structural_type"] == pytest.approx({"verify": 50.0, "query": 100 / 3, "logical": 100.0})
    assert set(gqa_accuracy({"8": "blue"}, questions)) == {  # no typed question scored: no split reported
        "accuracy", "num_questions", "num_unanswered", "normalization"}


def test_gqa_bad_input_messages() -> None:
    questions = {"1": {"answer": "red"}}
    cases = [
        ("red", "GQA predictions: expected a list of prediction objects, got str"),
        ([3], "GQA predictions[0]: expected an object, got int"),
        ([{"answer": "red"}], "GQA predictions[0]: missing field 'question_id' (or 'questionId')"),
        ([{"question_id": 1}], "GQA predictions[0]: missing string field 'answer' (or 'prediction'/'text')"),
        ([], "GQA predictions: no predictions to score"),
        ({k: "x" for k in "gfedcba"},  # seven unknown ids: the first five, sorted, are named
         "GQA predictions: 7 predicted question ids are not in the ground truth (e.g. ['a', 'b', 'c', 'd', 'e'])"),
    ]
    for predictions, expected in cases:
        assert _message(ValueError, gqa_accuracy, predictions, questions) == expected
    assert _message(ValueError, gqa_accuracy, {"1": "red"}, [questions]) == (
        "GQA questions: expected a JSON object mapping question id -> question")
    for malformed in ("red", {"answer": 3}, {"types": {}}):
        assert _message(ValueError, gqa_accuracy, {"1": "red"}, {"1": malformed}) == (
            "GQA questions['1']: missing string field 'answer'")


# ------------------------------------------------------------------ POPE

@pytest.mark.parametrize("text, parsed", [
    ("No, it is.", "no"),  # commas are deleted before the split, so "No," is the word "No"
    ("There is\nno cat", "yes"),  # the official parser splits on single spaces only: "is\nno" is one word
    ("not,", "no"),
])
def test_pope_parser_commas_and_spaces(text: str, parsed: str) -> None:
    assert parse_pope_answer(text) == parsed


def test_pope_parser_refuses_non_strings() -> None:
    assert _message(TypeError, parse_pope_answer, 3) == "POPE answers must be strings, got int: 3"


def _pope(preds: list[str], labels: list[str], categories: list[str] | None = None) -> dict:
    recs = [{"question_id": i, "label": lab, **({"category": categories[i]} if categories else {})}
            for i, lab in enumerate(labels)]
    return pope_metrics({i: p for i, p in enumerate(preds)}, recs)


def test_pope_zero_denominators_are_reported_as_zero_with_a_note() -> None:
    # every prediction "no": TP = FP = 0, so precision has no denominator; recall = 0 / 2; F1 then undefined
    m = _pope(["No", "no", "No."], ["yes", "no", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 0, 1, 2)
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["accuracy"] == pytest.approx(100 / 3) and m["num_questions"] == 3
    assert m["notes"] == ["precision undefined (0 denominator), reported as 0",
                          "f1 undefined (precision + recall = 0), reported as 0"]
    # no positive label: recall has no denominator; one predicted positive, so precision = 0 / 1 is defined
    m = _pope(["Yes", "no", "no"], ["no", "no", "no"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 1, 2, 0)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["notes"] == ["recall undefined (0 denominator), reported as 0",
                          "f1 undefined (precision + recall = 0), reported as 0"]


def test_pope_precision_and_recall_of_one_half() -> None:
    m = _pope(["yes", "yes", "no"], ["yes", "no", "yes"])  # TP 1, FP 1, FN 1: P = R = 0.5, F1 = 0.5
    assert (m["precision"], m["recall"], m["f1"]) == (50.0, 50.0, 50.0)
    assert "notes" not in m


def test_pope_label_forms_unanswered_and_category_mean() -> None:
    labels = [{"question_id": 0, "answer": " Yes ", "category": "random"},  # lmms-eval: field 'answer'
              {"question_id": 1, "answer": "yes", "category": "random"},
              {"question_id": 2, "label": "YES", "category": "adversarial"},
              {"question_id": 3, "label": "no", "category": "adversarial"}]
    m = pope_metrics({0: "yes", 1: "no", 2: "yes"}, labels)  # question 3 unanswered
    assert m["num_unanswered"] == 1 and m["num_questions"] == 3
    # random: TP 1, FN 1 -> P 1, R 1/2, F1 2/3; adversarial: TP 1 -> F1 1
    assert m["per_category"]["random"]["f1"] == pytest.approx(200 / 3)
    assert m["per_category"]["adversarial"]["f1"] == pytest.approx(100.0)
    assert m["mean_f1_over_categories"] == pytest.approx((200 / 3 + 100) / 2)


def test_pope_bad_input_messages() -> None:
    labels = [{"question_id": 0, "label": "yes"}]
    assert _message(ValueError, pope_metrics, {0: "yes"}, {"0": "yes"}) == (
        "POPE labels: expected a list of question records")
    for bad in (5, {"label": "yes"}):
        assert _message(ValueError, pope_metrics, {0: "yes"}, [bad]) == "POPE labels[0]: missing field 'question_id'"
    assert _message(ValueError, pope_metrics, {0: "yes"}, [{"question_id": 0}]) == (
        "POPE labels[0]: field 'label' (or 'answer') must be 'yes' or 'no', got None")
    assert _message(ValueError, pope_metrics, "yes", labels) == (
        "POPE predictions: expected a list of prediction objects, got str")
    assert _message(ValueError, pope_metrics, {9: "yes"}, labels) == (
        "POPE predictions: 1 predicted question ids are not in the ground truth (e.g. ['9'])")

"""Benchmark metrics: official VQA accuracy, COCO caption metrics, GQA exact match and POPE.

Caption metrics import pycocoevalcap (and need Java) only when called, so VQA/GQA/POPE scoring works
in environments without either.
"""

from mmoe.metrics.caption import JavaNotFoundError, caption_metrics
from mmoe.metrics.gqa_pope import gqa_accuracy, normalize_gqa_answer, parse_pope_answer, pope_metrics
from mmoe.metrics.vqa import clean_prediction, normalize_answer, question_accuracy, vqa_accuracy

__all__ = [
    "JavaNotFoundError",
    "caption_metrics",
    "clean_prediction",
    "gqa_accuracy",
    "normalize_answer",
    "normalize_gqa_answer",
    "parse_pope_answer",
    "pope_metrics",
    "question_accuracy",
    "vqa_accuracy",
]

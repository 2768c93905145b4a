"""Why a model misses held-out questions: classify its colour and shape answers on the synthetic held-out split.

Why: the held-out split's images each contain an object of an unseen (shape, colour) combination, and its questions
ask about it and about the seen objects beside it. A model can miss a held-out colour question because it did not
find the object (it reads another object's colour), or because it found it but maps the unseen combination to a
colour the shape had in training. This script separates those cases from the answers alone, per question referent:

- ``referent_heldout`` / ``referent_seen``: accuracy on colour and shape questions whose object is (is not) of a
  held-out combination, in the same scenes;
- for each wrong answer: ``other_object`` (another object's colour or shape in the scene: the model did not find
  the object it was asked about), ``absent_value`` (a colour or shape no object in the scene has: it found no
  object or mapped the one it found to a value from training), ``invalid`` (not a colour or shape at all);
- ``is there``: accuracy on questions whose answer is yes and on those whose answer is no, apart: a model that does
  not recognise an unseen combination says "no" to "Is there a green circle?" when there is one.

Run it on the test split too (``--split test``): every referent there is of a seen combination, so the two splits'
error kinds compare a model's seen and unseen combinations.

Usage (after `benchmarks/moe_vs_dense.py`, whose runs write vqa_heldout.json)::

    python benchmarks/heldout_errors.py --data data/synthetic \
        moe=runs/study/moe_vs_dense_default/moe_s0/vqa_heldout.json \
        dense=runs/study/moe_vs_dense_default/dense_s0/vqa_heldout.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

COLOR_Q = re.compile(r"^(?:What color is the|What is the color of the) (?:(\w+) )?(\w+)\?$")
SHAPE_Q = re.compile(r"^(?:What shape is the|What is the shape of the) (?:(\w+) )?(\w+) object\?$")
KINDS = ("other_object", "absent_value", "invalid")


class HeldoutErrorsError(SystemExit):
    """Inputs that cannot be analysed (missing file, unknown question id): exits with the message."""


def _load(path: Path) -> dict | list:
    if not path.is_file():
        raise HeldoutErrorsError(f"[heldout_errors] file not found: {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def _referent(objects: list[dict], attr: str, value: str, size: str | None) -> dict | None:
    """The one object with attribute ``attr`` == value (and the size, when the question names one)."""
    hits = [o for o in objects if o[attr] == value and (size is None or o["size"] == size)]
    return hits[0] if len(hits) == 1 else None


def classify(data: Path, answers: dict[int, str], split: str = "heldout") -> dict:
    """Accuracy by referent kind and the kinds of wrong answers, for the colour and shape questions of ``split``."""
    meta = _load(data / "meta.json")
    heldout = {tuple(c) for c in meta["heldout_combos"]}
    sizes = set(meta.get("sizes", {})) or {"small", "large"}
    values = {"color": set(meta["colors"]), "shape": set(meta["shapes"])}
    scenes = {s["image_id"]: s["objects"] for s in _load(data / f"{split}_scenes.json")["scenes"]}
    annotations = _load(data / f"{split}_annotations.json")["annotations"]
    truth = {a["question_id"]: a["multiple_choice_answer"] for a in annotations}
    kind_of = {a["question_id"]: a["question_type"] for a in annotations}
    exist = {"yes": [0, 0], "no": [0, 0]}
    out = {q: {"referent_heldout": [0, 0], "referent_seen": [0, 0], "errors": dict.fromkeys(KINDS, 0)}
           for q in ("what color", "what shape")}
    for q in _load(data / f"{split}_questions.json")["questions"]:
        qid, text = q["question_id"], q["question"]
        if qid not in answers:
            raise HeldoutErrorsError(f"[heldout_errors] no answer for question {qid} ({text!r})")
        if kind_of[qid] == "is there" and truth[qid] in exist:
            exist[truth[qid]][1] += 1
            exist[truth[qid]][0] += answers[qid].strip().lower() == truth[qid]
        for qtype, pattern, named, asked in (("what color", COLOR_Q, "shape", "color"),
                                             ("what shape", SHAPE_Q, "color", "shape")):
            m = pattern.match(text)
            if not m:
                continue
            size = m.group(1) if m.group(1) in sizes else None
            obj = _referent(scenes[q["image_id"]], named, m.group(2), size)
            if obj is None or obj[asked] != truth[qid]:
                raise HeldoutErrorsError(f"[heldout_errors] question {qid} ({text!r}): no unique referent in its "
                                         f"scene with answer {truth[qid]!r}; is --data the split's dataset?")
            row = out[qtype]
            bucket = row["referent_heldout" if (obj["shape"], obj["color"]) in heldout else "referent_seen"]
            pred = answers[qid].strip().lower()
            bucket[1] += 1
            if pred == truth[qid]:
                bucket[0] += 1
                continue
            in_scene = {o[asked] for o in scenes[q["image_id"]] if o is not obj}
            kind = "other_object" if pred in in_scene else "absent_value" if pred in values[asked] else "invalid"
            row["errors"][kind] += 1
    report = {qt: {"acc_referent_heldout": _pct(r["referent_heldout"]), "n_referent_heldout": r["referent_heldout"][1],
                 "acc_referent_seen": _pct(r["referent_seen"]), "n_referent_seen": r["referent_seen"][1],
                 "errors": r["errors"]} for qt, r in out.items()}
    report["is there"] = {f"acc_{t}": _pct(hit_total) for t, hit_total in exist.items()} | {
        f"n_{t}": hit_total[1] for t, hit_total in exist.items()}
    return report


def _pct(hit_total: list[int]) -> float | None:
    return round(100.0 * hit_total[0] / hit_total[1], 2) if hit_total[1] else None


def read_answers(path: Path) -> dict[int, str]:
    """question_id -> answer from a VQA results file (a list of {question_id, answer}, the official format)."""
    res = _load(path)
    rows = res.get("results", res.get("predictions")) if isinstance(res, dict) else res
    keys = {"question_id", "answer"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and keys <= r.keys() for r in rows):
        raise HeldoutErrorsError(f"[heldout_errors] {path}: expected a list of {{question_id, answer}} records")
    return {int(r["question_id"]): str(r["answer"]) for r in rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/synthetic", help="the synthetic dataset the results were scored on")
    ap.add_argument("--split", default="heldout")
    ap.add_argument("results", nargs="+", help="NAME=PATH of a VQA results file per model")
    args = ap.parse_args(argv)
    report = {}
    for item in args.results:
        name, sep, path = item.partition("=")
        if not sep:
            raise HeldoutErrorsError(f"[heldout_errors] {item!r}: write NAME=PATH")
        report[name] = classify(Path(args.data), read_answers(Path(path)), args.split)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

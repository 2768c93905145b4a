"""VQA accuracy of an exported model with int8 weight-only linears (torchao) against the unquantised model.

    python benchmarks/int8_accuracy.py --model runs/default/export --data data/synthetic [--device cuda] [--limit N]

Runs eval/vqa.py twice on the synthetic test split (same questions, greedy decoding), once as exported and once
with ``--quantize int8``, and prints a table and one final JSON line: both accuracies (overall and per answer
type), their difference, how many answers are identical, and how many weight elements are stored in int8. The
record is also written with date, commit and machine to benchmarks/results/int8_accuracy-<cpu|cuda>.json (or
$MMOE_BENCH_RESULTS; 'none' writes nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _util import finish  # noqa: E402  (benchmarks/ is on sys.path: the script's directory)

from eval import vqa  # noqa: E402


def accuracy(args, quantize: str | None, out_dir: Path) -> tuple[dict, dict]:
    """(metrics of eval/vqa.py, {question_id: answer}) for the model as exported or quantised."""
    out = out_dir / f"answers_{quantize or 'float'}.json"
    data = Path(args.data)
    argv = ["--model", args.model, "--questions", str(data / f"{args.split}_questions.json"),
            "--annotations", str(data / f"{args.split}_annotations.json"), "--images", str(data),
            "--image-index", str(data / f"{args.split}_captions.json"), "--out", str(out),
            "--batch-size", str(args.batch_size)]
    argv += ["--limit", str(args.limit)] if args.limit else []
    argv += ["--device", args.device] if args.device else []
    argv += ["--quantize", quantize] if quantize else []
    if vqa.main(argv) != 0:
        raise SystemExit(f"eval/vqa.py failed for quantize={quantize}")
    answers = {a["question_id"]: a["answer"] for a in json.loads(out.read_text())}
    return json.loads(out.with_suffix(".metrics.json").read_text()), answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="exported model directory")
    ap.add_argument("--data", default="data/synthetic")
    ap.add_argument("--split", default="test")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()

    from mmoe.inference.pipeline import load_model
    from mmoe.inference.quantize import quantize_for_inference

    stats = quantize_for_inference(load_model(args.model, "cpu"), "int8")
    with tempfile.TemporaryDirectory() as tmp:
        fp, fp_answers = accuracy(args, None, Path(tmp))
        q, q_answers = accuracy(args, "int8", Path(tmp))
    same = sum(fp_answers[k] == q_answers.get(k) for k in fp_answers)
    print(f"{'model':<14}{'VQA accuracy':>14}\n{'float':<14}{fp['overall']:>14.2f}\n"
          f"{'int8 weights':<14}{q['overall']:>14.2f}\nidentical answers: {same} of {len(fp_answers)}")
    finish("int8_accuracy", {
        "benchmark": "int8_accuracy", "model": args.model, "data": args.data, "split": args.split,
        "limit": args.limit, "questions": len(fp_answers), "accuracy_float": fp["overall"],
        "accuracy_int8": q["overall"], "delta": round(q["overall"] - fp["overall"], 2),
        "per_answer_type_float": fp.get("per_answer_type"), "per_answer_type_int8": q.get("per_answer_type"),
        "identical_answers": same, "int8_linears": stats["linears"], "int8_weight_elements": stats["weights"],
    }, args.device)


if __name__ == "__main__":
    main()

"""VQA accuracy of an exported model with int8 weight-only linears (torchao) against the unquantised model.

    python benchmarks/int8_accuracy.py --model runs/default/export --data data/synthetic [--device cuda] [--limit N]

Runs eval/vqa.py twice on the synthetic test split (same questions, greedy decoding), once as exported and once
with ``--quantize int8``, and prints a table and one final JSON line: both accuracies, their difference, and
the bytes of the weights the quantisation stores in int8.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eval import vqa  # noqa: E402


def accuracy(args, quantize: str | None, out_dir: Path) -> float:
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
    return float(json.loads(out.with_suffix(".metrics.json").read_text())["overall"])


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
        fp = accuracy(args, None, Path(tmp))
        q = accuracy(args, "int8", Path(tmp))
    print(f"{'model':<12}{'VQA accuracy':>14}\n{'float':<12}{fp:>14.2f}\n{'int8 weights':<12}{q:>14.2f}")
    print(json.dumps({"split": args.split, "limit": args.limit, "accuracy_float": fp, "accuracy_int8": q,
                      "delta": round(q - fp, 2), "int8_linears": stats["linears"],
                      "int8_weight_elements": stats["weights"]}))


if __name__ == "__main__":
    main()

"""Command line of the Hugging Face export (the mapping and what is refused: `mmoe.interop.hf_export`).

    python -m mmoe.export_hf EXPORT_DIR OUT_DIR [--dtype float32|bfloat16|float16]
"""

from __future__ import annotations

import argparse
import sys

import torch

from mmoe.interop import hf_export


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmoe.export_hf", description=hf_export.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", help="an mmoe export (config.json + model.safetensors + tokenizer)")
    ap.add_argument("out_dir", help="the transformers directory to write")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    a = ap.parse_args(argv)
    try:
        out = hf_export.export_hf(a.export_dir, a.out_dir, getattr(torch, a.dtype))
    except (hf_export.NotRepresentableError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[mmoe] wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Generate the synthetic shapes VQA / captioning dataset (VQAv2, COCO-captions and LLaVA formats) + tokenizer.

Example: python data_scripts/make_synthetic.py --out data/synthetic --seed 0 [--preset hard]
Same seed (and preset) -> byte-identical files. ``--preset hard``: 2-6 objects, 7 shapes, 9 colours, 3 sizes,
size and two-hop relation questions, 13 held-out combinations (the default VLM config reads it unchanged). See mmoe/data/synthetic.py for what is generated and why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mmoe.data.synthetic import PRESETS, generate_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, required=True, help="non-negative random seed")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="the synthetic world: 'default' (the embedded setting) or 'hard' (dense does not saturate)")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-val", type=int, default=300)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-heldout", type=int, default=300)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--questions-per-image", type=int, default=3, help="VQA questions per val/test/heldout image")
    p.add_argument("--train-questions-per-image", type=int, default=6,
                   help="questions per training image (more supervision per image encode; the train split's "
                        "conversations hold them all)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes rendering images (the files are identical for any number)")
    p.add_argument("--overwrite", action="store_true", help="replace images from an earlier run in --out")
    a = p.parse_args(argv)
    try:
        generate_dataset(
            a.out,
            a.seed,
            n_train=a.n_train,
            n_val=a.n_val,
            n_test=a.n_test,
            n_heldout=a.n_heldout,
            image_size=a.image_size,
            questions_per_image=a.questions_per_image,
            train_questions_per_image=a.train_questions_per_image,
            overwrite=a.overwrite,
            preset=a.preset,
            workers=a.workers,
        )
    except (ValueError, FileExistsError) as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-batch loading time on the synthetic data: the loader against the one it replaced, in one run.

    .venv/bin/python benchmarks/data_loading.py [--data data/synthetic] [--batches 8] [--repeats 5]

On a 2-core CPU the default run loads batches in the training process (a DataLoader worker would compete with
the two compute threads), so every millisecond here is a millisecond of the training step.
The "reference" loader is the earlier pipeline, rebuilt here: torchvision's v2.Compose image transform and the
tokenizer called through transformers' generic `encode`. "fast" is today's loader on its first epoch (Rust
tokenizer, functional image kernels), "fast_cached" on later epochs (`data.cache_tokens`: no tokenizer at all),
"cached_images" on later epochs with `data.cache_images` too (no PNG decoding: the default configs).
Both tasks are timed: the VLM's conversations (`MMoEDataModule`) and stage 0's labelled images
(`ImageLabelsDataModule`, whose per-patch targets are already cached per image). Loaders are timed interleaved and
compared by medians; identical batches are checked first. Last stdout line: JSON with the ratios (reference / new).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.data import default_collate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _util import env_info, finish, measure, print_table, setup_threads  # noqa: E402

from mmoe.data.collate import collate_batch  # noqa: E402
from mmoe.data.dataset import LlavaJsonDataset  # noqa: E402
from mmoe.data.images import build_image_transform  # noqa: E402
from mmoe.data.instances import ImageLabelsDataModule  # noqa: E402
from mmoe.data.tokenizer import load_tokenizer  # noqa: E402


class GenericTokenizer:
    """The same tokenizer seen through transformers' generic API only (no Rust fast path), as before."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text, add_special_tokens=True):
        return self._tok.encode(text, add_special_tokens=add_special_tokens)


def compose_transform(size: int, mean, std):
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean=list(mean), std=list(std))])


def batches(dataset, batch_size: int, n: int, collate):
    """A loader stand-in over fixed indices: what one training step's `next(dataloader)` does in-process."""
    def load():
        for b in range(n):
            collate([dataset[i] for i in range(b * batch_size, (b + 1) * batch_size)])
    return load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/synthetic", help="synthetic dataset directory (make data)")
    ap.add_argument("--batches", type=int, default=8, help="batches per timed round")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    setup_threads(args.threads)
    data = args.data
    if not os.path.isfile(os.path.join(data, "train_llava.json")):
        raise SystemExit(f"{data}/train_llava.json not found: run `make data` (or data_scripts/make_synthetic.py)")
    size, mean, std, max_len = 64, (0.5,) * 3, (0.5,) * 3, 192
    tok = load_tokenizer(data)

    def llava(tokenizer, transform, cache, cache_images=False):
        return LlavaJsonDataset(os.path.join(data, "train_llava.json"), data, tokenizer, transform, max_len,
                                cache_tokens=cache, cache_images=cache_images)

    ref = llava(GenericTokenizer(tok), compose_transform(size, mean, std), False)
    fast = llava(tok, build_image_transform(size, mean, std), False)
    cached = llava(tok, build_image_transform(size, mean, std), True)
    cached_images = llava(tok, build_image_transform(size, mean, std), True, cache_images=True)
    n, bs = args.batches, args.batch_size
    for i in range(n * bs):  # same items from every loader (and the cached ones warmed: a later epoch)
        a, others = ref[i], (fast[i], cached[i], cached_images[i])
        for key in ("input_ids", "labels", "pixel_values"):
            if not all(torch.equal(a[key], b[key]) for b in others):
                raise SystemExit(f"loaders disagree on item {i} field {key}")
    collate = lambda items: collate_batch(items, pad_id=tok.pad_token_id)  # noqa: E731
    vlm = measure({"reference": batches(ref, bs, n, collate), "fast": batches(fast, bs, n, collate),
                   "fast_cached": batches(cached, bs, n, collate),
                   "cached_images": batches(cached_images, bs, n, collate)}, repeats=args.repeats, warmup=1)

    def labelled_images(cache_images=False):
        dm = ImageLabelsDataModule(data_dir=data, batch_size=bs, patch_grid=8, cache_images=cache_images)
        dm.setup("fit")
        return dm.train_dataset

    labels_ref, labels_new, labels_cached = labelled_images(), labelled_images(), labelled_images(True)
    labels_ref.transform = compose_transform(size, mean, std)
    for i in range(n * bs):
        a = labels_ref[i]
        for other in (labels_new[i], labels_cached[i]):
            for key in ("pixel_values", "targets", "patch_targets", "patch_boxes"):
                if not torch.equal(a[key], other[key]):
                    raise SystemExit(f"stage-0 loaders disagree on image {i} field {key}")
    s0 = measure({"reference": batches(labels_ref, bs, n, default_collate),
                  "fast": batches(labels_new, bs, n, default_collate),
                  "cached_images": batches(labels_cached, bs, n, default_collate)}, repeats=args.repeats, warmup=1)

    per_batch = lambda t: 1000 * t["median"] / n  # noqa: E731
    rows = [{"task": "vlm", "loader": k, "ms_per_batch": per_batch(v)} for k, v in vlm.items()]
    rows += [{"task": "stage0", "loader": k, "ms_per_batch": per_batch(v)} for k, v in s0.items()]
    print_table(rows, ["task", "loader", "ms_per_batch"])
    result = {
        "benchmark": "data_loading",
        "vlm_ms_per_batch": {k: round(per_batch(v), 2) for k, v in vlm.items()},
        "stage0_ms_per_batch": {k: round(per_batch(v), 2) for k, v in s0.items()},
        "vlm_first_epoch_speedup": round(vlm["reference"]["median"] / vlm["fast"]["median"], 2),
        "vlm_later_epoch_speedup": round(vlm["reference"]["median"] / vlm["fast_cached"]["median"], 2),
        "vlm_cached_images_speedup": round(vlm["reference"]["median"] / vlm["cached_images"]["median"], 2),
        "stage0_speedup": round(s0["reference"]["median"] / s0["fast"]["median"], 2),
        "stage0_cached_images_speedup": round(s0["reference"]["median"] / s0["cached_images"]["median"], 2),
        "batch_size": bs, **env_info(),
    }
    finish("data_loading", result)


if __name__ == "__main__":
    main()

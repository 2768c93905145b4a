"""LightningDataModule: LLaVA conversations for training, VQA generation batches for validation.

Interface used by the LightningModule:

* ``dm.tokenizer`` - HF tokenizer (loaded eagerly when ``tokenizer_path`` exists, else on first access).
  Vocabulary size for embeddings: ``len(dm.tokenizer)``; ids: ``dm.pad_id``, ``dm.image_token_id``,
  ``dm.tokenizer.bos_token_id`` / ``eos_token_id``.
* ``train_dataloader()`` batches (see :func:`mmoe.data.collate.collate_batch`)::

      input_ids [B,T] long (right-padded), labels [B,T] long (IGNORE_INDEX off answers), attention_mask [B,T] bool,
      pixel_values [N_img,3,S,S] float (images of sample 0 first, ...), image_counts [B] long, ids list[str]

* ``val_dataloader()`` batches (see :func:`mmoe.data.collate.collate_vqa_generation`)::

      prompt_ids [B,T] long (LEFT-padded, ending in "ASSISTANT:"), attention_mask [B,T] bool,
      pixel_values [N_img,3,S,S], image_counts [B], question_ids [B] long, questions list[str]

  Generate, decode with :func:`mmoe.data.template.decode_answer`, and score the predictions
  ``[{"question_id", "answer"}]`` against ``dm.val_annotations_path`` / ``dm.val_questions_path`` restricted to the
  evaluated ``question_ids`` (at most ``val_max_questions``, a seeded subset; 0 = all).
* ``vqa_dataloader(split)`` - the same for any split (``test``, ``heldout``), e.g. for final evaluation.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Sampler

from mmoe.data.collate import collate_batch, collate_vqa_generation
from mmoe.data.dataset import LlavaJsonDataset, VqaGenerationDataset, image_files_from_coco
from mmoe.data.images import build_image_transform
from mmoe.data.tokenizer import check_template_tokens, image_token_id, load_tokenizer


def split_image_index(data_dir: Path, split: str) -> Path | None:
    """The image index of a split: ``<split>_images.json`` (converters), else ``<split>_captions.json``."""
    for name in (f"{split}_images.json", f"{split}_captions.json"):
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    return None


@rank_zero_only
def _report_truncation(report: dict, path: Path) -> None:
    msg = (f"[mmoe] data: {report['truncated']} of {report['checked']} training samples checked "
           f"({report['percent']} %) exceed data.max_len={report['max_len']} tokens and are truncated "
           f"(longest {report['longest']}) in {path}")
    if report["truncated"]:
        msg += "; raise data.max_len (and model.arch.decoder.max_seq_len) to keep them whole"
    print(msg, flush=True)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with seed + epoch (Lightning calls set_epoch), so a run resumed from a checkpoint sees
    exactly the batches the uninterrupted run would have seen. Under DDP Lightning swaps in its
    DistributedSampler, which follows the same rule."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class MMoEDataModule(L.LightningDataModule):
    """Synthetic (or any LLaVA/VQAv2-format) data for training and generation-based validation."""

    def __init__(
        self,
        *,
        data_dir: str = "data/synthetic",
        train_json: str = "train_llava.json",
        val_split: str | None = "val",
        test_split: str = "test",
        tokenizer_path: str | None = None,
        image_size: int = 64,
        image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        max_len: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        val_max_questions: int = 200,
        seed: int = 0,
        independent_turns: bool = False,
        cache_tokens: bool = False,
        cache_images: bool = False,
        truncation_check: int = 2000,
    ) -> None:
        """
        Args:
            data_dir: dataset directory: the synthetic set (data_scripts/make_synthetic.py) or a converted one
                (data_scripts/prepare_*.py); image paths in its JSON files resolve against it.
            train_json: LLaVA-format training conversations, relative to data_dir.
            val_split: prefix of the VQAv2-format validation files `<val_split>_questions.json` and
                `_annotations.json` (images from each question's file_name, else `<val_split>_images.json` or
                `_captions.json`); validation generates answers and logs val/vqa_acc. null: the data has no VQA
                validation split (trainer.limit_val_batches must then be 0).
            test_split: prefix of the test files, used by `train.py test` the same way.
            tokenizer_path: tokenizer directory (default: data_dir, where the converters and the synthetic
                generator write tokenizer.json).
            image_size: image side in pixels (linked to model.arch.vision.image_size).
            image_mean: per-channel normalisation mean (linked to the vision config).
            image_std: per-channel normalisation std (linked to the vision config).
            max_len: text tokens per training sample (<image> counts as one); longer conversations are cut, and
                setup reports how many are (see truncation_check).
            batch_size: samples per training and validation batch (per device).
            num_workers: DataLoader worker processes (0: load in the training process).
            val_max_questions: validation questions per validation run, a seeded subset (0: all).
            seed: seed of the shuffling (per epoch) and of the validation subset.
            independent_turns: train each question of a one-image conversation on its own, as evaluation asks it
                (shared-prefix packing: one image encode, no answer visible to later turns, see
                `mmoe.data.template.encode_independent_turns`); False trains conversations as chats.
            cache_tokens: keep every training sample's token ids after its first epoch (the tokenizer then runs
                once per sample, not once per epoch; timings in docs/results.md); costs ~12 bytes per token in
                each loader process, so leave it off for very large sets.
            cache_images: decode each training image once and keep its resized uint8 pixels (12 KiB per 64²
                image, per loader process): for small image sets such as the synthetic one.
            truncation_check: at setup, tokenize up to this many training samples (seeded) and report how many
                exceed max_len (0: skip the check).
        """
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or num_workers < 0 or max_len < 1 or val_max_questions < 0 or truncation_check < 0:
            raise ValueError(
                "MMoEDataModule: batch_size and max_len must be >= 1, num_workers, val_max_questions and "
                "truncation_check >= 0"
            )
        self.data_dir = Path(data_dir)
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else self.data_dir
        self.image_transform = build_image_transform(image_size, image_mean, image_std)
        self.val_questions_path = self.data_dir / f"{val_split}_questions.json" if val_split else None
        self.val_annotations_path = self.data_dir / f"{val_split}_annotations.json" if val_split else None
        self.test_annotations_path = self.data_dir / f"{test_split}_annotations.json"
        self.train_dataset: LlavaJsonDataset | None = None
        self.val_dataset: VqaGenerationDataset | None = None
        self._tokenizer = None
        self.truncation: dict | None = None  # filled at setup("fit"): see LlavaJsonDataset.truncation_report
        if (self.tokenizer_path / "tokenizer_config.json").exists() or (
            self.tokenizer_path / "tokenizer.json"
        ).exists():
            self._tokenizer = load_tokenizer(self.tokenizer_path)

    @property
    def tokenizer(self):
        """The tokenizer; loaded on first access if it did not exist at construction (e.g. data made later)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def image_token_id(self) -> int:
        return image_token_id(self.tokenizer)

    def prepare_data(self) -> None:
        if not self.data_dir.is_dir():
            raise FileNotFoundError(
                f"data_dir {self.data_dir} does not exist; generate it with "
                f"`python data_scripts/make_synthetic.py --out {self.data_dir} --seed 0`"
            )

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit") and self.train_dataset is None:
            check_template_tokens(self.tokenizer, where=f"tokenizer {self.tokenizer_path}")
            self.train_dataset = LlavaJsonDataset(
                self.data_dir / hp.train_json, self.data_dir, self.tokenizer, self.image_transform, hp.max_len,
                independent_turns=hp.independent_turns, cache_tokens=hp.cache_tokens,
                cache_images=hp.cache_images,
            )
            if hp.truncation_check:
                self.truncation = self.train_dataset.truncation_report(hp.truncation_check, hp.seed)
                _report_truncation(self.truncation, self.data_dir / hp.train_json)
        if stage in (None, "fit", "validate") and self.val_dataset is None and hp.val_split:
            self.val_dataset = self.vqa_dataset(hp.val_split, hp.val_max_questions or None)  # 0 = all

    def vqa_dataset(self, split: str, max_questions: int | None = None) -> VqaGenerationDataset:
        """Generation dataset for ``<split>_questions.json``: each question's image from its ``file_name``, else
        from the image index ``<split>_images.json`` (written by the converters), else ``<split>_captions.json``
        (the synthetic data), the same files eval/vqa.py reads (``--image-index``)."""
        index = split_image_index(self.data_dir, split)
        files = image_files_from_coco(index) if index is not None else None
        return VqaGenerationDataset(
            self.data_dir / f"{split}_questions.json",
            self.data_dir,
            self.tokenizer,
            self.image_transform,
            image_files=files,
            max_questions=max_questions,
            seed=self.hparams.seed,
        )

    def _loader(self, dataset, collate, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=EpochShuffleSampler(len(dataset), hp.seed) if shuffle else None,
            num_workers=hp.num_workers,
            collate_fn=partial(collate, pad_id=self.pad_id),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, collate_batch, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if not self.hparams.val_split:
            raise ValueError("data.val_split is null (no VQA validation split): set trainer.limit_val_batches=0 "
                             "or name a VQAv2-format split in data.val_split")
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, collate_vqa_generation, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Every question of the test split (`python train.py test`), scored like validation."""
        return self.vqa_dataloader(self.hparams.test_split, max_questions=None)

    def vqa_dataloader(self, split: str, max_questions: int | None = None) -> DataLoader:
        """Left-padded generation batches for any split, e.g. ``test`` or ``heldout``."""
        return self._loader(self.vqa_dataset(split, max_questions), collate_vqa_generation, shuffle=False)

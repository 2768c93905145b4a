"""Batch collation: right padding for training, left padding for batched generation.

Images of a batch are concatenated in order of appearance (all images of sample 0, then sample 1, ...) and
``image_counts[b]`` says how many belong to sample ``b``; the model consumes them in that order when it replaces
``<image>`` tokens, which is why the order must never change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mmoe.constants import IGNORE_INDEX


def _cat_images(samples: Sequence[Mapping]) -> tuple[torch.Tensor, torch.Tensor]:
    pix = [s["pixel_values"] for s in samples]
    counts = torch.tensor([int(p.shape[0]) if p.dim() == 4 else 0 for p in pix], dtype=torch.long)
    with_images = [p for p in pix if p.dim() == 4 and p.shape[0] > 0]
    if with_images:
        return torch.cat(with_images, dim=0), counts
    shaped = [p for p in pix if p.dim() == 4]  # empty [0, 3, S, S] keeps the image size when it is known
    return (shaped[0] if shaped else torch.empty(0, 3, 0, 0)), counts


def collate_batch(samples: Sequence[Mapping], pad_id: int) -> dict:
    """Right-pad ``input_ids`` (pad_id) and ``labels`` (IGNORE_INDEX) of dataset items into a training batch.

    Returns ``input_ids`` [B, T] long, ``labels`` [B, T] long, ``attention_mask`` [B, T] bool,
    ``pixel_values`` [N_img, 3, S, S] float, ``image_counts`` [B] long, ``ids`` list.
    """
    if not samples:
        raise ValueError("collate_batch: empty batch")
    T = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, s in enumerate(samples):
        ids, lab = (
            torch.as_tensor(s["input_ids"], dtype=torch.long),
            torch.as_tensor(s["labels"], dtype=torch.long),
        )
        if ids.shape != lab.shape:
            raise ValueError(
                f"collate_batch: sample {s.get('id', b)!r} has {len(ids)} input_ids but {len(lab)} labels"
            )
        n = ids.shape[0]
        input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = ids, lab, True
    pixel_values, image_counts = _cat_images(samples)
    extra = {}
    if any("segment_ids" in s for s in samples):  # shared-prefix packing: padding is segment 0 (masked anyway)
        segment_ids = torch.zeros((B, T), dtype=torch.long)
        for b, s in enumerate(samples):
            seg = torch.as_tensor(s.get("segment_ids", [0] * len(s["input_ids"])), dtype=torch.long)
            if seg.shape[0] != len(s["input_ids"]):
                raise ValueError(f"collate_batch: sample {s.get('id', b)!r} has {len(s['input_ids'])} input_ids "
                                 f"but {seg.shape[0]} segment_ids")
            segment_ids[b, : seg.shape[0]] = seg
        extra["segment_ids"] = segment_ids
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_counts": image_counts,
        "ids": [s.get("id") for s in samples],
        **extra,
    }


def collate_for_generation(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts so every prompt ends at the last column (where generation continues).

    Returns ``input_ids`` [B, T] long and ``attention_mask`` [B, T] bool (False on the left padding).
    """
    if not prompts:
        raise ValueError("collate_for_generation: no prompts")
    T = max(len(p) for p in prompts)
    if T == 0:
        raise ValueError("collate_for_generation: all prompts are empty")
    input_ids = torch.full((len(prompts), T), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for b, p in enumerate(prompts):
        n = len(p)
        if n:
            input_ids[b, T - n :] = torch.as_tensor(list(p), dtype=torch.long)
            attention_mask[b, T - n :] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_vqa_generation(samples: Sequence[Mapping], pad_id: int) -> dict:
    """Batch of :class:`mmoe.data.dataset.VqaGenerationDataset` items for generation-based evaluation.

    Returns ``prompt_ids`` [B, T] (left-padded), ``attention_mask`` [B, T] bool, ``pixel_values``,
    ``image_counts`` [B], ``question_ids`` [B] long, ``questions`` list[str].
    """
    if not samples:
        raise ValueError("collate_vqa_generation: empty batch")
    gen = collate_for_generation([s["prompt_ids"] for s in samples], pad_id)
    pixel_values, image_counts = _cat_images(samples)
    return {
        "prompt_ids": gen["input_ids"],
        "attention_mask": gen["attention_mask"],
        "pixel_values": pixel_values,
        "image_counts": image_counts,
        "question_ids": torch.tensor([int(s["question_id"]) for s in samples], dtype=torch.long),
        "questions": [s["question"] for s in samples],
    }

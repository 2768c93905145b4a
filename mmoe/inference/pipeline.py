"""Load an exported model and answer questions about images (used by eval/, the CLI, lmms-eval)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from mmoe.model.vlm import MMoEVLM
from mmoe.interop.export import read_export_config


def load_model(model_dir: str | Path, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> MMoEVLM:
    """Exported directory -> MMoEVLM in eval mode. Errors name the directory and the tensors."""
    from safetensors.torch import load_model as st_load

    cfg = read_export_config(model_dir)
    model = MMoEVLM(cfg)
    weights = Path(model_dir) / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{model_dir}: model.safetensors is missing")
    try:
        missing, unexpected = st_load(model, str(weights), strict=False)
    except Exception as e:
        raise ValueError(f"{weights}: cannot load weights ({type(e).__name__}: {e})") from None
    missing = [k for k in missing if "load_accum" not in k]
    if missing or unexpected:
        raise ValueError(f"{weights}: weights do not match config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device=device, dtype=dtype).eval()


class VLMPipeline:
    """Tokenizer + image transform + model, with batched greedy/sampled generation."""

    def __init__(self, model: MMoEVLM, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.transform = model.vision.image_transform()
        self.device = next(model.parameters()).device

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return torch.stack([self.transform(im) for im in images]).to(self.device, dtype)

    @torch.no_grad()
    def generate(self, images: list[list[Image.Image]], prompts: list[str], max_new_tokens: int = 32, *,
                 temperature: float = 0.0, top_p: float = 1.0, short_answer: bool = False,
                 stream_callback: Callable[[int, torch.Tensor], None] | None = None,
                 seed: int | None = None) -> list[str]:
        """One prompt per sample; `<image>` placeholders are added in front when the prompt has none."""
        from mmoe.data.collate import collate_for_generation
        from mmoe.data.template import SHORT_ANSWER_SUFFIX, build_prompt

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        ids = []
        for imgs, p in zip(images, prompts):
            if not p or not p.strip():
                raise ValueError("empty prompt: give a question or an instruction")
            text = p if "<image>" in p else "<image>\n" * len(imgs) + p
            if text.count("<image>") != len(imgs):
                raise ValueError(f"prompt has {text.count('<image>')} '<image>' placeholders for {len(imgs)} images")
            if short_answer:
                text = text + SHORT_ANSWER_SUFFIX
            ids.append(build_prompt(self.tokenizer, text))
        batch = collate_for_generation(ids, self.tokenizer.pad_token_id)
        flat = [im for imgs in images for im in imgs]
        pixels = self._pixels(flat) if flat else None
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        new = self.model.generate(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                                  pixels, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  stream_callback=stream_callback, generator=gen)
        return [s.strip() for s in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def answer(self, images: list[Image.Image], questions: list[str], max_new_tokens: int = 8,
               short_answer: bool = True) -> list[str]:
        return self.generate([[im] for im in images], questions, max_new_tokens, short_answer=short_answer)

    def caption(self, images: list[Image.Image], max_new_tokens: int = 24) -> list[str]:
        from mmoe.data.template import CAPTION_PROMPT
        return self.generate([[im] for im in images], [CAPTION_PROMPT] * len(images), max_new_tokens)


def load_pipeline(model_dir: str | Path, device: str | torch.device | None = None,
                  tokenizer_backend: str = "auto", quantize: str | None = None) -> VLMPipeline:
    """Export directory -> pipeline. `tokenizer_backend`: 'transformers', 'tokenizers' (no transformers needed),
    or 'auto' (transformers when installed). `quantize`: None, or 'int8' weight-only (needs torchao)."""
    from .tokenizer import load_inference_tokenizer

    model = load_model(model_dir, device)
    if quantize:
        from .quantize import quantize_for_inference

        quantize_for_inference(model, quantize)
    return VLMPipeline(model, load_inference_tokenizer(model_dir, tokenizer_backend))

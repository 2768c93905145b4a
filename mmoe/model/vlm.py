"""The VLM: vision encoder -> connector -> image tokens spliced into the decoder's input.

LLaVA's three-part split. Each `<image>` placeholder in the text becomes the projected tokens of the
next image (several images per sample, any position). Labels are expanded with IGNORE_INDEX on image
positions, and a modality id per token goes to every router so balance and metrics split by modality.
All routing results of all MoE sites (vision, connector, attention, FFN) come back with the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mmoe.constants import IGNORE_INDEX, MODALITY_IMAGE, MODALITY_TEXT

from .connector import Connector, ConnectorConfig
from .decoder import Decoder, DecoderConfig, DecoderOutput
from .generation import generate
from .moe.routing import RoutingResult
from .vision import VisionConfig, VisionEncoder


@dataclass
class VLMConfig:
    """Architecture of the whole model; nested parts keep their own dataclasses."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    """Vision encoder (ViT, optionally with MoE MLP blocks)."""
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    """Projector from vision features to the decoder width (MLP or MoE MLP)."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """Language model (dense or MoA / MoE layers)."""
    image_token_id: int = 4
    """Id of the `<image>` placeholder token (set from the tokenizer at training start)."""
    pad_token_id: int = 0
    """Padding id."""
    eos_token_id: int = 2
    """End-of-answer id; generation stops on it."""


@dataclass
class VLMOutput:
    logits: Tensor  # (B, L, V); (N, V) at the positions that predict a label with logits_at_labels=True
    labels: Tensor | None  # (B, L) expanded labels aligned with logits' positions (not shifted)
    attention_mask: Tensor  # (B, L) bool
    modality: Tensor  # (B, L) long
    routing: list[RoutingResult]


class SpliceError(ValueError):
    """Mismatch between `<image>` placeholders and images."""


class MMoEVLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.connector = Connector(cfg.connector, in_dim=self.vision.out_dim, out_dim=cfg.decoder.dim,
                                   grid=_grid(self.vision.num_patches))
        self.decoder = Decoder(cfg.decoder)
        # Set by distributed training (expert parallelism, DDP): a batch without images still runs the vision
        # side on a masked-out blank image, so every rank issues the same collectives (all-to-all, gradient
        # buckets) and none waits forever on a rank whose batch happened to be text-only.
        self.always_encode_images = False

    @property
    def num_image_tokens(self) -> int:
        return self.connector.num_tokens(self.vision.num_patches)

    def encode_images(self, pixel_values: Tensor, image_mask: Tensor | None = None
                      ) -> tuple[Tensor, list[RoutingResult]]:
        """(N, 3, H, W) -> (N, P', D) decoder-width image tokens, routing of vision + connector."""
        feats, r_vis = self.vision(pixel_values, image_mask)
        tokens, r_con = self.connector(feats, image_mask)
        return tokens, r_vis + r_con

    def _encode_placeholder_image(self, like: Tensor) -> tuple[Tensor, list[RoutingResult]]:
        """Run the vision side on one blank image whose tokens are masked out everywhere, and return a zero
        that depends on its output (so backward runs its collectives too) plus its (token-less) routing."""
        S = self.cfg.vision.image_size
        blank = torch.zeros(1, 3, S, S, device=like.device,
                            dtype=next(self.vision.parameters()).dtype)
        tokens, routing = self.encode_images(blank, torch.zeros(1, dtype=torch.bool, device=like.device))
        return tokens.sum() * 0.0, routing

    def splice(self, input_ids: Tensor, attention_mask: Tensor, image_tokens: Tensor | None,
               labels: Tensor | None = None, padding_side: str = "right"):
        """Replace each placeholder by its image's tokens; returns embeds, mask, labels, modality.

        Vectorised: every text token moves to cumsum(expansion) and every image token fills a run of
        P' positions; rows are re-padded on `padding_side` so left-padded prompts stay left-padded.
        """
        B, T = input_ids.shape
        emb = self.decoder.embed_tokens
        is_img = input_ids == self.cfg.image_token_id
        n_placeholders = int(is_img.sum())
        n_images = 0 if image_tokens is None else image_tokens.shape[0]
        if n_placeholders != n_images:
            raise SpliceError(f"batch has {n_placeholders} '<image>' placeholders but {n_images} images")
        attention_mask = attention_mask.bool()
        safe_ids = input_ids.masked_fill(is_img, self.cfg.pad_token_id)
        text_emb = emb(safe_ids)
        if n_images == 0:
            mod = torch.full_like(input_ids, MODALITY_TEXT)
            return text_emb, attention_mask, labels, mod
        P = image_tokens.shape[1]
        start, L = _spliced_starts(is_img, P, padding_side)
        D = text_emb.shape[-1]
        embeds = text_emb.new_zeros(B, L, D)
        mask = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
        modality = torch.full((B, L), MODALITY_TEXT, dtype=torch.long, device=input_ids.device)
        rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T)
        txt = ~is_img
        embeds[rows[txt], start[txt]] = text_emb[txt]
        mask[rows[txt], start[txt]] = attention_mask[txt]
        # image i (in row-major placeholder order) fills positions start .. start + P - 1
        img_rows = rows[is_img].repeat_interleave(P)
        img_pos = (start[is_img][:, None] + torch.arange(P, device=input_ids.device)).flatten()
        embeds[img_rows, img_pos] = image_tokens.reshape(-1, D).to(embeds.dtype)
        mask[img_rows, img_pos] = attention_mask[is_img].repeat_interleave(P)
        modality[img_rows, img_pos] = MODALITY_IMAGE
        new_labels = None
        if labels is not None:
            new_labels = torch.full((B, L), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            new_labels[rows[txt], start[txt]] = labels[txt]
        return embeds, mask, new_labels, modality

    def expand_like_splice(self, input_ids: Tensor, values: Tensor, image_tokens: Tensor | None,
                           padding_side: str = "right") -> Tensor:
        """Per-token integer `values` (B, T) laid out as `splice` lays out the tokens: each image token takes
        its placeholder's value; re-padding positions get 0."""
        if image_tokens is None:
            return values
        B, T = input_ids.shape
        is_img = input_ids == self.cfg.image_token_id
        P = image_tokens.shape[1]
        start, L = _spliced_starts(is_img, P, padding_side)
        out = values.new_zeros(B, L)
        rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T)
        offsets = torch.arange(P, device=input_ids.device)
        pos = torch.where(is_img[..., None], start[..., None] + offsets, start[..., None])  # (B, T, P)
        keep = is_img[..., None] | (offsets == 0)  # text tokens fill one position, images P
        out[rows[..., None].expand(B, T, P)[keep], pos[keep]] = values[..., None].expand(B, T, P)[keep]
        return out

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None,
                labels: Tensor | None = None, *, padding_side: str = "right",
                segment_ids: Tensor | None = None, logits_at_labels: bool = False) -> VLMOutput:
        """`segment_ids` (B, T) long: shared-prefix packing (see `Decoder.forward`); an image takes the
        segment of its placeholder, so questions packed after a shared image each see only that image.
        `logits_at_labels`: logits only at positions whose next label is supervised, (N, V) row-major, which is
        all the training loss reads (`mmoe.training.module.lm_loss` takes either layout)."""
        routing: list[RoutingResult] = []
        image_tokens = None
        zero = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            image_tokens, routing = self.encode_images(pixel_values)
        elif self.always_encode_images:
            zero, routing = self._encode_placeholder_image(input_ids)
        embeds, mask, labels, modality = self.splice(input_ids, attention_mask, image_tokens, labels, padding_side)
        if segment_ids is not None:
            if segment_ids.shape != input_ids.shape:
                raise SpliceError(f"segment_ids {tuple(segment_ids.shape)} must match input_ids "
                                  f"{tuple(input_ids.shape)}")
            segment_ids = self.expand_like_splice(input_ids, segment_ids, image_tokens, padding_side)
        if zero is not None:
            embeds = embeds + zero.to(embeds.dtype)
        logits_mask = None
        if logits_at_labels:
            if labels is None:
                raise ValueError("logits_at_labels=True needs labels")
            logits_mask = torch.zeros_like(labels, dtype=torch.bool)
            logits_mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        out: DecoderOutput = self.decoder(inputs_embeds=embeds, attention_mask=mask, modality=modality,
                                          segment_ids=segment_ids, logits_mask=logits_mask)
        return VLMOutput(out.logits, labels, mask, modality, routing + out.routing)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None,
                 **gen_kwargs) -> Tensor:
        """Left-padded prompts (+ their images) -> (B, n_new) new token ids."""
        image_tokens = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            image_tokens, _ = self.encode_images(pixel_values)
        elif self.always_encode_images:
            self._encode_placeholder_image(input_ids)
        embeds, mask, _, modality = self.splice(input_ids, attention_mask, image_tokens, None, "left")
        gen_kwargs.setdefault("pad_token_id", self.cfg.pad_token_id)
        gen_kwargs.setdefault("stop_token_ids", (self.cfg.eos_token_id,))
        return generate(self.decoder, inputs_embeds=embeds, attention_mask=mask, modality=modality, **gen_kwargs)


def _spliced_starts(is_img: Tensor, P: int, padding_side: str) -> tuple[Tensor, int]:
    """(B, T) first spliced position of every token when each placeholder becomes P tokens, and the spliced
    length L; rows re-padded on `padding_side`."""
    counts = torch.where(is_img, P, 1)
    start = counts.cumsum(1) - counts
    length = counts.sum(1)
    L = int(length.max())
    if padding_side == "left":
        start = start + (L - length)[:, None]
    return start, L


def _grid(num_patches: int) -> int | None:
    g = int(round(num_patches ** 0.5))
    return g if g * g == num_patches else None

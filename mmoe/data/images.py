"""Robust image loading (any PIL mode -> RGB) and the model's image transform.

Real datasets contain grayscale, palette, 16-bit, CMYK and transparent images, plus the occasional truncated or
mislabelled file. :func:`load_image` turns all of them into 8-bit RGB, and every failure into an
:class:`ImageLoadError` that names the file, so a bad sample is found in seconds rather than mid-epoch.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_SIDE = 16384
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb threshold
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class ImageLoadError(ValueError):
    """An image file is missing, empty, corrupt, not an image, or absurdly large."""


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit: keep 0..255 data, scale 16-bit range, else min-max."""
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        arr = arr * 255.0
    elif img.mode.startswith("I;16") or (lo >= 0.0 and 255.0 < hi <= 65535.0):
        arr = arr / 257.0
    elif lo < 0.0 or hi > 255.0:
        arr = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an opened PIL image of any mode to 8-bit RGB (transparency composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        return _on_white(img) if "transparency" in img.info else img.convert("RGB")
    if img.mode in _ALPHA_MODES:
        return _on_white(img)
    if img.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(img)
    if img.mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` as an 8-bit RGB PIL image (EXIF orientation applied); raise ImageLoadError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ImageLoadError(f"image file not found: {p}")
    if p.stat().st_size == 0:
        raise ImageLoadError(f"image file is empty (0 bytes): {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
            with Image.open(p) as img:
                w, h = img.size
                if w < 1 or h < 1 or max(w, h) > MAX_SIDE or w * h > MAX_PIXELS:
                    raise ImageLoadError(
                        f"refusing image {p}: size {w}x{h} (limit {MAX_SIDE} px per side, {MAX_PIXELS} pixels)"
                    )
                img.load()
                with contextlib.suppress(Exception):  # broken EXIF must not lose an otherwise fine image
                    ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an image without EXIF
                rgb = to_rgb(img)
                return rgb.copy() if rgb is img else rgb  # detach from the file handle closed below
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"refusing image {p}: {e}") from e
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), SyntaxError, zlib errors, ...
        raise ImageLoadError(f"cannot read image {p}: {type(e).__name__}: {e}") from e


class ImageTransform:
    """PIL RGB image -> normalised float tensor [3, S, S]; resize shorter side (bicubic) then center crop.

    A class (not a bare Compose) so datasets can read ``image_size`` for text-only samples and so it pickles for
    DataLoader workers. It calls torchvision's functional kernels on a plain tensor and skips the resize and crop
    an image already at S x S does not need: the same pixels as ``v2.Compose([ToImage, Resize, CenterCrop, ToDtype,
    Normalize])`` (pinned by a test) at a third of the cost, which matters when one CPU process both loads and trains.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values each and std > 0; got mean={mean}, std={std}")
        self.image_size = int(image_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_pixels(img))

    def to_pixels(self, img: Image.Image) -> torch.Tensor:
        """The resize and crop: PIL image -> uint8 (3, S, S) (what `ImageCache` keeps)."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        if not isinstance(img, Image.Image):
            raise TypeError(f"ImageTransform expects a PIL image (see load_image), got {type(img).__name__}")
        if img.mode != "RGB":  # e.g. an RGBA or greyscale image a caller opened itself
            img = to_rgb(img)
        size = self.image_size
        x = TF.pil_to_tensor(img)  # (3, H, W) uint8
        if min(x.shape[-2:]) != size:
            x = TF.resize(x, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        if tuple(x.shape[-2:]) != (size, size):
            x = TF.center_crop(x, [size, size])
        return x

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (3, S, S) from `to_pixels` -> the model's normalised float32 input."""
        from torchvision.transforms.v2 import functional as TF

        x = TF.to_dtype(pixels, torch.float32, scale=True)
        return TF.normalize(x, list(self.mean), list(self.std))

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, mean={self.mean}, std={self.std})"


class ImageCache:
    """Images decoded once per process: path -> resized uint8 pixels and the file's (width, height).

    Why: on a 2-core CPU batches load in the training process, so decoding the same PNGs every epoch is step time
    (stage 0 reads each synthetic image 16 times). Items equal the uncached `transform(load_image(path))` bit for
    bit. Memory grows with the set (12 KiB per 64² image): for small sets, not LLaVA-scale ones.
    """

    def __init__(self, transform: ImageTransform) -> None:
        if not isinstance(transform, ImageTransform):
            raise TypeError(f"image caching needs mmoe's ImageTransform (it keeps resized uint8 pixels), got "
                            f"{type(transform).__name__}; turn the cache off for a custom transform")
        self.transform = transform
        self._entries: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, path: str | Path) -> tuple[torch.Tensor, tuple[int, int]]:
        """(normalised float32 (3, S, S), original (width, height)) of the image at `path`."""
        key = str(path)
        entry = self._entries.get(key)
        if entry is None:
            img = load_image(path)
            entry = (self.transform.to_pixels(img), img.size)
            self._entries[key] = entry
        return self.transform.normalize(entry[0]), entry[1]


def build_image_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
    """The model's image transform (see :class:`ImageTransform`)."""
    return ImageTransform(image_size, mean, std)

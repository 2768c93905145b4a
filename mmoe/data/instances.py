"""Images with object labels (COCO instances JSON) for vision-tower pretraining: which classes are in each image.

Why: a VLM's vision tower normally arrives pretrained (CLIP, ImageNet). When there is none to load (offline,
or the synthetic world), multi-label classification of the objects in each image is the cheapest way to teach
a ViT to see them before it is upcycled into MoE and joined to the LLM (`mmoe.training.vision_pretrain`).

Format: the COCO ``instances_*.json`` layout: ``images`` (``id``, ``file_name`` relative to the image root),
``annotations`` (``image_id``, ``category_id``, optional ``bbox`` for per-patch targets) and ``categories`` (``id``,
``name``). Targets are multi-hot over the categories in file order. Images without annotations are kept (all-zero
targets).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mmoe.data.images import ImageCache, build_image_transform, load_image


class InstancesFormatError(ValueError):
    """An instances file that cannot be read; the message names the file and the field."""


def read_instances(path: str | Path) -> tuple[list[dict], list[str], dict[int, list[tuple[int, list[float] | None]]]]:
    """(images, category names, image id -> [(category index, bbox [x, y, w, h] or None)]) of a COCO instances
    file; images keep their optional ``width`` / ``height``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instances file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InstancesFormatError(f"{path}: not valid JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise InstancesFormatError(f"{path}: expected a COCO instances object with a '{key}' list")
    cats = data["categories"]
    if not cats:
        raise InstancesFormatError(f"{path}: 'categories' is empty")
    try:
        index = {int(c["id"]): i for i, c in enumerate(cats)}
        names = [str(c["name"]) for c in cats]
        images = [{"id": int(im["id"]), "file_name": str(im["file_name"]), "width": im.get("width"),
                   "height": im.get("height")} for im in data["images"]]
    except (KeyError, TypeError, ValueError) as e:
        raise InstancesFormatError(f"{path}: categories need 'id' and 'name', images 'id' and 'file_name' "
                                   f"({type(e).__name__}: {e})") from None
    known = {im["id"] for im in images}
    labels: dict[int, list[tuple[int, list[float] | None]]] = {i: [] for i in known}
    for k, a in enumerate(data["annotations"]):
        try:
            image_id, cat = int(a["image_id"]), int(a["category_id"])
        except (KeyError, TypeError, ValueError):
            raise InstancesFormatError(f"{path}: annotations[{k}] needs integer 'image_id' and "
                                       "'category_id'") from None
        if cat not in index:
            raise InstancesFormatError(f"{path}: annotations[{k}].category_id {cat} is not in 'categories'")
        if image_id not in known:
            raise InstancesFormatError(f"{path}: annotations[{k}].image_id {image_id} is not in 'images'")
        box = a.get("bbox")
        if box is not None and (not isinstance(box, list) or len(box) != 4):
            raise InstancesFormatError(f"{path}: annotations[{k}].bbox must be [x, y, width, height], got {box!r}")
        labels[image_id].append((index[cat], [float(v) for v in box] if box is not None else None))
    return images, names, labels


def covered_patches(box: list[float], grid: int, width: float, height: float, min_cover: float = 0.25) -> list[int]:
    """Row-major indices of the patches a box [x, y, w, h] covers: at least `min_cover` of the patch, and always
    the patch holding the box centre (so a tiny object still owns one token)."""
    cw, ch = width / grid, height / grid
    x, y, w, h = box
    out = []
    for r in range(grid):
        oy = max(0.0, min(y + h, (r + 1) * ch) - max(y, r * ch))
        for c in range(grid):
            ox = max(0.0, min(x + w, (c + 1) * cw) - max(x, c * cw))
            if ox * oy >= min_cover * cw * ch:
                out.append(r * grid + c)
    centre = min(grid - 1, max(0, int((y + h / 2) / ch))) * grid + min(grid - 1, max(0, int((x + w / 2) / cw)))
    return out if centre in out else out + [centre]


def patch_targets(objects: list[tuple[int, list[float] | None]], num_classes: int, grid: int, width: float,
                  height: float) -> torch.Tensor:
    """(grid * grid, num_classes) multi-hot, row-major like ViT tokens: a patch carries the classes of the boxes
    that cover it (`covered_patches`)."""
    out = torch.zeros(grid * grid, num_classes)
    for cat, box in objects:
        if box is not None:
            out[covered_patches(box, grid, width, height), cat] = 1.0
    return out


def patch_boxes(objects: list[tuple[int, list[float] | None]], grid: int, width: float,
                height: float) -> torch.Tensor:
    """(grid * grid, 5): per patch the box of the object covering it as (centre x, centre y, w, h) in image
    fractions, then a mask (1 where a box covers the patch). Where boxes overlap the smallest one wins (FCOS).
    Why: a token that also states where and how big its object is lets the LLM compare positions and sizes."""
    out = torch.zeros(grid * grid, 5)
    area = torch.full((grid * grid,), float("inf"))
    for _cat, box in objects:
        if box is None:
            continue
        x, y, w, h = box
        for i in covered_patches(box, grid, width, height):
            if w * h < area[i]:
                area[i] = w * h
                out[i] = torch.tensor([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height, 1.0])
    return out


class ImageLabelsDataset(Dataset):
    """Items: ``pixel_values`` (3, S, S) and ``targets`` (num_classes,) multi-hot float."""

    def __init__(self, instances_path: str | Path, image_root: str | Path, image_transform: Callable,
                 num_classes: int | None = None, patch_grid: int = 0, cache_images: bool = False):
        """`patch_grid` > 0 adds ``patch_targets`` (grid * grid, num_classes) and ``patch_boxes`` (grid * grid, 5)
        from the boxes (`patch_targets`, `patch_boxes`). `cache_images` decodes each file once (`ImageCache`)."""
        self.path, self.image_root, self.transform = Path(instances_path), Path(image_root), image_transform
        self.patch_grid = int(patch_grid)
        self.images, self.class_names, self.labels = read_instances(self.path)
        self._dense: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # index -> (patch targets, patch boxes)
        self.image_cache = ImageCache(image_transform) if cache_images else None
        if num_classes is not None and num_classes != len(self.class_names):
            raise InstancesFormatError(f"{self.path}: {len(self.class_names)} categories, but the model has "
                                       f"{num_classes} outputs (train and val files must share categories)")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        im = self.images[i]
        targets = torch.zeros(len(self.class_names))
        objects = self.labels[im["id"]]
        targets[[cat for cat, _ in objects]] = 1.0
        path = self.image_root / im["file_name"]
        if self.image_cache is not None:
            pixels, (file_w, file_h) = self.image_cache.load(path)
        else:
            image = load_image(path)
            pixels, (file_w, file_h) = self.transform(image), image.size
        item = {"pixel_values": pixels, "targets": targets}
        if self.patch_grid:
            width, height = im["width"] or file_w, im["height"] or file_h  # boxes are in file pixels
            if i not in self._dense:  # Python loops over patches: computed once per image, not once per epoch
                self._dense[i] = (patch_targets(objects, len(self.class_names), self.patch_grid, width, height),
                                  patch_boxes(objects, self.patch_grid, width, height))
            item["patch_targets"], item["patch_boxes"] = (t.clone() for t in self._dense[i])
        return item


class ImageLabelsDataModule(L.LightningDataModule):
    """Train / val COCO instances files under `data_dir` (the synthetic generator writes `{split}_instances.json`)."""

    def __init__(self, *, data_dir: str = "data/synthetic", train_file: str = "train_instances.json",
                 val_file: str = "val_instances.json", image_size: int = 64,
                 image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
                 image_std: tuple[float, float, float] = (0.5, 0.5, 0.5), batch_size: int = 32,
                 num_workers: int = 0, patch_grid: int = 0, cache_images: bool = False):
        """`patch_grid`: side of the ViT's token grid for per-patch targets (linked from the model by the CLI;
        0 = image-level targets only). `cache_images`: decode each training image once and keep its resized
        uint8 pixels (12 KiB per 64² image per loader process): for small image sets such as the synthetic one."""
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError("ImageLabelsDataModule: batch_size must be >= 1 and num_workers >= 0")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.transform = build_image_transform(image_size, image_mean, image_std)
        self.train_dataset: ImageLabelsDataset | None = None
        self.val_dataset: ImageLabelsDataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of categories of the train file (the model's output width); reads the files once, via setup."""
        self.setup()
        return len(self.train_dataset.class_names)

    @property
    def class_names(self) -> list[str]:
        """Category names of the train file, in its order (stage 0's word targets are built from them)."""
        self.setup()
        return list(self.train_dataset.class_names)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            grid = self.hparams.patch_grid
            self.train_dataset = ImageLabelsDataset(self.data_dir / self.hparams.train_file, self.data_dir,
                                                    self.transform, patch_grid=grid,
                                                    cache_images=self.hparams.cache_images)
            self.val_dataset = ImageLabelsDataset(self.data_dir / self.hparams.val_file, self.data_dir,
                                                  self.transform, num_classes=len(self.train_dataset.class_names),
                                                  patch_grid=grid)

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=shuffle, generator=g,
                          num_workers=self.hparams.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

"""Datasets behind one registry. Every item is ``(image [C,H,W] float32, label int)``; natural images
are in [-1, 1]; labels are -1 where unknown. A labelled dataset has ``class_names`` (label order); an
unlabelled one has ``class_names = None``."""

from __future__ import annotations

from ..errors import UserError
from .images import CIFAR10, CelebA, ImageFolder
from .twoscale import TwoScaleDataset

DATASETS = {"twoscale": TwoScaleDataset, "cifar10": CIFAR10, "celeba": CelebA, "image_folder": ImageFolder}
ALIASES = {"celeba32": ("celeba", 32), "celeba64": ("celeba", 64)}
DEFAULT_SIZE = {"twoscale": 16, "cifar10": 32, "celeba": 64, "image_folder": None}


def _resolve(name: str, image_size: int | None) -> tuple[str, int | None]:
    if name in ALIASES:
        base, size = ALIASES[name]
        if image_size not in (None, size):
            raise UserError(f"dataset '{name}' is {size}x{size} but dataset.image_size = {image_size}; "
                            f"use dataset 'celeba' with image_size {image_size}")
        return base, size
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; valid: {sorted(DATASETS) + sorted(ALIASES)}")
    if name == "cifar10" and image_size not in (None, 32):
        raise UserError(f"CIFAR-10 images are 32x32; remove dataset.image_size = {image_size}")
    return name, image_size or DEFAULT_SIZE[name]


def dataset_image_shape(name: str, image_size: int | None = None, channels: int = 3, **_) -> tuple[int, int, int]:
    """(C, H, W) of a dataset without touching the disk."""
    name, size = _resolve(name, image_size)
    if size is None:
        raise UserError(f"dataset '{name}' needs dataset.image_size")
    return (channels if name == "twoscale" else 3, size, size)


def class_names(dataset) -> list[str] | None:
    """The dataset's classes in label order, or None when it has no labels."""
    names = getattr(dataset, "class_names", None)
    return list(names) if names is not None else None


def class_counts(dataset) -> dict[str, int] | None:
    """{class name: number of items} for datasets that hold their labels as a list (not twoscale's stream)."""
    names, labels = class_names(dataset), getattr(dataset, "labels", None)
    if names is None or labels is None:
        return None
    counts = [0] * len(names)
    for label in labels:
        counts[label] += 1
    return dict(zip(names, counts, strict=True))


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``0 … total−1`` (all of them when ``count >= total``): a subset of a
    dataset stored class by class (an image folder's sorted class subfolders) then still covers every class."""
    count = min(count, total)
    return [i * total // count for i in range(count)]


def build_dataset(name: str, *, root: str | None = None, image_size: int | None = None, split: str = "train",
                  random_flip: bool | None = None, download: bool = False, labels: str = "none",
                  folder_split: str | None = None, cache: bool = False, cache_dir: str | None = None,
                  **twoscale_kwargs):
    """Instantiate a dataset by name (see ``DATASETS``; ``celeba32``/``celeba64`` fix the size).

    ``split`` is the train/test split of cifar10, celeba and twoscale; an image folder reads ``root/folder_split``
    (``dataset.split``) instead, with ``labels`` from its subfolders or none, except that the held-out split of a
    ``train``/``test`` tree is ``root/test``: ``split="test"`` with ``dataset.split = "train"`` reads it.
    ``cache``: decoded-image cache of image folders and CelebA (``cache.py``)."""
    name, size = _resolve(name, image_size)
    flip = random_flip if random_flip is not None else name != "twoscale"
    if name == "twoscale":
        return TwoScaleDataset(image_size=size, split=split, **twoscale_kwargs)
    if name == "cifar10":
        return CIFAR10(root, split=split, random_flip=flip, download=download)
    if name == "celeba":
        return CelebA(root, image_size=size, split=split, random_flip=flip, cache=cache, cache_dir=cache_dir)
    if split == "test" and folder_split == "train":
        folder_split = "test"  # evaluation's held-out images are the tree's test/ half, never the training images
    return ImageFolder(root, size, random_flip=flip, labels=labels, split=folder_split, cache=cache,
                       cache_dir=cache_dir)


__all__ = ["DATASETS", "build_dataset", "evenly_spaced", "class_names", "class_counts", "dataset_image_shape",
           "TwoScaleDataset", "CIFAR10", "CelebA", "ImageFolder"]

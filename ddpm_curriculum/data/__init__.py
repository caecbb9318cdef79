"""Datasets behind one registry. Every item is ``(image [C,H,W] float32, label int)``; natural images
are in [-1, 1]; labels are -1 where unknown. A labelled dataset has ``class_names`` (label order); an
unlabelled one has ``class_names = None``."""

from __future__ import annotations

from ..config import DatasetConfig
from ..errors import UserError
from .images import CIFAR10, CelebA, ImageFolder
from .twoscale import TwoScaleDataset

# name → dataset class. Each class declares ``default_size`` (None: dataset.image_size is required),
# ``fixed_size`` (the default is the only size), ``natural_images`` (random flips on by default),
# ``channels_of(dataset_config)`` and ``from_config(dataset_config, size, split, use_cache)``; its instances have
# ``image_shape`` (C, H, W), items ``(image, label)`` (see above) and ``class_names`` when labelled.
DATASETS = {"twoscale": TwoScaleDataset, "cifar10": CIFAR10, "celeba": CelebA, "image_folder": ImageFolder}
ALIASES = {"celeba32": ("celeba", 32), "celeba64": ("celeba", 64)}  # the seeds' names: a dataset at a fixed size


def dataset_names() -> list[str]:
    """Every valid ``dataset.name`` (the config's choices)."""
    return sorted(DATASETS) + sorted(ALIASES)


def _resolve(name: str, image_size: int | None) -> tuple[str, int | None]:
    if name in ALIASES:
        base, size = ALIASES[name]
        if image_size not in (None, size):
            raise UserError(f"dataset '{name}' is {size}x{size} but dataset.image_size = {image_size}; "
                            f"use dataset '{base}' with image_size {image_size}")
        return base, size
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; valid: {dataset_names()}")
    cls = DATASETS[name]
    if cls.fixed_size and image_size not in (None, cls.default_size):
        raise UserError(f"dataset '{name}' images are {cls.default_size}x{cls.default_size}; remove "
                        f"dataset.image_size = {image_size}")
    return name, image_size or cls.default_size


def dataset_shape(d: DatasetConfig) -> tuple[int, int, int]:
    """(C, H, W) of a configured dataset without touching the disk."""
    name, size = _resolve(d.name, d.image_size)
    if size is None:
        raise UserError(f"dataset '{name}' needs dataset.image_size")
    return (DATASETS[name].channels_of(d), size, size)


def dataset_from_config(d: DatasetConfig, split: str = "train", use_cache: bool = True):
    """The configured dataset's ``split`` (``train``/``test``; an image folder maps it onto its subfolders, see
    ``ImageFolder.from_config``), unflipped: flips are the trainer's, drawn per step (``default_flip``).
    ``use_cache`` False skips ``dataset.cache`` (lists files without decoding them, e.g. for ``--dry-run``)."""
    name, size = _resolve(d.name, d.image_size)
    return DATASETS[name].from_config(d, size, split, use_cache)


def default_flip(d: DatasetConfig) -> bool:
    """Whether training flips images: ``dataset.random_flip``, or when null the dataset's default."""
    return d.random_flip if d.random_flip is not None else DATASETS[_resolve(d.name, d.image_size)[0]].natural_images


def dataset_image_shape(name: str, image_size: int | None = None, channels: int = 3, **_) -> tuple[int, int, int]:
    """(C, H, W) of dataset ``name`` (``dataset_shape`` by keywords)."""
    return dataset_shape(DatasetConfig(name=name, image_size=image_size, channels=channels))


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


def build_dataset(name: str, *, split: str = "train", folder_split: str | None = None, **keys):
    """Dataset ``name`` built from ``dataset`` config keys given as keywords (``root``, ``image_size``, ``labels``,
    ``cache``, the twoscale keys …; ``folder_split`` is ``dataset.split``), for scripts and tests."""
    return dataset_from_config(DatasetConfig(name=name, split=folder_split, **keys), split)


__all__ = ["DATASETS", "ALIASES", "dataset_names", "dataset_shape", "dataset_from_config", "default_flip",
           "build_dataset", "evenly_spaced", "class_names", "class_counts", "dataset_image_shape",
           "TwoScaleDataset", "CIFAR10", "CelebA", "ImageFolder"]

"""The reference side of an evaluation: precomputed statistics, a folder/npz of images, or a dataset config
(whose statistics are cached on disk, keyed by everything that changes them)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..errors import UserError
from ..metrics.fid import load_stats, save_stats
from .sources import DatasetImages


@dataclass
class Reference:
    description: str
    num_images: int | None = None  # None: a statistics file that does not record it
    shape: tuple | None = None  # (H, W, C) of the reference images; None for statistics files
    mu: np.ndarray | None = None  # [dims]
    sigma: np.ndarray | None = None  # [dims, dims]
    features: torch.Tensor | None = None  # [n, dims] of the first images, for precision/recall
    dataset: object | None = None  # the dataset object (twoscale oracle metrics)
    cache: Path | None = None  # where dataset statistics were cached
    source: object | None = None  # the image source (folder / npz / dataset); None for statistics files


def from_stats_file(path: str | Path, dims: int) -> Reference:
    """``--ref-stats``: ``mu``/``sigma`` (+ ``features``, ``num_images`` when written by --save-stats)."""
    data = load_stats(path)
    if data["mu"].shape[0] != dims:
        raise UserError(f"reference statistics {path} have {data['mu'].shape[0]} dims but --dims is {dims}; "
                        f"pass --dims {data['mu'].shape[0]} or recompute the statistics at {dims} dims")
    features = data.get("features")
    if features is not None and (features.ndim != 2 or features.shape[1] != dims):
        raise UserError(f"{path}: 'features' has shape {list(features.shape)}, expected [n, {dims}]")
    num = int(data["num_images"]) if "num_images" in data else None
    return Reference(f"statistics {path}", num, None, data["mu"].astype(np.float64),
                     data["sigma"].astype(np.float64),
                     None if features is None else torch.from_numpy(features.astype(np.float32)))


def from_images(source, extract, keep: int) -> Reference:
    """A folder / npz / dataset of reference images; ``extract(source, keep, desc)`` → ``Features``."""
    ref = Reference(source.description, len(source), tuple(source.shape),
                    dataset=getattr(source, "dataset", None), source=source)
    if extract is not None:
        feats = extract(source, keep, "reference features")
        ref.mu, ref.sigma = feats.stats.mean_cov()
        ref.features = feats.kept
    return ref


def file_fingerprint(path: str | Path) -> str:
    """sha256 prefix of a file's contents (identifies the Inception weights in cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ddpm_curriculum/ref_stats`` (default ``~/.cache/ddpm_curriculum/ref_stats``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddpm_curriculum" / "ref_stats"


def dataset_cache_path(cache_dir: Path, cfg, split: str, limit: int | None, dims: int, keep: int,
                       weights_id: str) -> Path:
    key = {"dataset": cfg.to_dict()["dataset"], "split": split, "limit": limit, "dims": dims, "keep": keep,
           "weights": weights_id, "subset": "evenly_spaced"}  # a limit picks evenly spaced images (not the first N)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{cfg.dataset.name}-{split}-d{dims}-{digest}.npz"


def from_dataset(source: DatasetImages, cfg, split: str, limit: int | None, extract, keep: int, dims: int,
                 cache_dir: Path, weights_id: str) -> Reference:
    """``--dataset-config``: the dataset's statistics, read from the cache or computed and cached (rank 0
    writes; the key covers the dataset section, split, image count, dims, kept features and weights)."""
    path = dataset_cache_path(cache_dir, cfg, split, limit, dims, keep, weights_id)
    if path.is_file():
        data = load_stats(path)
        return Reference(source.description, int(data["num_images"]), tuple(source.shape), data["mu"],
                         data["sigma"], torch.from_numpy(data["features"]), source.dataset, path, source)
    ref = from_images(source, extract, keep)
    if dist.is_main():
        save_stats(path, ref.mu, ref.sigma, features=ref.features.numpy(), num_images=ref.num_images)
    ref.cache = path
    return ref

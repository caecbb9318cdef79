"""Inception features of an image source, split over ranks and combined exactly.

Rank r takes images r, r + W, r + 2W, … (W = world size). Statistics are float64 sums, so the all-reduce
gives the same mean and covariance as one process (up to summation order, ≈1e-16). The features of the
first ``keep`` images (for precision/recall) are gathered in index order, so they too are independent of
the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import dist
from ..errors import UserError
from ..metrics.fid import FeatureStats
from ..metrics.inception import no_tf32


def inception_input(images: np.ndarray, device) -> torch.Tensor:
    """uint8 [B, H, W, C] (C = 1 or 3) → float [B, 3, H, W] in [0, 1] on ``device`` (gray → 3 equal channels)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def raise_on_any_rank(error: str | None) -> None:
    """Collective: if any rank hit a UserError, every rank raises it (instead of the others hanging in the
    next collective)."""
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        raise UserError(errors[0])


@dataclass
class Features:
    stats: FeatureStats  # over all images, reduced over ranks
    kept: torch.Tensor  # [min(keep, N), dims] float32 on the CPU: images 0 … keep−1 in index order


def _extract_local(source, model, dims, batch_size, device, keep, progress, desc):
    from tqdm.auto import tqdm

    mine = list(range(dist.rank(), len(source), dist.world_size()))
    stats = FeatureStats(dims, device)
    kept: list[tuple[int, torch.Tensor]] = []
    bar = tqdm(total=len(mine), unit="img", desc=desc, disable=not (progress and dist.is_main()),
               dynamic_ncols=True, leave=False)
    with torch.no_grad(), no_tf32():
        for lo in range(0, len(mine), batch_size):
            idx = mine[lo:lo + batch_size]
            feats = model(inception_input(source.load(idx), device), dims=(dims,))[dims]  # [B, dims]
            stats.update(feats)
            kept += [(i, f) for i, f in zip(idx, feats.float().cpu(), strict=True) if i < keep]
            bar.update(len(idx))
    bar.close()
    return stats, kept


def extract_features(source, model, dims: int, batch_size: int, device, keep: int = 0,
                     progress: bool = False, desc: str = "features") -> Features:
    """Collective: features of every image of ``source`` → float64 statistics, plus the first ``keep``."""
    stats, kept, error = None, [], None
    try:
        stats, kept = _extract_local(source, model, dims, batch_size, device, keep, progress, desc)
    except UserError as exc:  # e.g. an unreadable file found by one rank only
        error = str(exc)
    raise_on_any_rank(error)
    stats.all_reduce()
    if dist.world_size() > 1:
        kept = [item for part in dist.all_gather_object(kept) for item in part]
    kept.sort(key=lambda item: item[0])
    rows = torch.stack([f for _, f in kept]) if kept else torch.zeros(0, dims)
    return Features(stats, rows)

"""Unstructured masks: magnitude (per layer or global) and random (the control of seed 003).

Each function takes ``{name: module}`` (from ``masks.select_layers``) and returns ``{name: bool mask}``
without touching the weights; ``masks.apply_masks`` zeroes them. Exactly ``round(ratio · numel)``
entries are pruned (per layer, or over all layers together for ``scope="global"``); among equal
magnitudes the earlier entry (row-major) is pruned first, so the result is deterministic.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

SCOPES = ("layer", "global")


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"pruning ratio {ratio} must be in [0, 1) (the share of weights set to zero)")


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool keep-mask of a flat ``scores`` vector with its ``count`` lowest entries pruned (stable)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.sort(scores, stable=True).indices[:count]] = False
    return keep


def magnitude_masks(layers: dict[str, nn.Module], ratio: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Prune the smallest |w|: ``ratio`` of each layer (``layer``) or of all layers pooled (``global``)."""
    _check_ratio(ratio)
    if scope not in SCOPES:
        raise UserError(f"unknown magnitude scope {scope!r}; choose one of {list(SCOPES)}")
    weights = {name: m.weight.detach().float().cpu() for name, m in layers.items()}
    if scope == "layer":
        return {name: _prune_lowest(w.abs().flatten(), round(ratio * w.numel())).reshape(w.shape)
                for name, w in weights.items()}
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    keep = _prune_lowest(flat, round(ratio * flat.numel()))
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = keep[start:start + w.numel()].reshape(w.shape)
        start += w.numel()
    return out


def random_masks(layers: dict[str, nn.Module], ratio: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Prune ``round(ratio · numel)`` uniformly random entries of each layer (seeded)."""
    _check_ratio(ratio)
    g = torch.Generator().manual_seed(seed)
    return {name: _prune_lowest(torch.rand(m.weight.numel(), generator=g), round(ratio * m.weight.numel()))
            .reshape(m.weight.shape) for name, m in layers.items()}

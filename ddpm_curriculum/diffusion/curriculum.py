"""Timestep curriculum: a GaussianDiffusion whose training timesteps are drawn from a sub-range of [0, T−1]."""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from .gaussian import GaussianDiffusion

_TOL = 1e-9  # absorbs float error in t·T, e.g. 0.8·1000 or 0.29·100 = 28.999999999999996


def time_range_indices(t_min: float, t_max: float, timesteps: int) -> tuple[int, int]:
    """Integer timesteps (lo, hi), both inclusive, of the stage with noise-level fractions [t_min, t_max).

    Rule: the stage trains on the integers t with t_min·T ≤ t < t_max·T, i.e.
        lo = ceil(t_min·T),  hi = ceil(t_max·T) − 1,
    each product rounded with a 1e-9 tolerance. So t_max = 1 includes T−1 and adjacent stages
    (a, b), (b, c) never share a timestep. With T = 1000: (0.8, 1.0) → 800..999, (0.0, 1.0) → 0..999.
    Raises UserError unless 0 ≤ t_min < t_max ≤ 1 and the range holds at least one integer.
    """
    if int(timesteps) != timesteps or timesteps < 1:
        raise UserError(f"timesteps = {timesteps} must be a positive integer")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise UserError(f"time range ({t_min}, {t_max}) is invalid; need 0 <= t_min < t_max <= 1")
    lo = math.ceil(t_min * timesteps - _TOL)
    hi = math.ceil(t_max * timesteps - _TOL) - 1
    if hi < lo:
        raise UserError(f"time range ({t_min}, {t_max}) holds no integer timestep for T={timesteps}; widen it")
    return lo, hi


class CurriculumDiffusion(GaussianDiffusion):
    """GaussianDiffusion plus a current training time range (default: all of 0..T−1).

    ``set_time_range(0.8, 1.0)`` restricts ``sample_timesteps`` to the high-noise stage; sampling and the
    loss are unaffected (the network is always called with absolute timesteps 0..T−1).
    """

    def __init__(self, betas, prediction_type: str = "eps", var_type: str = "fixed-small", loss_type: str = "mse"):
        super().__init__(betas, prediction_type, var_type, loss_type)
        self.set_time_range(0.0, 1.0)

    def set_time_range(self, t_min: float, t_max: float) -> None:
        """Train on the fractions [t_min, t_max) of T; see ``time_range_indices`` for the integer rule."""
        self._range = time_range_indices(t_min, t_max, self.timesteps)
        self.t_min, self.t_max = float(t_min), float(t_max)

    @property
    def time_range(self) -> tuple[int, int]:
        """Current (lo, hi) integer timesteps, both inclusive."""
        return self._range

    def sample_timesteps(self, batch_size: int, device="cpu", generator=None) -> torch.Tensor:
        """t ~ Uniform{lo, …, hi} → LongTensor [batch_size] on ``device``, drawn with ``generator``."""
        lo, hi = self._range
        return torch.randint(lo, hi + 1, (batch_size,), device=device, generator=generator)

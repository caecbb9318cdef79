"""Timestep curriculum: a GaussianDiffusion whose training timesteps are drawn from a sub-range of [0, T−1]
(bounds as fractions of T or of the log-SNR range), or from a fixed histogram."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UserError
from .gaussian import GaussianDiffusion
from .seed_api import translate
from .timestep_sampling import logsnr_range_indices, sample_from_probs

SPACES = ("t", "logsnr")

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
    loss are unaffected (the network is always called with absolute timesteps 0..T−1). ``space`` says what
    the bounds are fractions of: ``t`` (``time_range_indices``) or ``logsnr`` (``logsnr_range_indices``).
    ``set_timestep_probs(p)`` replaces the uniform draw by i.i.d. draws from a histogram p [T].

    Seed 001's ``CurriculumDiffusion(betas=betas, **config)`` works too: ``config`` may be the ddpm-torch
    ``diffusion`` section (``model_mean_type``, ``model_var_type``, ``loss_type``, and ``timesteps``/``beta_*``,
    which must describe ``betas``); see ``seed_api.py``.
    """

    def __init__(self, betas, prediction_type: str = "eps", var_type: str = "fixed-small", loss_type: str = "mse",
                 space: str = "t", **config):
        if config:
            prediction_type, var_type = translate(betas, prediction_type, var_type, loss_type, config,
                                                  ("eps", "fixed-small"))
        super().__init__(betas, prediction_type, var_type, loss_type)
        if space not in SPACES:
            raise UserError(f"unknown curriculum space {space!r}; choose one of {list(SPACES)}")
        self.space = space
        self._probs, self._cdf = None, {}
        self.set_time_range(0.0, 1.0)

    def range_indices(self, t_min: float, t_max: float) -> tuple[int, int]:
        """Inclusive integer timesteps (lo, hi) of the bounds (t_min, t_max) in this diffusion's ``space``."""
        if self.space == "logsnr":
            return logsnr_range_indices(t_min, t_max, self.alphas_bar)
        return time_range_indices(t_min, t_max, self.timesteps)

    def set_time_range(self, t_min: float, t_max: float) -> None:
        """Train on the fractions [t_min, t_max) of T (or of the log-SNR range); see ``range_indices``."""
        self._range = self.range_indices(t_min, t_max)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def set_timestep_probs(self, probs) -> None:
        """Draw t i.i.d. from ``probs`` (array-like [T], sums to 1) instead of the time range; None undoes it."""
        if probs is None:
            self._probs, self._cdf = None, {}
            return
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape != (self.timesteps,) or (probs < 0).any() or abs(probs.sum() - 1.0) > 1e-6:
            raise UserError(f"timestep probabilities must be {self.timesteps} non-negative numbers summing to 1")
        self._probs, self._cdf = probs, {}

    @property
    def time_range(self) -> tuple[int, int]:
        """Current (lo, hi) integer timesteps, both inclusive (the histogram's support when one is set)."""
        if self._probs is not None:
            support = np.flatnonzero(self._probs > 0)
            return int(support[0]), int(support[-1])
        return self._range

    def sample_timesteps(self, batch_size: int, device="cpu", generator=None) -> torch.Tensor:
        """t ~ Uniform{lo, …, hi} (or the histogram) → LongTensor [batch_size] on ``device``, drawn with
        ``generator``."""
        if self._probs is not None:
            device = torch.device(device)
            if device not in self._cdf:
                cdf = np.cumsum(self._probs)
                self._cdf[device] = torch.from_numpy(cdf / cdf[-1]).to(device)
            return sample_from_probs(self._cdf[device], batch_size, generator)
        lo, hi = self._range
        return torch.randint(lo, hi + 1, (batch_size,), device=device, generator=generator)

"""Timestep curriculum: a GaussianDiffusion whose training timesteps are drawn from a sub-range of [0, T−1]
(bounds as fractions of T or of the log-SNR range), or from a fixed histogram."""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from .gaussian import GaussianDiffusion
from .seed_api import translate
from .timestep_sampling import TimestepSampler, check_probs, logsnr_range_indices

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
        self._probs, self._samplers = None, {}
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
        self._samplers = {}

    def set_timestep_probs(self, probs) -> None:
        """Draw t i.i.d. from ``probs`` (array-like [T], sums to 1) instead of the time range; None undoes it."""
        self._probs = None if probs is None else check_probs(probs, self.timesteps)
        self._samplers = {}

    def timestep_sampler(self, device="cpu") -> TimestepSampler:
        """The stateless sampler of the current range or histogram (the trainer builds its own per stage)."""
        device = torch.device(device)
        if device not in self._samplers:
            self._samplers[device] = TimestepSampler(*self._range) if self._probs is None else \
                TimestepSampler.for_stage(self, self.t_min, self.t_max, self._probs, device)
        return self._samplers[device]

    @property
    def time_range(self) -> tuple[int, int]:
        """Current (lo, hi) integer timesteps, both inclusive (the histogram's support when one is set)."""
        return self.timestep_sampler().time_range

    def sample_timesteps(self, batch_size: int, device="cpu", generator=None) -> torch.Tensor:
        """t ~ Uniform{lo, …, hi} (or the histogram) → LongTensor [batch_size] on ``device``, drawn with
        ``generator``."""
        return self.timestep_sampler(device).sample(batch_size, device=device, generator=generator)

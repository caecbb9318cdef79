"""Which timesteps a step trains and how much each counts: loss weights, the matched-histogram sampler
and log-SNR stage bounds.

A curriculum changes two things at once: the *order* in which noise levels are seen and the
*training-averaged* distribution of t. The baselines here separate the two:

* **Loss weights** w(t), returned with t and multiplied into the per-sample loss (no forked trainer).
  Each scheme is defined as a weight on the ε-MSE and converted to the network's parameterisation with
  ‖x0 − x0_pred‖² = ‖ε − eps_pred‖²/snr and ‖v − v_pred‖² = ‖ε − eps_pred‖²·(snr + 1)/snr, so the objective
  is the same whatever the network predicts:

      w_eps(snr)            min_snr (Hang et al. 2023)     p2 (Choi et al. 2022)
      eps:  w_eps           min(1, γ/snr)                   1/(k + snr)^γ
      x0:   w_eps·snr       min(snr, γ)                     snr/(k + snr)^γ
      v:    w_eps·snr/(snr+1)  min(snr, γ)/(snr + 1)        snr/((snr + 1)(k + snr)^γ)

  (the min_snr rows are REFERENCE §2's published formulas, which this conversion reproduces).
* **matched_histogram**: t i.i.d. from the histogram that a curriculum's stage plan produces over the
  whole run, p(t) = Σ_k (L_k/L)·U(t; lo_k, hi_k), with L_k the stage lengths in steps.
* **log-SNR stage bounds**: a stage (f_min, f_max) trains the t whose position u(t) on the log-SNR axis,
  u(t) = (logsnr(0) − logsnr(t))/(logsnr(0) − logsnr(T−1)) ∈ [0, 1] (0 = least noise), satisfies
  f_min ≤ u(t) < f_max (f_max = 1 includes T−1), mirroring the t-space rule t_min·T ≤ t < t_max·T.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError

_TOL = 1e-9


def _min_snr_eps(snr: np.ndarray, gamma: float = 5.0, **_) -> np.ndarray:
    return np.minimum(1.0, gamma / snr)


def _p2_eps(snr: np.ndarray, k: float = 1.0, gamma: float = 1.0, **_) -> np.ndarray:
    return 1.0 / (k + snr) ** gamma


# ε-loss weight of each scheme, as a function of snr (float64 arrays of shape [T]).
LOSS_WEIGHTINGS = {"min_snr": _min_snr_eps, "p2": _p2_eps}

# Factor that turns an ε-loss weight into the weight on the loss of each parameterisation.
PREDICTION_FACTORS = {
    "eps": lambda snr: np.ones_like(snr),
    "x0": lambda snr: snr,
    "v": lambda snr: snr / (snr + 1.0),
}


def loss_weight_table(kind: str, snr: np.ndarray, prediction_type: str, **params) -> np.ndarray:
    """w(t) for every t: ``snr`` float64 [T] → float64 [T] (see the module docstring for the formulas)."""
    if kind not in LOSS_WEIGHTINGS:
        raise UserError(f"unknown loss weighting {kind!r}; choose one of {['none', *LOSS_WEIGHTINGS]}")
    if prediction_type not in PREDICTION_FACTORS:
        raise UserError(f"unknown prediction type {prediction_type!r}; choose one of {list(PREDICTION_FACTORS)}")
    snr = np.asarray(snr, dtype=np.float64)
    return LOSS_WEIGHTINGS[kind](snr, **params) * PREDICTION_FACTORS[prediction_type](snr)


class LossWeights:
    """Per-sample loss weights w(t) gathered from a float64 table: ``weights(t [B]) → float32 [B]``."""

    def __init__(self, table: np.ndarray):
        self.table = np.asarray(table, dtype=np.float64)
        self._cache: dict = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.device not in self._cache:
            self._cache[t.device] = torch.from_numpy(self.table).float().to(t.device)
        return self._cache[t.device][t]


def make_loss_weights(kind: str, diffusion, **params) -> LossWeights | None:
    """The weighting ``kind`` for ``diffusion`` (its snr table and prediction type); None for ``none``."""
    if kind == "none":
        return None
    return LossWeights(loss_weight_table(kind, diffusion.snr_table, diffusion.prediction_type, **params))


def matched_histogram(ranges: list[tuple[int, int]], lengths: list[int], timesteps: int) -> np.ndarray:
    """Training-averaged distribution of t of a stage plan: p(t) = Σ_k (L_k/ΣL)·1[lo_k ≤ t ≤ hi_k]/(hi_k−lo_k+1).

    ``ranges``: (lo, hi) inclusive integer range of each stage; ``lengths``: its length in steps.
    Returns float64 [timesteps] summing to 1.
    """
    if len(ranges) != len(lengths) or not ranges or min(lengths) <= 0:
        raise UserError("matched_histogram needs one positive length per stage range")
    probs = np.zeros(timesteps, dtype=np.float64)
    total = float(sum(lengths))
    for (lo, hi), length in zip(ranges, lengths, strict=True):
        probs[lo:hi + 1] += length / total / (hi - lo + 1)
    return probs


def sample_from_probs(probs_cdf: torch.Tensor, batch_size: int, generator=None) -> torch.Tensor:
    """Inverse-CDF draw of ``batch_size`` timesteps from a float64 CDF [T] (on the target device) → long [B]."""
    u = torch.rand(batch_size, generator=generator, device=probs_cdf.device, dtype=torch.float64)
    return torch.searchsorted(probs_cdf, u, right=True).clamp_(max=len(probs_cdf) - 1)


@dataclass(frozen=True)
class TimestepSampler:
    """Which t the training steps of one stage draw, with no state (in the manner of improved-diffusion's
    ScheduleSampler): uniform over ``lo … hi`` (both inclusive), or i.i.d. from a histogram given by its float64
    CDF [T] on the device (``cdf``; ``lo``/``hi`` are then its support). The trainer gets one per stage from the
    stage plan (``for_stage``), so nothing has to be set again at a stage start or after a resume."""

    lo: int
    hi: int
    cdf: torch.Tensor | None = None

    @classmethod
    def for_stage(cls, diffusion, t_min: float, t_max: float, probs=None, device="cpu") -> TimestepSampler:
        """The stage (t_min, t_max) of ``diffusion``'s curriculum space, or the histogram ``probs`` [T] (whose
        support then replaces the range; ``check_probs``)."""
        if probs is None:
            return cls(*diffusion.range_indices(t_min, t_max))
        probs = check_probs(probs, diffusion.timesteps)
        support, cdf = np.flatnonzero(probs > 0), np.cumsum(probs)
        return cls(int(support[0]), int(support[-1]), torch.from_numpy(cdf / cdf[-1]).to(device))

    @property
    def time_range(self) -> tuple[int, int]:
        return self.lo, self.hi

    def sample(self, batch_size: int, device="cpu", generator=None) -> torch.Tensor:
        """t → LongTensor [batch_size] on ``device`` (the CDF's device for a histogram), drawn with ``generator``."""
        if self.cdf is not None:
            return sample_from_probs(self.cdf, batch_size, generator)
        return torch.randint(self.lo, self.hi + 1, (batch_size,), device=device, generator=generator)


def check_probs(probs, timesteps: int) -> np.ndarray:
    """``probs`` as float64 [T]; UserError unless it is T non-negative numbers summing to 1."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (timesteps,) or (probs < 0).any() or abs(probs.sum() - 1.0) > 1e-6:
        raise UserError(f"timestep probabilities must be {timesteps} non-negative numbers summing to 1")
    return probs


def logsnr_positions(alphas_bar: np.ndarray) -> np.ndarray:
    """u(t) ∈ [0, 1]: position of each t on the log-SNR axis, 0 at t = 0 (least noise), 1 at t = T−1."""
    logsnr = np.log(alphas_bar) - np.log1p(-alphas_bar)
    return (logsnr[0] - logsnr) / (logsnr[0] - logsnr[-1])


def logsnr_range_indices(f_min: float, f_max: float, alphas_bar: np.ndarray) -> tuple[int, int]:
    """Integer timesteps (lo, hi), both inclusive, with f_min ≤ u(t) < f_max (f_max = 1 includes T−1).

    Raises UserError unless 0 ≤ f_min < f_max ≤ 1 and the range holds at least one timestep.
    """
    if not 0.0 <= f_min < f_max <= 1.0:
        raise UserError(f"log-SNR range ({f_min}, {f_max}) is invalid; need 0 <= f_min < f_max <= 1")
    u = logsnr_positions(alphas_bar)
    if not np.all(np.diff(u) > 0):
        raise UserError("the β schedule's log-SNR is not strictly decreasing in t; use curriculum.space 't'")
    inside = (u >= f_min - _TOL) & ((u < f_max - _TOL) | (f_max >= 1.0))
    idx = np.flatnonzero(inside)
    if len(idx) == 0:
        raise UserError(f"log-SNR range ({f_min}, {f_max}) holds no timestep for T={len(alphas_bar)}; widen it")
    return int(idx[0]), int(idx[-1])

"""β schedules β_0 … β_{T−1} (float64 numpy arrays of shape [T]).

Index t = 0 … T−1 is the paper's step t+1: ᾱ_t = ∏_{s≤t} (1 − β_s). Every schedule is computed in float64;
casting to the network dtype happens only when a value is gathered for a batch.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserError

COSINE_S = 0.008  # Nichol & Dhariwal's offset that keeps β_0 from being vanishingly small
MAX_BETA = 0.999  # cap for the cosine schedule, whose last β would otherwise be 1


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """DDPM (Ho et al. 2020): β evenly spaced from ``beta_start`` to ``beta_end``."""
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def quad_betas(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """√β evenly spaced (ddpm-torch ``quad`` = diffusers ``scaled_linear``)."""
    return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), timesteps, dtype=np.float64) ** 2


def cosine_betas(timesteps: int, beta_start: float = 0.0, beta_end: float = 0.0) -> np.ndarray:
    """Nichol & Dhariwal 2021: ᾱ(u) = cos²((u + s)/(1 + s)·π/2), β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999).

    ``beta_start``/``beta_end`` are ignored (accepted so every schedule has one signature).
    """
    u = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    alpha_bar = np.cos((u + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], MAX_BETA)


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "quad": quad_betas}


def make_betas(schedule: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """β schedule ``schedule`` (a key of ``BETA_SCHEDULES``) → float64 array of shape [timesteps]."""
    if schedule not in BETA_SCHEDULES:
        raise UserError(f"unknown beta schedule '{schedule}'; choose one of {list(BETA_SCHEDULES)}")
    if int(timesteps) != timesteps or timesteps < 1:
        raise UserError(f"timesteps = {timesteps} must be a positive integer")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise UserError(f"need 0 < beta_start ({beta_start}) <= beta_end ({beta_end}) < 1; fix the β range")
    return BETA_SCHEDULES[schedule](int(timesteps), float(beta_start), float(beta_end))

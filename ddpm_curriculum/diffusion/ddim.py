"""DDIM sampling (Song, Meng & Ermon 2021, arXiv 2010.02502) on a GaussianDiffusion; the model is passed in.

Notation: ᾱ_t = ``alpha_bar``, ᾱ_prev = ``alpha_bar_prev`` at the previous kept timestep (1 past the end),
x0_pred / eps_pred = the network's estimates of x0 and ε, σ_t = ``sigma``, η = ``eta``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UserError


def _uniform(n: int, steps: int) -> np.ndarray:
    """floor(i·n/S), i = 0…S−1: distinct because n/S ≥ 1; equals range(0, n, n//S) when S divides n."""
    return np.arange(steps, dtype=np.int64) * n // steps


def _quadratic(n: int, steps: int) -> np.ndarray:
    """round((linspace(0, √c, S))²) with c = min(0.8·n, n−1), collisions bumped up by one.

    Bumping keeps the values ≤ n−1: round(q_j) + (S−1−j) is an integer below the convex q_j + S−1−j + ½,
    whose ends are S−1+½ and c+½, both < n.
    """
    c = min(0.8 * n, n - 1.0)
    t = np.round(np.linspace(0.0, math.sqrt(c), steps) ** 2).astype(np.int64)
    for i in range(1, steps):
        t[i] = max(t[i], t[i - 1] + 1)
    return t


DDIM_SKIP_TYPES = {"uniform": _uniform, "quadratic": _quadratic}


def ddim_timesteps(timesteps: int, steps: int, skip_type: str = "uniform", t_max: int | None = None) -> np.ndarray:
    """The S = ``steps`` timesteps DDIM visits → int64 array [S], ascending, distinct, starting at 0.

    ``uniform``: floor(i·n/S) (the DDIM paper's range(0, n, n/S), correct length when S does not divide n);
    ``quadratic``: the paper's (linspace(0, √(0.8n), S))² rounded, de-duplicated by bumping collisions upward.
    n = T by default; ``t_max`` (≤ T−1) sets n = t_max + 1 to start from a lower noise level.
    """
    if skip_type not in DDIM_SKIP_TYPES:
        raise UserError(f"unknown DDIM skip type '{skip_type}'; choose one of {list(DDIM_SKIP_TYPES)}")
    n = timesteps if t_max is None else t_max + 1
    if not 1 <= n <= timesteps:
        raise UserError(f"t_max = {t_max} is outside [0, {timesteps - 1}]; pick a valid timestep")
    if not 1 <= steps <= n:
        raise UserError(f"DDIM steps = {steps} must be in [1, {n}] (the timesteps available); change steps")
    return DDIM_SKIP_TYPES[skip_type](n, steps)


def ddim_step(diffusion, model_out: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int, eta: float = 0.0,
              noise: torch.Tensor | None = None, clip_denoised: bool = True):
    """One DDIM update x_t → x_{t_prev}.  model_out, x_t, noise: [B, …]; t, t_prev: ints (t_prev = −1: ᾱ_prev = 1).

    ``clip_denoised`` clamps x0_pred to [−1, 1] and recomputes eps_pred from it (diffusers' ``clip_sample``
    with ``use_clipped_model_output=True``), so the step stays on the line through x_t and the clipped x0.
    ``noise`` (z ~ N(0, I)) is required when eta > 0.  Returns (x_prev [B, …], x0_pred [B, …]).
    """
    alpha_bar = float(diffusion.alphas_bar[t])
    alpha_bar_prev = 1.0 if t_prev < 0 else float(diffusion.alphas_bar[t_prev])
    # eq. 12, first term: x0_pred = (x_t − √(1−ᾱ_t)·eps_pred)/√ᾱ_t, via the prediction type
    x0_pred = diffusion.predict_x0(x_t, t, model_out)
    if clip_denoised:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
        eps_pred = diffusion.eps_from_x0(x_t, t, x0_pred)
    else:
        eps_pred = diffusion.predict_eps(x_t, t, model_out)
    # eq. 16: σ_t(η) = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev)
    sigma = eta * math.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev))
    # eq. 12: x_prev = √ᾱ_prev·x0_pred + √(1−ᾱ_prev−σ_t²)·eps_pred + σ_t·z
    x_prev = math.sqrt(alpha_bar_prev) * x0_pred + math.sqrt(max(1.0 - alpha_bar_prev - sigma**2, 0.0)) * eps_pred
    if sigma > 0:
        if noise is None:
            raise UserError("ddim_step with eta > 0 needs `noise`; pass torch.randn_like(x_t)")
        x_prev = x_prev + sigma * noise
    return x_prev, x0_pred


@torch.no_grad()
def ddim_sample(diffusion, model, x_T: torch.Tensor, steps: int, eta: float = 0.0, skip_type: str = "uniform",
                generator=None, progress: bool = False, clip_denoised: bool = True,
                t_max: int | None = None, noise_fn=None) -> torch.Tensor:
    """DDIM from x_T [B, …] (at the last of ``ddim_timesteps(T, steps, skip_type, t_max)``) → x0 [B, …].

    η = 0 is deterministic; η > 0 draws z with ``generator`` on x_T's device at every step, or calls
    ``noise_fn()`` → z [B, …] instead when given. See ``ddim_step`` for ``clip_denoised``.
    """
    seq = ddim_timesteps(diffusion.timesteps, steps, skip_type, t_max).tolist()
    pairs = list(zip(seq, [-1] + seq[:-1], strict=True))[::-1]
    if progress:
        from tqdm.auto import tqdm
        pairs = tqdm(pairs, desc=f"ddim-{steps}", leave=False)
    x = x_T
    for t, t_prev in pairs:
        model_out = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        noise = None
        if eta > 0:
            noise = noise_fn() if noise_fn is not None else \
                torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x, _ = ddim_step(diffusion, model_out, x, t, t_prev, eta, noise, clip_denoised)
    return x

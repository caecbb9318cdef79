"""The DDPM forward/reverse process as a plain object; the network is passed into each method.

Notation (index t = 0 … T−1 is the paper's step t+1):
    β_t, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s (``alphas_bar``), ᾱ_{t−1} with ᾱ_{−1} = 1 (``alphas_bar_prev``),
    x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (``q_sample``), snr_t = ᾱ_t/(1−ᾱ_t),
    v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho 2022).
Schedules are float64 numpy arrays of shape [T]; a value is gathered for a batch and only then cast to the
input's dtype. ``t`` arguments are a LongTensor [B] on the input's device (the model convention
``model(x_t, t)``), or a Python int meaning the same timestep for the whole batch.
Tensors written [B, …] have any number of trailing dims (e.g. [B, C, H, W]).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError

PREDICTION_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixed-small", "fixed-large")
LOSSES = {"mse": lambda diff: diff.square(), "l1": lambda diff: diff.abs()}


def _check_choice(kind: str, value: str, choices) -> None:
    if value not in choices:
        raise UserError(f"unknown {kind} '{value}'; choose one of {list(choices)}")


class GaussianDiffusion:
    """DDPM math: q_sample, x0/ε conversions, posterior, training loss and ancestral sampling.

    Args:
        betas: β schedule, array-like of shape [T] with values in (0, 1].
        prediction_type: what the network outputs: ``eps`` (ε), ``x0`` or ``v``.
        var_type: reverse variance σ_t²: ``fixed-small`` (posterior β̃_t) or ``fixed-large`` (β_t, with β̃_1 at
            t = 0 as in DDPM/ddpm-torch, so the log-variance stays finite).
        loss_type: ``mse`` or ``l1`` between network output and ``target``.
    """

    def __init__(self, betas, prediction_type: str = "eps", var_type: str = "fixed-small", loss_type: str = "mse"):
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("var_type", var_type, VAR_TYPES)
        _check_choice("loss_type", loss_type, LOSSES)
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1 or not ((betas > 0) & (betas <= 1)).all():
            raise UserError("betas must be a 1-D array of values in (0, 1]; build them with make_betas()")
        self.prediction_type, self.var_type, self.loss_type = prediction_type, var_type, loss_type
        self.timesteps = len(betas)
        self._tables: dict = {}
        self._init_schedules(betas)

    def _init_schedules(self, betas: np.ndarray) -> None:
        """All per-timestep constants, float64 arrays of shape [T]."""
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_bar = np.cumprod(self.alphas)
        self.alphas_bar_prev = np.append(1.0, self.alphas_bar[:-1])
        self.sqrt_alphas_bar = np.sqrt(self.alphas_bar)
        self.sqrt_one_minus_alphas_bar = np.sqrt(1.0 - self.alphas_bar)
        self.sqrt_recip_alphas_bar = np.sqrt(1.0 / self.alphas_bar)
        self.sqrt_recipm1_alphas_bar = np.sqrt(1.0 / self.alphas_bar - 1.0)
        self.snr_table = self.alphas_bar / (1.0 - self.alphas_bar)
        # q(x_{t−1} | x_t, x0) = N(coef1·x0 + coef2·x_t, β̃_t) (DDPM eqs. 6–7); β̃_0 = 0.
        self.posterior_var = betas * (1.0 - self.alphas_bar_prev) / (1.0 - self.alphas_bar)
        self.posterior_log_var_clipped = np.log(np.append(self.posterior_var[1:2], self.posterior_var[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_bar_prev) / (1.0 - self.alphas_bar)
        self.posterior_mean_coef2 = (1.0 - self.alphas_bar_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_bar)
        if self.var_type == "fixed-small":
            self.model_var, self.model_log_var = self.posterior_var, self.posterior_log_var_clipped
        else:
            self.model_var = np.append(self.posterior_var[1:2], betas[1:])
            self.model_log_var = np.log(self.model_var)

    # ----- gathering -----

    def _table(self, name: str, device, dtype) -> torch.Tensor:
        """Schedule ``name`` cast (on the CPU, from float64) to ``dtype`` and moved to ``device``; cached."""
        key = (name, torch.device(device), dtype)
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(getattr(self, name)).to(dtype).to(device)
        return self._tables[key]

    def _coef(self, name: str, t, x: torch.Tensor):
        """Schedule ``name`` at ``t``: a float for int t, else [B, 1, …, 1] in x's dtype to broadcast with x."""
        if isinstance(t, (int, np.integer)):
            return float(getattr(self, name)[t])
        return self._table(name, x.device, x.dtype)[t].view(-1, *([1] * (x.dim() - 1)))

    def snr(self, t, dtype=torch.float32) -> torch.Tensor:
        """snr_t = ᾱ_t/(1−ᾱ_t) for t: LongTensor [B] → [B] of ``dtype`` (computed in float64, then cast)."""
        t = torch.as_tensor(t)
        return self._table("snr_table", t.device, dtype)[t]

    # ----- forward process and parameterisations -----

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε.  x0, noise: [B, …]; t: [B] → x_t [B, …]."""
        return self._coef("sqrt_alphas_bar", t, x0) * x0 + self._coef("sqrt_one_minus_alphas_bar", t, x0) * noise

    def target(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """What the network should output for x_t = q_sample(x0, t, noise): ε, x0 or v.  → [B, …]."""
        if self.prediction_type == "eps":
            return noise
        if self.prediction_type == "x0":
            return x0
        return self._coef("sqrt_alphas_bar", t, x0) * noise - self._coef("sqrt_one_minus_alphas_bar", t, x0) * x0

    def predict_x0(self, x_t: torch.Tensor, t, model_out: torch.Tensor) -> torch.Tensor:
        """x0_pred from the network output.  x_t, model_out: [B, …]; t: [B] → [B, …]."""
        if self.prediction_type == "eps":  # x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ
            return self._coef("sqrt_recip_alphas_bar", t, x_t) * x_t \
                - self._coef("sqrt_recipm1_alphas_bar", t, x_t) * model_out
        if self.prediction_type == "x0":
            return model_out
        # x0 = √ᾱ·x_t − √(1−ᾱ)·v
        return self._coef("sqrt_alphas_bar", t, x_t) * x_t - self._coef("sqrt_one_minus_alphas_bar", t, x_t) * model_out

    def predict_eps(self, x_t: torch.Tensor, t, model_out: torch.Tensor) -> torch.Tensor:
        """eps_pred from the network output.  x_t, model_out: [B, …]; t: [B] → [B, …]."""
        if self.prediction_type == "eps":
            return model_out
        if self.prediction_type == "x0":
            return self.eps_from_x0(x_t, t, model_out)
        # ε = √ᾱ·v + √(1−ᾱ)·x_t
        return self._coef("sqrt_alphas_bar", t, x_t) * model_out + self._coef("sqrt_one_minus_alphas_bar", t, x_t) * x_t

    def eps_from_x0(self, x_t: torch.Tensor, t, x0_pred: torch.Tensor) -> torch.Tensor:
        """ε = (x_t − √ᾱ·x0)/√(1−ᾱ), written as (x_t/√ᾱ − x0)/√(1/ᾱ − 1).  → [B, …]."""
        return (self._coef("sqrt_recip_alphas_bar", t, x_t) * x_t - x0_pred) \
            / self._coef("sqrt_recipm1_alphas_bar", t, x_t)

    # ----- posterior and reverse process -----

    def q_posterior_mean_var(self, x0: torch.Tensor, x_t: torch.Tensor, t):
        """q(x_{t−1} | x_t, x0) → (mean [B, …], var [B, 1, …], log_var [B, 1, …]).

        var is β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t (0 at t = 0); log_var uses β̃_1 at t = 0 so it stays finite.
        """
        mean = self._coef("posterior_mean_coef1", t, x_t) * x0 + self._coef("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._coef("posterior_var", t, x_t), self._coef("posterior_log_var_clipped", t, x_t)

    def p_mean_var(self, model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True) -> dict:
        """One network call → p(x_{t−1} | x_t).  x_t: [B, …]; t: LongTensor [B].

        Returns dict(mean [B, …], var, log_var (both [B, 1, …], from ``var_type``), x0_pred [B, …]).
        ``clip_denoised`` clamps x0_pred to [−1, 1] before it enters the posterior mean.
        """
        x0_pred = self.predict_x0(x_t, t, model(x_t, t))
        if clip_denoised:
            x0_pred = x0_pred.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_var(x0_pred, x_t, t)
        return {"mean": mean, "var": self._coef("model_var", t, x_t),
                "log_var": self._coef("model_log_var", t, x_t), "x0_pred": x0_pred}

    @torch.no_grad()
    def p_sample(self, model, x_t: torch.Tensor, t: torch.Tensor, generator=None,
                 clip_denoised: bool = True, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_{t−1} = mean + σ_t·z, z = ``noise`` or N(0, I) drawn with ``generator`` on x_t's device; no
        noise where t = 0.

        x_t, noise: [B, …]; t: LongTensor [B] → x_{t−1} [B, …].
        """
        out = self.p_mean_var(model, x_t, t, clip_denoised)
        z = noise if noise is not None else \
            torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_var"]) * z

    @torch.no_grad()
    def p_sample_loop(self, model, x_T: torch.Tensor, generator=None, progress: bool = False,
                      t_start: int | None = None, clip_denoised: bool = True, noise_fn=None) -> torch.Tensor:
        """Ancestral sampling from x_T [B, …] at timestep ``t_start`` (default T−1) down to t = 0 → x0 [B, …].

        ``noise_fn()`` → z [B, …], called once per step with t > 0, replaces the ``generator`` draws (e.g.
        per-image noise streams, ``ddpm_curriculum.sampling``).
        """
        t_start = self.timesteps - 1 if t_start is None else t_start
        if not 0 <= t_start < self.timesteps:
            raise UserError(f"t_start = {t_start} is outside [0, {self.timesteps - 1}]; pick a valid timestep")
        steps = range(t_start, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="ancestral", leave=False)
        x = x_T
        for t in steps:
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            # at t = 0 no noise is added, so no draw is spent on it
            noise = None if noise_fn is None else (noise_fn() if t > 0 else torch.zeros_like(x))
            x = self.p_sample(model, x, t_batch, generator, clip_denoised, noise)
        return x

    # ----- training -----

    def training_losses(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                        weights: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss  w·mean_{C,H,W} loss(model(x_t, t[, y]), target).  x0: [B, …]; t: LongTensor [B];
        noise: [B, …] (default fresh N(0, I)); weights: [B] or None; y: class labels [B] (conditional
        networks) or None → [B]."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t) if y is None else model(x_t, t, y)
        diff = out - self.target(x0, t, noise)
        loss = LOSSES[self.loss_type](diff).flatten(1).mean(dim=1)
        return loss if weights is None else loss * weights

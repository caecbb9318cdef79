"""Sampler settings and the batch sampler: DDIM or full ancestral DDPM, fed by per-image noise streams."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..diffusion import DDIM_SKIP_TYPES, ddim_sample, ddim_timesteps
from ..errors import UserError
from .guidance import ClassConditioned
from .noise import PerImageNoise


@dataclass(frozen=True)
class SamplerSpec:
    """What to run: DDIM (``use_ddim``, ``steps`` kept timesteps, ``eta``, ``skip_type``) or ancestral DDPM
    over every timestep; ``t_max`` starts both from a lower noise level (a timestep index ≤ T−1)."""

    use_ddim: bool = False
    steps: int = 100
    eta: float = 0.0
    skip_type: str = "uniform"
    t_max: int | None = None
    clip_denoised: bool = True

    def validate(self, timesteps: int) -> None:
        if self.t_max is not None and not 0 <= self.t_max < timesteps:
            raise UserError(f"--t-max {self.t_max} is outside [0, {timesteps - 1}]; pick a timestep of this model")
        if self.use_ddim:
            if self.skip_type not in DDIM_SKIP_TYPES:
                raise UserError(f"unknown --skip-type '{self.skip_type}'; choose one of {list(DDIM_SKIP_TYPES)}")
            if not math.isfinite(self.eta) or self.eta < 0:
                raise UserError(f"--eta {self.eta} is not a finite number ≥ 0; "
                                f"use 0 (deterministic DDIM) … 1 (DDPM-like)")
            ddim_timesteps(timesteps, self.steps, self.skip_type, self.t_max)  # raises on a bad step count

    def num_noise_draws(self, timesteps: int) -> int:
        """How many per-step noise tensors one run consumes after x_T."""
        if self.use_ddim:
            return self.steps if self.eta > 0 else 0
        return timesteps - 1 if self.t_max is None else self.t_max  # steps t ≥ 1

    def describe(self, timesteps: int) -> str:
        start = "" if self.t_max is None else f", from t={self.t_max}"
        if self.use_ddim:
            return f"DDIM {self.steps} steps ({self.skip_type}, eta {self.eta:g}{start})"
        return f"ancestral DDPM {timesteps if self.t_max is None else self.t_max + 1} steps{start}"

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.use_ddim:  # irrelevant to ancestral sampling: keep manifests comparable
            for key in ("steps", "eta", "skip_type"):
                d.pop(key)
        return d


@torch.no_grad()
def sample_batch(diffusion, model, spec: SamplerSpec, indices: Sequence[int], seed: int,
                 image_shape: Sequence[int], device, labels: Sequence[int] | None = None,
                 guidance: float = 0.0) -> torch.Tensor:
    """Images ``indices`` → x0 [B, C, H, W] in model space (≈ [−1, 1]); image i is a function of (seed, i) and,
    for a class-conditional network, of its label ``labels[i]`` and the guidance w (``guidance.py``)."""
    T = diffusion.timesteps
    if labels is not None:
        if len(labels) != len(indices):
            raise ValueError(f"{len(labels)} labels for {len(indices)} images")
        model = ClassConditioned(model, torch.tensor(list(labels), dtype=torch.long, device=device), guidance)
    elif guidance:
        raise UserError("guidance needs class labels; pass --class-label K or --classes balanced")
    noise = PerImageNoise(seed, indices, image_shape, device, spec.num_noise_draws(T))
    x_T = noise.initial()
    if spec.use_ddim:
        return ddim_sample(diffusion, model, x_T, steps=spec.steps, eta=spec.eta, skip_type=spec.skip_type,
                           clip_denoised=spec.clip_denoised, t_max=spec.t_max, noise_fn=noise.next)
    return diffusion.p_sample_loop(model, x_T, t_start=spec.t_max, clip_denoised=spec.clip_denoised,
                                   noise_fn=noise.next)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [B, C, H, W] (≈ [−1, 1]) → uint8 [B, H, W, C] on the CPU, rounded like saved PNGs."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def from_uint8(images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 [B, H, W, C] (saved images, ``to_uint8``'s output) → model space [B, C, H, W] in [−1, 1]."""
    return images.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1

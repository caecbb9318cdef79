"""Diffusion math: β schedules, GaussianDiffusion (model passed in), the timestep curriculum, timestep
weighting/sampling baselines and DDIM."""

from .curriculum import CurriculumDiffusion, time_range_indices
from .ddim import DDIM_SKIP_TYPES, ddim_sample, ddim_step, ddim_timesteps
from .gaussian import LOSSES, PREDICTION_TYPES, VAR_TYPES, GaussianDiffusion
from .schedules import BETA_SCHEDULES, make_betas
from .timestep_sampling import (LOSS_WEIGHTINGS, loss_weight_table, logsnr_range_indices, make_loss_weights,
                                matched_histogram)

__all__ = [
    "BETA_SCHEDULES", "make_betas",
    "GaussianDiffusion", "PREDICTION_TYPES", "VAR_TYPES", "LOSSES",
    "CurriculumDiffusion", "time_range_indices",
    "DDIM_SKIP_TYPES", "ddim_timesteps", "ddim_step", "ddim_sample",
    "LOSS_WEIGHTINGS", "loss_weight_table", "make_loss_weights", "matched_histogram", "logsnr_range_indices",
]

"""Seed 001's ``CurriculumDiffusion(betas=betas, **config)``: the ddpm-torch spelling of the diffusion arguments.

In ddpm-torch ``config`` is the JSON file's whole ``diffusion`` section (``timesteps``, ``beta_*``,
``model_mean_type``, ``model_var_type``, ``loss_type``); its GaussianDiffusion swallows the schedule keys.
Here they are translated to ``prediction_type`` / ``var_type`` / ``loss_type``, and the schedule keys are
checked against ``betas`` instead of ignored; what this package does not implement raises ``UserError``.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .schedules import make_betas

MEAN_TYPES = {"eps": "eps", "x_0": "x0", "x0": "x0", "v": "v"}  # ddpm-torch's names → prediction_type
UNSUPPORTED = {
    ("model_mean_type", "mean"): "predicting the posterior mean directly (ddpm-torch's 'mean') is not "
                                 "implemented; use 'eps', 'x_0' or 'v'",
    ("model_var_type", "learned"): "a learned reverse variance is not implemented; use 'fixed-small' or "
                                   "'fixed-large'",
    ("loss_type", "kl"): "the KL (bits/dim) training loss is not implemented; use 'mse' or 'l1' "
                         "(eval.py --metrics nll reports bits/dim)",
}
SCHEDULE_KEYS = ("timesteps", "beta_schedule", "beta_start", "beta_end")
SEED_KEYS = ("model_mean_type", "model_var_type") + SCHEDULE_KEYS


def _check_supported(key: str, value) -> None:
    if (key, value) in UNSUPPORTED:
        raise UserError(f"CurriculumDiffusion: {key}={value!r}: {UNSUPPORTED[key, value]}")


def _pick(name: str, given: str, default: str, seed_key: str, seed_value: str) -> str:
    if given != default and given != seed_value:
        raise UserError(f"CurriculumDiffusion: {name}={given!r} and {seed_key} (→ {seed_value!r}) disagree; "
                        f"pass one of them")
    return seed_value


def translate(betas, prediction_type: str, var_type: str, loss_type: str, config: dict,
              defaults: tuple[str, str]) -> tuple[str, str]:
    """(prediction_type, var_type) after the seed keys of ``config``; UserError for unknown, unsupported or
    inconsistent ones. ``defaults``: the constructor's defaults of the two, which a seed key may replace."""
    unknown = sorted(set(config) - set(SEED_KEYS))
    if unknown:
        raise UserError(f"CurriculumDiffusion: unknown argument(s) {', '.join(unknown)}; valid: betas, "
                        f"prediction_type, var_type, loss_type, space and the seed's {', '.join(SEED_KEYS)}")
    _check_supported("loss_type", loss_type)
    if "model_mean_type" in config:
        mean_type = config["model_mean_type"]
        _check_supported("model_mean_type", mean_type)
        if mean_type not in MEAN_TYPES:
            raise UserError(f"CurriculumDiffusion: unknown model_mean_type {mean_type!r}; choose one of "
                            f"{sorted(MEAN_TYPES)}")
        prediction_type = _pick("prediction_type", prediction_type, defaults[0], "model_mean_type",
                                MEAN_TYPES[mean_type])
    if "model_var_type" in config:
        _check_supported("model_var_type", config["model_var_type"])
        var_type = _pick("var_type", var_type, defaults[1], "model_var_type", config["model_var_type"])
    _check_schedule(betas, {k: config[k] for k in SCHEDULE_KEYS if k in config})
    return prediction_type, var_type


def _check_schedule(betas, given: dict) -> None:
    """The schedule keys must describe ``betas`` (they would otherwise be silently ignored)."""
    if not given:
        return
    betas = np.asarray(betas, dtype=np.float64)
    if "timesteps" in given and given["timesteps"] != len(betas):
        raise UserError(f"CurriculumDiffusion: timesteps={given['timesteps']} but betas has {len(betas)} values")
    beta_keys = {k: v for k, v in given.items() if k != "timesteps"}
    if not beta_keys:
        return
    expected = make_betas(beta_keys.get("beta_schedule", "linear"), len(betas), beta_keys.get("beta_start", 1e-4),
                          beta_keys.get("beta_end", 0.02))
    if not np.allclose(betas, expected, rtol=1e-9, atol=0.0):
        described = ", ".join(f"{k}={v!r}" for k, v in beta_keys.items())
        raise UserError(f"CurriculumDiffusion: betas are not the schedule {described}; build them with "
                        f"make_betas() from the same values, or drop those keys")

"""DDIM timestep lists, exact recovery with an oracle, and agreement with diffusers' DDIMScheduler."""

import math

import numpy as np
import pytest
import torch

from ddpm_curriculum.diffusion import GaussianDiffusion, ddim_sample, ddim_step, ddim_timesteps, make_betas
from ddpm_curriculum.errors import UserError
from .helpers import DIFFUSERS_PRED, PRED_TYPES, diffusers, float64_scheduler, needs_diffusers, Oracle, rand

CASES = [(1000, 1), (1000, 10), (1000, 50), (1000, 100), (1000, 999), (1000, 1000), (1000, 7), (1000, 300),
         (1000, 850), (100, 30), (100, 100), (37, 5), (10, 9), (2, 2), (2, 1), (1, 1), (1001, 10)]


@pytest.mark.parametrize("skip_type", ["uniform", "quadratic"])
@pytest.mark.parametrize("T, S", CASES)
def test_ddim_timesteps_are_s_distinct_ascending_values_from_zero(skip_type, T, S):
    ts = ddim_timesteps(T, S, skip_type)
    assert ts.dtype == np.int64 and ts.shape == (S,)
    assert ts[0] == 0 and (np.diff(ts) > 0).all() and ts[-1] <= T - 1


def test_ddim_timesteps_closed_forms():
    assert ddim_timesteps(1000, 10).tolist() == list(range(0, 1000, 100))
    assert ddim_timesteps(10, 3).tolist() == [0, 3, 6]
    q = ddim_timesteps(1000, 10, "quadratic")
    np.testing.assert_array_equal(q, np.round(np.linspace(0, math.sqrt(800), 10) ** 2))  # no collisions here
    assert ddim_timesteps(1000, 10, t_max=499).tolist() == list(range(0, 500, 50))
    assert ddim_timesteps(1000, 20, "quadratic", t_max=99)[-1] <= 99


@pytest.mark.parametrize("args", [(10, 0), (10, 11), (10, 5, "cubic"), (10, 5, "uniform", 10)])
def test_ddim_timesteps_bad_arguments(args):
    with pytest.raises(UserError):
        ddim_timesteps(*args)


@pytest.mark.parametrize("pred", PRED_TYPES)
@pytest.mark.parametrize("skip_type", ["uniform", "quadratic"])
def test_ddim_eta0_with_oracle_recovers_x0(pred, skip_type):
    betas = make_betas("linear", 1000)
    diffusion = GaussianDiffusion(betas, prediction_type=pred)
    x0 = rand(2, 3, 4, 4, seed=1).clamp(-1, 1)
    t_last = int(ddim_timesteps(1000, 10, skip_type)[-1])
    x_T = diffusion.q_sample(x0, t_last, rand(2, 3, 4, 4, seed=2))
    out = ddim_sample(diffusion, Oracle(x0, betas, pred), x_T, steps=10, skip_type=skip_type)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)
    x0f = x0.float()
    out = ddim_sample(diffusion, Oracle(x0f, betas, pred), x_T.float(), steps=10, skip_type=skip_type)
    torch.testing.assert_close(out, x0f, rtol=0, atol=1e-4)


def test_ddim_eta_positive_is_seeded_and_clip_bounds_x0():
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    model = lambda x, t: 3 * x  # noqa: E731
    x_T = rand(2, 4, seed=3)
    a = ddim_sample(diffusion, model, x_T, 5, eta=1.0, generator=torch.Generator().manual_seed(0))
    b = ddim_sample(diffusion, model, x_T, 5, eta=1.0, generator=torch.Generator().manual_seed(0))
    c = ddim_sample(diffusion, model, x_T, 5, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.abs().max() <= 1.0  # the last step returns the clipped x0_pred
    with pytest.raises(UserError, match="noise"):
        ddim_step(diffusion, model(x_T, None), x_T, 50, 30, eta=0.5)


def test_ddim_eta1_full_steps_is_ddpm_fixed_small():
    """DDIM paper: η = 1 with every timestep kept is the DDPM posterior with variance β̃_t."""
    diffusion = GaussianDiffusion(make_betas("linear", 100), var_type="fixed-small")
    model = lambda x, t: torch.sin(x)  # noqa: E731
    x_t, z = rand(2, 5, seed=4), rand(2, 5, seed=5)
    for t in (99, 40, 1):
        x_prev, _ = ddim_step(diffusion, model(x_t, None), x_t, t, t - 1, eta=1.0, noise=z, clip_denoised=False)
        out = diffusion.p_mean_var(model, x_t, torch.full((2,), t), clip_denoised=False)
        torch.testing.assert_close(x_prev, out["mean"] + out["var"].sqrt() * z, rtol=1e-10, atol=1e-10)


@needs_diffusers
@pytest.mark.parametrize("pred", PRED_TYPES)
@pytest.mark.parametrize("eta, clip", [(0.0, False), (1.0, False), (0.5, True)])
def test_ddim_step_matches_diffusers(pred, eta, clip):
    """Leading spacing with steps_offset=0 gives diffusers the same timesteps as our uniform list (S | T);
    set_alpha_to_one=True is our ᾱ_prev = 1 at the last step; clip_sample + use_clipped_model_output is our
    clip_denoised."""
    T, S = 1000, 10
    diffusion = GaussianDiffusion(make_betas("cosine", T), prediction_type=pred)
    sched = float64_scheduler(diffusers.DDIMScheduler, diffusion, prediction_type=DIFFUSERS_PRED[pred],
                              set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched.config.clip_sample = clip
    sched.set_timesteps(S)
    ours = ddim_timesteps(T, S)
    assert sorted(sched.timesteps.tolist()) == ours.tolist()
    model = lambda x, t: 2.0 * torch.tanh(x) + 0.001 * t.view(-1, 1, 1, 1)  # noqa: E731
    x = rand(2, 3, 4, 4, seed=6)
    prevs = dict(zip(ours.tolist(), [-1] + ours[:-1].tolist(), strict=True))
    for t in sched.timesteps.tolist():
        out, z = model(x, torch.full((2,), t)), rand(2, 3, 4, 4, seed=t)
        ref = sched.step(out, t, x, eta=eta, variance_noise=z, use_clipped_model_output=clip)
        x_prev, x0_pred = ddim_step(diffusion, out, x, t, prevs[t], eta, z, clip_denoised=clip)
        torch.testing.assert_close(x0_pred, ref.pred_original_sample, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x_prev, ref.prev_sample, rtol=1e-9, atol=1e-9)
        x = x_prev

"""Schedules, GaussianDiffusion and the curriculum against closed forms and diffusers' DDPMScheduler."""

import math

import numpy as np
import pytest
import torch

from ddpm_curriculum.diffusion import (BETA_SCHEDULES, CurriculumDiffusion, GaussianDiffusion, make_betas,
                                       time_range_indices)
from ddpm_curriculum.errors import UserError

from .helpers import (DIFFUSERS_PRED, PRED_TYPES, Oracle, closed_alpha_bar, diffusers, float64_scheduler,
                      needs_diffusers, rand)

T = 1000


# ----- schedules -----

def test_linear_schedule_endpoints_and_alpha_bar():
    betas = make_betas("linear", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / (T - 1), rtol=1e-9)
    np.testing.assert_allclose(GaussianDiffusion(betas).alphas_bar, closed_alpha_bar(betas), rtol=1e-12)


def test_cosine_schedule_follows_alpha_bar_formula():
    betas = make_betas("cosine", T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f((t + 1) / T) / f(0.0) for t in range(T)])
    alpha_bar = GaussianDiffusion(betas).alphas_bar
    np.testing.assert_allclose(alpha_bar[:-1], expected[:-1], rtol=1e-9)  # the last β is capped
    assert betas[-1] == 0.999 and betas.max() == 0.999


def test_quad_schedule_is_linear_in_sqrt_beta():
    betas = make_betas("quad", T, 1e-4, 0.02)
    np.testing.assert_allclose([betas[0], betas[-1]], [1e-4, 0.02], rtol=1e-12)
    np.testing.assert_allclose(np.diff(np.sqrt(betas)), (math.sqrt(0.02) - 0.01) / (T - 1), rtol=1e-9)


def test_linear_snr_matches_reference_table():
    diffusion = GaussianDiffusion(make_betas("linear", T))
    snr = diffusion.snr(torch.tensor([500, 800]), dtype=torch.float64)
    np.testing.assert_allclose(snr.numpy(), [0.084, 1.5e-3], rtol=0.02)
    assert diffusion.snr(torch.tensor([3])).dtype == torch.float32


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(UserError, match=str(list(BETA_SCHEDULES)).replace("[", r"\[").replace("]", r"\]")):
        make_betas("sigmoid", T)


@pytest.mark.parametrize("kwargs", [{"prediction_type": "score"}, {"var_type": "learned"}, {"loss_type": "huber"}])
def test_bad_diffusion_options_raise(kwargs):
    with pytest.raises(UserError, match="choose one of"):
        GaussianDiffusion(make_betas("linear", 10), **kwargs)


# ----- forward process, parameterisations, posterior -----

def test_q_sample_moments():
    diffusion = GaussianDiffusion(make_betas("linear", T))
    n, t = 20000, 300
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    x_t = diffusion.q_sample(x0, torch.full((n,), t), rand(n, 1))
    a = closed_alpha_bar(make_betas("linear", T))[t]
    assert abs(x_t.mean().item() - math.sqrt(a) * 0.7) < 4 * math.sqrt((1 - a) / n)
    assert abs(x_t.var().item() - (1 - a)) < 4 * (1 - a) * math.sqrt(2 / n)


@pytest.mark.parametrize("pred", PRED_TYPES)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_round_trip_through_target(pred, schedule):
    diffusion = GaussianDiffusion(make_betas(schedule, T), prediction_type=pred)
    x0, eps = rand(6, 2, 3, 3, seed=1), rand(6, 2, 3, 3, seed=2)
    t = torch.tensor([0, 1, 250, 500, 900, 998])
    x_t = diffusion.q_sample(x0, t, eps)
    out = diffusion.target(x0, t, eps)
    torch.testing.assert_close(diffusion.predict_x0(x_t, t, out), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(diffusion.predict_eps(x_t, t, out), eps, rtol=0, atol=1e-9)
    assert diffusion.predict_x0(x_t.float(), t, out.float()).dtype == torch.float32


def test_v_target_closed_form():
    diffusion = GaussianDiffusion(make_betas("linear", T), prediction_type="v")
    x0, eps, t = rand(3, 4, seed=3), rand(3, 4, seed=4), torch.tensor([10, 500, 990])
    a = torch.from_numpy(closed_alpha_bar(make_betas("linear", T)))[t].view(-1, 1)
    torch.testing.assert_close(diffusion.target(x0, t, eps), a.sqrt() * eps - (1 - a).sqrt() * x0)


def test_posterior_matches_closed_form():
    betas = make_betas("linear", T)
    diffusion = GaussianDiffusion(betas)
    a = closed_alpha_bar(betas)
    t = torch.tensor([0, 1, 2, 400, 999])
    x0, x_t = rand(5, 3, seed=5), rand(5, 3, seed=6)
    mean, var, log_var = diffusion.q_posterior_mean_var(x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        a_prev = a[ti - 1] if ti > 0 else 1.0
        var_ref = (1 - a_prev) / (1 - a[ti]) * betas[ti]
        mean_ref = (math.sqrt(a_prev) * betas[ti] * x0[i] + math.sqrt(1 - betas[ti]) * (1 - a_prev) * x_t[i]) \
            / (1 - a[ti])
        torch.testing.assert_close(mean[i], mean_ref, rtol=1e-12, atol=1e-12)
        assert var[i].item() == pytest.approx(var_ref, rel=1e-12, abs=1e-300)
    var1 = (1 - a[0]) / (1 - a[1]) * betas[1]
    assert log_var[0].item() == pytest.approx(math.log(var1), rel=1e-12)  # clipped at t = 0
    assert var[0].item() == 0.0


def test_fixed_large_variance_uses_beta_and_posterior_at_zero():
    betas = make_betas("linear", T)
    diffusion = GaussianDiffusion(betas, var_type="fixed-large")
    out = diffusion.p_mean_var(lambda x, t: torch.zeros_like(x), rand(3, 2), torch.tensor([0, 1, 700]))
    a = closed_alpha_bar(betas)
    expected = [(1 - a[0]) / (1 - a[1]) * betas[1], betas[1], betas[700]]
    np.testing.assert_allclose(out["var"].flatten().numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(out["log_var"].flatten().numpy(), np.log(expected), rtol=1e-12)


@pytest.mark.parametrize("pred", PRED_TYPES)
def test_oracle_has_zero_loss_and_weights_scale_it(pred):
    betas = make_betas("linear", 100)
    diffusion = GaussianDiffusion(betas, prediction_type=pred)
    x0, t = rand(4, 1, 4, 4, seed=7), torch.tensor([0, 10, 50, 99])
    assert diffusion.training_losses(Oracle(x0, betas, pred), x0, t).abs().max() < 1e-10
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    noise = rand(4, 1, 4, 4, seed=8)
    loss = diffusion.training_losses(zero, x0, t, noise)
    torch.testing.assert_close(loss, diffusion.target(x0, t, noise).square().flatten(1).mean(1))
    w = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(diffusion.training_losses(zero, x0, t, noise, weights=w), loss * w)


def test_l1_loss():
    diffusion = GaussianDiffusion(make_betas("linear", 10), loss_type="l1")
    x0, noise, t = rand(2, 5, seed=9), rand(2, 5, seed=10), torch.tensor([1, 8])
    loss = diffusion.training_losses(lambda x, t: torch.zeros_like(x), x0, t, noise)
    torch.testing.assert_close(loss, noise.abs().mean(1))


@pytest.mark.parametrize("pred", PRED_TYPES)
def test_ancestral_sampling_with_oracle_returns_x0(pred):
    betas = make_betas("linear", 50)
    diffusion = GaussianDiffusion(betas, prediction_type=pred)
    x0 = rand(3, 2, 4, 4, seed=11).clamp(-1, 1)
    g = torch.Generator().manual_seed(0)
    out = diffusion.p_sample_loop(Oracle(x0, betas, pred), rand(3, 2, 4, 4, seed=12), generator=g)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)
    out = diffusion.p_sample_loop(Oracle(x0, betas, pred), rand(3, 2, 4, 4, seed=12), generator=g, t_start=7)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


def test_p_sample_is_deterministic_given_a_seed_and_noise_free_at_zero():
    diffusion = GaussianDiffusion(make_betas("linear", 20))
    model = lambda x, t: 0.3 * x  # noqa: E731
    x = rand(2, 3, seed=13)
    t = torch.tensor([5, 0])
    a = diffusion.p_sample(model, x, t, torch.Generator().manual_seed(1))
    b = diffusion.p_sample(model, x, t, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    torch.testing.assert_close(a[1], diffusion.p_mean_var(model, x, t)["mean"][1])
    assert not torch.allclose(a[0], diffusion.p_mean_var(model, x, t)["mean"][0])


# ----- curriculum -----

@pytest.mark.parametrize("t_min, lo", [(0.8, 800), (0.6, 600), (0.4, 400), (0.2, 200), (0.0, 0)])
def test_seed_stage_boundaries(t_min, lo):
    assert time_range_indices(t_min, 1.0, 1000) == (lo, 999)
    diffusion = CurriculumDiffusion(make_betas("linear", 1000))
    diffusion.set_time_range(t_min, 1.0)
    assert diffusion.time_range == (lo, 999)


def test_range_rule_is_half_open_and_adjacent_stages_do_not_overlap():
    assert time_range_indices(0.29, 0.57, 100) == (29, 56)  # 0.29·100 = 28.999999999999996 in float
    assert time_range_indices(0.57, 1.0, 100) == (57, 99)
    assert time_range_indices(0.07, 0.14, 100) == (7, 13)  # 7.000000000000001 and 14.000000000000002
    assert time_range_indices(0.05, 0.15, 10) == (1, 1)
    assert time_range_indices(0.0, 1.0, 7) == (0, 6)
    assert CurriculumDiffusion(make_betas("linear", 30)).time_range == (0, 29)


@pytest.mark.parametrize("bad", [(0.8, 0.8), (0.9, 0.2), (-0.1, 1.0), (0.0, 1.5), (0.81, 0.85)])
def test_bad_ranges_raise(bad):
    with pytest.raises(UserError, match="time range"):
        time_range_indices(*bad, 10)


def test_sampled_timesteps_stay_in_range_and_cover_it():
    diffusion = CurriculumDiffusion(make_betas("linear", 1000))
    g = torch.Generator().manual_seed(0)
    for t_min in (0.8, 0.6, 0.4, 0.2, 0.0):
        diffusion.set_time_range(t_min, 1.0)
        lo, hi = diffusion.time_range
        t = diffusion.sample_timesteps(4096, generator=g)
        assert t.dtype == torch.long and t.shape == (4096,)
        assert lo <= t.min().item() and t.max().item() <= hi
    diffusion.set_time_range(0.995, 1.0)
    assert set(diffusion.sample_timesteps(500, generator=g).tolist()) == {995, 996, 997, 998, 999}
    a = diffusion.sample_timesteps(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, diffusion.sample_timesteps(8, generator=torch.Generator().manual_seed(3)))


# ----- agreement with diffusers' DDPMScheduler -----

DIFFUSERS_NAMES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "quad": "scaled_linear"}


@needs_diffusers
@pytest.mark.parametrize("schedule", list(DIFFUSERS_NAMES))
def test_schedule_and_add_noise_match_diffusers(schedule):
    """diffusers builds β and ᾱ in float32, so agreement is to float32 accuracy."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAMES[schedule],
                                    beta_start=1e-4, beta_end=0.02)
    diffusion = GaussianDiffusion(make_betas(schedule, T))
    np.testing.assert_allclose(sched.betas.numpy(), diffusion.betas, rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), diffusion.alphas_bar, rtol=1e-4, atol=1e-7)
    x0, noise = rand(4, 3, 4, 4, seed=14, dtype=torch.float32), rand(4, 3, 4, 4, seed=15, dtype=torch.float32)
    t = torch.tensor([0, 123, 640, 999])
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), sched.add_noise(x0, noise, t),
                               rtol=1e-4, atol=1e-5)


@needs_diffusers
@pytest.mark.parametrize("pred", PRED_TYPES)
@pytest.mark.parametrize("var_type", ["fixed-small", "fixed-large"])
def test_ddpm_step_matches_diffusers(pred, var_type):
    """Same seed → diffusers' step and our p_sample draw the same z; prev_sample and x0 agree."""
    diffusion = GaussianDiffusion(make_betas("linear", T), prediction_type=pred, var_type=var_type)
    sched = float64_scheduler(diffusers.DDPMScheduler, diffusion, variance_type=var_type.replace("-", "_"),
                              prediction_type=DIFFUSERS_PRED[pred])
    model = lambda x, t: torch.tanh(x) + 0.01 * t.view(-1, 1, 1, 1)  # noqa: E731
    x_t = rand(2, 3, 4, 4, seed=16)
    for t in (999, 500, 37, 1, 0):
        t_batch = torch.full((2,), t)
        ref = sched.step(model(x_t, t_batch), t, x_t, generator=torch.Generator().manual_seed(t))
        ours = diffusion.p_sample(model, x_t, t_batch, torch.Generator().manual_seed(t), clip_denoised=False)
        torch.testing.assert_close(ours, ref.prev_sample, rtol=1e-10, atol=1e-10)
        out = diffusion.p_mean_var(model, x_t, t_batch, clip_denoised=False)
        torch.testing.assert_close(out["x0_pred"], ref.pred_original_sample, rtol=1e-10, atol=1e-10)
        if t > 0:  # diffusers' fixed_large uses β_0 at t = 0 where no noise is added; ours β̃_1 (DDPM)
            torch.testing.assert_close(out["var"].flatten()[0], sched._get_variance(t).double(), rtol=1e-10, atol=0)

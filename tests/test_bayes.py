"""The exact twoscale Bayes denoiser against brute force; the ceiling, the template-knowledge index and the
decision windows it defines."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_curriculum.data.twoscale import TwoScaleDataset
from ddpm_curriculum.diffusion import GaussianDiffusion, make_betas
from ddpm_curriculum.diffusion.timestep_sampling import logsnr_positions
from ddpm_curriculum.metrics.bayes import (bayes_denoiser, ceiling_metrics, feature_windows, spectral_denoiser,
                                           template_knowledge_index)
from ddpm_curriculum.metrics.oracle import quantisation_report

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(make_betas("linear", 1000))


@pytest.fixture(scope="module")
def ds():
    return TwoScaleDataset(num_samples=1024)


@pytest.fixture(scope="module")
def tiny():
    """D = 16, K1 = K2 = 2, broad components so importance sampling from the prior works."""
    return TwoScaleDataset(image_size=4, channels=1, k1=2, k2=2, alpha1=0.6, alpha2=0.4, sigma0=0.3,
                           num_samples=64)


def dense_posterior_mean(means, cov, x_t, alpha_bar):
    """Explicit enumeration with full-matrix Gaussian conditioning (numpy float64, no shortcuts):
    x_t | c ~ N(√ᾱ μ_c, ᾱΣ + (1−ᾱ)I), E[x0 | x_t, c] = μ_c + √ᾱ Σ (ᾱΣ + (1−ᾱ)I)⁻¹ (x_t − √ᾱ μ_c)."""
    d = means.shape[1]
    c = alpha_bar * cov + (1 - alpha_bar) * np.eye(d)
    c_inv = np.linalg.inv(c)
    out = []
    for x in x_t:
        r = x[None] - math.sqrt(alpha_bar) * means  # [K, D]
        logp = -0.5 * np.einsum("kd,de,ke->k", r, c_inv, r)
        w = np.exp(logp - logp.max())
        w /= w.sum()
        cond = means + math.sqrt(alpha_bar) * (r @ c_inv @ cov.T)
        out.append(w @ cond)
    return np.stack(out)


@pytest.mark.parametrize("kind", ["bayes", "spectral"])
@pytest.mark.parametrize("t", [0, 150, 600, 999])
def test_posterior_mean_matches_dense_enumeration(tiny, diffusion, kind, t):
    model = (bayes_denoiser if kind == "bayes" else spectral_denoiser)(tiny, diffusion)
    means = model.means.numpy()
    basis = model.basis.numpy()
    cov = tiny.sigma0 ** 2 * np.eye(means.shape[1]) + model.extra_var * basis.T @ basis
    x_t = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    want = dense_posterior_mean(means, cov, x_t.flatten(1).numpy(), diffusion.alphas_bar[t])
    np.testing.assert_allclose(model.x0_hat(x_t, t).flatten(1).numpy(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_bayes_matches_importance_sampling_from_the_prior(tiny, diffusion):
    """Monte Carlo: draw x0 from the data generator itself, weight by N(x_t; √ᾱ x0, (1−ᾱ)I)."""
    t = 300
    a = diffusion.alphas_bar[t]
    prior = torch.stack([tiny._draw(i)[0] for i in range(20000)]).double().flatten(1)  # the generator itself
    x0, _ = tiny.held_out(4)
    x_t = diffusion.q_sample(x0.double(), t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(5),
                                                          dtype=torch.float64))
    log_w = -((x_t.flatten(1)[:, None] - math.sqrt(a) * prior[None]) ** 2).sum(2) / (2 * (1 - a))  # [4, M]
    w = torch.softmax(log_w, 1)
    assert (1 / (w ** 2).sum(1)).min() > 500  # effective sample size
    mc = w @ prior
    exact = bayes_denoiser(tiny, diffusion).x0_hat(x_t, t).flatten(1)
    assert (mc - exact).abs().max() < 0.05
    assert (exact - x_t.flatten(1) / math.sqrt(a)).abs().max() > 0.2  # the test can tell denoisers apart


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_module_output_follows_the_prediction_type(tiny, prediction_type):
    diff = GaussianDiffusion(make_betas("linear", 1000), prediction_type=prediction_type)
    model = bayes_denoiser(tiny, diff)
    x_t = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 400, 900])
    out = model(x_t, t)
    assert out.dtype == torch.float32
    want = torch.stack([model.x0_hat(x_t[i:i + 1], int(t[i]))[0] for i in range(3)])
    torch.testing.assert_close(diff.predict_x0(x_t.double(), t, out.double()), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tki_is_one_for_bayes_zero_for_spectral_and_finite_for_zero_eps(ds, diffusion):
    ts = (100, 400)
    one = template_knowledge_index(bayes_denoiser(ds, diffusion), diffusion, ds, ts=ts, n=32)
    zero = template_knowledge_index(spectral_denoiser(ds, diffusion), diffusion, ds, ts=ts, n=32)

    class ZeroEps(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    untrained = template_knowledge_index(ZeroEps(), diffusion, ds, ts=ts, n=32)
    for t in ts:
        assert one[t]["tki"] == pytest.approx(1, abs=1e-4) and one[t]["tki_mse"] == pytest.approx(1, abs=1e-4)
        assert zero[t]["tki"] == pytest.approx(0, abs=1e-4) and zero[t]["tki_mse"] == pytest.approx(0, abs=1e-4)
        assert one[t]["r_bayes"] > one[t]["r_spectral"] + 0.2  # the index has a non-trivial range
        assert all(math.isfinite(v) for v in untrained[t].values())
    # ε̂ = 0 is unbiased (r ≈ 1, so the projection TKI exceeds 1 at t = 400) but noisy: tki_mse ≪ 0
    assert untrained[400]["r_model"] == pytest.approx(1, abs=0.3) and untrained[400]["tki"] > 1
    assert untrained[400]["tki_mse"] < -1


@pytest.mark.slow
def test_ceiling_through_the_sampler_matches_the_quantised_data(ds, diffusion):
    """The Bayes denoiser through DDIM + clip + to_uint8 scores what the data scores after quantisation
    (≈ 0.87/0.90 amplitude, not 1), with every minor feature present and no excess lost to the floor."""
    ceiling = ceiling_metrics(diffusion, ds, num_samples=48, sample_steps=10, batch_size=48)
    data = quantisation_report(ds, num_samples=256)
    assert ceiling["minor_present"] > 0.95 and ceiling["major_present"] == 1.0
    for key in ("major_amplitude", "minor_amplitude", "minor_amplitude_excess"):
        assert ceiling[key] == pytest.approx(data[key], abs=0.03), key
    assert data["minor_amplitude"] < 0.95 and ceiling["minor_floor"] < 0.05


@pytest.mark.slow
def test_windows_are_ordered_and_match_the_bayes_posterior(ds, diffusion):
    w = feature_windows(ds, diffusion.alphas_bar)
    major, minor = w["major"], w["minor"]
    assert minor["t_lo"] < minor["t_hi"] and major["t_lo"] < major["t_hi"]
    assert minor["t_lo"] < major["t_lo"] and minor["t_hi"] < major["t_hi"]  # fine detail is decided later
    assert 300 <= minor["t_lo"] <= 380 and 560 <= minor["t_hi"] <= 650  # the "t ≈ 340–600"
    assert major["t_hi"] < 0.85 * diffusion.timesteps  # t ≥ 0.85·T carries (almost) no class information
    u = logsnr_positions(diffusion.alphas_bar)
    assert minor["u_lo"] == u[minor["t_lo"]] and major["u_hi"] == u[major["t_hi"]]
    # the exact Bayes denoiser's responsibilities on held-out images at each edge: q ≈ 0.9 and ≈ 0.1
    x0, labels = ds.held_out(1024)
    k, j = labels // ds.k2, labels % ds.k2
    rows = torch.arange(len(labels))
    model = bayes_denoiser(ds, diffusion)
    g = torch.Generator().manual_seed(11)
    for name, edge, level in [("major", "t_lo", 0.9), ("major", "t_hi", 0.1), ("minor", "t_lo", 0.9),
                              ("minor", "t_hi", 0.1)]:
        t = w[name][edge]
        x_t = diffusion.q_sample(x0.double(), t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        resp = model.posterior(x_t, t)[1].exp().view(-1, ds.k1, ds.k2)
        if name == "major":
            p, chance = resp.sum(2)[rows, k].mean().item(), 1 / ds.k1
        else:
            p, chance = (resp[rows, k, j] / resp[rows, k].sum(1)).mean().item(), 1 / ds.k2
        assert (p - chance) / (1 - chance) == pytest.approx(level, abs=0.04), (name, edge)


def test_window_config_follows_the_windows_and_dry_run_prints_them(diffusion, capsys):
    from ddpm_curriculum.config import load_config
    from ddpm_curriculum.training.builders import make_dataset
    from ddpm_curriculum.training.cli import main as train_main

    cfg = load_config(ROOT / "configs/twoscale_c_window.json")
    assert cfg.curriculum.space == "logsnr" and cfg.curriculum.enabled
    w = feature_windows(make_dataset(cfg), diffusion.alphas_bar)
    s1, s2, s3 = cfg.curriculum.stages
    assert s1.t_min == pytest.approx(w["major"]["u_lo"], abs=0.01)
    assert s1.t_max == pytest.approx(w["major"]["u_hi"], abs=0.01)
    assert s2.t_min == pytest.approx(w["minor"]["u_lo"], abs=0.01) and s2.t_max == s1.t_max
    assert (s3.t_min, s3.t_max) == (0.0, 1.0)
    assert train_main(["--config-path", str(ROOT / "configs/twoscale_c_window.json"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (f"major t {w['major']['t_lo']}-{w['major']['t_hi']} (log-SNR {w['major']['u_lo']:.3f}-"
            f"{w['major']['u_hi']:.3f}), minor t {w['minor']['t_lo']}-{w['minor']['t_hi']}") in out
    read = lambda name: json.loads((ROOT / "configs" / name).read_text())
    assert read("twoscale_c_window.json")["dataset"] == read("twoscale_c.json")["dataset"]

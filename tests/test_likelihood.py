"""Bits/dim bound (metrics/likelihood.py): each term against closed forms / scipy / Monte Carlo, the whole
bound against a brute-force per-t sum written from the paper's equations, K = T exact, K < T unbiased."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ddpm_curriculum.diffusion import GaussianDiffusion, make_betas
from ddpm_curriculum.errors import UserError
from ddpm_curriculum.metrics import likelihood as lk

LEVELS = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1  # the 8-bit grid in [−1, 1]


def test_decoder_matches_scipy_cdf_and_sums_to_one():
    rng = np.random.default_rng(0)
    mean = torch.from_numpy(rng.uniform(-1.2, 1.2, 40))
    log_scale = torch.from_numpy(rng.uniform(np.log(1e-3), np.log(0.5), 40))
    ll = lk.discretized_gaussian_log_likelihood(LEVELS[:, None], mean[None], log_scale[None])  # [256, 40]
    s = np.exp(log_scale.numpy())[None]
    x, m = LEVELS.numpy()[:, None], mean.numpy()[None]
    upper = np.where(x > 0.999, np.inf, x + 1 / 255)
    lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
    zu, zl = (upper - m) / s, (lower - m) / s
    # Φ(zu) − Φ(zl), through the survival function above the mean, where CDF values near 1 would cancel
    prob = np.where(zl > 0, norm.sf(zl) - norm.sf(zu), norm.cdf(zu) - norm.cdf(zl))
    ok = prob > 1e-250  # beyond, scipy's difference underflows
    np.testing.assert_allclose(ll.numpy()[ok], np.log(prob[ok]), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(torch.logsumexp(ll, 0).numpy(), 0.0, atol=1e-12)  # the 256 bins sum to 1
    far = lk.discretized_gaussian_log_likelihood(LEVELS[-2:-1], torch.tensor([-1.0]), torch.tensor([-6.0]))
    assert torch.isfinite(far).all() and far.item() < -1e4  # deep tail: finite, not −inf or NaN


def test_normal_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
    x = m1 + math.exp(0.5 * lv1) * torch.randn(400_000, generator=g, dtype=torch.float64)
    mc = (norm.logpdf(x.numpy(), m1, math.exp(0.5 * lv1)) - norm.logpdf(x.numpy(), m2, math.exp(0.5 * lv2)))
    kl = lk.normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2))).item()
    assert abs(kl - mc.mean()) < 4 * mc.std() / math.sqrt(len(mc))
    assert lk.normal_kl(*(torch.tensor(v) for v in (0.4, -1.0, 0.4, -1.0))).item() == pytest.approx(0.0, abs=1e-7)


def test_prior_term_is_the_closed_form():
    d = GaussianDiffusion(make_betas("linear", 10, 0.05, 0.3))
    x0 = LEVELS[torch.randint(256, (3, 2, 4, 4), generator=torch.Generator().manual_seed(1))]
    abar = np.prod(1 - np.linspace(0.05, 0.3, 10))
    kl = 0.5 * (-np.log(1 - abar) + (1 - abar) + abar * x0.numpy() ** 2 - 1)
    expected = kl.reshape(3, -1).mean(1) / np.log(2)
    np.testing.assert_allclose(lk.prior_bpd(d, x0).numpy(), expected, rtol=1e-12)


def test_strata_partition_the_kl_timesteps():
    for T in (2, 3, 10, 97, 1000):
        for k in sorted({2, 3, 5, T // 2 + 1, T - 1, T} - {1, 0}):
            if not 2 <= k <= T:
                continue
            parts = lk.strata(T, k)
            covered = [t for lo, hi in parts for t in range(lo, hi + 1)]
            assert covered == list(range(1, T)) and len(parts) == k - 1
            sizes = [hi - lo + 1 for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(UserError, match="must be in \\[2, 10\\]"):
        lk.check_timesteps(10, 11)


class RandomEps(torch.nn.Module):
    """A fixed random ε-network: ε̂ = tanh(W·x_t + b_t), W a random 1×1 mixing of channels."""

    def __init__(self, channels=2, T=10):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(channels, channels, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(T, generator=g, dtype=torch.float64))

    def forward(self, x, t):
        return torch.tanh(torch.einsum("oc,bchw->bohw", self.w, x) + self.b[t].view(-1, 1, 1, 1))


def brute_force_bound(betas, model, x0, seed, index, var_type):
    """The bound for one image [C, H, W] from DDPM's equations (eq. 7 posterior, eq. 11 model mean from ε̂), the
    same ε draws as nll_bpd_batch with K = T (per-image generator: the K−1 stratum picks, then ε for t = 0, 1, …)."""
    T = len(betas)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    model_var = post_var.copy() if var_type == "fixed-small" else betas.copy()
    model_var[0] = post_var[1]
    g = lk._image_generator(seed, index)
    for _ in range(T - 1):
        torch.randint(1, (1,), generator=g)
    x = x0.numpy()
    D = x.size
    total = 0.5 * (-np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * x ** 2 - 1).sum()  # prior
    for t in range(T):
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64).numpy()
        x_t = np.sqrt(abar[t]) * x + np.sqrt(1 - abar[t]) * eps
        with torch.no_grad():
            eps_hat = model(torch.from_numpy(x_t)[None], torch.tensor([t]))[0].numpy()
        mean_p = (x_t - betas[t] / np.sqrt(1 - abar[t]) * eps_hat) / np.sqrt(alphas[t])  # eq. 11
        if t == 0:
            s = np.sqrt(model_var[0])
            up = np.where(x > 0.999, np.inf, x + 1 / 255)
            lo = np.where(x < -0.999, -np.inf, x - 1 / 255)
            total -= np.log(norm.cdf((up - mean_p) / s) - norm.cdf((lo - mean_p) / s)).sum()
        else:
            mean_q = (np.sqrt(abar_prev[t]) * betas[t] * x
                      + np.sqrt(alphas[t]) * (1 - abar_prev[t]) * x_t) / (1 - abar[t])
            v_q, v_p = post_var[t], model_var[t]
            total += 0.5 * (np.log(v_p / v_q) + v_q / v_p + (mean_q - mean_p) ** 2 / v_p - 1).sum()
    return total / (D * np.log(2))


@pytest.mark.parametrize("var_type", ["fixed-small", "fixed-large"])
def test_full_bound_equals_brute_force_sum(var_type):
    betas = make_betas("linear", 10, 0.01, 0.3)
    d = GaussianDiffusion(betas, var_type=var_type)
    model = RandomEps()
    x0 = LEVELS[torch.randint(256, (3, 2, 3, 3), generator=torch.Generator().manual_seed(2))]
    x0[0, 0, 0, 0], x0[1, 1, 2, 2] = -1.0, 1.0  # both edge bins occur
    out = lk.nll_bpd_batch(d, model, x0, [5, 6, 7], k=10, seed=4, clip_denoised=False)
    expected = [brute_force_bound(betas, model, x0[r], 4, i, var_type) for r, i in enumerate([5, 6, 7])]
    np.testing.assert_allclose(out["total"].numpy(), expected, rtol=1e-10)
    assert (out["subsample_var"] == 0).all()  # K = T: nothing is subsampled
    np.testing.assert_allclose(out["total"], out["prior"] + out["kl"] + out["decoder"], rtol=1e-14)


def one_point_closed_form(betas, x_star, var_type):
    """Bound of x* under the exact ε-network of the one-point dataset {x*}: x0_pred = x*, so the KL terms are
    variance mismatches only (0 for fixed-small) and the decoder is a centred Gaussian's mass on x*'s bin."""
    abar = np.cumprod(1 - betas)
    post_var = betas * (1 - np.append(1.0, abar[:-1])) / (1 - abar)
    v_p = post_var if var_type == "fixed-small" else betas
    kl_t = 0.5 * (np.log(v_p[1:] / post_var[1:]) + post_var[1:] / v_p[1:] - 1)  # per dim
    x = x_star.numpy()
    s = np.sqrt(post_var[1])
    up = np.where(x > 0.999, np.inf, x + 1 / 255)
    lo = np.where(x < -0.999, -np.inf, x - 1 / 255)
    decoder = -np.log(norm.cdf((up - x) / s) - norm.cdf((lo - x) / s)).mean()
    prior = (0.5 * (-np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * x ** 2 - 1)).mean()
    return (prior + kl_t.sum() + decoder) / np.log(2), kl_t / np.log(2)


@pytest.mark.parametrize("var_type", ["fixed-small", "fixed-large"])
def test_exact_model_of_one_point_and_unbiased_subsampling(var_type):
    T = 40
    betas = make_betas("linear", T, 0.001, 0.2)
    d = GaussianDiffusion(betas, var_type=var_type)
    x_star = LEVELS[torch.tensor([[0, 37], [128, 255]])][None]  # [1, 1, 2, 2]
    sa, s1a = torch.from_numpy(d.sqrt_alphas_bar), torch.from_numpy(d.sqrt_one_minus_alphas_bar)
    model = lambda x_t, t: (x_t - sa[t].view(-1, 1, 1, 1) * x_star) / s1a[t].view(-1, 1, 1, 1)
    expected, kl_t = one_point_closed_form(betas, x_star[0], var_type)
    n = 300
    x0 = x_star.expand(n, -1, -1, -1)
    full = lk.nll_bpd_batch(d, model, x0, range(n), k=T, seed=0, clip_denoised=False)
    np.testing.assert_allclose(full["total"].numpy(), expected, rtol=1e-9)
    sub = lk.summarise([lk.nll_bpd_batch(d, model, x0, range(n), k=7, seed=0, clip_denoised=False)], 7, T)
    if var_type == "fixed-small":  # every KL term is 0: the subsampled estimate is exact too
        assert sub.bpd == pytest.approx(expected, rel=1e-9) and sub.sem < 1e-9
    else:  # the KL terms differ across t, so the estimate varies; its mean is the full sum
        assert sub.sem > 0 and abs(sub.bpd - expected) < 4 * sub.sem
        # the conservative collapsed-strata variance is at least the true stratified variance
        sizes = [hi - lo + 1 for lo, hi in lk.strata(T, 7)]
        true_var = sum(nj ** 2 * kl_t[lo - 1:hi].var() for nj, (lo, hi) in zip(sizes, lk.strata(T, 7), strict=True))
        assert sub.subsample_sem >= 0.99 * math.sqrt(true_var / n)
        assert sub.sem == pytest.approx(math.sqrt(true_var / n), rel=0.25)


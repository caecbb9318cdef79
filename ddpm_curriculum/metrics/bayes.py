"""The exact Bayes-optimal denoiser of ``twoscale`` and what it measures: the ceiling of the oracle metrics,
the template-knowledge index and the t-windows in which each feature is decided.

The data is a Gaussian mixture (``data.twoscale``; no flips or shifts, so nothing else to integrate over):

    x0 | c ~ N(μ_c, σ0²·I),  μ_(k,j) = α1·P1[k] + α2·P2[k, j],  c = (k, j) uniform over the K1·K2 components
    x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε

so x_t | c ~ N(√ᾱ·μ_c, ᾱΣ + (1−ᾱ)I) and E[x0 | x_t] = Σ_c w_c(x_t)·E[x0 | x_t, c] with responsibilities
w_c ∝ N(x_t; √ᾱ·μ_c, ᾱΣ + (1−ᾱ)I) (log-space, logsumexp, float64). ``MixtureDenoiser`` does this for a
shared covariance Σ = σ0²·I + v·BᵀB (B: orthonormal rows spanning a subspace S), which covers both

- ``bayes_denoiser``: the twoscale mixture itself (v = 0), and
- ``spectral_denoiser``: knows the major templates and the minor *power and band* but not the minor
  templates: x0 = α1·P1[k] + z + σ0·ε with z ~ N(0, v·Π_S), S = the minor feature subspace
  (``TwoScaleDataset.minor_subspace``, m dims) and v = α2²·D/m, i.e. the minor energy E‖α2·P2‖² = α2²·D
  spread isotropically over S. Its estimate of the minor part is the linear Wiener filter of Π_S·x_t.

Both are ``nn.Module``s called like a network, ``model(x_t, t)``, returning what the diffusion's
prediction type asks for (ε, x0 or v), so they run through the project's one sampler (``sample_batch``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..diffusion.timestep_sampling import logsnr_positions


class MixtureDenoiser(nn.Module):
    """E[x0 | x_t] for x0 ~ (1/K)·Σ_c N(μ_c, σ0²·I + v·BᵀB), under ``diffusion``'s forward process.

    Args:
        diffusion: a ``GaussianDiffusion`` (its ᾱ table and prediction type are used).
        means: μ [K, C, H, W] (any float dtype; used in float64).
        sigma0: the isotropic standard deviation σ0 of every component.
        basis: B [m, D] with orthonormal rows, or None (then v is ignored).
        extra_var: v, the additional variance per dimension inside span(B).
    """

    def __init__(self, diffusion, means: torch.Tensor, sigma0: float, basis=None, extra_var: float = 0.0):
        super().__init__()
        self.diffusion, self.image_shape = diffusion, tuple(means.shape[1:])
        self.register_buffer("means", means.double().flatten(1), persistent=False)  # [K, D]
        self.var = float(sigma0) ** 2
        self.extra_var = float(extra_var) if basis is not None else 0.0
        basis = torch.zeros(0, self.means.shape[1]) if basis is None else torch.as_tensor(basis)
        self.register_buffer("basis", basis.double(), persistent=False)  # [m, D]

    def _alpha_bar(self, t, batch: int) -> torch.Tensor:
        """ᾱ_t [B, 1] (float64) for t: an int or a LongTensor [B]."""
        a = torch.from_numpy(self.diffusion.alphas_bar)[torch.as_tensor(t).reshape(-1).cpu()]
        return a.expand(batch).reshape(-1, 1).to(self.means.device)

    def posterior(self, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t [B, C, H, W], t (int or [B]) → (x0_hat [B, C, H, W] float64, log w [B, K] float64, normalised)."""
        x = x_t.double().flatten(1).to(self.means.device)  # [B, D]
        a = self._alpha_bar(t, len(x))
        s_out = a * self.var + 1.0 - a  # variance of x_t | c outside S, [B, 1]
        s_in = a * (self.var + self.extra_var) + 1.0 - a  # inside S
        # ‖r‖²_C⁻¹ = ‖r‖²/s_out + ‖B r‖²·(1/s_in − 1/s_out) with r = x_t − √ᾱ·μ_c; terms constant in c dropped
        proj_means = self.means @ self.basis.T  # [K, m]
        proj_x = x @ self.basis.T  # [B, m]
        cross = (x @ self.means.T) / s_out + (proj_x @ proj_means.T) * (1 / s_in - 1 / s_out)  # [B, K]
        sq = (self.means ** 2).sum(1) / s_out + (proj_means ** 2).sum(1) * (1 / s_in - 1 / s_out)  # [B, K]
        logits = a.sqrt() * cross - 0.5 * a * sq
        log_w = logits - torch.logsumexp(logits, 1, keepdim=True)
        mean = log_w.exp() @ self.means  # Σ_c w_c μ_c, [B, D]
        # E[x0 | x_t, c] = μ_c + Σ√ᾱ(ᾱΣ + (1−ᾱ)I)⁻¹ r: gain g_out outside S, g_in inside; linear in μ_c
        g_out = a.sqrt() * self.var / s_out
        g_in = a.sqrt() * (self.var + self.extra_var) / s_in
        r = x - a.sqrt() * mean
        x0_hat = mean + g_out * r + (g_in - g_out) * ((r @ self.basis.T) @ self.basis)
        return x0_hat.view(-1, *self.image_shape), log_w

    def x0_hat(self, x_t: torch.Tensor, t) -> torch.Tensor:
        return self.posterior(x_t, t)[0]

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """The network output the diffusion expects (ε, x0 or v) for the exact x0_hat, in x_t's dtype/device."""
        x0 = self.x0_hat(x_t, t)
        x64 = x_t.double().to(x0.device)
        t = torch.as_tensor(t, device=x0.device)
        eps = self.diffusion.eps_from_x0(x64, t, x0)
        return self.diffusion.target(x0, t, eps).to(x_t.dtype).to(x_t.device)


def _major_means(dataset) -> torch.Tensor:
    return dataset.alpha1 * dataset.prototypes_major.double()


def bayes_denoiser(dataset, diffusion) -> MixtureDenoiser:
    """The exact posterior-mean denoiser of a ``TwoScaleDataset`` (components in label order k·K2 + j)."""
    means = _major_means(dataset)[:, None] + dataset.alpha2 * dataset.prototypes_minor.double()  # [K1, K2, …]
    return MixtureDenoiser(diffusion, means.flatten(0, 1), dataset.sigma0)


def spectral_denoiser(dataset, diffusion) -> MixtureDenoiser:
    """The Bayes denoiser of the 'spectral' prior (module docstring): major templates known, minor part an
    isotropic Gaussian of the right power α2²·D over the minor feature subspace S, templates unknown."""
    basis = torch.from_numpy(dataset.minor_subspace())
    d = basis.shape[1]
    return MixtureDenoiser(diffusion, _major_means(dataset), dataset.sigma0, basis,
                           extra_var=dataset.alpha2 ** 2 * d / len(basis))


# ----- the ceiling: the Bayes denoiser through the sampler and quantisation -----

def ceiling_metrics(diffusion, dataset, num_samples: int = 256, sample_steps: int = 25, seed: int = 0,
                    batch_size: int = 256, device="cpu") -> dict:
    """Oracle metrics of ``num_samples`` images that the exact Bayes denoiser samples through the same path as
    a trained model's evaluation (``training.reporting.sample_oracle_metrics``: DDIM with ``sample_steps``
    steps, η = 0, ``clip_denoised``, or the ``SamplerSpec`` passed as ``sample_steps``; one noise stream per
    image, ``to_uint8`` quantisation): what a perfect (Bayes-optimal) denoiser scores with this sampler, i.e.
    the ceiling row. Not an upper bound on every field: DDIM with few steps under-produces the σ0 noise, so its
    residual_ratio is below the data's."""
    from ..training.reporting import sample_oracle_metrics  # lazy: training imports metrics

    model = bayes_denoiser(dataset, diffusion).to(device)
    return sample_oracle_metrics(diffusion, model, dataset, num_samples, sample_steps, seed, batch_size, device)


# ----- template-knowledge index -----

def _minor_scores(x0_hat: torch.Tensor, x0: torch.Tensor, dataset, labels: torch.Tensor) -> tuple[float, float]:
    """(r, e): r = mean_i ⟨x0_hat_i, P2[k_i, j_i]⟩/‖P2[k_i, j_i]‖²/α2; e = mean_i ‖Π_T(x0_hat_i − x0_i)‖²/(α2²·D),
    Π_T the projector on the span of all K1·K2 minor prototypes (float64)."""
    p2 = dataset.prototypes_minor.double().flatten(2).flatten(0, 1)  # [K1·K2, D]
    x = x0_hat.double().flatten(1).cpu()
    r = ((x * p2[labels]).sum(1) / (p2[labels] ** 2).sum(1)).mean().item() / dataset.alpha2
    span = torch.linalg.qr(p2.T)[0]  # [D, K1·K2], orthonormal columns
    e = (((x - x0.double().flatten(1)) @ span) ** 2).sum(1).mean().item() / (dataset.alpha2 ** 2 * p2.shape[1])
    return r, e


@torch.no_grad()
def template_knowledge_index(model, diffusion, dataset, ts=(50, 100, 300, 400, 500), n: int = 256, seed: int = 0,
                             batch_size: int = 256, device="cpu") -> dict[int, dict[str, float]]:
    """TKI(t) = (r_model − r_spectral)/(r_bayes − r_spectral), a sampling-free probe of template knowledge.

    On the test split's first ``n`` images x0 (``held_out``) with fixed noise ε (``seed``, one draw per t),
    x_t = q_sample(x0, t, ε); r = mean ⟨x̂0, P2[true k, j]⟩/‖P2‖²/α2 for the denoised x̂0 of the model
    (its output through ``diffusion.predict_x0``), of the exact Bayes denoiser and of the spectral denoiser
    (module docstring). 1 = the model recovers the true template as well as the Bayes denoiser; 0 = no
    better than knowing only the minor power.

    Caveat: r measures only the *bias* towards the template, so an estimate that does not shrink at all
    scores highest: ε̂ = 0 (x̂0 = x_t/√ᾱ, an untrained model's typical output) is unbiased, r ≈ 1 ≥ r_bayes,
    TKI ≥ 1 (measured: 1.3 at t = 400, 2.1 at t = 500). ``tki_mse`` does not have that failure:
    TKI_mse = (e_spectral − e_model)/(e_spectral − e_bayes) with e = mean ‖Π_T(x̂0 − x0)‖²/(α2²·D), the error
    inside the span of the minor templates (Π_T). The posterior mean minimises every such fixed-projection
    error, so TKI_mse ≤ 1 up to sampling noise, = 1 for the Bayes denoiser, 0 for the spectral one, and ε̂ = 0
    scores far below 0. Prefer ``tki_mse``; ``tki`` is the issue's definition, kept for comparison.

    Returns {t: {"tki", "r_model", "r_bayes", "r_spectral", "tki_mse", "e_model", "e_bayes", "e_spectral"}}.
    """
    x0, labels = dataset.held_out(n)
    bayes, spectral = bayes_denoiser(dataset, diffusion), spectral_denoiser(dataset, diffusion)
    g = torch.Generator().manual_seed(seed)
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    dtype = next((p.dtype for p in model.parameters()), torch.float32) if isinstance(model, nn.Module) \
        else torch.float32
    out = {}
    try:
        for t in ts:
            x_t = diffusion.q_sample(x0.double(), int(t), torch.randn(x0.shape, generator=g, dtype=torch.float64))
            preds = []
            for lo in range(0, n, batch_size):
                xb = x_t[lo:lo + batch_size].to(device=device, dtype=dtype)
                tb = torch.full((len(xb),), int(t), device=device, dtype=torch.long)
                preds.append(diffusion.predict_x0(xb, tb, model(xb, tb)).double().cpu())
            r_model, e_model = _minor_scores(torch.cat(preds), x0, dataset, labels)
            r_bayes, e_bayes = _minor_scores(bayes.x0_hat(x_t, int(t)), x0, dataset, labels)
            r_spectral, e_spectral = _minor_scores(spectral.x0_hat(x_t, int(t)), x0, dataset, labels)
            out[int(t)] = {"tki": (r_model - r_spectral) / (r_bayes - r_spectral), "r_model": r_model,
                           "r_bayes": r_bayes, "r_spectral": r_spectral,
                           "tki_mse": (e_spectral - e_model) / (e_spectral - e_bayes), "e_model": e_model,
                           "e_bayes": e_bayes, "e_spectral": e_spectral}
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return out


# ----- decision windows -----

WINDOW_LEVELS = (0.1, 0.9)  # chance-corrected posterior q = (p − 1/K)/(1 − 1/K) at the high-t / low-t edge


def matched_filter_snr(alphas_bar: np.ndarray, alpha: float, dim: int, sigma0: float) -> np.ndarray:
    """μ²(t) = ᾱ·α²·D / (ᾱσ0² + 1 − ᾱ) [T]: the feature energy ‖√ᾱ·α·P‖² = ᾱα²D against the per-dimension
    variance of x_t around it; ⟨x_t, P⟩/(√D·s) is N(μ, 1) on the true prototype and N(0, 1) on the others."""
    a = np.asarray(alphas_bar, dtype=np.float64)
    return a * alpha ** 2 * dim / (a * sigma0 ** 2 + 1.0 - a)


def true_class_posterior(mu_major: float, mu_minor: float, k1: int, k2: int, draws: int = 4000,
                         seed: int = 0) -> tuple[float, float]:
    """Expected Bayes posterior of the true major class, and of the true minor class given the major one, at
    matched-filter amplitudes μ1, μ2, by Monte Carlo with fixed draws (float64, so smooth in μ).

    With orthogonal equal-norm prototypes the component logits are exactly μ1·z1_k + μ2·z2_kj, z ~ N(0, 1)
    plus μ on the true component's entries; so p(k_true) = Σ_j softmax(·)_(k_true, j) and
    p(j_true | k_true) = softmax_j(μ2·z2_(k_true, j))_(j_true).
    """
    rng = np.random.default_rng(seed)
    z1, z2 = rng.standard_normal((draws, k1)), rng.standard_normal((draws, k1, k2))
    z1[:, 0] += mu_major
    z2[:, 0, 0] += mu_minor
    logits = (mu_major * z1[:, :, None] + mu_minor * z2).reshape(draws, -1)  # [draws, K1·K2]
    w = np.exp(logits - logits.max(1, keepdims=True))
    p_major = (w[:, :k2].sum(1) / w.sum(1)).mean()
    minor = mu_minor * z2[:, 0]
    w = np.exp(minor - minor.max(1, keepdims=True))
    return float(p_major), float((w[:, 0] / w.sum(1)).mean())


def feature_windows(dataset, alphas_bar: np.ndarray, levels=WINDOW_LEVELS) -> dict[str, dict]:
    """The t-range in which each twoscale feature is decided, from its energy against the noise.

    Definition: the window of a feature with K classes is where the expected Bayes posterior of its true
    class p(t) (``true_class_posterior`` at μ(t) = √``matched_filter_snr``) rises, as t falls, from chance to
    near-certain: q(t) = (p − 1/K)/(1 − 1/K) goes from ``levels[0]`` (0.1, at ``t_hi``) to ``levels[1]``
    (0.9, at ``t_lo``). The major feature's posterior includes the minor templates' evidence (each is specific
    to its major class); the minor one is given the true major class (decided earlier). Why the posterior
    and not a raw SNR threshold: the posterior is what a denoiser can know at t, it accounts for K, and it is
    checked against the exact Bayes denoiser's responsibilities on real samples (tests/test_bayes.py).
    p(t) falls monotonically with t (μ does), so each edge is found by bisection.

    Returns {"major": {...}, "minor": {...}}, each with ``t_lo``, ``t_hi`` (integer timesteps: the largest t
    with q(t) ≥ the level), ``u_lo``, ``u_hi`` (their positions on the log-SNR axis, ``logsnr_positions``:
    the ``curriculum.space = "logsnr"`` fractions).
    """
    d = int(np.prod(dataset.image_shape))
    a = np.asarray(alphas_bar, dtype=np.float64)
    mu1 = np.sqrt(matched_filter_snr(a, dataset.alpha1, d, dataset.sigma0))
    mu2 = np.sqrt(matched_filter_snr(a, dataset.alpha2, d, dataset.sigma0))
    u = logsnr_positions(a)
    out = {}
    for which, k in ((0, dataset.k1), (1, dataset.k2)):
        def q(t, which=which, k=k):
            p = true_class_posterior(mu1[t], mu2[t], dataset.k1, dataset.k2)[which]
            return (p - 1.0 / k) / (1.0 - 1.0 / k)
        t_hi, t_lo = (_last_at_least(q, level, len(a)) for level in levels)
        out[("major", "minor")[which]] = {"t_lo": t_lo, "t_hi": t_hi, "u_lo": float(u[t_lo]),
                                          "u_hi": float(u[t_hi])}
    return out


def _last_at_least(q, level: float, timesteps: int) -> int:
    """The largest t in [0, T−1] with q(t) ≥ level for a q falling in t (0 if even q(0) < level)."""
    lo, hi = 0, timesteps - 1
    if q(hi) >= level:
        return hi
    while hi - lo > 1:  # invariant: q(hi) < level, and q(lo) ≥ level unless lo = 0
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if q(mid) >= level else (lo, mid)
    return lo


def feature_window_lines(cfg, diffusion) -> list[str]:
    """``--dry-run`` lines: the decision windows of a twoscale config's features ([] for other datasets)."""
    if cfg.dataset.name != "twoscale":
        return []
    from ..training.builders import make_dataset  # lazy: training imports metrics

    w = feature_windows(make_dataset(cfg), diffusion.alphas_bar)
    lo, hi = WINDOW_LEVELS
    parts = [f"{name} t {v['t_lo']}-{v['t_hi']} (log-SNR {v['u_lo']:.3f}-{v['u_hi']:.3f})" for name, v in w.items()]
    return [f"twoscale decision windows (Bayes posterior of the true class {lo:g}->{hi:g} of the way from "
            f"chance to certain): " + ", ".join(parts)]

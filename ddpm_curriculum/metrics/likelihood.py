"""Negative log-likelihood bound in bits/dim (DDPM, Ho et al. 2020, §3.3 and eq. 5; REFERENCE §1).

For 8-bit data scaled to [−1, 1] (x0 on the grid −1 + 2k/255) the variational bound is

    L = L_T + Σ_{t=1}^{T−1} L_t + L_0                     (index t = 0 … T−1 is the paper's step t+1)
    L_T = KL(q(x_T | x0) ‖ N(0, I))                     prior term, no network
    L_t = KL(q(x_{t−1} | x_t, x0) ‖ p(x_{t−1} | x_t))    x_t = q_sample(x0, t, ε), one ε per (image, t)
    L_0 = −log p(x0 | x_1)                              discretised Gaussian decoder over the 256 bins

divided by D·ln 2 (D = C·H·W). p(x_{t−1} | x_t) is exactly the ancestral sampler's step: the mean from the
network's output through x0_pred (clamped to [−1, 1] when ``clip_denoised``, as the sampler does) and the
fixed variance σ_t² of ``var_type`` — ``fixed-small`` (β̃_t, the posterior variance) or ``fixed-large``
(β_t); both use β̃_1 at t = 0 (the decoder's scale), as DDPM / improved-diffusion do.

Decoder bins: bin k of x0 = −1 + 2k/255 is [x0 − 1/255, x0 + 1/255], except the edge bins, which extend to
−∞ (k = 0) and +∞ (k = 255), so the 256 probabilities sum to 1.

Subsampling (``timesteps`` = K < T): the prior and the decoder are computed exactly; the T−1 KL terms are
split into K−1 contiguous strata of (nearly) equal size n_j, one t drawn uniformly in each, weighted by n_j.
E[n_j·L_{t_j}] = Σ_{t ∈ stratum j} L_t, so the estimate is unbiased; K = T evaluates every term (exact sum).
Per-image randomness (strata picks, ε) comes from a generator seeded by (seed, image index), so results do
not depend on the batch size.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError

BIN_HALF_WIDTH = 1.0 / 255.0  # half the spacing of the 256 levels in [−1, 1]
EDGE = 0.999  # x0 below −EDGE is the bottom bin, above +EDGE the top bin (levels are 2/255 ≈ 0.0078 apart)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats (broadcasting)."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_sub_cdf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Φ(b) − Φ(a)) for a < b, stable in both tails (upper tail through Φ(−a) − Φ(−b))."""
    upper = a > 0
    lo, hi = torch.where(upper, -b, a), torch.where(upper, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi).clamp(max=1.0))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under N(mean, e^(2·log_scale)), elementwise, in nats.

    x: [B, …] on the 256-level grid of [−1, 1]; mean, log_scale broadcast to x. Edge bins are open (see the
    module docstring). Computed in the inputs' dtype (use float64 for the bound).
    """
    inv_scale = torch.exp(-log_scale)
    lower = (x - BIN_HALF_WIDTH - mean) * inv_scale
    upper = (x + BIN_HALF_WIDTH - mean) * inv_scale
    log_cdf_upper = torch.special.log_ndtr(upper)  # bottom bin: Φ(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)  # top bin: 1 − Φ(lower)
    middle = _log_sub_cdf(lower, upper)
    return torch.where(x < -EDGE, log_cdf_upper, torch.where(x > EDGE, log_sf_lower, middle))


def _bits(nats: torch.Tensor) -> torch.Tensor:
    """[B, …] nats → [B] bits per dimension (mean over the non-batch dims / ln 2)."""
    return nats.flatten(1).mean(1) / math.log(2.0)


def prior_bpd(diffusion, x0: torch.Tensor) -> torch.Tensor:
    """L_T in bits/dim: KL(N(√ᾱ_{T−1}·x0, 1 − ᾱ_{T−1}) ‖ N(0, 1)) averaged over dims.  x0: [B, …] → [B]."""
    T = diffusion.timesteps
    abar = float(diffusion.alphas_bar[T - 1])
    mean = math.sqrt(abar) * x0
    logvar = torch.full_like(x0, math.log1p(-abar))
    return _bits(normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0)))


def term_bpd(diffusion, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             clip_denoised: bool = True) -> torch.Tensor:
    """The bound's term at timestep t for each image: L_t (KL, t ≥ 1) or L_0 (decoder, t = 0), bits/dim.

    x0, noise: [B, …] float64 on the bin grid; t: LongTensor [B] → [B]. One network call.
    """
    x_t = diffusion.q_sample(x0, t, noise)
    out = diffusion.p_mean_var(model, x_t, t, clip_denoised)
    true_mean, _, true_log_var = diffusion.q_posterior_mean_var(x0, x_t, t)
    kl = _bits(normal_kl(true_mean, true_log_var, out["mean"], out["log_var"]))
    decoder = -_bits(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_var"]))
    return torch.where(t == 0, decoder, kl)


class _Float64Model:
    """Calls the network in its own dtype and returns float64, so the bound's arithmetic is float64."""

    def __init__(self, model, dtype):
        self.model, self.dtype = model, dtype

    def __call__(self, x, t):
        return self.model(x.to(self.dtype), t).to(torch.float64)


def strata(timesteps: int, k: int) -> list[tuple[int, int]]:
    """The K−1 strata (lo, hi), both inclusive, of the KL timesteps 1 … T−1: contiguous, sizes differ by at
    most 1 (edges round(linspace(1, T, K)), strictly increasing because their spacing is ≥ 1)."""
    edges = np.linspace(1, timesteps, k, dtype=np.float64).round().astype(int)
    return [(int(lo), int(hi) - 1) for lo, hi in itertools.pairwise(edges)]


def check_timesteps(timesteps: int, k: int | None) -> int:
    """K (the network evaluations per image) for T timesteps: None → T; must be in [2, T] (1 when T = 1)."""
    k = timesteps if k is None else int(k)
    if timesteps == 1:
        return 1
    if not 2 <= k <= timesteps:
        raise UserError(f"--nll-timesteps {k} must be in [2, {timesteps}] (the decoder plus at least one KL "
                        f"term; {timesteps} = every term of this model)")
    return k


def _image_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


@torch.no_grad()
def nll_bpd_batch(diffusion, model, x0: torch.Tensor, indices, k: int | None = None, seed: int = 0,
                  clip_denoised: bool = True) -> dict:
    """Per-image bound in bits/dim for x0 [B, C, H, W] (images ``indices`` of the data set, for the seeds).

    Returns float64 [B] tensors (on the CPU): ``total`` (the estimate of L), ``prior``, ``decoder``, ``kl``
    (the estimate of Σ L_t, t ≥ 1) and ``subsample_var`` (collapsed-strata estimate of the variance the
    subsampling adds to ``total``; 0 when K = T).
    """
    T = diffusion.timesteps
    k = check_timesteps(T, k)
    device = x0.device
    params = getattr(model, "parameters", None)
    fmodel = _Float64Model(model, next(params()).dtype if params else torch.float64)
    x0 = x0.to(torch.float64)
    B = x0.shape[0]
    parts = strata(T, k)
    gens = [_image_generator(seed, i) for i in indices]
    picks = torch.tensor([[lo + int(torch.randint(hi - lo + 1, (1,), generator=g)) for lo, hi in parts]
                          for g in gens], dtype=torch.long).view(B, len(parts))

    def noise() -> torch.Tensor:  # the next ε of every image, from its own generator
        return torch.stack([torch.randn(x0.shape[1:], generator=g, dtype=torch.float64) for g in gens]).to(device)

    zero = torch.zeros(B, dtype=torch.long, device=device)
    decoder = term_bpd(diffusion, fmodel, x0, zero, noise(), clip_denoised).cpu()
    sizes = torch.tensor([hi - lo + 1 for lo, hi in parts], dtype=torch.float64)
    weighted = torch.zeros(B, len(parts), dtype=torch.float64)
    for j in range(len(parts)):
        weighted[:, j] = sizes[j] * term_bpd(diffusion, fmodel, x0, picks[:, j].to(device), noise(),
                                             clip_denoised).cpu()
    prior = prior_bpd(diffusion, x0).cpu()
    kl = weighted.sum(1)
    return {"total": prior + kl + decoder, "prior": prior, "decoder": decoder, "kl": kl,
            "subsample_var": collapsed_strata_var(weighted, sizes)}


def collapsed_strata_var(weighted: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Variance of Σ_j y_j (y_j = n_j·L_{t_j}, one draw per stratum) by collapsing neighbouring strata into
    groups of 2 (the last of 3 when the count is odd) and treating each group as one stratum sampled G times
    (Cochran, Sampling Techniques, §5A.12): Σ_groups G/(G−1)·Σ_{j∈g} (y_j − ȳ_g)². Conservative: it also
    counts the differences between the strata's means. 0 when every stratum has one timestep (K = T).
    weighted: [B, S]; sizes: [S] → [B]."""
    B, S = weighted.shape
    if S < 2 or bool((sizes == 1).all()):
        return torch.zeros(B, dtype=torch.float64)
    starts = list(range(0, S - 1, 2))
    groups = [list(range(a, a + 2)) for a in starts]
    if S % 2:
        groups[-1].append(S - 1)
    var = torch.zeros(B, dtype=torch.float64)
    for g in groups:
        y = weighted[:, g]
        var += len(g) / (len(g) - 1) * ((y - y.mean(1, keepdim=True)) ** 2).sum(1)
    return var


@dataclass
class NLLResult:
    """Bits/dim over N images: the mean, its standard error, the subsampling part of it, and the parts."""

    bpd: float
    sem: float  # std error of the mean over images (includes the subsampling noise)
    subsample_sem: float  # the subsampling noise alone: √(mean collapsed-strata variance / N)
    prior: float
    decoder: float
    kl: float
    num_images: int
    timesteps: int  # K
    total_timesteps: int  # T

    def to_dict(self) -> dict:
        return {"nll_bpd": self.bpd, "nll_bpd_sem": self.sem, "nll_bpd_subsample_sem": self.subsample_sem,
                "nll_prior_bpd": self.prior, "nll_decoder_bpd": self.decoder, "nll_kl_bpd": self.kl,
                "nll_num_images": self.num_images, "nll_timesteps": self.timesteps,
                "nll_total_timesteps": self.total_timesteps}


def summarise(parts: list[dict], k: int, T: int) -> NLLResult:
    """Combine per-batch outputs of :func:`nll_bpd_batch` into the means and error bars."""
    cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    n = len(cat["total"])
    sem = float(cat["total"].std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return NLLResult(float(cat["total"].mean()), sem, float(math.sqrt(cat["subsample_var"].mean() / n)),
                     float(cat["prior"].mean()), float(cat["decoder"].mean()), float(cat["kl"].mean()), n, k, T)


def nll_bpd(diffusion, model, images, k: int | None = None, seed: int = 0, batch_size: int = 64,
            device="cpu", clip_denoised: bool = True, progress: bool = False) -> NLLResult:
    """The bound over ``images``: a source with ``len`` and ``load(indices)`` → uint8 [B, H, W, C] (eval.py's
    folder / npz / dataset sources), or a uint8 tensor [N, H, W, C]."""
    from ..sampling import from_uint8

    if isinstance(images, torch.Tensor):
        tensor = images
        load, n = (lambda idx: tensor[list(idx)].numpy()), len(images)
    else:
        load, n = images.load, len(images)
    T = diffusion.timesteps
    k = check_timesteps(T, k)
    parts = []
    batches = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="nll", leave=False)
    for lo in batches:
        idx = range(lo, min(n, lo + batch_size))
        x0 = from_uint8(torch.from_numpy(np.ascontiguousarray(load(idx))), torch.float64).to(device)
        parts.append(nll_bpd_batch(diffusion, model, x0, idx, k, seed, clip_denoised))
    return summarise(parts, k, T)


def with_var_type(diffusion, var_type: str | None):
    """``diffusion``, or a GaussianDiffusion with the same schedule and parameterisation but ``var_type``."""
    from ..diffusion import VAR_TYPES, GaussianDiffusion

    if var_type is None or var_type == diffusion.var_type:
        return diffusion
    if var_type not in VAR_TYPES:
        raise UserError(f"--nll-var {var_type}: choose one of {list(VAR_TYPES)} (or omit it for the model's)")
    return GaussianDiffusion(diffusion.betas, diffusion.prediction_type, var_type, diffusion.loss_type)

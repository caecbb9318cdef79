"""Oracle metrics for the ``twoscale`` dataset: does a generator reproduce the coarse classes, the fine
sub-classes, and the right amplitudes? No Inception network needed, since the prototypes are known.

For generated samples x̂ [N, C, H, W] (model space, not clipped), with ⟨·,·⟩ the inner product over all
D = C·H·W pixels and ‖P‖² = D for every unit-RMS prototype:

- ĉ1 = argmax_k ⟨x̂, P1[k]⟩, a1 = ⟨x̂, P1[ĉ1]⟩ / ‖P1[ĉ1]‖²       (fitted major class and coefficient)
- ĉ2 = argmax_j ⟨x̂ − α1·P1[ĉ1], P2[ĉ1, j]⟩, a2 = ⟨x̂, P2[ĉ1, ĉ2]⟩ / ‖P2‖²
  (P1 ⊥ P2, so subtracting α1·P1 changes no minor inner product; it is kept to match the definition)

- ``major_coverage`` = 1 − TV(histogram of ĉ1, uniform over K1); 1 = every class equally often
- ``minor_coverage`` = 1 − TV(histogram of (ĉ1, ĉ2), uniform over K1·K2)
- ``major_amplitude`` = mean(a1) / α1, ``minor_amplitude`` = mean(a2) / α2; 1 = right strength, 0 = missing
- ``major_present`` = share of samples with a1 > α1/2, ``minor_present`` = share with a2 > α2/2: the feature is
  clearly there, not just the largest of K noise projections (see the caveat below)
- ``residual_ratio`` = mean ‖x̂ − a1·P1[ĉ1] − a2·P2[ĉ1, ĉ2]‖² / (D·σ0²); on real data this is (D − 2)/D ≈ 1
  (two fitted coefficients absorb two noise dimensions); > 1 means extra noise or artefacts,
  < 1 means too little noise (over-smoothed samples)

- ``minor_floor`` = the ``minor_amplitude`` of the same samples scored against decoys Q[k, j]
  (``TwoScaleDataset.decoy_minor_prototypes``: K1·K2 directions in the minor feature subspace, orthogonal to
  every true prototype): ĉ2' = argmax_j ⟨x̂ − α1·P1[ĉ1], Q[ĉ1, j]⟩, floor = mean ⟨x̂, Q[ĉ1, ĉ2']⟩/‖Q‖² / α2.
  Same class count, so the same argmax selection bias as the true score, and the same frequency band, so
  high-frequency artefacts score on both; only knowing the templates separates them. NaN if no room for decoys.
- ``minor_amplitude_excess`` = ``minor_amplitude`` − ``minor_floor``: the template content above that floor
- ``minor_coef_median`` = median(a2) / α2 (robust to a few large coefficients)

TV(p, q) = ½ Σ |p − q|. With finitely many samples the coverages of real data sit slightly below 1
(multinomial fluctuation): compare models at equal sample counts.

Caveat — the noise floor: the argmax picks *some* class for every sample, so pure noise spreads uniformly
over the classes (coverage ≈ 1) and its chosen coefficient is the largest of K noise projections, which is
positive (std σ/√D each: for σ = 1, D = 768 about 0.04, i.e. ≈ 0.25·α2 with the defaults). Coverage and
amplitude only mean something together with ``*_present`` and ``residual_ratio``, which pure noise fails.
That is the floor of *unit-variance noise*; a trained model's samples carry far less high-frequency energy
than that, so their floor is ``minor_floor`` (0.03–0.08 measured), not 0.25: compare ``minor_amplitude_excess``.

Quantisation: saved images are clipped to [−1, 1]; with the default twoscale parameters ~10.6% of the data's
own pixels lie outside, so even the data scores below 1 after ``to_uint8`` (``quantisation_report``).
"""

from __future__ import annotations

import torch


def total_variation(counts: torch.Tensor) -> float:
    """TV distance between the normalised histogram ``counts`` and the uniform distribution."""
    p = counts.double() / counts.sum()
    return 0.5 * (p - 1.0 / counts.numel()).abs().sum().item()


def _fit_minor(x: torch.Tensor, x_minor: torch.Tensor, c1: torch.Tensor, p2: torch.Tensor):
    """ĉ2 = argmax_j ⟨x_minor, p2[ĉ1, j]⟩ and a2 = ⟨x, p2[ĉ1, ĉ2]⟩/‖p2[ĉ1, ĉ2]‖² for x [N, D], p2 [K1, K2, D]."""
    c2 = torch.einsum("nd,njd->nj", x_minor, p2[c1]).argmax(1)
    fit = p2[c1, c2]
    return c2, (x * fit).sum(1) / (fit * fit).sum(1)


@torch.no_grad()
def twoscale_oracle_metrics(samples: torch.Tensor, dataset) -> dict[str, float]:
    """Oracle metrics of ``samples`` [N, C, H, W] against a ``TwoScaleDataset``'s prototypes."""
    p1 = dataset.prototypes_major.double().flatten(1)  # [K1, D]
    k1, k2 = dataset.k1, dataset.k2
    p2 = dataset.prototypes_minor.double().reshape(k1, k2, -1)  # [K1, K2, D]
    x = samples.double().flatten(1).to(p1.device)  # [N, D]
    n, d = x.shape
    if d != p1.shape[1]:
        raise ValueError(f"samples have {d} values per image, the dataset {p1.shape[1]}")
    norm1 = (p1 * p1).sum(1)  # [K1]

    c1 = (x @ p1.T).argmax(1)  # [N]
    a1 = (x * p1[c1]).sum(1) / norm1[c1]
    x_minor = x - dataset.alpha1 * p1[c1]
    c2, a2 = _fit_minor(x, x_minor, c1, p2)
    p2_fit = p2[c1, c2]  # [N, D]
    residual = x - a1[:, None] * p1[c1] - a2[:, None] * p2_fit
    per_alpha2 = 1.0 / dataset.alpha2 if dataset.alpha2 else float("nan")
    minor = a2 * per_alpha2  # fitted minor coefficients / α2
    decoys = dataset.decoy_minor_prototypes()
    floor = float("nan")
    if decoys is not None:
        floor = _fit_minor(x, x_minor, c1, decoys.double().reshape(k1, k2, -1).to(x.device))[1].mean().item() \
            * per_alpha2

    major_counts = torch.bincount(c1, minlength=k1)
    minor_counts = torch.bincount(c1 * k2 + c2, minlength=k1 * k2)
    sigma2 = dataset.sigma0 ** 2
    return {
        "num_samples": n,
        "major_coverage": 1.0 - total_variation(major_counts),
        "minor_coverage": 1.0 - total_variation(minor_counts),
        "major_amplitude": (a1.mean() / dataset.alpha1).item() if dataset.alpha1 else float("nan"),
        "minor_amplitude": minor.mean().item(),
        "minor_floor": floor,
        "minor_amplitude_excess": minor.mean().item() - floor,
        "minor_coef_median": minor.median().item(),
        "major_present": (a1 > 0.5 * dataset.alpha1).double().mean().item(),
        "minor_present": (a2 > 0.5 * dataset.alpha2).double().mean().item(),
        "residual_ratio": ((residual ** 2).sum(1).mean() / (d * sigma2)).item() if sigma2 else float("nan"),
    }


@torch.no_grad()
def quantisation_report(dataset, num_samples: int = 2048) -> dict[str, float]:
    """What clipping costs on the data itself: the share of the first ``num_samples`` training images' pixels
    outside [−1, 1], and the oracle metrics of those images after ``to_uint8`` (clip to [−1, 1], round to
    1/127.5), i.e. the scores a perfect generator gets through the saved-image path (DDIM's ``clip_denoised``
    clips the final x0 the same way)."""
    from ..sampling import from_uint8, to_uint8

    x = torch.stack([dataset[i][0] for i in range(num_samples)])
    metrics = twoscale_oracle_metrics(from_uint8(to_uint8(x), torch.float64), dataset)
    return {"fraction_outside": (x.abs() > 1).double().mean().item(), **metrics}

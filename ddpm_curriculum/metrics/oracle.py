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

TV(p, q) = ½ Σ |p − q|. With finitely many samples the coverages of real data sit slightly below 1
(multinomial fluctuation): compare models at equal sample counts.

Caveat — the noise floor: the argmax picks *some* class for every sample, so pure noise spreads uniformly
over the classes (coverage ≈ 1) and its chosen coefficient is the largest of K noise projections, which is
positive (std σ/√D each: for σ = 1, D = 768 about 0.04, i.e. ≈ 0.25·α2 with the defaults). Coverage and
amplitude only mean something together with ``*_present`` and ``residual_ratio``, which pure noise fails.
"""

from __future__ import annotations

import torch


def total_variation(counts: torch.Tensor) -> float:
    """TV distance between the normalised histogram ``counts`` and the uniform distribution."""
    p = counts.double() / counts.sum()
    return 0.5 * (p - 1.0 / counts.numel()).abs().sum().item()


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
    norm2 = (p2 * p2).sum(2)  # [K1, K2]

    c1 = (x @ p1.T).argmax(1)  # [N]
    a1 = (x * p1[c1]).sum(1) / norm1[c1]
    x_minor = x - dataset.alpha1 * p1[c1]
    c2 = torch.einsum("nd,njd->nj", x_minor, p2[c1]).argmax(1)
    p2_fit = p2[c1, c2]  # [N, D]
    a2 = (x * p2_fit).sum(1) / norm2[c1, c2]
    residual = x - a1[:, None] * p1[c1] - a2[:, None] * p2_fit

    major_counts = torch.bincount(c1, minlength=k1)
    minor_counts = torch.bincount(c1 * k2 + c2, minlength=k1 * k2)
    sigma2 = dataset.sigma0 ** 2
    return {
        "num_samples": n,
        "major_coverage": 1.0 - total_variation(major_counts),
        "minor_coverage": 1.0 - total_variation(minor_counts),
        "major_amplitude": (a1.mean() / dataset.alpha1).item() if dataset.alpha1 else float("nan"),
        "minor_amplitude": (a2.mean() / dataset.alpha2).item() if dataset.alpha2 else float("nan"),
        "major_present": (a1 > 0.5 * dataset.alpha1).double().mean().item(),
        "minor_present": (a2 > 0.5 * dataset.alpha2).double().mean().item(),
        "residual_ratio": ((residual ** 2).sum(1).mean() / (d * sigma2)).item() if sigma2 else float("nan"),
    }

"""Improved precision & recall (Kynkäänniemi et al. 2019, k = 3) and density & coverage (Naeem et al. 2020,
k = 5) on feature vectors, with distances computed in row blocks (a full 50k × 50k matrix would be 20 GB).

Notation: real features R [n, d], generated (fake) features F [m, d]; r_k(x) = distance from x to its k-th
nearest neighbour within its own set, the point itself excluded; d(a, b) the Euclidean distance.

- precision = (1/m) Σ_j 1[∃ i: d(F_j, R_i) ≤ r_k(R_i)]       (fakes inside the real manifold)
- recall    = (1/n) Σ_i 1[∃ j: d(R_i, F_j) ≤ r_k(F_j)]       (reals inside the fake manifold)
- density   = 1/(k·m) Σ_j Σ_i 1[d(F_j, R_i) < r_k(R_i)]      (radii from the real set only, strict <)
- coverage  = (1/n) Σ_i 1[min_j d(R_i, F_j) < r_k(R_i)]

Everything runs on squared distances (monotone, no square roots) in float64; three passes over blocks of
rows (real–real radii, fake–fake radii, fake–real comparisons) give all four numbers.
"""

from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 24  # entries of one distance block: 128 MB in float64


def sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances [na, nb] between rows of a [na, d] and b [nb, d] (float64, ≥ 0)."""
    a_sq = (a * a).sum(1, keepdim=True)
    b_sq = (b * b).sum(1) if b_sq is None else b_sq
    return (a_sq + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_(min=0.0)


def _row_blocks(n_rows: int, n_cols: int, block_rows: int | None):
    step = block_rows or max(1, BLOCK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def knn_sq_radii(x: torch.Tensor, ks, block_rows: int | None = None) -> dict[int, torch.Tensor]:
    """Squared k-th-nearest-neighbour distance of every row of x [n, d] within x (self excluded), for each
    k in ``ks`` → {k: [n]}. The self-distance is the smallest entry of a row, so r_k is entry k (0-based)."""
    x = x.double()
    n, kmax = x.shape[0], max(ks)
    if n <= kmax:
        raise ValueError(f"{n} points are too few for a {kmax}-nearest-neighbour radius; use more samples")
    x_sq = (x * x).sum(1)
    out = {k: torch.empty(n, dtype=torch.float64, device=x.device) for k in ks}
    for rows in _row_blocks(n, n, block_rows):
        smallest = sq_dists(x[rows], x, x_sq).topk(kmax + 1, dim=1, largest=False).values  # ascending
        for k in ks:
            out[k][rows] = smallest[:, k]
    return out


@torch.no_grad()
def prdc(real: torch.Tensor, fake: torch.Tensor, pr_k: int = 3, dc_k: int = 5,
         block_rows: int | None = None) -> dict[str, float]:
    """Precision, recall (``pr_k``), density and coverage (``dc_k``) of fake [m, d] against real [n, d].

    ``block_rows`` bounds the rows of each distance block (default: 2^24 entries per block); the result is
    the same for every block size.
    """
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need real [n, d] and fake [m, d] with the same d, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    real, fake = real.double(), fake.to(device=real.device, dtype=torch.float64)
    n, m = real.shape[0], fake.shape[0]
    r_real = knn_sq_radii(real, sorted({pr_k, dc_k}), block_rows)  # {k: [n]}
    r_fake = knn_sq_radii(fake, [pr_k], block_rows)[pr_k]  # [m]
    real_sq = (real * real).sum(1)

    in_real_ball = 0  # fakes within some real pr_k-ball (precision)
    density_hits = 0  # Σ_j #{i: d(F_j, R_i) < r_dc(R_i)}
    real_covered_by_fake = torch.zeros(n, dtype=torch.bool, device=real.device)  # recall
    nearest_fake = torch.full((n,), float("inf"), dtype=torch.float64, device=real.device)  # coverage
    for rows in _row_blocks(m, n, block_rows):
        d = sq_dists(fake[rows], real, real_sq)  # [b, n]
        in_real_ball += (d <= r_real[pr_k][None, :]).any(dim=1).sum().item()
        density_hits += (d < r_real[dc_k][None, :]).sum().item()
        real_covered_by_fake |= (d <= r_fake[rows][:, None]).any(dim=0)
        nearest_fake = torch.minimum(nearest_fake, d.min(dim=0).values)
    return {
        "precision": in_real_ball / m,
        "recall": real_covered_by_fake.double().mean().item(),
        "density": density_hits / (dc_k * m),
        "coverage": (nearest_fake < r_real[dc_k]).double().mean().item(),
    }

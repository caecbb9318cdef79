"""Precision/recall and density/coverage: a brute-force loop of the definitions, blockwise = full matrix,
and the invariants of REFERENCE §5."""

import numpy as np
import pytest
import torch

from ddpm_curriculum.metrics.prdc import prdc


def brute_force(real: np.ndarray, fake: np.ndarray, pr_k: int, dc_k: int) -> dict:
    """The papers' definitions, one point at a time (distances, not squared; self excluded from radii)."""
    def dist(a, b):
        return float(np.sqrt(((a - b) ** 2).sum()))

    def radius(points, i, k):
        return sorted(dist(points[i], points[j]) for j in range(len(points)) if j != i)[k - 1]

    r_real_pr = [radius(real, i, pr_k) for i in range(len(real))]
    r_real_dc = [radius(real, i, dc_k) for i in range(len(real))]
    r_fake = [radius(fake, j, pr_k) for j in range(len(fake))]
    precision = np.mean([any(dist(f, r) <= r_real_pr[i] for i, r in enumerate(real)) for f in fake])
    recall = np.mean([any(dist(r, f) <= r_fake[j] for j, f in enumerate(fake)) for r in real])
    density = sum(dist(f, r) < r_real_dc[i] for f in fake for i, r in enumerate(real)) / (dc_k * len(fake))
    coverage = np.mean([min(dist(r, f) for f in fake) < r_real_dc[i] for i, r in enumerate(real)])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("pr_k, dc_k", [(3, 5), (1, 2)])
def test_matches_brute_force_definitions(pr_k, dc_k):
    rng = np.random.default_rng(pr_k)
    real = rng.standard_normal((40, 3))
    fake = rng.standard_normal((30, 3)) * 0.7 + 0.6
    ours = prdc(torch.from_numpy(real), torch.from_numpy(fake), pr_k, dc_k)
    ref = brute_force(real, fake, pr_k, dc_k)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert all(0 < ours[k] < 1 for k in ("precision", "recall", "coverage"))  # the test can tell


@pytest.mark.slow
def test_blockwise_equals_full_matrix():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(301, 16, generator=g), torch.randn(257, 16, generator=g) * 1.1
    full = prdc(real, fake, block_rows=10_000)
    for block in (1, 7, 64):
        assert prdc(real, fake, block_rows=block) == full


def test_identical_and_disjoint_sets():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 32, generator=g)
    same = prdc(x, x.clone())
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    # each real ball holds itself and its k−1 nearer neighbours strictly inside: density 1 (up to ties of
    # the k-th neighbour, which float round-off may break either way)
    assert same["density"] == pytest.approx(1.0, abs=0.01)
    far = prdc(x, x + 1000.0)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_two_samples_of_one_gaussian():
    # REFERENCE §5: d = 64, 2000 points, k = 3 → P ≈ R ≈ 0.61; coverage ≈ 1 − 2^−k (k = 5); density ≈ 1
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(2000, 64, generator=g), torch.randn(2000, 64, generator=g)
    out = prdc(real, fake)
    assert out["precision"] == pytest.approx(0.61, abs=0.06)
    assert out["recall"] == pytest.approx(0.61, abs=0.06)
    assert out["coverage"] == pytest.approx(1 - 2 ** -5, abs=0.02)
    assert out["density"] == pytest.approx(1.0, abs=0.15)

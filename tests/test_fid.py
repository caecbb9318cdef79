"""Fréchet distance against closed forms and scipy's sqrtm; streaming float64 statistics against np.cov."""

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm_curriculum.errors import UserError
from ddpm_curriculum.metrics.fid import FeatureStats, frechet_distance, load_stats, save_stats


def random_spd(rng, d, n=None, scale=None):
    """Covariance of n Gaussian points with per-dimension scales: SPD for n > d, singular PSD for n ≤ d."""
    n = n or 3 * d
    scale = rng.uniform(0.1, 3.0, d) if scale is None else scale
    x = rng.standard_normal((n, d)) * scale @ np.linalg.qr(rng.standard_normal((d, d)))[0]
    return np.cov(x, rowvar=False)


def sqrtm_fid(mu1, s1, mu2, s2):
    """The textbook formula with scipy.linalg.sqrtm (pytorch-fid's route), as the reference."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d, seed", [(8, 0), (64, 1), (256, 2)])
def test_agrees_with_sqrtm_on_random_spd(d, seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), sqrtm_fid(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_closed_forms():
    rng = np.random.default_rng(3)
    d = 32
    mu, s = rng.standard_normal(d), random_spd(rng, d)
    # identical statistics → 0 (relative to the size of the traces)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-10 * np.trace(s)
    # equal covariances → ‖Δμ‖²
    mu2 = rng.standard_normal(d)
    assert frechet_distance(mu, s, mu2, s) == pytest.approx(((mu - mu2) ** 2).sum(), rel=1e-9)
    # diagonal → ‖Δμ‖² + Σ(√a − √b)², including zero variances (the singular, eigh fallback path)
    a, b = rng.uniform(0, 2, d), rng.uniform(0, 2, d)
    a[:5] = 0.0
    expected = ((mu - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # σ2 = c²·σ1 with equal means → (1 − c)²·tr σ1
    c = 1.7
    assert frechet_distance(mu, s, mu, c * c * s) == pytest.approx((1 - c) ** 2 * np.trace(s), rel=1e-9)


def test_invariances():
    rng = np.random.default_rng(4)
    d = 24
    x, y = rng.standard_normal((200, d)) * 2 + 1, rng.standard_normal((300, d)) * rng.uniform(0.5, 2, d)
    stats = lambda a: (a.mean(0), np.cov(a, rowvar=False))  # noqa: E731
    base = frechet_distance(*stats(x), *stats(y))
    assert frechet_distance(*stats(y), *stats(x)) == pytest.approx(base, rel=1e-9)  # symmetric
    assert frechet_distance(*stats(3 * x), *stats(3 * y)) == pytest.approx(9 * base, rel=1e-9)  # scale c²
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    shift = rng.standard_normal(d) * 5
    moved = frechet_distance(*stats(x @ q.T + shift), *stats(y @ q.T + shift))
    assert moved == pytest.approx(base, rel=1e-9)  # common rotation + translation


def test_singular_covariance_matches_sqrtm():
    # fewer samples than dims: both covariances singular; the eigh fallback must still be exact
    rng = np.random.default_rng(5)
    d = 40
    s1, s2 = random_spd(rng, d, n=20), random_spd(rng, d, n=30)
    mu = np.zeros(d)
    ref = sqrtm_fid(mu, s1, mu, s2)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(ref, rel=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_streaming_stats_equal_np_cov_for_any_split_and_world_size(world):
    rng = np.random.default_rng(world)
    d, n = 16, 257
    feats = (rng.standard_normal((n, d)) * rng.uniform(0.1, 2, d) + rng.uniform(-3, 3, d)).astype(np.float32)
    # rank r owns images r, r+W, …, fed in random batch sizes; ranks are merged like the all-reduce does
    shards = []
    for r in range(world):
        mine = feats[r::world]
        st = FeatureStats(d)
        cuts = np.sort(rng.choice(np.arange(1, len(mine)), size=min(6, len(mine) - 1), replace=False))
        for part in np.split(mine, cuts):
            st.update(torch.from_numpy(part))
        shards.append(st)
    total = shards[0]
    for st in shards[1:]:
        total.merge(st)
    total.all_reduce()  # one process: a no-op that must keep the sums
    mu, sigma = total.mean_cov()
    ref64 = feats.astype(np.float64)
    assert total.n == n
    np.testing.assert_allclose(mu, ref64.mean(0), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(ref64, rowvar=False), rtol=1e-10, atol=1e-12)


def test_stats_file_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = rng.standard_normal(5), random_spd(rng, 5)
    path = save_stats(tmp_path / "s.npz", mu, sigma, features=np.ones((3, 5), np.float32), num_images=3)
    data = load_stats(path)
    np.testing.assert_array_equal(data["mu"], mu)
    np.testing.assert_array_equal(data["sigma"], sigma)
    assert int(data["num_images"]) == 3 and data["features"].shape == (3, 5)
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(UserError, match="not 'mu' and 'sigma'"):
        load_stats(tmp_path / "bad.npz")
    (tmp_path / "trunc.npz").write_bytes(path.read_bytes()[:50])
    with pytest.raises(UserError, match="cannot read statistics file"):
        load_stats(tmp_path / "trunc.npz")

"""Twoscale oracle metrics: near-perfect on real data, low on degraded data, equal to a brute-force loop."""

import pytest
import torch

from ddpm_curriculum.data.twoscale import TwoScaleDataset
from ddpm_curriculum.metrics.oracle import quantisation_report, twoscale_oracle_metrics


@pytest.fixture(scope="module")
def ds():
    return TwoScaleDataset(num_samples=2048)


@pytest.fixture(scope="module")
def real(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))])


def brute_force(samples, ds):
    """Per-sample Python loop over the definitions in the module docstring."""
    k1, k2, d = ds.k1, ds.k2, samples[0].numel()
    major, minor = [0] * k1, [0] * (k1 * k2)
    a1s, a2s, res, decoy = [], [], [], []
    q = ds.decoy_minor_prototypes().double()
    for x in samples.double():
        x = x.flatten()
        p1 = [ds.prototypes_major[k].double().flatten() for k in range(k1)]
        c1 = max(range(k1), key=lambda k: float(x @ p1[k]))
        p2 = [ds.prototypes_minor[c1, j].double().flatten() for j in range(k2)]
        c2 = max(range(k2), key=lambda j: float((x - ds.alpha1 * p1[c1]) @ p2[j]))
        a1 = float(x @ p1[c1] / (p1[c1] @ p1[c1]))
        a2 = float(x @ p2[c2] / (p2[c2] @ p2[c2]))
        qs = [q[c1, j].flatten() for j in range(k2)]
        c2q = max(range(k2), key=lambda j: float((x - ds.alpha1 * p1[c1]) @ qs[j]))
        decoy.append(float(x @ qs[c2q] / (qs[c2q] @ qs[c2q])))
        major[c1] += 1
        minor[c1 * k2 + c2] += 1
        a1s.append(a1)
        a2s.append(a2)
        res.append(float(((x - a1 * p1[c1] - a2 * p2[c2]) ** 2).sum()))
    n = len(samples)
    tv = lambda counts: 0.5 * sum(abs(c / n - 1 / len(counts)) for c in counts)
    return {"major_coverage": 1 - tv(major), "minor_coverage": 1 - tv(minor),
            "major_amplitude": sum(a1s) / n / ds.alpha1, "minor_amplitude": sum(a2s) / n / ds.alpha2,
            "major_present": sum(a > ds.alpha1 / 2 for a in a1s) / n,
            "minor_present": sum(a > ds.alpha2 / 2 for a in a2s) / n,
            "residual_ratio": sum(res) / n / (d * ds.sigma0 ** 2),
            "minor_floor": sum(decoy) / n / ds.alpha2,
            "minor_amplitude_excess": (sum(a2s) - sum(decoy)) / n / ds.alpha2,
            "minor_coef_median": float(torch.tensor(a2s, dtype=torch.float64).median()) / ds.alpha2}


def test_real_data_scores_near_perfect(ds, real):
    m = twoscale_oracle_metrics(real, ds)
    d = real[0].numel()
    assert m["num_samples"] == 2048
    assert m["major_coverage"] > 0.95 and m["minor_coverage"] > 0.9
    assert abs(m["major_amplitude"] - 1) < 0.01 and abs(m["minor_amplitude"] - 1) < 0.02
    assert abs(m["residual_ratio"] - (d - 2) / d) < 0.02
    assert m["major_present"] == 1.0 and m["minor_present"] > 0.99


def test_minor_features_removed(ds, real):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(4, (1000,), generator=g)
    no_minor = ds.alpha1 * ds.prototypes_major[labels] + ds.sigma0 * torch.randn(1000, 3, 16, 16, generator=g)
    m = twoscale_oracle_metrics(no_minor, ds)
    assert abs(m["minor_amplitude"]) < 0.1 and abs(m["major_amplitude"] - 1) < 0.01
    assert m["minor_present"] == 0 and m["major_present"] == 1.0


def test_single_class_has_low_coverage(ds, real):
    _, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
    one = real[torch.tensor(labels) // ds.k2 == 2]
    m = twoscale_oracle_metrics(one, ds)
    assert m["major_coverage"] == pytest.approx(1 - (1 - 1 / ds.k1))  # TV to uniform = 1 − 1/K1
    assert m["minor_coverage"] < 0.3


def test_pure_noise_has_no_features(ds):
    noise = torch.randn(1000, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    m = twoscale_oracle_metrics(noise * 0.3, ds)
    assert abs(m["minor_amplitude"]) < 0.5 and m["major_amplitude"] < 0.2
    assert m["residual_ratio"] > 10
    assert m["major_present"] == 0 and m["minor_present"] == 0


def test_noise_floor_fools_coverage_but_not_presence(ds):
    """Unit-variance noise (what an untrained model samples) covers every class uniformly and has a
    positive chosen minor coefficient — the argmax selection bias; the presence shares stay near zero."""
    noise = torch.randn(4000, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    m = twoscale_oracle_metrics(noise, ds)
    assert m["major_coverage"] > 0.95 and m["minor_coverage"] > 0.9
    d = noise[0].numel()
    # E[max of K2 iid N(0, 1/D)] for K2 = 4 is 1.0294/√D (order-statistic constant)
    assert m["minor_amplitude"] == pytest.approx(1.0294 / d ** 0.5 / ds.alpha2, rel=0.1)
    assert m["major_present"] < 0.01 and m["minor_present"] < 0.15


def test_matches_brute_force(ds, real):
    x = real[:40] + 0.05 * torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    fast, slow = twoscale_oracle_metrics(x, ds), brute_force(x, ds)
    for k, v in slow.items():
        assert fast[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_decoys_lie_in_the_minor_band_orthogonal_to_every_prototype(ds):
    q = ds.decoy_minor_prototypes().double().reshape(ds.k1 * ds.k2, -1)
    d = q.shape[1]
    basis = torch.from_numpy(ds.minor_subspace())
    protos = torch.cat([ds.prototypes_major.double().flatten(1), ds.prototypes_minor.double().reshape(-1, d)])
    assert (q @ protos.T).abs().max() / d < 1e-6  # orthogonal to all K1 + K1·K2 prototypes
    torch.testing.assert_close(q @ q.T / d, torch.eye(len(q), dtype=torch.float64), atol=1e-6, rtol=0)  # unit RMS
    torch.testing.assert_close((q @ basis.T) @ basis, q, atol=1e-5, rtol=0)  # inside the minor band
    assert torch.equal(ds.decoy_minor_prototypes(), TwoScaleDataset(num_samples=8).decoy_minor_prototypes())
    assert not torch.equal(ds.decoy_minor_prototypes(), TwoScaleDataset(seed=1).decoy_minor_prototypes())


def test_pure_noise_floor_is_the_selection_bias(ds):
    noise = torch.randn(4000, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    m = twoscale_oracle_metrics(noise, ds)
    d = noise[0].numel()
    assert m["minor_floor"] == pytest.approx(1.0294 / d ** 0.5 / ds.alpha2, rel=0.1)  # E max of 4 N(0, 1/D)
    assert abs(m["minor_amplitude_excess"]) < 0.03


def test_major_only_has_no_excess(ds):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(4, (1000,), generator=g)
    no_minor = ds.alpha1 * ds.prototypes_major[labels] + ds.sigma0 * torch.randn(1000, 3, 16, 16, generator=g)
    m = twoscale_oracle_metrics(no_minor, ds)
    assert m["minor_present"] == 0
    floor = 1.0294 * ds.sigma0 / 768 ** 0.5 / ds.alpha2  # the σ0 noise's selection bias, ≈ 0.012
    assert m["minor_floor"] == pytest.approx(floor, rel=0.1) and m["minor_amplitude"] == pytest.approx(floor, rel=0.1)
    assert abs(m["minor_amplitude_excess"]) < 0.005


@pytest.mark.slow
def test_correct_minor_has_full_excess_and_a_decoy_minor_has_none(ds, real):
    m = twoscale_oracle_metrics(real, ds)
    assert m["minor_present"] > 0.99 and m["minor_coef_median"] == pytest.approx(1, abs=0.01)
    assert m["minor_amplitude_excess"] == pytest.approx(1 - 1.0294 * ds.sigma0 / 768 ** 0.5 / ds.alpha2, abs=0.01)
    # the same images with each minor template swapped for its decoy: the amplitude moves to the floor
    _, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
    labels = torch.tensor(labels)
    k, j = labels // ds.k2, labels % ds.k2
    swapped = real + ds.alpha2 * (ds.decoy_minor_prototypes()[k, j] - ds.prototypes_minor[k, j])
    m = twoscale_oracle_metrics(swapped, ds)
    assert m["minor_present"] == 0 and m["minor_floor"] == pytest.approx(1, abs=0.01)
    assert m["minor_amplitude_excess"] < -0.95


def test_quantisation_costs_the_default_data_its_perfect_score():
    """~10.6% of the default data's pixels are clipped by to_uint8; with 0.4% clipped the data keeps ≈ 1/1."""
    m = quantisation_report(TwoScaleDataset(num_samples=512), num_samples=512)
    assert m["fraction_outside"] == pytest.approx(0.106, abs=0.01)
    assert m["major_amplitude"] < 0.9 and m["minor_amplitude"] < 0.93 and m["residual_ratio"] > 3
    small = TwoScaleDataset(alpha1=0.3, alpha2=0.15, sigma0=0.02, num_samples=512)
    m = quantisation_report(small, num_samples=512)
    assert m["fraction_outside"] < 0.01
    assert m["major_amplitude"] == pytest.approx(1, abs=0.01) and m["minor_amplitude"] == pytest.approx(1, abs=0.01)

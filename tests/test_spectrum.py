"""Radially averaged power spectrum (metrics/spectrum.py) against a brute-force DFT and known signals."""

import cmath
import math

import numpy as np
import pytest

from ddpm_curriculum.errors import UserError
from ddpm_curriculum.metrics.spectrum import SpectrumStats, compare_spectra


def brute_force_band_power(images, bands):
    """Explicit DFT sums and per-bin band assignment, written from the module docstring's definitions."""
    n, h, w, c = images.shape
    sums, counts = [0.0] * bands, [0] * bands
    for u in range(h):
        for v in range(w):
            fu = (u if u < (h + 1) // 2 else u - h) / h  # signed frequency, cycles per pixel
            fv = (v if v < (w + 1) // 2 else v - w) / w
            r = math.hypot(fu, fv) / 0.5
            if r == 0 or r > 1 + 1e-12:
                continue
            k = min(b for b in range(bands) if r <= (b + 1) / bands + 1e-12)
            counts[k] += 1
            for i in range(n):
                for ch in range(c):
                    x = images[i, :, :, ch] / 255.0
                    f = sum(x[a, b] * cmath.exp(-2j * math.pi * (u * a / h + v * b / w))
                            for a in range(h) for b in range(w))
                    sums[k] += abs(f) ** 2 / (h * w)
    return np.array(sums) / (np.array(counts) * n * c)


def test_band_power_matches_brute_force_dft():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 6, 8, 3), dtype=np.uint8)  # non-square
    stats = SpectrumStats(6, 8, 3)
    stats.update(images[:1])
    stats.update(images[1:])  # streaming over batches
    np.testing.assert_allclose(stats.band_power(), brute_force_band_power(images, 3), rtol=1e-10)


def sinusoid(size, cycles, n=4, phase_seed=0):
    """uint8 images [n, size, size, 3] of a horizontal sinusoid with ``cycles`` periods across the image."""
    rng = np.random.default_rng(phase_seed)
    x = np.arange(size)
    rows = [0.5 + 0.4 * np.sin(2 * np.pi * cycles * x / size + rng.uniform(0, 2 * np.pi)) for _ in range(n)]
    return (np.stack([np.broadcast_to(r[None, :, None], (size, size, 3)) for r in rows]) * 255).round() \
        .astype(np.uint8)


@pytest.mark.parametrize("cycles, band", [(2, 0), (7, 2), (12, 4), (15, 5)])
def test_a_sinusoid_puts_its_power_in_its_band(cycles, band):
    """32×32, 6 bands of width 16/6 frequency units: 2 cycles → r = 0.125 (band 0), 15 → 0.94 (band 5)."""
    stats = SpectrumStats(32, 32, 6)
    stats.update(sinusoid(32, cycles))
    p = stats.band_power()
    assert p.argmax() == band
    assert p[band] > 1e3 * np.delete(p, band).max()  # the rest is uint8 rounding noise
    assert (stats.high_power() > 1e-3 * p.max()) == (cycles / 16 > 2 / 3)  # high band = r in (2/3, 1]


def test_white_noise_is_flat_and_compares_equal_to_itself():
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, (400, 16, 16, 3), dtype=np.uint8) for _ in range(2))
    sa, sb = SpectrumStats(16, 16, 4), SpectrumStats(16, 16, 4)
    sa.update(a)
    sb.update(b)
    var = (255 ** 2 - 1) / 12 / 255 ** 2  # variance of a uniform uint8 level, scaled to [0, 1]
    np.testing.assert_allclose(sa.band_power(), var, rtol=0.03)  # white: E|DFT|²/(HW) = σ² at every r > 0
    out = compare_spectra(sa, sb)
    assert max(abs(v) for v in out["spectrum_log10_ratio"]) < 0.02 and out["spectrum_high_error"] < 0.02
    blurred = ((a.astype(float) + np.roll(a, 1, axis=2)) / 2).round().astype(np.uint8)  # box blur along x
    sc = SpectrumStats(16, 16, 4)
    sc.update(blurred)
    low_pass = compare_spectra(sc, sb)
    assert low_pass["spectrum_high_log10_ratio"] < -0.3  # the blur removes high-frequency power
    assert low_pass["spectrum_log10_ratio"][0] > low_pass["spectrum_log10_ratio"][-1]


def test_bad_band_counts_and_sizes_are_one_line_errors():
    with pytest.raises(UserError, match="use at most"):
        SpectrumStats(8, 8, 6)
    stats = SpectrumStats(16, 16, 4)
    with pytest.raises(UserError, match="images are 8x8 but the spectrum was set up for 16x16"):
        stats.update(np.zeros((1, 8, 8, 3), np.uint8))

"""Radially averaged power spectrum of two image sets: does the fine detail have the right energy?

Definitions (all images uint8 [N, H, W, C], scaled to [0, 1]):
- Power of one channel c of one image: P(u, v) = |DFT₂(x_c)(u, v)|² / (H·W), no window (the DFT treats the
  image as periodic, so both sets share the edge-seam energy along the axes). Channels are treated alike and
  averaged (per-channel mean, not grayscale): a colour-only error counts as much as a luminance one.
- Radial frequency of bin (u, v): r = √(f_u² + f_v²) / 0.5, with f the signed DFT frequencies in cycles per
  pixel (numpy ``fftfreq``), so r = 1 is the Nyquist frequency along an axis. r = 0 (the mean) and the
  corners r > 1 (only diagonal directions reach them) are left out.
- Bands: ``bands`` equal-width intervals (e_k, e_{k+1}] of r, e_k = k/bands; band power = mean of P over the
  frequencies in the band, over all images and channels.
- Per band: log10(P_generated / P_real); 0 is right, −0.3 is half the power (blur), +0.3 twice (noise).
- High band: r ∈ (2/3, 1], the top third of the frequencies up to Nyquist: ``high_log10_ratio`` is
  log10 of the generated/real ratio of its mean power, ``high_error`` its absolute value.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserError

HIGH_BAND = (2.0 / 3.0, 1.0)  # radial frequency, fraction of Nyquist


def radial_frequency(height: int, width: int) -> np.ndarray:
    """r [H, W] of every DFT bin (numpy's unshifted layout), in units of the Nyquist frequency."""
    fu, fv = np.fft.fftfreq(height), np.fft.fftfreq(width)
    return np.sqrt(fu[:, None] ** 2 + fv[None, :] ** 2) / 0.5


def band_index(height: int, width: int, bands: int) -> np.ndarray:
    """Band of each DFT bin [H, W]: 0 … bands−1, or −1 for r = 0 and r > 1 (excluded)."""
    r = radial_frequency(height, width)
    k = np.ceil(r * bands - 1e-9).astype(int) - 1  # (e_k, e_{k+1}] → k
    k[(r == 0) | (r > 1 + 1e-12)] = -1
    return k


def check_bands(height: int, width: int, bands: int) -> None:
    if bands < 1:
        raise UserError(f"--spectrum-bands {bands} must be ≥ 1")
    counts = np.bincount(band_index(height, width, bands).ravel() + 1, minlength=bands + 1)[1:]
    if (counts == 0).any():
        fit = max(b for b in range(1, bands) if (np.bincount(band_index(height, width, b).ravel() + 1,
                                                              minlength=b + 1)[1:] > 0).all())
        raise UserError(f"--spectrum-bands {bands} leaves bands without any frequency at {width}x{height}; "
                        f"use at most {fit}")


class SpectrumStats:
    """Streaming per-band power sums (float64) of one image set, and the high band's."""

    def __init__(self, height: int, width: int, bands: int):
        check_bands(height, width, bands)
        self.shape, self.bands = (height, width), bands
        self.index = band_index(height, width, bands)
        r = radial_frequency(height, width)
        self.high = (r > HIGH_BAND[0]) & (r <= HIGH_BAND[1] + 1e-12)
        self.counts = np.bincount(self.index.ravel() + 1, minlength=bands + 1)[1:].astype(np.float64)
        self.band_sum = np.zeros(bands)
        self.high_sum = 0.0
        self.n = 0  # image-channels

    def update(self, images: np.ndarray) -> None:
        """Add uint8 images [B, H, W, C]."""
        if tuple(images.shape[1:3]) != self.shape:
            raise UserError(f"images are {images.shape[2]}x{images.shape[1]} but the spectrum was set up for "
                            f"{self.shape[1]}x{self.shape[0]}; compare images of one size")
        x = np.moveaxis(images.astype(np.float64) / 255.0, -1, 1)  # [B, C, H, W]
        power = np.abs(np.fft.fft2(x)) ** 2 / (self.shape[0] * self.shape[1])
        flat = power.reshape(-1, self.shape[0] * self.shape[1]).sum(0)  # summed over images and channels
        keep = self.index.ravel() >= 0
        self.band_sum += np.bincount(self.index.ravel()[keep], weights=flat[keep], minlength=self.bands)
        self.high_sum += float(flat[self.high.ravel()].sum())
        self.n += power.shape[0] * power.shape[1]

    def band_power(self) -> np.ndarray:
        """Mean power per band [bands]."""
        return self.band_sum / (self.counts * self.n)

    def high_power(self) -> float:
        return self.high_sum / (self.high.sum() * self.n)


def spectrum_stats(source, bands: int, batch_size: int = 256) -> SpectrumStats:
    """Spectrum statistics of an image source (``len``, ``shape`` (H, W, C), ``load(indices)``)."""
    h, w, _ = source.shape
    stats = SpectrumStats(h, w, bands)
    for lo in range(0, len(source), batch_size):
        stats.update(source.load(range(lo, min(len(source), lo + batch_size))))
    return stats


def compare_spectra(generated: SpectrumStats, real: SpectrumStats) -> dict:
    """The metrics: per-band log10 ratios (a list, low → high), the high-band ratio and error, band edges."""
    ratio = np.log10(generated.band_power() / real.band_power())
    high = math.log10(generated.high_power() / real.high_power())
    return {"spectrum_log10_ratio": [float(v) for v in ratio], "spectrum_high_log10_ratio": high,
            "spectrum_high_error": abs(high),
            "spectrum_band_edges": [k / generated.bands for k in range(generated.bands + 1)]}

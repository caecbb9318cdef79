"""``twoscale``: the built-in hierarchical two-scale mixture (no download).

    x = α1·P1[k] + α2·P2[k, j] + σ0·ε,      k ~ U{0..K1−1}, j ~ U{0..K2−1}, ε ~ N(0, I)

P1[k] are smooth prototypes from a low-frequency 2-D DCT subspace (the "major" features a high-noise
stage can see); P2[k, j] are textures from a high-frequency DCT subspace (the "minor" features that only
low-noise stages can resolve). All K1 + K1·K2 prototypes are mutually orthogonal (random combinations
inside each subspace, orthonormalised by QR; the two subspaces are disjoint sets of orthonormal DCT
basis images) and unit-RMS (mean square over the C·H·W pixels = 1). Values are not clipped: with the
defaults |x| stays mostly inside [-1, 1].

Unlike a Gaussian model x = α1·M1·z1 + α2·M2·z2 (REFERENCE §3), whose optimal denoiser is linear, this
mixture has a non-linear optimal denoiser, and whether minor features are learned is measured directly
by the oracle metrics (``ddpm_curriculum.metrics.oracle``).

Sample i is a fixed function of (seed, i) only: independent of ``num_samples``, DataLoader workers and
access order, so loaders, resumes and ranks are reproducible. The ``test`` split is the continuation of the
same stream (samples num_samples, num_samples + 1, …): same prototypes, images never seen in training.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """A fast, well-mixed 64-bit hash (SplitMix64 finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix [n, n]; row u is the u-th cosine basis vector."""
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def _frequency_sets(size: int):
    """Low set: max(u, v) ≤ 2 (smooth blobs and gradients); high set: u + v ≥ size (fine texture)."""
    pairs = [(u, v) for u in range(size) for v in range(size)]
    low = [p for p in pairs if max(p) <= min(2, size // 2 - 1)]
    high = [p for p in pairs if p[0] + p[1] >= size]
    return low, high


def _basis(pairs, size: int, channels: int) -> np.ndarray:
    """Orthonormal basis images [len(pairs)·channels, C, H, W] (one DCT image on one channel each)."""
    m = dct_matrix(size)
    out = np.zeros((len(pairs) * channels, channels, size, size))
    for i, (u, v) in enumerate(pairs):
        for c in range(channels):
            out[i * channels + c, c] = np.outer(m[u], m[v])
    return out


def _prototypes(basis: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` orthogonal unit-RMS random combinations of the orthonormal ``basis`` rows."""
    flat = basis.reshape(len(basis), -1)
    q, _ = np.linalg.qr(rng.standard_normal((len(basis), count)))  # orthonormal columns [n_basis, count]
    protos = q.T @ flat  # orthonormal rows (‖·‖ = 1)
    return (protos * math.sqrt(flat.shape[1])).reshape(count, *basis.shape[1:])  # unit RMS


class TwoScaleDataset(Dataset):
    """The two-scale mixture. Items are ``(x [C,H,W] float32, label = k·K2 + j)``."""

    def __init__(self, image_size: int = 16, channels: int = 3, k1: int = 4, k2: int = 4, alpha1: float = 0.6,
                 alpha2: float = 0.15, sigma0: float = 0.05, num_samples: int = 16384, seed: int = 0,
                 split: str = "train"):
        for name, value in dict(image_size=image_size, channels=channels, k1=k1, k2=k2,
                                num_samples=num_samples).items():
            if int(value) < 1:
                raise UserError(f"twoscale: {name} = {value} must be a positive integer")
        if image_size < 4:
            raise UserError(f"twoscale: image_size = {image_size} must be at least 4")
        low, high = _frequency_sets(image_size)
        n_low, n_high = len(low) * channels, len(high) * channels
        if k1 > n_low:
            raise UserError(f"twoscale: k1 = {k1} exceeds the {n_low} low-frequency components of a "
                            f"{channels}x{image_size}x{image_size} image; lower dataset.k1")
        if k1 * k2 > n_high:
            raise UserError(f"twoscale: k1*k2 = {k1 * k2} exceeds the {n_high} high-frequency components; "
                            f"lower dataset.k2 or raise dataset.image_size")
        if split not in ("train", "test"):
            raise UserError(f"twoscale: split '{split}' is not 'train' or 'test'")
        self.k1, self.k2, self.num_samples, self.seed = k1, k2, num_samples, seed
        self.first_index = num_samples if split == "test" else 0
        self.alpha1, self.alpha2, self.sigma0 = float(alpha1), float(alpha2), float(sigma0)
        self.image_shape = (channels, image_size, image_size)
        rng = np.random.default_rng([seed, 0x7C0])
        p1 = _prototypes(_basis(low, image_size, channels), k1, rng)
        p2 = _prototypes(_basis(high, image_size, channels), k1 * k2, rng)
        self.prototypes_major = torch.from_numpy(p1).float()  # [K1, C, H, W]
        self.prototypes_minor = torch.from_numpy(p2).float().view(k1, k2, *self.image_shape)  # [K1, K2, C, H, W]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int):
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        g = torch.Generator().manual_seed(splitmix64((self.seed << 32) ^ (self.first_index + int(i))) >> 1)
        label = int(torch.randint(self.k1 * self.k2, (1,), generator=g))
        k, j = divmod(label, self.k2)
        eps = torch.randn(self.image_shape, generator=g)
        x = self.alpha1 * self.prototypes_major[k] + self.alpha2 * self.prototypes_minor[k, j] + self.sigma0 * eps
        return x, label

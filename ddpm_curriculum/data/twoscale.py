"""``twoscale``: the built-in hierarchical two-scale mixture (no download).

    x = α1·P1[k] + α2·P2[k, j] + σ0·ε,      k ~ U{0..K1−1}, j ~ U{0..K2−1}, ε ~ N(0, I)

P1[k] are smooth prototypes from a low-frequency 2-D DCT subspace (the "major" features a high-noise
stage can see); P2[k, j] are textures from a high-frequency DCT subspace (the "minor" features that only
low-noise stages can resolve). All K1 + K1·K2 prototypes are mutually orthogonal (random combinations
inside each subspace, orthonormalised by QR; the two subspaces are disjoint sets of orthonormal DCT
basis images) and unit-RMS (mean square over the C·H·W pixels = 1). Values are not clipped: with the
defaults about 10.6% of the pixels lie outside [-1, 1] and are clipped by ``to_uint8`` (saved images) and by
DDIM's ``clip_denoised`` (``metrics.oracle.quantisation_report`` measures what that costs the oracle scores).
There are no flips or shifts (``random_flip`` defaults to off for twoscale), so x is exactly the K1·K2-component
Gaussian mixture above (``metrics.bayes`` builds its exact posterior).

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

    # no flips: a mirrored prototype is not a prototype
    default_size, fixed_size, natural_images = 16, False, False

    @classmethod
    def from_config(cls, d, size: int, split: str, use_cache: bool) -> TwoScaleDataset:
        return cls(image_size=size, channels=d.channels, k1=d.k1, k2=d.k2, alpha1=d.alpha1, alpha2=d.alpha2,
                   sigma0=d.sigma0, num_samples=d.num_samples, seed=d.seed, split=split)

    @staticmethod
    def channels_of(d) -> int:
        return d.channels

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
        self.class_names = [f"{k}.{j}" for k in range(k1) for j in range(k2)]  # label k·K2 + j
        self._high = high
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
        return self._draw(self.first_index + int(i))

    def _draw(self, index: int):
        """Sample ``index`` of the stream (train split: 0 … num_samples−1, test split: from num_samples)."""
        g = torch.Generator().manual_seed(splitmix64((self.seed << 32) ^ index) >> 1)
        label = int(torch.randint(self.k1 * self.k2, (1,), generator=g))
        k, j = divmod(label, self.k2)
        eps = torch.randn(self.image_shape, generator=g)
        x = self.alpha1 * self.prototypes_major[k] + self.alpha2 * self.prototypes_minor[k, j] + self.sigma0 * eps
        return x, label

    def held_out(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The test split's first ``n`` images and labels (never in training, whichever split this is):
        x [n, C, H, W] float32, labels [n] long (k·K2 + j)."""
        xs, labels = zip(*(self._draw(self.num_samples + i) for i in range(n)), strict=True)
        return torch.stack(xs), torch.tensor(labels)

    def minor_subspace(self) -> np.ndarray:
        """Orthonormal rows [m, D] (float64) spanning the minor feature subspace: the m = (#high-frequency DCT
        pairs)·C basis images every P2[k, j] is a combination of (D = C·H·W; m = 360 for 16×16×3)."""
        c, size = self.image_shape[0], self.image_shape[1]
        return _basis(self._high, size, c).reshape(-1, c * size * size)

    def decoy_minor_prototypes(self) -> torch.Tensor | None:
        """K1·K2 decoys [K1, K2, C, H, W] (float32, unit RMS, mutually orthogonal) in the minor feature
        subspace and orthogonal to every true prototype; None when the subspace has no room (m < 2·K1·K2).

        The span of the true P2 is exactly K1·K2-dimensional (it is the P2 themselves), so the decoys live in
        the minor *feature* subspace (``minor_subspace``: the high-frequency DCT images the P2 are drawn from),
        made like the P2 (random combinations, orthonormalised by QR) and then orthogonalised against the P2.
        A fixed function of ``seed``. They look like minor features to every statistic except the templates.
        """
        basis = self.minor_subspace()  # [m, D]
        m, count = len(basis), self.k1 * self.k2
        if m < 2 * count:
            return None
        d = basis.shape[1]
        true = basis @ self.prototypes_minor.double().reshape(count, d).numpy().T  # coordinates [m, K1K2]
        q_true, _ = np.linalg.qr(true)
        g = np.random.default_rng([self.seed, 0xDEC0]).standard_normal((m, count))
        for _ in range(2):  # twice: orthogonal to float64 precision, not just to the first pass's
            g = g - q_true @ (q_true.T @ g)
            g, _ = np.linalg.qr(g)
        decoys = (g.T @ basis) * math.sqrt(d)  # unit RMS
        return torch.from_numpy(decoys).float().view(self.k1, self.k2, *self.image_shape)

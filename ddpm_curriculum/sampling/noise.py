"""One random stream per image: every noise draw of image i (its x_T and each later z) depends only on
(seed, i) and the sampler settings, never on which batch, batch size, rank or world size produced it.

Each image owns a ``torch.Generator`` seeded from (seed, i). Its draws, in order: x_T [C, H, W], then the
per-step noise in chunks of K steps [K, C, H, W], K fixed by the image size (``chunk_steps``). Drawing a
chunk at once costs B generator calls every K steps instead of every step, which keeps the sampler's own
overhead far below the network's forward time (``scripts/bench_eval.py`` measures it).

Streams are reproducible per device type: CPU and CUDA generators produce different numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Values per image per chunk (1 MiB of float32): 85 steps at 32×32×3, 21 at 64×64×3.
CHUNK_VALUES = 1 << 18


def image_seed(seed: int, index: int) -> int:
    """Generator seed of image ``index``: numpy's SeedSequence of (seed, index) hashed to 63 bits, so
    neighbouring indices get unrelated streams."""
    hi, lo = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return (int(hi) << 31) ^ int(lo)


def chunk_steps(image_shape: Sequence[int]) -> int:
    """Steps of noise drawn per generator call: a function of the image shape only."""
    return max(1, CHUNK_VALUES // int(np.prod(image_shape)))


class PerImageNoise:
    """The noise of the images ``indices`` (one batch) for one sampling run.

    ``initial()`` → x_T [B, C, H, W]; then each ``next()`` → z [B, C, H, W] for the next noisy step.
    ``num_draws`` (the number of ``next()`` calls the sampler will make) only trims the last chunk.
    """

    def __init__(self, seed: int, indices: Sequence[int], image_shape: Sequence[int], device,
                 num_draws: int | None = None, dtype=torch.float32):
        device = torch.device(device)
        self.generators = [torch.Generator(device).manual_seed(image_seed(seed, int(i))) for i in indices]
        self.shape, self.device, self.dtype = tuple(image_shape), device, dtype
        self.chunk = chunk_steps(image_shape)
        self.left = num_draws
        self._buf: torch.Tensor | None = None
        self._pos = 0
        self._initial_done = False

    def _draw(self, shape: tuple) -> torch.Tensor:
        out = torch.empty((len(self.generators), *shape), device=self.device, dtype=self.dtype)
        for row, g in zip(out, self.generators, strict=True):
            row.normal_(generator=g)  # = torch.randn(shape, generator=g): fills the contiguous row
        return out

    def initial(self) -> torch.Tensor:
        """x_T ~ N(0, I), [B, C, H, W]: the first draw of every image's stream."""
        if self._initial_done:
            raise RuntimeError("initial() must be called once, before next()")
        self._initial_done = True
        return self._draw(self.shape)

    def next(self) -> torch.Tensor:
        """z ~ N(0, I) [B, C, H, W] for the next noisy step."""
        if not self._initial_done:
            raise RuntimeError("call initial() before next()")
        if self._buf is None or self._pos == self._buf.shape[1]:
            k = self.chunk if self.left is None else max(1, min(self.chunk, self.left))
            self._buf, self._pos = self._draw((k, *self.shape)), 0
        z = self._buf[:, self._pos]
        self._pos += 1
        if self.left is not None:
            self.left -= 1
        return z

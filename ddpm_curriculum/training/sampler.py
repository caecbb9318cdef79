"""Data order and per-step randomness, both pure functions of (seed, position).

Every epoch is a seeded permutation cut into global batches; rank r takes the r-th slice of each
global batch, so the union over ranks is the same global batch whatever the world size, and a run
resumed in the middle of an epoch restarts at the exact batch it stopped at (``DistributedSampler``
plus ``set_epoch`` gives the same guarantees for whole epochs only).

Timesteps, noise and flips of a step come from a generator seeded by (seed, step), drawn for the
whole global batch on every rank and sliced, so they do not depend on world size, on resumes or on
how many random numbers anything else consumed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

from ..errors import UserError


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, 0x5EED))


class ShardedBatchSampler(Sampler):
    """Yields this rank's indices of every global batch of one epoch (incomplete tail dropped)."""

    def __init__(self, num_items: int, global_batch: int, rank: int, world: int, seed: int):
        if global_batch % world:
            raise UserError(f"'train.batch_size' = {global_batch} is not divisible by the world size "
                            f"{world}; use a multiple of the number of processes")
        self.steps_per_epoch = num_items // global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"the dataset has {num_items} samples, fewer than 'train.batch_size' = "
                            f"{global_batch}; lower the batch size")
        self.num_items, self.global_batch = num_items, global_batch
        self.per_rank, self.rank, self.seed = global_batch // world, rank, seed
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0xDA7A))
        perm = torch.randperm(self.num_items, generator=g)
        for b in range(self.start_batch, self.steps_per_epoch):
            lo = b * self.global_batch + self.rank * self.per_rank
            yield perm[lo:lo + self.per_rank].tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_batch

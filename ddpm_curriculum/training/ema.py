"""Exponential moving average of the network weights, kept outside DDP."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = d·ema + (1 − d)·param`` after every optimizer step, with the warm-up of TF's
    ExponentialMovingAverage(num_updates) that ddpm-torch also uses: d = min(decay, (1 + n)/(10 + n)).

    Without the warm-up a short run keeps (decay)^steps of its random initialisation in the average
    (0.999^1280 ≈ 28%), and samples from it are mostly noise. Buffers are copied.

    ``update_every`` k and ``start_step`` s (seed 002's ``ema_update_rate``/``ema_start``): ``after_step`` acts only
    after optimizer steps n with n % k == 0; while n < s it copies the weights (no averaging, the warm-up count
    stays 0), from s on it averages. k = 1, s = 0 is an update after every step.
    """

    def __init__(self, model: nn.Module, decay: float, update_every: int = 1, start_step: int = 0):
        self.decay, self.update_every, self.start_step = decay, update_every, start_step
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after optimizer step ``step`` (1-based)."""
        if step % self.update_every:
            return
        if step < self.start_step:
            for dst, src in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
                dst.copy_(src)
            return
        self.update(model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        # lerp_(end, w) computes self + w·(end − self) = decay·self + (1 − decay)·end.
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        """The averaged weights: a plain model state dict (loadable into a fresh network)."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict, num_updates: int) -> None:
        self.model.load_state_dict(state)
        self.num_updates = num_updates

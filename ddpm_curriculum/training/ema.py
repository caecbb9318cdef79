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
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

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

"""Exponential moving average of the network weights, kept outside DDP."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = decay·ema + (1 − decay)·param`` after every optimizer step; buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach() for p in model.parameters()]
        # lerp_(end, w) computes self + w·(end − self) = decay·self + (1 − decay)·end.
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

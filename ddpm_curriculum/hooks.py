"""What a training mode adds to the loop, without forking the trainer.

Modes CS, CR and masked fine-tuning each need a little more than "loss → backward → step": a mask that
changes at stage transitions, a penalty in the loss, gradients read after backward, weights fixed after
the optimizer step. Each such mode is a :class:`TrainingExtension`; the trainer calls every extension's
hooks at fixed points of a step and stores their state in checkpoints::

    stage starts       → on_stage_start(trainer, stage)          (also at step 0; not again on resume;
                                                                 may add fields to trainer.transition, the
                                                                 stage's line in transitions.jsonl)
    after the forward  → loss_terms(trainer)  → {name: scalar}   (added to the loss, logged separately)
    after backward     → after_backward(trainer)                 (before clipping and the optimizer step)
    after the step     → after_step(trainer)                     (before the EMA update)
    stage ends         → on_stage_end(trainer, stage)            (after its last step, also the final one)
    at each log line   → log_fields(trainer)  → {name: value}    (merged into metrics.jsonl)

Every hook runs on every rank with identical inputs, so decisions taken in them (which channels to
regrow) agree across ranks as long as they only use reduced quantities (gradients after DDP's all-reduce,
``dist.all_reduce_*``) or the shared seed.

:class:`FrozenEntries` is the shared mechanism for "these weight entries must not move": gradients
zeroed after backward, values and Adam moments restored after the step. It keeps reserved channels
(CS) and pruned weights (masked fine-tuning) bit-identical whatever the optimizer, weight decay or
clipping do.
"""

from __future__ import annotations

import torch
from torch import nn


class TrainingExtension:
    """Base class: every hook is a no-op; subclasses override what they need."""

    name = "extension"

    def on_stage_start(self, trainer, stage) -> None:
        pass

    def loss_terms(self, trainer) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, trainer) -> None:
        pass

    def after_step(self, trainer) -> None:
        pass

    def on_stage_end(self, trainer, stage) -> None:
        pass

    def log_fields(self, trainer) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FrozenEntries:
    """Keeps chosen entries of parameters fixed through backward, optimizer steps and weight decay.

    ``freeze(param, frozen)`` marks the entries where the bool tensor ``frozen`` is True; their current
    values are remembered. ``zero_grads()`` (after backward) removes their gradients, so Adam's moments
    stay zero there and clipping ignores them; ``restore(optimizer)`` (after the step) writes back the
    remembered values and zeroes any moment entries that weight decay put there. ``release`` unfreezes.
    """

    MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")

    def __init__(self):
        self._frozen: dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor]] = {}

    def freeze(self, param: nn.Parameter, frozen: torch.Tensor) -> None:
        frozen = frozen.to(device=param.device, dtype=torch.bool).expand_as(param).clone()
        if param in self._frozen:
            old_mask, old_values = self._frozen[param]
            values = torch.where(old_mask, old_values, param.detach())
            frozen = frozen | old_mask
        else:
            values = param.detach().clone()
        if frozen.any():
            self._frozen[param] = (frozen, values)
        else:
            self._frozen.pop(param, None)

    def release(self, param: nn.Parameter, entries: torch.Tensor | None = None) -> None:
        """Unfreeze ``entries`` (bool, True = release) of ``param``, or all of it."""
        if param not in self._frozen:
            return
        if entries is None:
            del self._frozen[param]
            return
        frozen, values = self._frozen[param]
        frozen = frozen & ~entries.to(device=param.device, dtype=torch.bool).expand_as(param)
        if frozen.any():
            self._frozen[param] = (frozen, values)
        else:
            del self._frozen[param]

    def is_frozen(self, param: nn.Parameter) -> torch.Tensor | None:
        entry = self._frozen.get(param)
        return None if entry is None else entry[0]

    @torch.no_grad()
    def zero_grads(self) -> None:
        for param, (frozen, _) in self._frozen.items():
            if param.grad is not None:
                param.grad.masked_fill_(frozen, 0.0)

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        for param, (frozen, values) in self._frozen.items():
            param.copy_(torch.where(frozen, values, param))
            if optimizer is not None:
                state = optimizer.state.get(param, {})
                for key in self.MOMENT_KEYS:
                    if isinstance(state.get(key), torch.Tensor) and state[key].shape == param.shape:
                        state[key].masked_fill_(frozen, 0.0)

"""What a training mode adds to the loop, without forking the trainer.

Modes CS, CR and masked fine-tuning each need a little more than "loss → backward → step": a mask that
changes at stage transitions, a penalty in the loss, gradients read after backward, weights fixed after
the optimizer step. Each such mode is a :class:`TrainingExtension`; the trainer calls every extension's
hooks at fixed points of a step and stores their state in checkpoints. A hook gets a :class:`HookContext`
(what the trainer exposes to extensions, read-only), not the trainer, and returns what it wants recorded::

    stage starts       → on_stage_start(ctx, stage) → {field: value}  (also at step 0; not again on resume;
                                                         merged, in extension order, into the stage's line
                                                         of transitions.jsonl)
    after the forward  → loss_terms(ctx)  → {name: scalar}           (added to the loss, logged separately)
    after backward     → after_backward(ctx)                         (before clipping and the optimizer step)
    after the step     → after_step(ctx)                             (before the EMA update)
    stage ends         → on_stage_end(ctx, stage) → {file: record}   (after its last step, also the final
                                                         one; rank 0 appends each record to run_dir/file)
    at each log line   → log_fields(ctx)  → {name: value}            (merged into metrics.jsonl)

Every hook runs on every rank with identical inputs, so decisions taken in them (which channels to
regrow) agree across ranks as long as they only use reduced quantities (gradients after DDP's all-reduce,
``dist.all_reduce_*``) or the shared seed.

:class:`FrozenEntries` is the shared mechanism for "these weight entries must not move": gradients
zeroed after backward, values and Adam moments restored after the step. It keeps reserved channels
(CS) and pruned weights (masked fine-tuning) bit-identical whatever the optimizer, weight decay or
clipping do. An extension that keeps entries fixed holds one as its ``frozen`` attribute and the trainer
applies it: ``zero_grads()`` after every extension's ``after_backward`` (so ``after_backward`` still sees
the gradients of frozen entries), ``restore(optimizer)`` after every extension's ``after_step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class HookContext:
    """What a hook may use of the trainer, a snapshot the trainer builds for each call (one for the three
    hooks of a step: ``loss_terms``, ``after_backward``, ``after_step``).

    ``step``: optimizer steps done (at ``on_stage_end``: including the stage's last one). ``model``: the network
    being trained, without a DDP or compile wrapper. ``ema_model``: the EMA copy, None without EMA. ``optimizer``:
    the run's optimizer (the step's lr is ``param_groups[0]["lr"]``; Adam's moments in its ``state``; None under an
    update rule without one, MaskPro's mask learning). ``grad_scale``: the fp16 GradScaler's scale of this step's
    backward (1.0 without fp16): the trainer unscales the parameters' ``.grad`` before ``after_backward``, but
    gradients captured during the backward (CS's gate probe) are ``grad_scale`` × the true ones. ``world``: world
    size. ``run_dir``, ``device``, ``cfg`` (the run's Config) as the trainer's. Services: ``probe_loss()`` is the
    mean loss of one fixed probe batch (same on every rank, eval mode); ``load_weights(state_dict)`` loads weights
    into the model and resets the EMA copy to them.
    """

    step: int
    model: nn.Module
    ema_model: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    grad_scale: float
    world: int
    run_dir: Path
    device: torch.device
    cfg: Any
    probe_loss: Callable[[], float]
    load_weights: Callable[[dict], None]


class TrainingExtension:
    """Base class: every hook is a no-op (recording nothing); subclasses override what they need.

    An extension with entries to keep fixed sets ``self.frozen`` to a :class:`FrozenEntries` (see the module
    docstring); the trainer reads the attribute at every step, so it may be replaced."""

    name = "extension"

    def on_stage_start(self, ctx: HookContext, stage) -> dict:
        return {}

    def loss_terms(self, ctx: HookContext) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, ctx: HookContext) -> None:
        pass

    def after_step(self, ctx: HookContext) -> None:
        pass

    def on_stage_end(self, ctx: HookContext, stage) -> dict[str, dict]:
        return {}

    def log_fields(self, ctx: HookContext) -> dict:
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

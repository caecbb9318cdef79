"""Compatibility name of the extension surface: the hooks live in ``ddpm_curriculum/hooks.py`` (a leaf module,
so the modes' extensions and the trainer import it without a cycle); which extensions a run gets is its
mode's choice (``ddpm_curriculum/modes``)."""

from __future__ import annotations

from torch import nn

from ..hooks import FrozenEntries, HookContext, TrainingExtension
from ..modes import mode_of

__all__ = ["FrozenEntries", "HookContext", "TrainingExtension", "build_extensions"]


def build_extensions(cfg, model: nn.Module) -> list[TrainingExtension]:
    """The extensions of the config's mode (none for baseline and mode C). An extension that needs to survive a
    resume keeps its state in ``state_dict`` or in model buffers (``FrozenEntries`` is re-derived from the
    buffers, so it needs no state of its own)."""
    return mode_of(cfg).extensions(cfg, model)

"""Modes CS (bottleneck channel sparsity with regrowth) and CR (Group-L1 regularisation).

Both plug into the trainer as ``TrainingExtension`` objects (``hooks.py``), declared by their modes in
``modes/``: ``channel_mask.ChannelSparsity`` acts on a ``SparseUNet``; ``group_l1.GroupL1`` on any network.
``schedules`` holds their per-stage schedules.
"""

from __future__ import annotations

from .schedules import stage_active_channels, stage_lambdas

__all__ = ["stage_active_channels", "stage_lambdas"]

"""Modes CS (bottleneck channel sparsity with regrowth) and CR (Group-L1 regularisation).

Both plug into the trainer as ``TrainingExtension`` objects (``training/extensions.py``):
``channel_mask.ChannelSparsity`` acts on a ``SparseUNet``; ``group_l1.GroupL1`` on any network.
``schedules`` holds their per-stage schedules; ``stage_notes`` describes them for ``--dry-run``.
"""

from __future__ import annotations

from .schedules import stage_active_channels, stage_lambdas


def make_channel_sparsity(cfg, model):
    if not cfg.sparsity.enabled:
        return None
    from .channel_mask import ChannelSparsity

    return ChannelSparsity(cfg, model)


def make_group_l1(cfg, model):
    if not cfg.regularization.enabled:
        return None
    from .group_l1 import GroupL1

    return GroupL1(cfg, model)


def stage_notes(cfg) -> list[str]:
    """One note per curriculum stage for the dry-run plan: active channels (CS) or λ (CR); empty otherwise."""
    if cfg.sparsity.enabled and cfg.sparsity.location == "decoder":
        from ..training.builders import make_model

        segments = make_model(cfg).gate_segments
        per_stage = zip(*[stage_active_channels(cfg, c) for c in segments], strict=True)
        return [f"active {sum(k)}/{sum(segments)} decoder input channels ({len(segments)} up blocks)"
                for k in per_stage]
    if cfg.sparsity.enabled:
        channels = cfg.model.ch_multipliers[-1] * cfg.model.hid_channels
        return [f"active {k}/{channels} bottleneck channels" for k in stage_active_channels(cfg)]
    if cfg.regularization.enabled:
        return [f"λ = {lam:.3g}" for lam in stage_lambdas(cfg)]
    return []

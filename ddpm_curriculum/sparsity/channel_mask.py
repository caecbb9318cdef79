"""Mode CS: the bottleneck channel mask of ``SparseUNet``, regrown at every stage transition.

Stage k keeps ``active_channels(C, sparsities)[k]`` channels active (schedules.py). At the start of stage 0 the
first n_0 channels are active (at initialisation channels are interchangeable; taking whole leading groups
keeps GroupNorm groups either full or empty). At each later transition the masked channels with the
largest regrowth score become active, ``channel_birth_stage`` records when, and their reserved weights
(see ``models/sparse_unet.py``) are released from ``FrozenEntries``.

Regrowth scores (``REGROWTH``):

* ``gate_gradient`` (default): Σ over the stage's steps and samples of |∂L_i/∂m_c|, the per-sample
  first-order effect of opening gate c (``GateProbe``). The absolute value is taken per sample: a signed
  sum cancels between samples (and timesteps) that pull the channel in opposite directions, although
  each of them would use it. Per-sample terms are scaled to the global mean loss and all-reduced every
  step, so the score is the same for any world size and identical on every rank. Reset at each regrowth.
* ``weight_gradient`` / ``gradient`` (the seed's name and criterion, for reproduction): Σ_steps
  Σ |∂L/∂W| over each output channel's row of ``middle.0.conv2`` (the middle block's *first* residual
  block), never reset, as in the seed's code. This is a proxy read from another layer: the masked
  channel's own producing weights (``middle.2.conv2``) get exactly zero gradient, so they cannot rank it,
  and ``middle.0``'s channel c feeds every channel through attention and ``middle.2.conv1``; what it ranks
  is how much the loss wants ``middle.0``'s channel c changed, not what opening bottleneck channel c would do.
* ``random``: seeded by (``train.seed``, stage), the SET control.

The chosen channels are broadcast from rank 0, so every rank applies the same choice whatever the floating
point. Before and after each transition the loss of one fixed probe batch (fixed images, t uniform over
0..T−1, fixed noise; eval mode: the trainer's ``probe_loss`` service) is measured, so the jump a regrowth
causes is visible; it is printed and, with the chosen channels, returned by ``on_stage_start`` for the stage's
line of ``transitions.jsonl`` in the run directory. The reserved entries of the masked channels are a
``FrozenEntries`` (``self.frozen``) that the trainer applies after ``after_backward`` (which reads their
gradients first: ``weight_gradient``) and after ``after_step``.
"""

from __future__ import annotations

import torch

from .. import dist
from ..models import GateProbe, SparseUNet
from ..hooks import FrozenEntries, HookContext, TrainingExtension
from ..training.sampler import mix_seed
from .schedules import stage_active_channels


class GateGradient:
    """Accumulated per-sample |∂L/∂m_c| of the tied channel gate (see the module docstring)."""

    uses_probe, resets = True, True

    def accumulate(self, ext: "ChannelSparsity", ctx: HookContext) -> None:
        c = ext.model.gated_channels
        part = ext.model.gate_probe.collect(c)
        part = torch.zeros(c, device=ext.scores.device) if part is None else part.to(ext.scores.device)
        # Each rank's autograd gradients are of its local mean loss: ×1/world gives the global mean's share.
        scale = ctx.world * ctx.grad_scale
        ext.scores += dist.all_reduce_sum(part.double()) / scale

    def scores(self, ext: "ChannelSparsity", ctx: HookContext, stage) -> torch.Tensor:
        return ext.scores


class WeightGradient:
    """The seed's criterion: Σ |∂L/∂W| of ``middle.0.conv2`` per output channel (already all-reduced by DDP)."""

    uses_probe, resets = False, False

    def accumulate(self, ext: "ChannelSparsity", ctx: HookContext) -> None:
        grad = ext.model.middle[0].conv2.weight.grad
        if grad is not None:
            ext.scores += grad.detach().abs().sum(dim=(1, 2, 3)).double().to(ext.scores.device)

    def scores(self, ext: "ChannelSparsity", ctx: HookContext, stage) -> torch.Tensor:
        return ext.scores


class RandomRegrowth:
    """Uniformly random among the masked channels, seeded by (train.seed, stage)."""

    uses_probe, resets = False, False

    def accumulate(self, ext: "ChannelSparsity", ctx: HookContext) -> None:
        pass

    def scores(self, ext: "ChannelSparsity", ctx: HookContext, stage) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(ctx.cfg.train.seed, stage.index, 0x5E7))
        return torch.rand(ext.model.gated_channels, generator=g, dtype=torch.float64)


REGROWTH = {"gate_gradient": GateGradient, "weight_gradient": WeightGradient, "gradient": WeightGradient,
            "random": RandomRegrowth}


def select_channels(scores: torch.Tensor, masked: torch.Tensor, count: int) -> list[int]:
    """The ``count`` masked channels with the largest score (ties: lower index first).

    scores: [C] float; masked: bool [C] → sorted list of channel indices.
    """
    candidates = torch.nonzero(masked).flatten()
    order = torch.argsort(-scores[candidates].double().cpu(), stable=True)
    return sorted(candidates[order[:count]].tolist())


class ChannelSparsity(TrainingExtension):
    """CS: sets the mask per stage, accumulates the regrowth score, keeps reserved entries frozen (``frozen``)."""

    name = "channel_sparsity"

    def __init__(self, cfg, model: SparseUNet):
        sp = cfg.sparsity
        self.model = model
        # counts[j][k]: active channels of gate segment j (the bottleneck, or one up block's input) in stage k
        self.counts = [stage_active_channels(cfg, c) for c in model.gate_segments]
        self.criterion = REGROWTH[sp.regrowth_method]()
        self.method, self.regrow_init, self.location = sp.regrowth_method, sp.regrow_init, sp.location
        self.scores = torch.zeros(model.gated_channels, dtype=torch.float64, device=model.channel_mask.device)
        self.frozen = FrozenEntries()

    # ----- hooks -----

    def on_stage_start(self, ctx: HookContext, stage) -> dict:
        if stage.index == 0:
            self._initial_mask()
            fields = self._transition_log(ctx, stage, [], None, None)
        else:
            fields = self._regrow(ctx, stage)
        self._refreeze()
        return fields

    def after_backward(self, ctx: HookContext) -> None:
        # the trainer zeroes the frozen entries' gradients after this (weight_gradient reads them first)
        if self.model.gate_probe is not None or not self.criterion.uses_probe:
            self.criterion.accumulate(self, ctx)

    def log_fields(self, ctx: HookContext) -> dict:
        return {"active_channels": int(self.model.channel_mask.sum())}

    def state_dict(self) -> dict:
        return {"scores": self.scores.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scores = state["scores"].to(dtype=torch.float64, device=self.model.channel_mask.device)
        self._refreeze()

    # ----- mask changes -----

    def _initial_mask(self) -> None:
        """The leading ``counts[j][0]`` channels of every segment j."""
        m = self.model
        active = torch.zeros(m.gated_channels, dtype=torch.bool, device=m.channel_mask.device)
        for where, counts in zip(m.segment_slices(), self.counts, strict=True):
            active[where.start:where.start + counts[0]] = True
        m.channel_mask.copy_(active.float())
        m.channel_birth_stage.copy_(torch.where(active, 0, -1))

    def _regrow(self, ctx: HookContext, stage) -> dict:
        m = self.model
        masked = m.channel_mask == 0
        scores, chosen = None, []
        for where, counts in zip(m.segment_slices(), self.counts, strict=True):  # each segment regrows its own channels
            count = counts[stage.index] - int((~masked[where]).sum())
            if count > 0:
                scores = self.criterion.scores(self, ctx, stage) if scores is None else scores
                chosen += [where.start + i for i in select_channels(scores[where], masked[where], count)]
        chosen = dist.broadcast_object(chosen)  # one decision for all ranks
        before = ctx.probe_loss()
        idx = torch.tensor(chosen, dtype=torch.long, device=m.channel_mask.device)
        m.channel_mask[idx] = 1.0
        m.channel_birth_stage[idx] = stage.index
        if self.regrow_init == "zero_out" and chosen:
            self._zero_fan_out(ctx, idx)
        after = ctx.probe_loss()
        if self.criterion.resets:
            self.scores.zero_()
        return self._transition_log(ctx, stage, chosen, before, after)

    @torch.no_grad()
    def _zero_fan_out(self, ctx: HookContext, idx: torch.Tensor) -> None:
        flags = torch.zeros(self.model.gated_channels, dtype=torch.bool, device=idx.device)
        flags[idx] = True
        models = [self.model] + ([ctx.ema_model] if ctx.ema_model is not None else [])
        for net in models:  # the EMA's reserved entries equal the model's, so both start from zero
            for param, entries in net.fan_out_entries(flags):
                param.masked_fill_(entries.expand_as(param), 0.0)

    def _refreeze(self) -> None:
        """Freeze exactly the reserved entries of the currently masked channels (values as they are now)."""
        self.frozen = FrozenEntries()
        masked = self.model.channel_mask == 0
        self.model.gate_probe = GateProbe() if self.criterion.uses_probe and bool(masked.any()) else None
        if masked.any():
            for param, entries in self.model.reserved_entries(masked):
                self.frozen.freeze(param, entries)

    def _transition_log(self, ctx: HookContext, stage, chosen, before, after) -> dict:
        """Prints the stage's mask change; returns its fields of the stage's transitions.jsonl line."""
        active, c = int(self.model.channel_mask.sum()), self.model.gated_channels
        if stage.index == 0:
            chosen = torch.nonzero(self.model.channel_mask).flatten().tolist()
            what = "bottleneck channels" if self.location == "bottleneck" else "decoder input channels"
            dist.print0(f"CS: stage '{stage.name}' starts with {active}/{c} {what}")
        else:
            dist.print0(f"CS: regrowth at step {ctx.step} ('{stage.name}', {self.method}, {self.regrow_init}): "
                        f"{active - len(chosen)} → {active}/{c} channels; probe loss {before:.5f} → {after:.5f}")
        return dict(active_channels=active, channels=c, regrowth_method=self.method,
                    regrown=chosen, probe_loss_before=before, probe_loss_after=after)


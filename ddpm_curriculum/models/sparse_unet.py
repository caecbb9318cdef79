"""SparseUNet: the UNet with a binary gate on the bottleneck channels (mode CS, seeds 000/001).

**Where the gate sits.** The bottleneck is the output h of the middle block (``middle.2``, a residual block
with an identity skip), C = ``ch_multipliers[-1]·hid_channels`` channels. One gate value m_c ∈ {0, 1}
(buffer ``channel_mask``) multiplies channel c in two places:

1. the middle block's output, y_c = m_c·h_c, as in the seeds (so the up path receives a zero channel);
2. the input of ``conv1`` of the first up block (after its ``norm1`` and SiLU). Without this second gate a
   masked channel would not be silent: its ``norm1`` (GroupNorm) turns the zero into β_c − γ_c·μ_g/σ_g
   (μ_g, σ_g of its group), which ``conv1`` would read through weights that train.

**Reserved capacity.** With both gates closed, exactly these entries serve channel c and nothing else;
they get exactly zero gradient, the network's output does not depend on them, and the CS extension
freezes them (``FrozenEntries``: no weight decay, no Adam moments, hence no EMA drift):

    producer  middle.2.conv2.weight[c], middle.2.conv2.bias[c]
    consumer  <first up block>.norm1.weight[c], .norm1.bias[c], .conv1.weight[:, c], .skip.weight[:, c]

What masking does *not* reserve (documented limits, not bugs): because ``middle.2`` has an identity skip,
h_c = x_c + conv2_c(…) where x_c is channel c of the residual stream, which upstream layers keep training
for the other channels' sake; so a regrown channel starts carrying x_c, not a blank signal. And the zero
channel still sits in its GroupNorm group in ``norm1``, so it shifts that group's mean and variance (a
constant effect with no parameters). Skip connections bypass the bottleneck altogether (REFERENCE §3).

**The gate-gradient signal.** With a ``GateProbe`` attached (``gate_probe``), every training forward
records, for each sample i, s_ic = Σ_{gates, space} ∂L/∂(m_c·x_c)·x_c, i.e. the sample's share of
∂L/∂m_c for the tied gate m_c (Taylor importance, Molchanov et al. 2017): it is non-zero for masked
channels, whose producing weights get no gradient at all.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .unet import ResAttnBlock, ResidualBlock, UNet


class GateProbe:
    """Per-sample first-order gate signals of the current step, filled during backward.

    ``begin()`` opens a record for one forward pass; both gates of that pass add their [B, C] signed parts
    to it in backward. ``collect()`` returns Σ_i |s_ic| over all records as [C] and clears them: the
    absolute value is taken per sample, after the two gates' parts are summed (see ``ChannelSparsity``).
    """

    def __init__(self):
        self._parts: dict[int, torch.Tensor] = {}
        self._calls = 0

    def begin(self) -> int:
        self._calls += 1
        return self._calls

    def add(self, record: int, part: torch.Tensor) -> None:
        self._parts[record] = part if record not in self._parts else self._parts[record] + part

    def collect(self) -> torch.Tensor | None:
        if not self._parts:
            return None
        total = sum(p.abs().sum(0) for p in self._parts.values())
        self._parts.clear()
        return total


class _RecordingGate(torch.autograd.Function):
    """y = x·m (m broadcast over [B, :, H, W]); backward also records Σ_space ∂L/∂y·x of the first C channels."""

    @staticmethod
    def forward(ctx, x, mask, probe, record, channels):
        ctx.save_for_backward(x, mask)
        ctx.probe, ctx.record, ctx.channels = probe, record, channels
        return x * mask.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad_y):
        x, mask = ctx.saved_tensors
        c = ctx.channels
        ctx.probe.add(ctx.record, (grad_y[:, :c] * x[:, :c]).sum(dim=(2, 3)).float())
        return grad_y * mask.view(1, -1, 1, 1), None, None, None, None


class SparseUNet(UNet):
    """UNet + bottleneck channel gate (see the module docstring). Same arguments and state-dict keys as
    ``UNet`` plus buffers ``channel_mask`` [C] (1 = active) and ``channel_birth_stage`` [C] (long: the stage
    index in which the channel became active, 0 for the initial ones, −1 while masked). With an all-ones
    mask it computes exactly what ``UNet`` computes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.bottleneck_channels
        self.register_buffer("channel_mask", torch.ones(c))
        self.register_buffer("channel_birth_stage", torch.zeros(c, dtype=torch.long))
        consumer = self.consumer_block
        if not isinstance(consumer.skip, nn.Conv2d):  # it concatenates a skip, so in_ch != out_ch always
            raise ValueError("the first up block must have a 1x1 skip conv")
        self.gate_probe: GateProbe | None = None
        self._record = 0
        self.middle.register_forward_hook(self._gate_bottleneck)
        consumer.conv1.register_forward_pre_hook(self._gate_consumer)

    @property
    def consumer_block(self) -> ResidualBlock:
        """The residual block that first reads the bottleneck: block 0 of the deepest up level."""
        block = self.upsamples[f"level_{self.levels - 1}"][0]
        return block[0] if isinstance(block, ResAttnBlock) else block

    # ----- the two gates -----

    def _gate(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        probe = self.gate_probe
        if probe is not None and torch.is_grad_enabled() and x.requires_grad:
            return _RecordingGate.apply(x, mask, probe, self._record, self.bottleneck_channels)
        return x * mask.view(1, -1, 1, 1)

    def _gate_bottleneck(self, module, inputs, h):
        if self.gate_probe is not None:
            self._record = self.gate_probe.begin()
        return self._gate(h, self.channel_mask.to(h.dtype))

    def _gate_consumer(self, module, inputs):
        (x,) = inputs
        extra = x.shape[1] - self.bottleneck_channels  # the concatenated skip activation's channels
        mask = torch.cat([self.channel_mask.to(x.dtype), x.new_ones(extra)])
        return (self._gate(x, mask),)

    # ----- what belongs to a channel -----

    def reserved_entries(self, channels: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, bool mask of its entries) for every entry that serves only the bottleneck channels
        flagged in ``channels`` (bool [C]); the masks broadcast to the parameters' shapes."""
        channels = channels.to(device=self.channel_mask.device, dtype=torch.bool)
        producer, consumer = self.middle[2], self.consumer_block
        inputs = self._consumer_inputs(channels)
        return [(producer.conv2.weight, channels.view(-1, 1, 1, 1)), (producer.conv2.bias, channels),
                (consumer.norm1.weight, inputs), (consumer.norm1.bias, inputs),
                (consumer.conv1.weight, inputs.view(1, -1, 1, 1)), (consumer.skip.weight, inputs.view(1, -1, 1, 1))]

    def fan_out_entries(self, channels: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """The consumer weights that read the flagged channels (zeroed by ``regrow_init: zero_out``)."""
        consumer = self.consumer_block
        inputs = self._consumer_inputs(channels.to(device=self.channel_mask.device, dtype=torch.bool))
        return [(consumer.conv1.weight, inputs.view(1, -1, 1, 1)), (consumer.skip.weight, inputs.view(1, -1, 1, 1))]

    def _consumer_inputs(self, channels: torch.Tensor) -> torch.Tensor:
        extra = self.consumer_block.norm1.num_channels - self.bottleneck_channels
        return torch.cat([channels, channels.new_zeros(extra)])


# build_model() checks keyword arguments against the constructor's signature: expose UNet's.
SparseUNet.__signature__ = inspect.signature(UNet)

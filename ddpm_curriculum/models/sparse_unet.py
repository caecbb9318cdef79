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

**Decoder location** (``DecoderSparseUNet``, ``sparsity.location: decoder``). The bottleneck gate leaves the
skip connections free: with every bottleneck channel of a trained baseline closed, 51–65% of its low-t
template recovery survives through the skips (issue 10). ``DecoderSparseUNet`` instead gates the input of
*every* up block after the skip concatenation, cat(h, skip) → m·cat(h, skip), once on the block input (read by
``norm1`` and the 1×1 ``skip``) and once at ``conv1``'s input (after ``norm1`` and SiLU, for the same GroupNorm
reason as above). ``channel_mask`` is then the concatenation of one segment per up block (``gate_segments``,
in forward order). A masked input channel is unused by both the residual and the skip path of its block; the
reserved entries of input c of block j are ``norm1.weight[c]``, ``norm1.bias[c]``, ``conv1.weight[:, c]`` and
``skip.weight[:, c]``. Their producers (an encoder activation or the previous up block's output) also feed
other layers, so they are not reserved.

**The gate-gradient signal.** With a ``GateProbe`` attached (``gate_probe``), every training forward
records, for each sample i, s_ic = Σ_{gates, space} ∂L/∂(m_c·x_c)·x_c, i.e. the sample's share of
∂L/∂m_c for the tied gate m_c (Taylor importance, Molchanov et al. 2017): it is non-zero for masked
channels, whose producing weights get no gradient at all.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from ..errors import UserError
from .unet import ResAttnBlock, ResidualBlock, TimestepBlock, UNet


class GateProbe:
    """Per-sample first-order gate signals of the current step, filled during backward.

    ``begin()`` opens a record for one forward pass; the gates of that pass add their [B, width] signed parts
    at their channel ``offset``. ``collect(size)`` returns Σ_i |s_ic| over all records as [size] and clears
    them: the absolute value is taken per sample, after the parts of the gates tied to one channel (same
    record and offset) are summed (see ``ChannelSparsity``).
    """

    def __init__(self):
        self._parts: dict[tuple[int, int], torch.Tensor] = {}
        self._calls = 0

    def begin(self) -> int:
        self._calls += 1
        return self._calls

    def add(self, record: int, part: torch.Tensor, offset: int = 0) -> None:
        key = (record, offset)
        self._parts[key] = part if key not in self._parts else self._parts[key] + part

    def collect(self, size: int | None = None) -> torch.Tensor | None:
        if not self._parts:
            return None
        size = size or max(offset + p.shape[1] for (_, offset), p in self._parts.items())
        total = next(iter(self._parts.values())).new_zeros(size)
        for (_, offset), part in self._parts.items():
            total[offset:offset + part.shape[1]] += part.abs().sum(0)
        self._parts.clear()
        return total


class _RecordingGate(torch.autograd.Function):
    """y = x·m (m broadcast over [B, :, H, W]); backward also records Σ_space ∂L/∂y·x of the first ``width``
    channels at channel ``offset`` of the probe."""

    @staticmethod
    def forward(ctx, x, mask, probe, record, width, offset):
        ctx.save_for_backward(x, mask)
        ctx.probe, ctx.record, ctx.width, ctx.offset = probe, record, width, offset
        return x * mask.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad_y):
        x, mask = ctx.saved_tensors
        w = ctx.width
        ctx.probe.add(ctx.record, (grad_y[:, :w] * x[:, :w]).sum(dim=(2, 3)).float(), ctx.offset)
        return grad_y * mask.view(1, -1, 1, 1), None, None, None, None, None


def _residual(block) -> ResidualBlock:
    return block[0] if isinstance(block, ResAttnBlock) else block


class _GatedUNet(UNet):
    """UNet + one binary gate per channel of ``gate_segments`` (buffers ``channel_mask`` [C], 1 = active, and
    ``channel_birth_stage`` [C], long: the stage in which the channel became active, 0 for the initial ones,
    −1 while masked). With an all-ones mask it computes exactly what ``UNet`` computes."""

    def _init_gates(self, segments: list[int]) -> None:
        self.gate_segments = list(segments)
        self.gated_channels = sum(segments)
        self.register_buffer("channel_mask", torch.ones(self.gated_channels))
        self.register_buffer("channel_birth_stage", torch.zeros(self.gated_channels, dtype=torch.long))
        self.gate_probe: GateProbe | None = None
        self._record = 0

    def segment_slices(self) -> list[slice]:
        out, start = [], 0
        for size in self.gate_segments:
            out.append(slice(start, start + size))
            start += size
        return out

    def _begin_record(self) -> None:
        if self.gate_probe is not None:
            self._record = self.gate_probe.begin()

    def _gate(self, x: torch.Tensor, mask: torch.Tensor, width: int, offset: int) -> torch.Tensor:
        probe = self.gate_probe
        if probe is not None and torch.is_grad_enabled() and x.requires_grad:
            return _RecordingGate.apply(x, mask, probe, self._record, width, offset)
        return x * mask.view(1, -1, 1, 1)


class SparseUNet(_GatedUNet):
    """UNet + bottleneck channel gate (see the module docstring). Same arguments and state-dict keys as
    ``UNet`` plus buffers ``channel_mask`` [C] (1 = active) and ``channel_birth_stage`` [C] (long: the stage
    index in which the channel became active, 0 for the initial ones, −1 while masked). With an all-ones
    mask it computes exactly what ``UNet`` computes. Seed 001's ``initial_sparsity`` / ``regrowth_method``
    (keyword-only) start it masked and enable ``accumulate_gradients`` / ``regrow_channels`` (the end of the class)."""

    def __init__(self, *args, initial_sparsity: float | None = None, regrowth_method: str | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._init_gates([self.bottleneck_channels])
        consumer = self.consumer_block
        if not isinstance(consumer.skip, nn.Conv2d):  # it concatenates a skip, so in_ch != out_ch always
            raise ValueError("the first up block must have a 1x1 skip conv")
        self.middle.register_forward_hook(self._gate_bottleneck)
        consumer.conv1.register_forward_pre_hook(self._gate_consumer)
        self.regrowth_method = None  # set only by seed 001's arguments (below); mode CS reads its config instead
        if initial_sparsity is not None or regrowth_method is not None:
            self._init_seed_sparsity(0.0 if initial_sparsity is None else initial_sparsity,
                                     "gradient" if regrowth_method is None else regrowth_method)

    @property
    def consumer_block(self) -> ResidualBlock:
        """The residual block that first reads the bottleneck: block 0 of the deepest up level."""
        return _residual(self.upsamples[f"level_{self.levels - 1}"][0])

    # ----- the two gates -----

    def _gate_bottleneck(self, module, inputs, h):
        self._begin_record()
        return self._gate(h, self.channel_mask.to(h.dtype), self.bottleneck_channels, 0)

    def _gate_consumer(self, module, inputs):
        (x,) = inputs
        extra = x.shape[1] - self.bottleneck_channels  # the concatenated skip activation's channels
        mask = torch.cat([self.channel_mask.to(x.dtype), x.new_ones(extra)])
        return (self._gate(x, mask, self.bottleneck_channels, 0),)

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

    # ----- seed 001's standalone API: SparseUNet(initial_sparsity=0.8, regrowth_method="gradient", **unet_kwargs)

    def _init_seed_sparsity(self, initial_sparsity: float, regrowth_method: str) -> None:
        """Mask all but the leading floor(C·(1 − s)) channels (mode CS's stage-0 rule) and prepare regrowth.

        Training through a config does not use this: there ``ChannelSparsity`` (sparsity/channel_mask.py) sets
        the mask per stage from ``sparsity.initial_sparsity`` / ``regrowth_method`` and also freezes the
        reserved weights of masked channels, which a network cannot do for its optimizer.
        """
        from ..sparsity.channel_mask import REGROWTH
        from ..sparsity.schedules import active_channels

        if regrowth_method not in REGROWTH:
            raise UserError(f"SparseUNet: unknown regrowth_method {regrowth_method!r}; choose one of "
                            f"{sorted(REGROWTH)}")
        kept = active_channels(self.gated_channels, [float(initial_sparsity)])[0]  # UserError outside [0, 1]
        active = torch.arange(self.gated_channels) < kept
        self.channel_mask.copy_(active.float())
        self.channel_birth_stage.copy_(torch.where(active, 0, -1))
        self.regrowth_method = regrowth_method
        # the seed's buffer, non-persistent so that the state-dict keys stay those of every SparseUNet
        self.register_buffer("channel_grad_accum", torch.zeros(self.gated_channels, dtype=torch.float64),
                             persistent=False)
        self._refresh_seed_probe()

    def _refresh_seed_probe(self) -> None:
        needs = self.regrowth_method == "gate_gradient" and bool((self.channel_mask == 0).any())
        self.gate_probe = (self.gate_probe or GateProbe()) if needs else None

    def _check_seed_api(self, what: str) -> None:
        if self.regrowth_method is None:
            raise UserError(f"SparseUNet.{what}() is seed 001's standalone regrowth: build the network with "
                            f"SparseUNet(initial_sparsity=..., regrowth_method=..., ...) (training through a "
                            f"config regrows with sparsity.regrowth_method instead)")

    @torch.no_grad()
    def accumulate_gradients(self) -> None:
        """After ``backward()``: add this step's regrowth score of the masked channels to ``channel_grad_accum``.

        ``gradient``/``weight_gradient``: Σ|∂L/∂W| per output channel of ``middle.0.conv2`` (the seed's);
        ``gate_gradient``: Σ_samples |∂L/∂m_c| recorded by the gate probe; ``random``: nothing.
        """
        self._check_seed_api("accumulate_gradients")
        masked = self.channel_mask == 0
        if self.regrowth_method in ("gradient", "weight_gradient"):
            grad = self.middle[0].conv2.weight.grad
            if grad is not None:
                self.channel_grad_accum[masked] += grad.abs().sum(dim=(1, 2, 3)).double()[masked]
        elif self.regrowth_method == "gate_gradient" and self.gate_probe is not None:
            part = self.gate_probe.collect(self.gated_channels)
            if part is not None:
                self.channel_grad_accum[masked] += part.double().to(self.channel_grad_accum.device)[masked]

    @torch.no_grad()
    def regrow_channels(self, target_sparsity: float, current_stage: int,
                        generator: torch.Generator | None = None) -> list[int]:
        """Activate the masked channels with the largest score until round(C·(1 − target_sparsity)) are active;
        record ``current_stage`` as their birth stage. Returns the regrown channels. ``random`` draws the scores
        with ``generator``. UserError if the target sparsity is above the current one (channels only regrow)."""
        from ..sparsity.channel_mask import select_channels
        from ..sparsity.schedules import active_channels

        self._check_seed_api("regrow_channels")
        c, masked = self.gated_channels, self.channel_mask == 0
        current = int((~masked).sum())
        if float(target_sparsity) > 1.0 - current / c + 1e-9:
            raise UserError(f"SparseUNet.regrow_channels: target sparsity {target_sparsity} is above the current "
                            f"{1.0 - current / c:.4g} ({current}/{c} active); channels are only ever regrown")
        count = active_channels(c, [1.0 - current / c, float(target_sparsity)])[1] - current
        if self.regrowth_method == "random":
            scores = torch.rand(c, generator=generator, dtype=torch.float64)
        else:
            scores = self.channel_grad_accum
        chosen = select_channels(scores, masked, count) if count > 0 else []
        idx = torch.tensor(chosen, dtype=torch.long, device=self.channel_mask.device)
        self.channel_mask[idx] = 1.0
        self.channel_birth_stage[idx] = int(current_stage)
        if self.regrowth_method == "gate_gradient":
            self.channel_grad_accum.zero_()  # as mode CS: each stage's gate score starts afresh
        self._refresh_seed_probe()
        return chosen


class DecoderSparseUNet(_GatedUNet):
    """UNet + a gate on the input of every up block, after the skip concatenation (module docstring,
    "Decoder location"). Same arguments and state-dict keys as ``UNet`` plus the two gate buffers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gated_blocks = [_residual(layer) for i in reversed(range(self.levels))
                             for layer in self.upsamples[f"level_{i}"] if isinstance(layer, TimestepBlock)]
        if not all(isinstance(b.skip, nn.Conv2d) for b in self.gated_blocks):
            raise ValueError("every up block must have a 1x1 skip conv (input and output widths differ)")
        self._init_gates([b.norm1.num_channels for b in self.gated_blocks])
        # bound methods (and partials of them), not closures: deepcopy (the EMA copy) rebinds them
        self.register_forward_pre_hook(self._start_forward)
        for block, where in zip(self.gated_blocks, self.segment_slices(), strict=True):
            block.register_forward_pre_hook(functools.partial(self._gate_input, where))
            block.conv1.register_forward_pre_hook(functools.partial(self._gate_input, where))

    def _start_forward(self, module, inputs):
        self._begin_record()

    def _gate_input(self, where: slice, module, inputs):
        x, *rest = inputs
        return (self._gate(x, self.channel_mask[where].to(x.dtype), x.shape[1], where.start), *rest)

    def reserved_entries(self, channels: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, bool mask of its entries) of every up block's entries that read only flagged inputs."""
        channels = channels.to(device=self.channel_mask.device, dtype=torch.bool)
        out = []
        for block, where in zip(self.gated_blocks, self.segment_slices(), strict=True):
            sel = channels[where]
            out += [(block.norm1.weight, sel), (block.norm1.bias, sel), (block.conv1.weight, sel.view(1, -1, 1, 1)),
                    (block.skip.weight, sel.view(1, -1, 1, 1))]
        return out

    def fan_out_entries(self, channels: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """The weights that read the flagged inputs (zeroed by ``regrow_init: zero_out``)."""
        return [(p, e) for p, e in self.reserved_entries(channels) if p.dim() == 4]


# Where mode CS puts its gates (``sparsity.location``) → the network class.
GATED_NETWORKS = {"bottleneck": SparseUNet, "decoder": DecoderSparseUNet}

# build_model() checks keyword arguments against the constructor's signature: expose UNet's (SparseUNet's
# also lists seed 001's two keyword-only arguments).
for _cls in GATED_NETWORKS.values():
    _cls.__signature__ = inspect.signature(UNet)
SparseUNet.__signature__ = inspect.signature(UNet).replace(parameters=[
    *inspect.signature(UNet).parameters.values(),
    *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
      for name, kind in (("initial_sparsity", "float | None"), ("regrowth_method", "str | None")))])

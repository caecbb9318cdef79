"""The DDPM UNet of Ho et al. (2020) as laid out by tqch/ddpm-torch.

Architecture (REFERENCE §1): sinusoidal time embedding → MLP; ``in_conv``; per resolution level
``num_res_blocks`` residual blocks (each followed by single-head self-attention where ``apply_attn``
is set) and a stride-2 downsample; a middle ResBlock → Attention → ResBlock; a mirrored up path whose
``num_res_blocks + 1`` blocks per level each concatenate one skip activation; GroupNorm → SiLU → conv out.

The state-dict keys follow ddpm-torch exactly, so its released checkpoints load by name:

    embed.{0,2}.{weight,bias}                       time-embedding MLP
    in_conv.{weight,bias}
    downsamples.level_{i}.{j}.{norm1,conv1,fc,norm2,conv2,skip}.*      plain res block j
    downsamples.level_{i}.{j}.0.<res block parts>                      res block j at an attention level
    downsamples.level_{i}.{j}.1.{norm,project_in,project_out}.*        its attention block
    downsamples.level_{i}.{num_res_blocks}.1.{weight,bias}             down conv (``.0`` is the padding)
    middle.{0,2}.<res block parts>, middle.1.{norm,project_in,project_out}.*
    upsamples.level_{i}.{j}...                                         j < num_res_blocks + 1, as above
    upsamples.level_{i}.{num_res_blocks + 1}.1.{weight,bias}           up conv (``.0`` is the nearest ×2)
    out_conv.{0,2}.{weight,bias}                                       GroupNorm, conv (``.1`` is SiLU)
    class_embed.weight                                                 only with num_classes > 0 (see below)

**Class conditioning** (``num_classes`` > 0, seed 002). ddpm-torch's UNet has no class input, so there is no
key layout to follow; the table ``class_embed`` [num_classes + 1, time_embedding_dim] holds one vector per
class plus the null label ``num_classes`` (classifier-free guidance's unconditional branch). Its row for the
label y is added to the time embedding after the MLP, so every residual block sees it through its ``fc``.
It starts at zero: a freshly built conditional network computes what the unconditional one does.

The CIFAR-10 configuration (hid 128, multipliers (1, 2, 2, 2), 2 res blocks, attention at 16×16)
has 35,746,307 parameters in 304 state-dict tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

GN_GROUPS = 32
# The original TF code, diffusers' google/ddpm-cifar10-32 and ddpm-torch since 2023-07-16 (its released
# checkpoints) use GroupNorm eps 1e-6, the default here; ddpm-torch before that used PyTorch's 1e-5
# (norm_eps=1e-5 matches those checkpoints bit for bit; the difference in outputs is tiny either way).
DEFAULT_NORM_EPS = 1e-6
# TF variance scaling with scale=0 is undefined; ddpm-torch substitutes 1e-10 ("zero-ish" init that
# keeps the weights non-zero, so a freshly built block is an identity map but still has gradients).
ZERO_INIT_SCALE = 1e-10


# ------------------------------------------------------------------------------------------------------
# small pieces


def init_variance_scaling_(module: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Module:
    """TF ``variance_scaling(scale, "fan_avg", "uniform")`` on the weight, zero bias.

    That is U(−a, a) with a = √(6·scale / (fan_in + fan_out)), i.e. Xavier-uniform with gain √scale.
    """
    nn.init.xavier_uniform_(module.weight, gain=math.sqrt(scale))
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def conv2d(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0,
           scale: float = 1.0) -> nn.Conv2d:
    return init_variance_scaling_(nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding), scale)


def linear(in_features: int, out_features: int, scale: float = 1.0) -> nn.Linear:
    return init_variance_scaling_(nn.Linear(in_features, out_features), scale)


def group_norm(channels: int, eps: float = DEFAULT_NORM_EPS, groups: int = GN_GROUPS) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups (32 in DDPM/ddpm-torch), or one per channel below that width.

    The fallback only exists so that toy models with fewer channels can be built. Beware that with one
    channel per group the norm removes any per-channel constant, including the time embedding that a
    ResBlock adds just before ``norm2``: narrow models (e.g. 32-channel layers) should use
    ``norm_groups=16`` so every group keeps ≥ 2 channels.
    """
    groups = min(groups, channels)
    if channels % groups:
        raise ValueError(f"GroupNorm({groups} groups) needs a channel count divisible by {groups}, "
                         f"got {channels}; use hid_channels that is a multiple of {groups} or change norm_groups")
    return nn.GroupNorm(groups, channels, eps=eps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps, ``[sin(t·f), cos(t·f)]`` with f_i = exp(−i·ln(max_period)/(half−1)).

    Args:
        t: [B] integer or float timesteps.
        dim: embedding size; an odd size gets one trailing zero column.
    Returns:
        [B, dim] float32.
    """
    half = dim // 2
    # half−1 in the denominator (not half) is what DDPM/ddpm-torch use: the last frequency is 1/max_period.
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / (half - 1))
    args = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def tf_same_pad(x: torch.Tensor, kernel_size: int = 3, stride: int = 2) -> torch.Tensor:
    """Zero-pad [B, C, H, W] like TensorFlow's ``padding="SAME"`` for a strided convolution.

    The total padding per axis is max((ceil(n/s) − 1)·s + k − n, 0), with the odd pixel at the
    bottom/right. For k=3, s=2 and even n that is (0, 1): only the right/bottom edge is padded.
    """
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad takes the last axis first
        total = max((math.ceil(n / stride) - 1) * stride + kernel_size - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _same_memory_format(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``x`` in ``like``'s memory format (channels_last or NCHW); no copy when it already is."""
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class SamePad2d(nn.Module):
    """Parameter-free TF "SAME" padding (see ``tf_same_pad``); index 0 of the down-conv Sequential."""

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tf_same_pad(x, self.kernel_size, self.stride)


# ------------------------------------------------------------------------------------------------------
# blocks


class TimestepBlock(nn.Module):
    """Marker for blocks whose ``forward`` takes ``(x, t_emb)``; the UNet passes the embedding only to these."""


class ResidualBlock(TimestepBlock):
    """norm1 → SiLU → conv1 (+ fc(SiLU(t_emb))) → norm2 → SiLU → dropout → conv2, plus a (1×1) skip.

    Shapes: x [B, in_ch, H, W], t_emb [B, embed_dim] → [B, out_ch, H, W].
    """

    def __init__(self, in_ch: int, out_ch: int, embed_dim: int, drop_rate: float = 0.0,
                 norm_eps: float = DEFAULT_NORM_EPS, norm_groups: int = GN_GROUPS):
        super().__init__()
        self.norm1 = group_norm(in_ch, norm_eps, norm_groups)
        self.conv1 = conv2d(in_ch, out_ch, 3, padding=1)
        self.fc = linear(embed_dim, out_ch)
        self.norm2 = group_norm(out_ch, norm_eps, norm_groups)
        self.dropout = nn.Dropout(drop_rate)
        # Zero-ish last conv: the block starts as (almost) its skip path, which stabilises early training.
        self.conv2 = conv2d(out_ch, out_ch, 3, padding=1, scale=ZERO_INIT_SCALE)
        self.skip = nn.Identity() if in_ch == out_ch else conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        # In-place adds are safe: conv backward needs the conv's input, not its output.
        h.add_(self.fc(F.silu(t_emb))[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h.add_(self.skip(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions, with a residual connection.

    norm → 1×1 conv to q, k, v (C each) → softmax(q·kᵀ/√C)·v → 1×1 conv (zero-ish init) → + x.
    Shapes: [B, C, H, W] → [B, C, H, W].
    """

    def __init__(self, channels: int, norm_eps: float = DEFAULT_NORM_EPS, norm_groups: int = GN_GROUPS):
        super().__init__()
        self.norm = group_norm(channels, norm_eps, norm_groups)
        self.project_in = conv2d(channels, 3 * channels, 1)
        self.project_out = conv2d(channels, channels, 1, scale=ZERO_INIT_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.project_in(self.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, 3C]; a view, no copy
        q, k, v = qkv.chunk(3, dim=2)                                  # [B, HW, C] each
        # SDPA's default scale is 1/√C, the formula above; it picks a fused kernel where one exists.
        h = F.scaled_dot_product_attention(q, k, v)                    # [B, HW, C]
        h = h.transpose(1, 2).unflatten(2, (H, W))                     # [B, C, H, W], channels_last strides
        h = _same_memory_format(h, x)  # keeps NCHW models NCHW (one copy), free for channels_last
        return self.project_out(h).add_(x)


class ResAttnBlock(nn.Sequential, TimestepBlock):
    """A ResidualBlock (index 0) followed by an AttentionBlock (index 1): the block at attention levels."""

    def __init__(self, res: ResidualBlock, attn: AttentionBlock):
        super().__init__(res, attn)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return self[1](self[0](x, t_emb))


class MiddleBlock(nn.Sequential, TimestepBlock):
    """ResidualBlock (0) → AttentionBlock (1) → ResidualBlock (2) at the lowest resolution."""

    def __init__(self, channels: int, embed_dim: int, drop_rate: float, norm_eps: float, norm_groups: int):
        super().__init__(ResidualBlock(channels, channels, embed_dim, drop_rate, norm_eps, norm_groups),
                         AttentionBlock(channels, norm_eps, norm_groups),
                         ResidualBlock(channels, channels, embed_dim, drop_rate, norm_eps, norm_groups))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return self[2](self[1](self[0](x, t_emb)), t_emb)


def downsample(channels: int, with_conv: bool) -> nn.Module:
    """Halve H and W: TF-SAME-padded stride-2 3×3 conv (key ``.1``), or a 2×2 average pool."""
    if with_conv:
        return nn.Sequential(SamePad2d(3, 2), conv2d(channels, channels, 3, stride=2))
    return nn.AvgPool2d(2)


def upsample(channels: int, with_conv: bool) -> nn.Sequential:
    """Double H and W: nearest-neighbour ×2, then a 3×3 conv (key ``.1``) if ``with_conv``."""
    layers = [nn.Upsample(scale_factor=2, mode="nearest")]
    if with_conv:
        layers.append(conv2d(channels, channels, 3, padding=1))
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------------
# the network


class UNet(nn.Module):
    """DDPM ε-prediction UNet (ddpm-torch layout and state-dict keys; see the module docstring).

    Args:
        in_channels: image channels.
        hid_channels: base width; level i has ``ch_multipliers[i] * hid_channels`` channels.
        out_channels: output channels (default ``in_channels``).
        ch_multipliers: one width multiplier per resolution level.
        num_res_blocks: residual blocks per level in the down path (the up path has one more).
        apply_attn: per level, whether each res block there is followed by self-attention (or one bool).
        time_embedding_dim: width of the time-embedding MLP (default ``4 * hid_channels``).
        drop_rate: dropout inside the residual blocks.
        resample_with_conv: strided conv / conv after upsampling, instead of avg-pool / plain upsampling.
        norm_eps: GroupNorm epsilon (1e-6 as in TF DDPM, diffusers and ddpm-torch since 2023; 1e-5 before).
        norm_groups: GroupNorm groups (32 as in DDPM; layers narrower than that use one group per channel).
        num_classes: class-conditional with this many classes (label ``num_classes`` = null); 0 = unconditional.

    ``forward(x [B, in_channels, H, W], t [B], y [B] | None) → [B, out_channels, H, W]``; H and W must be
    divisible by ``2 ** (len(ch_multipliers) - 1)``.
    """

    def __init__(self, in_channels: int = 3, hid_channels: int = 128, out_channels: int | None = None,
                 ch_multipliers: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 apply_attn: bool | Sequence[bool] = (False, True, False, False),
                 time_embedding_dim: int | None = None, drop_rate: float = 0.0,
                 resample_with_conv: bool = True, norm_eps: float = DEFAULT_NORM_EPS,
                 norm_groups: int = GN_GROUPS, num_classes: int = 0):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be ≥ 0 (0 = unconditional), got {num_classes}")
        ch_multipliers = tuple(ch_multipliers)
        apply_attn = (apply_attn,) * len(ch_multipliers) if isinstance(apply_attn, bool) else tuple(apply_attn)
        _check_args(in_channels, hid_channels, ch_multipliers, num_res_blocks, apply_attn, drop_rate)
        self.in_channels = in_channels
        self.hid_channels = hid_channels
        self.out_channels = out_channels or in_channels
        self.ch_multipliers = ch_multipliers
        self.num_res_blocks = num_res_blocks
        self.apply_attn = apply_attn
        self.time_embedding_dim = time_embedding_dim or 4 * hid_channels
        self.drop_rate = drop_rate
        self.resample_with_conv = resample_with_conv
        self.norm_eps = norm_eps
        self.norm_groups = norm_groups
        self.levels = len(ch_multipliers)
        # Channels of the middle block's output: the tensor a sparsity curriculum masks.
        self.bottleneck_channels = ch_multipliers[-1] * hid_channels

        emb_dim = self.time_embedding_dim
        self.embed = nn.Sequential(linear(hid_channels, emb_dim), nn.SiLU(), linear(emb_dim, emb_dim))
        self.num_classes = num_classes
        if num_classes:  # registered after ``embed`` only when used: unconditional state dicts keep their keys
            self.class_embed = nn.Embedding(num_classes + 1, emb_dim)
            nn.init.zeros_(self.class_embed.weight)
        self.in_conv = conv2d(in_channels, hid_channels, 3, padding=1)
        # Channel counts of the skip activations, in push order, so the up path can size its inputs.
        skip_channels = [hid_channels]
        self.downsamples = nn.ModuleDict(
            {f"level_{i}": self._down_level(i, skip_channels) for i in range(self.levels)})
        self.middle = MiddleBlock(self.bottleneck_channels, emb_dim, drop_rate, norm_eps, norm_groups)
        up = {}
        for i in reversed(range(self.levels)):
            up[f"level_{i}"] = self._up_level(i, skip_channels)
        # Built deepest-first (to pop skips in order) but registered level_0 first, as in ddpm-torch, so
        # that ``state_dict()`` lists keys in the same order as its checkpoints.
        self.upsamples = nn.ModuleDict({f"level_{i}": up[f"level_{i}"] for i in range(self.levels)})
        assert not skip_channels, "every skip activation must be consumed exactly once"
        self.out_conv = nn.Sequential(group_norm(hid_channels, norm_eps, norm_groups), nn.SiLU(),
                                      conv2d(hid_channels, self.out_channels, 3, padding=1,
                                             scale=ZERO_INIT_SCALE))

    def _block(self, level: int, in_ch: int, out_ch: int) -> TimestepBlock:
        res = ResidualBlock(in_ch, out_ch, self.time_embedding_dim, self.drop_rate, self.norm_eps, self.norm_groups)
        if not self.apply_attn[level]:
            return res
        return ResAttnBlock(res, AttentionBlock(out_ch, self.norm_eps, self.norm_groups))

    def _down_level(self, level: int, skip_channels: list[int]) -> nn.ModuleList:
        """Res blocks ``0..num_res_blocks-1`` then (not at the last level) the downsample; records skips."""
        ch, out_ch = skip_channels[-1], self.ch_multipliers[level] * self.hid_channels
        layers = nn.ModuleList()
        for _ in range(self.num_res_blocks):
            layers.append(self._block(level, ch, out_ch))
            ch = out_ch
            skip_channels.append(ch)
        if level != self.levels - 1:
            layers.append(downsample(ch, self.resample_with_conv))
            skip_channels.append(ch)
        return layers

    def _up_level(self, level: int, skip_channels: list[int]) -> nn.ModuleList:
        """``num_res_blocks + 1`` res blocks, each fed ``cat(h, skip)``, then (not at level 0) the upsample."""
        # h enters a level with the width of the level below it (the middle block for the last level).
        ch = self.ch_multipliers[min(level + 1, self.levels - 1)] * self.hid_channels
        out_ch = self.ch_multipliers[level] * self.hid_channels
        layers = nn.ModuleList()
        for _ in range(self.num_res_blocks + 1):
            layers.append(self._block(level, ch + skip_channels.pop(), out_ch))
            ch = out_ch
        if level != 0:
            layers.append(upsample(ch, self.resample_with_conv))
        return layers

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict ε (or whatever the model was trained on) for noisy images at timesteps ``t``.

        Args:
            x: [B, in_channels, H, W], NCHW or channels_last (the output keeps the model's layout).
            t: [B] timesteps 0..T−1, int or float; a scalar is broadcast over the batch.
            y: [B] class labels 0..num_classes (num_classes = null label), only for a conditional network;
                None there means the null label (unconditional).
        Returns:
            [B, out_channels, H, W].
        """
        factor = 2 ** (self.levels - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by {factor} "
                             f"({self.levels} UNet levels)")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        t_emb = self.embed(timestep_embedding(t, self.hid_channels).to(self.embed[0].weight.dtype))
        if self.num_classes:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            t_emb = t_emb + self.class_embed(torch.as_tensor(y, device=x.device).expand(x.shape[0]))
        elif y is not None:
            raise ValueError("class labels given to an unconditional UNet (num_classes = 0)")

        h = self.in_conv(x)
        skips = [h]
        for i in range(self.levels):
            for layer in self.downsamples[f"level_{i}"]:
                h = layer(h, t_emb) if isinstance(layer, TimestepBlock) else layer(h)
                skips.append(h)
        h = self.middle(h, t_emb)
        for i in reversed(range(self.levels)):
            for layer in self.upsamples[f"level_{i}"]:
                if isinstance(layer, TimestepBlock):
                    h = layer(torch.cat([h, skips.pop()], dim=1), t_emb)
                else:
                    h = layer(h)
        return self.out_conv(h)


def _check_args(in_channels, hid_channels, ch_multipliers, num_res_blocks, apply_attn, drop_rate) -> None:
    """Raise ValueError naming the argument for configurations that cannot build a working UNet."""
    if not ch_multipliers or any(int(m) != m or m < 1 for m in ch_multipliers):
        raise ValueError(f"ch_multipliers must be a non-empty list of positive integers, got {list(ch_multipliers)}")
    if len(apply_attn) != len(ch_multipliers):
        raise ValueError(f"apply_attn has {len(apply_attn)} entries but ch_multipliers has {len(ch_multipliers)}; "
                         f"give one bool per level")
    if in_channels < 1 or hid_channels < 1 or num_res_blocks < 1:
        raise ValueError(f"in_channels, hid_channels and num_res_blocks must be ≥ 1, got "
                         f"{in_channels}, {hid_channels}, {num_res_blocks}")
    if hid_channels % 2 or hid_channels < 4:
        raise ValueError(f"hid_channels must be even and ≥ 4 (it is the sinusoidal embedding size), "
                         f"got {hid_channels}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")

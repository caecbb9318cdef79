"""Training throughput: this project's UNet against diffusers' ``UNet2DModel`` with the same layout and weights,
the same loss and the same optimizer step, and the machine's fp32 peaks that the achieved GFLOP/s is read against.

A step is the one ``CurriculumTrainer`` takes: noise the batch, ε-MSE loss, backward, clip the gradient norm,
Adam, EMA update. Both networks run it on the same batch, each in NCHW and in channels_last (what
``model.channels_last: true`` trains with: model and batch in that memory format); diffusers' default is NCHW.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..models.convert import diffusers_unet_config, to_diffusers_state
from ..training import builders
from ..training.ema import EMA


class DiffusersEps(nn.Module):
    """diffusers' ``UNet2DModel`` called like our UNet: ``model(x, t) -> ε``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t).sample


def diffusers_copy(cfg: Config, model: nn.Module) -> DiffusersEps:
    """diffusers' ``UNet2DModel`` with the layout of ``cfg.model`` and the weights of our ``model``."""
    from diffusers import UNet2DModel

    m = cfg.to_dict()["model"]
    unet = UNet2DModel(**diffusers_unet_config(m, builders.image_shape(cfg)[1]))
    unet.load_state_dict(to_diffusers_state(model.state_dict(), len(m["ch_multipliers"]), m["num_res_blocks"]))
    return DiffusersEps(unet)


def build_network(cfg: Config, impl: str) -> nn.Module:
    """``impl`` = "ours" or "diffusers": the config's UNet with seed-0 weights (diffusers gets the same ones)."""
    torch.manual_seed(0)
    model = builders.make_model(cfg)
    return model if impl == "ours" else diffusers_copy(cfg, model)


def fixed_batch(cfg: Config, batch: int, device, channels_last: bool):
    """A seeded batch (x0, t, noise) in the given memory format."""
    g = torch.Generator().manual_seed(1)
    shape = (batch, *builders.image_shape(cfg))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x0, noise = (torch.randn(shape, generator=g).to(device).contiguous(memory_format=fmt) for _ in range(2))
    t = torch.randint(0, cfg.diffusion.timesteps, (batch,), generator=g).to(device)
    return x0, t, noise


def make_train_step(cfg: Config, impl: str, batch: int, device="cpu", channels_last: bool = True,
                    bf16: bool = False, compile: bool = False):
    """One full optimizer step of ``impl``'s network on a fixed batch (``bf16``: under bf16 autocast, as
    ``train.amp=bf16`` trains; ``compile``: the forward and backward through ``torch.compile``, as
    ``model.compile`` trains; the first call compiles)."""
    model = build_network(cfg, impl).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile else model
    diffusion = builders.make_diffusion(cfg)
    x0, t, noise = fixed_batch(cfg, batch, device, channels_last)
    ema = EMA(model, cfg.train.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)

    def step():
        with autocast:  # as the trainer: autocast around the forward, the loss reduced in fp32
            per_sample = diffusion.training_losses(net, x0, t, noise)
        loss = per_sample.float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)

    return step


def step_flops(cfg: Config, batch: int) -> int:
    """Floating-point operations of one training forward + backward (convolutions, matmuls, attention), counted
    by ``torch.utils.flop_counter`` on our network; the diffusers network has the same layout and count."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_network(cfg, "ours")
    diffusion = builders.make_diffusion(cfg)
    x0, t, noise = fixed_batch(cfg, batch, "cpu", False)
    with FlopCounterMode(display=False) as counter:
        diffusion.training_losses(model, x0, t, noise).mean().backward()
    return int(counter.get_total_flops())


def outputs_max_diff(cfg: Config) -> float:
    """max |ours − diffusers| of ε on a batch of 2, after giving every weight a generic non-zero value (ours
    zero-initialises the output convolution, which would make the comparison vacuous)."""
    torch.manual_seed(0)
    model = builders.make_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs = diffusers_copy(cfg, model).eval()
    x0, t, _ = fixed_batch(cfg, 2, "cpu", False)
    with torch.no_grad():
        return float((model(x0, t) - theirs(x0, t)).abs().max())


def bf16_output_rel_diff(cfg: Config, device="cpu") -> float:
    """‖ε_bf16 − ε_fp32‖ / ‖ε_fp32‖ of our network under bf16 autocast on a batch of 8 (generic weights, as above)."""
    torch.manual_seed(0)
    model = builders.make_model(cfg).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x0, t, _ = fixed_batch(cfg, 8, device, False)
        ref = model(x0, t)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            low = model(x0, t).float()
    return float((low - ref).norm() / ref.norm())


MATMUL_N = 1024
CONV_SHAPE = dict(batch=16, channels=128, size=32)  # the CIFAR UNet's widest full-resolution 3×3 convolution
PEAK_SHAPES = {"matmul": f"{MATMUL_N}x{MATMUL_N} @ {MATMUL_N}x{MATMUL_N} fp32",
               "conv_channels_last": "3x3 conv {channels}->{channels}, batch {batch}, {size}x{size}, "
                                     "channels_last fp32 forward".format(**CONV_SHAPE)}


def peak_flops() -> dict[str, int]:
    """Floating-point operations per call of each peak case."""
    b, c, s = CONV_SHAPE["batch"], CONV_SHAPE["channels"], CONV_SHAPE["size"]
    return {"matmul": 2 * MATMUL_N ** 3, "conv_channels_last": 2 * b * c * c * 9 * s * s}


def matmul_peak_case(device="cpu"):
    a, b = (torch.randn(MATMUL_N, MATMUL_N, device=device) for _ in range(2))
    return lambda: torch.mm(a, b)


def conv_peak_case(device="cpu"):
    b, c, s = CONV_SHAPE["batch"], CONV_SHAPE["channels"], CONV_SHAPE["size"]
    conv = nn.Conv2d(c, c, 3, padding=1).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(b, c, s, s, device=device).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def run():
        return conv(x)

    return run

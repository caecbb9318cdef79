"""What a network costs: parameters, nonzero weights, multiply-accumulates per image, bytes on disk.

MACs are counted by forward hooks on one image: a Conv2d costs H_out·W_out·C_out·(C_in/groups)·kh·kw, a
Linear out·in per row, and a self-attention block 2·(H·W)²·C' for q·kᵀ and the weighted sum of v (C' its
q/k/v width); normalisation, activations, additions and biases are not counted. Masked (zero) weights are
counted like any other: dense kernels multiply by them, which is why N:M sparsity saves storage, not time,
without sparse kernels.
"""

from __future__ import annotations

import io

import torch
from torch import nn


def count_macs(model: nn.Module, image_shape, t: int = 0) -> int:
    """Multiply-accumulates of one forward pass of one image of ``image_shape`` (C, H, W) at timestep ``t``."""
    from ..models import AttentionBlock

    total = [0]

    def conv(m, inp, out):
        total[0] += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        total[0] += out.numel() * m.in_features

    def attention(m, inp, out):
        hw = inp[0].shape[-2] * inp[0].shape[-1]
        total[0] += 2 * hw * hw * (m.project_in.out_channels // 3)

    hooks = {nn.Conv2d: conv, nn.Linear: linear, AttentionBlock: attention}
    handles = [m.register_forward_hook(fn) for m in model.modules() for cls, fn in hooks.items()
               if isinstance(m, cls)]
    p = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros((1, *image_shape), device=p.device, dtype=p.dtype),
                  torch.full((1,), t, device=p.device, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def count_nonzeros(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())``: the dense weights, zeros included."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()

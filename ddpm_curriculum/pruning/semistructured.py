"""Optional inference speed-up: 2:4 layers as ``torch.sparse`` semi-structured tensors (CUDA, cc ≥ 8.0).

``torch.sparse.to_sparse_semi_structured`` compresses a 2-D fp16/bf16 weight that is 2:4 along its last
(input) dimension and runs it on sparse tensor cores, for linear-type ops only (REFERENCE §4). Eligible here:
``nn.Linear`` and 1×1, stride-1, unpadded, ungrouped ``nn.Conv2d`` whose weight is 2:4 along the input
channels (for 1×1 convolutions the ASP and im2col orders coincide), with at least 64 rows and columns
divisible by 64 (the kernels' tile constraints). A 1×1 convolution becomes ``Conv1x1AsLinear``: the same
map written as a linear layer over the pixels. Measured speed-ups are modest (≈1.1–1.4× on large layers,
slower than dense at small batch); not run in CI, which has no GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .nm import nm_compliance

MIN_ROWS, COL_MULTIPLE = 64, 64


class Conv1x1AsLinear(nn.Module):
    """A 1×1 convolution as a linear map over pixels: [B, C_in, H, W] → [B, C_out, H, W].

    ``weight`` [C_out, C_in] may be a semi-structured sparse tensor (then only linear-type ops apply).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # one row per pixel
        out = F.linear(rows, self.weight, self.bias)
        return out.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def weight_2d(module: nn.Module) -> torch.Tensor | None:
    """The [out, in] matrix of a Linear or an eligible 1×1 Conv2d; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1) \
            and module.padding == (0, 0) and module.groups == 1:
        return module.weight.detach().flatten(1)
    return None


def semi_structured_eligible(module: nn.Module) -> bool:
    w = weight_2d(module)
    return w is not None and w.shape[0] >= MIN_ROWS and w.shape[1] % COL_MULTIPLE == 0 \
        and nm_compliance(w != 0, 2, 4) == 1.0


def check_semi_structured_device(device: torch.device, dtype: torch.dtype) -> None:
    """UserError unless 2:4 sparse kernels can run here."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise UserError("2:4 semi-structured sparse inference needs a CUDA GPU (compute capability ≥ 8.0); "
                        "on this device use the dense pruned network")
    if torch.cuda.get_device_capability(device) < (8, 0):
        raise UserError(f"2:4 semi-structured sparse inference needs compute capability ≥ 8.0, this GPU has "
                        f"{torch.cuda.get_device_capability(device)}; use the dense pruned network")
    if dtype not in (torch.float16, torch.bfloat16):
        raise UserError(f"2:4 sparse kernels take fp16/bf16 weights, the network is {dtype}; convert it with "
                        f"model.half() first")


@torch.no_grad()
def to_semi_structured(model: nn.Module) -> list[str]:
    """Replace every eligible 2:4 layer of a CUDA fp16/bf16 ``model`` (in place); returns their names."""
    param = next(model.parameters())
    check_semi_structured_device(param.device, param.dtype)
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name, module in list(model.named_modules()):
        if not semi_structured_eligible(module):
            continue
        sparse = to_sparse_semi_structured(weight_2d(module).contiguous())
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(sparse, requires_grad=False)
        else:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, Conv1x1AsLinear(sparse, module.bias))
        converted.append(name)
    return converted

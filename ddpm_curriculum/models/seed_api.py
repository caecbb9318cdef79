"""Seed 001's UNet variants under their own names, as thin layers over this package's pieces.

    RegUNet(**unet_kwargs)                        the UNet (same arguments, state-dict keys and outputs) plus
        .get_conv_layers()                        every Conv2d as (name, module)
        .get_group_l1_penalty(lambda_val)         λ·Σ_layers Σ_c ‖W[c]‖₂, mode CR's penalty (sparsity/group_l1.py)
    wrap_maskpro(model, n=2, m=4, ...)            the MaskProLayer-wrapped network (pruning/maskpro.py)

``SparseUNet(initial_sparsity=…, regrowth_method=…, **unet_kwargs)`` is the class in ``sparse_unet.py`` itself.
Mode CR trains a plain ``UNet`` (its penalty is the ``GroupL1`` extension), so ``RegUNet`` is not in ``MODELS``.
sparsity/ and pruning/ are layer 3, above this package: they are imported inside the functions.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import UNet


class RegUNet(UNet):
    """Seed 001's CR network: a ``UNet`` with the Group-L1 penalty as methods (no other difference)."""

    def get_conv_layers(self) -> list[tuple[str, nn.Conv2d]]:
        """(name, module) of every Conv2d, the layers mode CR penalises (``conv_groups``), in model order."""
        from ..sparsity.group_l1 import conv_groups

        return [(name, self.get_submodule(name)) for name, _ in conv_groups(self)]

    def get_group_l1_penalty(self, lambda_val: float) -> torch.Tensor:
        """λ·Σ_layers Σ_c ‖W[c, :, :, :]‖₂ over ``get_conv_layers()``: a differentiable scalar (0 for λ = 0).

        The same Σ as mode CR's ``GroupL1`` term, which is λ·Σ/batch_size with ``combine: reg_over_batch``
        (the seed's ``mse + reg / batch_size``) and λ·Σ with ``combine: reg``.
        """
        from ..sparsity.group_l1 import conv_groups, group_l1

        weights = [w for _, w in conv_groups(self)]
        if lambda_val == 0:
            return torch.zeros((), device=weights[0].device)
        return lambda_val * group_l1(weights)


def wrap_maskpro(model: nn.Module, n: int = 2, m: int = 4, target_layers=(), **kwargs) -> nn.Module:
    """The MaskProLayer-wrapped network: ``model`` itself, its chosen Conv2d/Linear layers replaced in place by
    ``MaskProLayer``s (N:M masks from learned logits; the whole network frozen). Layer choice and ``kwargs``
    (``initial_masks``, ``order``, ``logits_magnitude``, ``protect``) as ``pruning.wrap_model_with_maskpro``,
    which returns the wrapped layers by name instead (``pruning.maskpro.maskpro_layers(model)`` lists them)."""
    from ..pruning.maskpro import wrap_model_with_maskpro

    wrap_model_with_maskpro(model, n, m, target_layers, **kwargs)
    return model

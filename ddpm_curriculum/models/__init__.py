"""Networks behind a name registry: ``build_model("unet", hid_channels=128, ...)``.

Bad names and bad arguments raise ``UserError`` (one line, with the valid choices), so configs fail at
build time with a message instead of a traceback from deep inside a constructor.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..errors import UserError
from .sparse_unet import GATED_NETWORKS, DecoderSparseUNet, GateProbe, SparseUNet
from .seed_api import RegUNet, wrap_maskpro
from .unet import AttentionBlock, ResidualBlock, UNet, timestep_embedding

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "sparse_unet": SparseUNet,
                                      "decoder_sparse_unet": DecoderSparseUNet}
# sparsity.location → the registered name of mode CS's gated network
GATED_MODEL_NAMES = {loc: next(n for n, c in MODELS.items() if c is cls) for loc, cls in GATED_NETWORKS.items()}

__all__ = ["MODELS", "GATED_MODEL_NAMES", "build_model", "count_parameters", "UNet", "SparseUNet",
           "DecoderSparseUNet", "GateProbe", "RegUNet", "wrap_maskpro", "ResidualBlock",
           "AttentionBlock", "timestep_embedding"]


def build_model(name: str, **kwargs) -> nn.Module:
    """Construct the registered model ``name`` with ``kwargs``; ``UserError`` for any bad input."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    cls = MODELS[name]
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise UserError(f"unknown argument(s) {', '.join(unknown)} for model {name!r}; "
                        f"valid arguments: {', '.join(params)}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # the constructors raise ValueError naming the offending argument
        raise UserError(f"model {name!r}: {e}") from e


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (shared tensors counted once); only ``requires_grad`` ones if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

"""Class-conditional sampling with classifier-free guidance (Ho & Salimans 2022), as a network wrapper.

Convention (the guidance scale w of the CFG paper, eq. 6):

    eps = (1 + w)·eps_cond − w·eps_uncond,     eps_cond = model(x_t, t, y), eps_uncond = model(x_t, t, null)

w = 0 is plain conditional sampling (the unconditional pass is skipped, so it is exactly ``model(x_t, t, y)``);
w > 0 sharpens towards the class. ``null`` is the label ``num_classes`` that ``train.cond_drop_prob`` trains.
The combination is applied to the raw network output: for x0- and v-prediction the conversion to ε is affine
in that output with the same x_t, and the weights sum to one, so this is the same as combining ε.

Samplers never see labels: they call the wrapped network as ``model(x_t, t)``, so DDIM and ancestral sampling
(``sample_batch``, the training grids) stay one code path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UserError

CLASS_CHOICES = ("balanced",)


class ClassConditioned(nn.Module):
    """``model`` with the labels ``y`` [B] bound and guidance ``w``: ``forward(x_t [B, …], t [B]) → [B, …]``."""

    def __init__(self, model: nn.Module, y: torch.Tensor, guidance: float = 0.0):
        super().__init__()
        self.model, self.guidance = model, float(guidance)
        self.register_buffer("y", torch.as_tensor(y, dtype=torch.long), persistent=False)
        self.null_label = int(model.num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self.y.to(x.device)
        eps_cond = self.model(x, t, y)
        if self.guidance == 0:
            return eps_cond
        eps_uncond = self.model(x, t, torch.full_like(y, self.null_label))
        return (1 + self.guidance) * eps_cond - self.guidance * eps_uncond


def image_labels(classes: int | str, indices: Sequence[int], num_classes: int) -> list[int]:
    """The class of each image: ``classes`` = K (every image class K) or ``balanced`` (image i has class
    i mod num_classes, so any prefix 0…N−1 has equal counts ±1 and a label never depends on the batch)."""
    if classes == "balanced":
        return [int(i) % num_classes for i in indices]
    if isinstance(classes, str) or not 0 <= classes < num_classes:
        raise UserError(f"class label {classes!r} is not in 0 … {num_classes - 1} (the model has {num_classes} "
                        f"classes); pass --class-label in that range or --classes balanced")
    return [int(classes)] * len(indices)


def num_classes_of(model: nn.Module) -> int:
    """Classes of a (possibly wrapped) UNet; 0 for unconditional networks."""
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return int(getattr(model, "num_classes", 0) or 0)

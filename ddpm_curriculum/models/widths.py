"""Per-layer widths of a structurally pruned network, as plain data that a config can hold.

A structurally pruned UNet is the UNet of its config with some layers narrower. ``layer_widths(model)`` lists
each Conv2d/Linear as ``[out, in]`` and each GroupNorm as ``[groups, channels]``; ``changed_widths(pruned,
reference)`` keeps the entries that differ from the unpruned build, and that dict is stored as
``model.widths`` in the pruned network's config (``prune.py --method structured``). ``set_widths(model,
widths)`` rebuilds those layers at the stored widths (same kernel, stride, padding, bias and eps), so
``builders.make_model`` builds the pruned architecture from the config alone, and every loader
(``load_network``, resume, ``maskpro.source``) loads it with no extra flag. Forward passes read widths from
the tensors, never from stored attributes, so nothing else needs to change.
"""

from __future__ import annotations

from torch import nn

from ..errors import UserError

RESIZABLE = (nn.Conv2d, nn.Linear, nn.GroupNorm)


def _width(module: nn.Module) -> list[int]:
    if isinstance(module, nn.Conv2d):
        return [module.out_channels, module.in_channels]
    if isinstance(module, nn.Linear):
        return [module.out_features, module.in_features]
    return [module.num_groups, module.num_channels]


def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """``{name: [out, in]}`` of every Conv2d/Linear and ``{name: [groups, channels]}`` of every GroupNorm."""
    return {name: _width(m) for name, m in model.named_modules() if isinstance(m, RESIZABLE)}


def changed_widths(model: nn.Module, reference: nn.Module) -> dict[str, list[int]]:
    """The entries of ``layer_widths(model)`` that differ from ``reference`` (the unpruned build)."""
    ref = layer_widths(reference)
    return {name: w for name, w in layer_widths(model).items() if ref.get(name) != w}


def _resized(module: nn.Module, width: list[int]) -> nn.Module:
    p = next(module.parameters())
    kw = {"device": p.device, "dtype": p.dtype}
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise UserError("model.widths can only resize ungrouped convolutions")
        return nn.Conv2d(width[1], width[0], module.kernel_size, module.stride, module.padding, module.dilation,
                         bias=module.bias is not None, padding_mode=module.padding_mode, **kw)
    if isinstance(module, nn.Linear):
        return nn.Linear(width[1], width[0], bias=module.bias is not None, **kw)
    groups, channels = width
    if groups < 1 or channels % groups:
        raise UserError(f"model.widths: a GroupNorm of {channels} channels cannot have {groups} groups; the "
                        f"widths were edited by hand: use the config prune.py wrote")
    return nn.GroupNorm(groups, channels, eps=module.eps, affine=module.affine, **kw)


def set_widths(model: nn.Module, widths: dict[str, list[int]]) -> nn.Module:
    """Replace the named layers of ``model`` by layers of the given widths (in place); returns ``model``.

    The new layers get PyTorch's default initialisation: they are meant to receive a pruned state dict.
    """
    modules = dict(model.named_modules())
    for name, width in widths.items():
        module = modules.get(name)
        if not isinstance(module, RESIZABLE):
            raise UserError(f"model.widths names '{name}', which is not a Conv2d/Linear/GroupNorm of this "
                            f"network; use the config that prune.py wrote with the network")
        if len(width) != 2 or min(width) < 1:
            raise UserError(f"model.widths['{name}'] = {width} must be two positive integers")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _resized(module, list(width)))
    return model

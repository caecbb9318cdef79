"""Weight masks as plain data: ``{layer_name: bool tensor}`` (True = kept), keyed by module name.

Which layers are prunable, applying masks (zeroing pruned weights in place), reading masks back from a
pruned network's zero pattern, the masks file, and the per-layer statistics written to
``pruning_stats.json``. A pruned network is an ordinary one whose pruned weights are exactly zero, so it
saves as plain weights plus masks and loads without custom classes; during fine-tuning
``training.extensions.FrozenEntries`` keeps those zeros in place.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .nm import nm_compliance, nm_eligible

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)
# Module-name regexes protected by default (seed 003): input conv, output conv, the time-embedding MLP and
# a class embedding if the network has one. Biases and normalisation layers are never pruned.
DEFAULT_PROTECT = (r"^in_conv$", r"^out_conv\.", r"^embed\.", r"(^|\.)(class_emb|label_emb)")


def _compile(patterns, what: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise UserError(f"{what} regex {p!r} is invalid ({exc}); fix the pattern") from None
    return out


def select_layers(model: nn.Module, include=(), protect=DEFAULT_PROTECT,
                  types=PRUNABLE_TYPES) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Prunable layers of ``model`` → (``{name: module}`` in model order, ``{name: why skipped}``).

    A Conv2d/Linear is selected when its name matches one of ``include`` (all when empty) and none of
    ``protect`` (``re.search`` on the module name).
    """
    inc, prot = _compile(include, "layer"), _compile(protect, "protect")
    chosen, skipped = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        if inc and not any(r.search(name) for r in inc):
            skipped[name] = "not selected"
        elif any(r.search(name) for r in prot):
            skipped[name] = "protected"
        else:
            chosen[name] = module
    if include and not chosen:
        raise UserError(f"no prunable layer matches {list(include)}; layer names look like "
                        f"'{next(iter(skipped), 'downsamples.level_0.0.conv1')}'")
    return chosen, skipped


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned (False) entries of each masked layer's weight, in place."""
    check_masks(model, masks)
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight
        weight.mul_(keep.to(weight.device, weight.dtype))


def check_masks(model: nn.Module, masks: dict) -> None:
    """UserError unless every mask names a layer of ``model`` with a weight of the mask's shape."""
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        weight = getattr(modules.get(name), "weight", None)
        if weight is None:
            raise UserError(f"the masks name layer '{name}', which this network does not have; use masks "
                            f"made for this network (prune.py --method extract makes them from a pruned one)")
        if tuple(keep.shape) != tuple(weight.shape):
            raise UserError(f"mask of '{name}' has shape {tuple(keep.shape)} but the weight is "
                            f"{tuple(weight.shape)}; use masks made for this network")


def masks_from_nonzero(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Masks = nonzero pattern of each layer's weight, for the layers that have at least one zero."""
    masks = {name: (m.weight.detach() != 0).cpu() for name, m in layers.items()}
    return {name: keep for name, keep in masks.items() if not bool(keep.all())}


def save_masks(path: str | Path, masks: dict[str, torch.Tensor]) -> None:
    from ..training.checkpoint import atomic_torch_save

    atomic_torch_save(Path(path), {name: keep.bool().cpu() for name, keep in masks.items()})


# Seed 003's mask folder (Maskpro/get_mask_diffusion.py): one ``{layer_name}.pt`` per layer holding its bool
# mask (True = kept), and a human-readable summary. The layer names are this project's module names.
MASK_DIR_SUMMARY = "extraction_summary.txt"
# prune.py's other outputs, which share the folder when only --output_dir is given: not layer masks
NOT_LAYER_MASKS = ("pruned.pt", "masks.pt", "nm_compact.pt")


def save_mask_dir(directory: str | Path, masks: dict[str, torch.Tensor], header: str = "") -> Path:
    """Write ``{layer_name}.pt`` (a bool tensor) per mask and ``extraction_summary.txt`` into ``directory``."""
    from ..atomic import atomic_write
    from ..training.checkpoint import atomic_torch_save

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the mask folder {directory} ({exc.strerror or exc}); choose a writable "
                        f"place") from None
    lines = [header] if header else []
    total = kept_total = 0
    for name, keep in masks.items():
        keep = keep.bool().cpu()
        atomic_torch_save(directory / f"{name}.pt", keep.clone())
        kept = int(keep.sum())
        total, kept_total = total + keep.numel(), kept_total + kept
        lines.append(f"{name}.pt  shape {list(keep.shape)}  kept {kept}/{keep.numel()}  "
                     f"sparsity {1 - kept / keep.numel():.4f}")
    lines.append(f"total: {len(masks)} layers, kept {kept_total}/{total}, "
                 f"sparsity {1 - kept_total / max(total, 1):.4f}")
    text = "\n".join(lines) + "\n"
    atomic_write(directory / MASK_DIR_SUMMARY, lambda f: f.write(text.encode()))
    return directory


def _load_mask_dir(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(p for p in directory.glob("*.pt") if p.name not in NOT_LAYER_MASKS)
    if not files:
        raise UserError(f"mask folder {directory} holds no .pt mask files; make one with prune.py --method extract "
                        f"--mask_dir {directory}")
    masks = {}
    for f in files:
        try:
            keep = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"cannot read mask file {f} ({type(exc).__name__}); re-create the folder with "
                            f"prune.py --method extract --mask_dir") from None
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            raise UserError(f"{f} does not hold one bool mask tensor; re-create the folder with prune.py "
                            f"--method extract --mask_dir")
        masks[f.name[:-len(".pt")]] = keep
    return masks


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """A masks file ``{layer_name: bool tensor}``, or a folder of ``{layer_name}.pt`` files (seed 003's layout,
    ``save_mask_dir``); a pruned checkpoint's ``masks`` entry is accepted too."""
    path = Path(path)
    if path.is_dir():
        return _load_mask_dir(path)
    if not path.is_file():
        raise UserError(f"mask file not found: {path}; make one with prune.py (masks.pt in its --save_path)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read mask file {path} ({type(exc).__name__}); is it a masks.pt from prune.py?") \
            from None
    if isinstance(obj, dict) and isinstance(obj.get("masks"), dict):
        obj = obj["masks"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(v, torch.Tensor) and v.dtype == torch.bool for v in obj.values()):
        raise UserError(f"{path} is not a mask file (expected {{layer_name: bool tensor}}); make one with prune.py")
    return obj


def sparsity_summary(model: nn.Module, masks: dict[str, torch.Tensor] | None = None, n: int = 2, m: int = 4,
                     order: str = "asp", layers=None) -> dict:
    """Per-layer and overall sparsity and N:M compliance.

    ``layers``: names to report (default: the masked layers, or every Conv2d/Linear without masks). A
    layer's kept entries are its mask's (``masks``) or else its weight's nonzeros. Totals count every
    parameter of the network; ``nonzeros`` counts effective (masked) weights.
    """
    masks = masks or {}
    modules = dict(model.named_modules())
    if layers is None:
        layers = list(masks) or [k for k, v in modules.items() if isinstance(v, PRUNABLE_TYPES)]
    per_layer, groups_ok, groups_all = {}, 0.0, 0
    for name in layers:
        weight = modules[name].weight.detach()
        keep = masks[name].to(weight.device) if name in masks else weight != 0
        kept = int(keep.sum())
        compliance = nm_compliance(keep, n, m, order)
        per_layer[name] = {"shape": list(weight.shape), "params": weight.numel(), "kept": kept,
                           "sparsity": 1.0 - kept / weight.numel(), "nm_compliance": compliance}
        if compliance is not None:
            groups_ok += compliance * weight.numel() / m
            groups_all += weight.numel() // m
    masked_weights = {id(modules[k].weight): masks[k] for k in masks if k in modules}
    params = nonzeros = 0
    for p in model.parameters():
        keep = masked_weights.get(id(p))
        eff = p.detach() if keep is None else p.detach() * keep.to(p.device)
        params += p.numel()
        nonzeros += int(torch.count_nonzero(eff))
    reported = sum(v["params"] for v in per_layer.values())
    kept = sum(v["kept"] for v in per_layer.values())
    totals = {"params": params, "nonzeros": nonzeros, "overall_sparsity": 1.0 - nonzeros / max(params, 1),
              "layers": len(per_layer), "layer_params": reported, "layer_kept": kept,
              "layer_sparsity": 1.0 - kept / max(reported, 1), "n": n, "m": m, "order": order,
              "nm_eligible_layers": sum(nm_eligible(modules[k].weight.shape, m, order) for k in per_layer),
              "nm_compliance": groups_ok / groups_all if groups_all else None}
    return {"layers": per_layer, "totals": totals}

"""N:M sparsity: which weights form a group, N:M magnitude masks, compliance, and a compact export.

An N:M mask keeps at most N of every M consecutive weights of a group. Where the groups lie matters
(REFERENCE §4), and one convention is used everywhere here (extraction, MaskPro, validation, export):

- ``asp`` (default): along the **input channels at each kernel tap** — a Conv2d weight [C_out, C_in, kh, kw]
  is viewed as [C_out·kh·kw, C_in] and cut into rows of M (NVIDIA ASP ``m4n2_1d``, the layout sparse
  cuDNN/TensorRT kernels expect). A Linear weight [out, in] is grouped along ``in``.
- ``im2col``: along the flattened (C_in·kh·kw) order of an im2col GEMM.

Both orders coincide for Linear and 1×1 convolutions. A layer whose grouped dimension is not a multiple of
M (the 3-channel input conv, say) is not eligible.
"""

from __future__ import annotations

import torch

from ..errors import UserError

NM_ORDERS = ("asp", "im2col")
COMPACT_FORMAT = "ddpm-curriculum/nm-compact"


def check_nm(n: int, m: int, order: str = "asp") -> None:
    if not 1 <= n < m or m > 16:
        raise UserError(f"N:M = {n}:{m} is not valid; need 1 <= N < M <= 16 (e.g. 2:4, 1:4, 4:8)")
    if order not in NM_ORDERS:
        raise UserError(f"unknown N:M group order {order!r}; choose one of {list(NM_ORDERS)}")


def grouped_dim(shape, order: str = "asp") -> int:
    """Length of the dimension the groups run along: C_in (asp), C_in·kh·kw (im2col), or ``in`` (Linear)."""
    if len(shape) == 2:
        return shape[1]
    if len(shape) == 4:
        return shape[1] if order == "asp" else shape[1] * shape[2] * shape[3]
    raise UserError(f"N:M groups are defined for Linear [out, in] and Conv2d [C_out, C_in, kh, kw] weights, "
                    f"got shape {tuple(shape)}")


def nm_eligible(shape, m: int, order: str = "asp") -> bool:
    return len(shape) in (2, 4) and grouped_dim(shape, order) % m == 0


def nm_groups(weight: torch.Tensor, m: int, order: str = "asp") -> torch.Tensor:
    """``weight`` (Linear [out, in] or Conv2d [C_out, C_in, kh, kw]) → [G, M] groups, G = numel/M."""
    if not nm_eligible(weight.shape, m, order):
        raise UserError(f"weight of shape {tuple(weight.shape)} cannot be cut into groups of {m} ({order} "
                        f"order): its grouped dimension {grouped_dim(weight.shape, order)} is not a multiple of {m}")
    if weight.ndim == 4 and order == "asp":
        weight = weight.permute(0, 2, 3, 1)  # [C_out, kh, kw, C_in]: C_in innermost
    return weight.reshape(-1, m)


def nm_ungroup(groups: torch.Tensor, shape, order: str = "asp") -> torch.Tensor:
    """Inverse of ``nm_groups``: [G, M] → a contiguous tensor of the weight's ``shape``."""
    shape = tuple(shape)
    if len(shape) == 4 and order == "asp":
        c_out, c_in, kh, kw = shape
        return groups.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()
    return groups.reshape(shape).contiguous()


def top_n_positions(scores: torch.Tensor, n: int) -> torch.Tensor:
    """[G, M] → [G, n] positions of the n largest scores per row, ascending; ties go to the lower position."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :n].sort(dim=1).values


def positions_to_groups(positions: torch.Tensor, m: int) -> torch.Tensor:
    """[G, n] positions → [G, M] bool with those positions set."""
    out = torch.zeros(positions.shape[0], m, dtype=torch.bool, device=positions.device)
    return out.scatter_(1, positions, True)


def nm_mask(weight: torch.Tensor, n: int, m: int, order: str = "asp") -> torch.Tensor:
    """N:M magnitude mask of ``weight``: the N largest |w| of every group kept (True). Same shape as weight."""
    check_nm(n, m, order)
    groups = nm_groups(weight.detach(), m, order)
    keep = positions_to_groups(top_n_positions(groups.abs(), n), m)
    return nm_ungroup(keep, weight.shape, order)


def nm_compliance(mask: torch.Tensor, n: int, m: int, order: str = "asp") -> float | None:
    """Share of groups with at most N kept entries (1.0 = fully N:M); None for an ineligible shape."""
    if not nm_eligible(mask.shape, m, order):
        return None
    kept = nm_groups(mask, m, order).sum(dim=1)
    return (kept <= n).double().mean().item()


def kept_per_group(mask: torch.Tensor, m: int, order: str = "asp") -> torch.Tensor:
    return nm_groups(mask, m, order).sum(dim=1)


# ------------------------------------------------------------------------------------ compact export


def _pattern_dtype(m: int) -> torch.dtype:
    return torch.uint8 if m <= 8 else torch.int32


def _fill_to_n(keep: torch.Tensor, n: int) -> torch.Tensor:
    """[G, M] bool with ≤ n set per row → exactly n set, adding the lowest free positions (their weights are 0)."""
    missing = n - keep.sum(dim=1, keepdim=True)
    free_rank = (~keep).cumsum(dim=1)  # 1, 2, ... over the free positions of each row
    return keep | (~keep & (free_rank <= missing))


def compact_layer(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int, order: str = "asp") -> dict:
    """One N:M layer → ``{"shape", "values" [G, n], "pattern" [G]}``: the kept values in position order and a
    bit pattern per group (bit j = position j kept). Groups with fewer than n kept entries store zeros in
    the free slots, so the decoded mask marks those as kept while the weights stay identical."""
    keep = _fill_to_n(nm_groups(mask.bool(), m, order), n)
    values = nm_groups(weight.detach() * mask, m, order)[keep].reshape(-1, n)
    bits = (keep.to(torch.int64) << torch.arange(m, device=keep.device)).sum(dim=1)
    return {"shape": list(weight.shape), "values": values.clone(), "pattern": bits.to(_pattern_dtype(m))}


def expand_layer(entry: dict, m: int, order: str = "asp") -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``compact_layer`` → (dense weight with zeros, bool mask)."""
    bits = entry["pattern"].to(torch.int64)
    keep = ((bits[:, None] >> torch.arange(m)) & 1).bool()  # [G, M]
    groups = torch.zeros(keep.shape, dtype=entry["values"].dtype)
    groups[keep] = entry["values"].flatten()  # boolean assignment fills row-major = position order
    shape = entry["shape"]
    return nm_ungroup(groups, shape, order), nm_ungroup(keep, shape, order)


def export_compact(state_dict: dict, masks: dict, n: int, m: int, order: str, config: dict,
                   step: int = 0) -> tuple[dict, list[str]]:
    """A compact file: every masked, N:M-compliant, eligible layer as (values, patterns), the rest dense.

    Returns (the object to ``torch.save``, names of masked layers kept dense because they are not N:M).
    """
    check_nm(n, m, order)
    nm_layers, dense_layers = {}, []
    for name, mask in masks.items():
        weight = state_dict[f"{name}.weight"]
        if nm_compliance(mask, n, m, order) == 1.0:
            nm_layers[name] = compact_layer(weight, mask, n, m, order)
        else:
            dense_layers.append(name)
    dense = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[0] not in nm_layers or not k.endswith(".weight")}
    obj = {"format": COMPACT_FORMAT, "version": 1, "n": n, "m": m, "order": order, "config": config,
           "step": step, "nm": nm_layers, "dense": dense}
    return obj, dense_layers


def is_compact(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == COMPACT_FORMAT


def import_compact(obj: dict) -> tuple[dict, dict]:
    """A compact object → (dense state dict with zeros at pruned entries, {layer: bool mask})."""
    if not is_compact(obj):
        raise UserError("not a ddpm-curriculum N:M compact file (no 'format' marker); export one with prune.py")
    state, masks = dict(obj["dense"]), {}
    for name, entry in obj["nm"].items():
        state[f"{name}.weight"], masks[name] = expand_layer(entry, obj["m"], obj["order"])
    return state, masks

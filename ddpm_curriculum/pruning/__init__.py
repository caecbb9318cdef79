"""Pruning: unstructured and N:M masks, MaskPro mask learning, compact N:M export (see README, "Pruning").

Masks are plain data, ``{layer_name: bool tensor}`` with True = kept; a pruned network is an ordinary one
whose pruned weights are exactly 0.
"""

from .magnitude import magnitude_masks, random_masks
from .masks import apply_masks, load_masks, masks_from_nonzero, save_masks, select_layers, sparsity_summary
from .maskpro import MaskProLayer, get_model_sparsity_summary, unwrap, wrap_model_with_maskpro
from .nm import export_compact, import_compact, nm_compliance, nm_groups, nm_mask

__all__ = ["magnitude_masks", "random_masks", "apply_masks", "load_masks", "masks_from_nonzero", "save_masks",
           "select_layers", "sparsity_summary", "MaskProLayer", "get_model_sparsity_summary", "unwrap",
           "wrap_model_with_maskpro", "export_compact", "import_compact", "nm_compliance", "nm_groups", "nm_mask"]

"""Mode ``prune`` plumbing shared by both phases, and phase ``finetune``.

- ``load_source`` / ``adopt_source_architecture``: the run starts from ``maskpro.source`` (any network
  ``load_network`` reads), so the run's ``model`` architecture and ``diffusion`` sections are copied from
  it when the run starts (training choices such as dropout stay the config's).
- ``MaskedFinetune``: a ``TrainingExtension`` that loads the pruned network at step 0 and keeps every
  pruned weight at exactly 0 through backward, clipping, Adam/AdamW (incl. weight decay) and hence the EMA,
  using ``FrozenEntries`` (its ``frozen``, which the trainer applies). Its masks are part of the checkpoint, so
  a resume does not need the source.
"""

from __future__ import annotations

from ..config import Config, config_from_dict
from ..errors import UserError
from ..training.checkpoint import check_compatible, load_network
from ..hooks import FrozenEntries, HookContext, TrainingExtension
from .masks import apply_masks, check_masks, load_masks

# Model keys that define the architecture (taken from the source); the rest are training choices.
ARCHITECTURE_KEYS = ("name", "in_channels", "hid_channels", "ch_multipliers", "num_res_blocks", "apply_attn",
                     "resample_with_conv", "norm_groups", "norm_eps", "widths")


def load_source(cfg: Config):
    """``maskpro.source`` as a LoadedNetwork (EMA weights if ``maskpro.use_ema``)."""
    if not cfg.maskpro.source:
        raise UserError("mode prune needs the network to start from: set maskpro.source "
                        "(e.g. --set maskpro.source=runs/quickstart-…)")
    return load_network(cfg.maskpro.source, use_ema=cfg.maskpro.use_ema)


def adopt_source_architecture(cfg: Config) -> tuple[Config, list[str]]:
    """``cfg`` with the source network's architecture and diffusion; also the keys that changed."""
    src = load_source(cfg).config.to_dict()
    raw, changed = cfg.to_dict(), []
    for key in ARCHITECTURE_KEYS:
        if raw["model"][key] != src["model"][key]:
            changed.append(f"model.{key}")
            raw["model"][key] = src["model"][key]
    for key, value in src["diffusion"].items():
        if raw["diffusion"][key] != value:
            changed.append(f"diffusion.{key}")
            raw["diffusion"][key] = value
    return config_from_dict(raw), changed


def source_masks(cfg: Config, net) -> dict:
    """The masks a run uses: ``maskpro.masks`` if set, else the source checkpoint's own (none for a
    structurally pruned source without masks: its removed channels are gone, every other weight trains)."""
    if cfg.maskpro.masks:
        return load_masks(cfg.maskpro.masks)
    if not net.masks and net.config.model.widths:  # structurally pruned: fine-tune every remaining weight
        return {}
    if not net.masks:
        raise UserError(f"{cfg.maskpro.source} has no masks (it is not a pruned or MaskPro checkpoint); "
                        f"set maskpro.masks to a mask file from prune.py")
    return net.masks


class MaskedFinetune(TrainingExtension):
    """Fine-tune with fixed masks: pruned weights are loaded as 0 and never move."""

    name = "masked_finetune"

    def __init__(self, cfg: Config, model):
        self.cfg, self.model = cfg, model
        self.masks: dict | None = None
        self.frozen = FrozenEntries()

    def on_stage_start(self, ctx: HookContext, stage) -> dict:
        if self.masks is None:  # first stage of a new run (a resume has masks from the checkpoint)
            self._load_pruned(ctx)
        return {}

    def _load_pruned(self, ctx: HookContext) -> None:
        net = load_source(self.cfg)
        masks = source_masks(self.cfg, net)
        check_compatible(ctx.model, net.model.state_dict(), str(self.cfg.maskpro.source))
        apply_masks(net.model, masks)  # the pruned source, loaded into the network and (reset to it) the EMA
        ctx.load_weights(net.model.state_dict())
        self._freeze(masks)

    def _freeze(self, masks: dict) -> None:
        check_masks(self.model, masks)
        self.masks, self.frozen = masks, FrozenEntries()
        for name, keep in masks.items():
            self.frozen.freeze(self.model.get_submodule(name).weight, ~keep)

    def log_fields(self, ctx: HookContext) -> dict:
        kept = sum(int(k.sum()) for k in self.masks.values())
        total = sum(k.numel() for k in self.masks.values())
        return {"masked_layers_sparsity": 1.0 - kept / total if total else 0.0}

    def state_dict(self) -> dict:
        return {"masks": self.masks}

    def load_state_dict(self, state: dict) -> None:
        self._freeze(state["masks"])  # the weights were just restored: pruned entries are 0

"""Training modes behind one registry: ``MODES = {"baseline": Mode(...), "C": ..., "CS": ..., "prune": ...}``.

A mode is declared once, here, by what it adds to a run: the config section that switches it on, whether it needs
the curriculum, the network it trains, its training extensions (``hooks.TrainingExtension``), the update rule of its
steps (``training/updates.py``), what it checks in the config, and its lines in ``--dry-run``. Everything that used
to branch on the mode (config validation, ``builders.make_model``, ``build_extensions``, the CLI, the mode bench)
asks the registry instead.

The mode is the config's ``mode`` key. When it is null (every seed config) it is derived from the section
switches, as before: the mode whose section has ``enabled: true``, else C or baseline by
``curriculum.enabled``. When it is given, it sets those switches, and a config that contradicts it is an error.

Adding a mode: declare a ``Mode`` below (its extension code may live in its own module, imported inside its
factory) and, if it has options, add their section to ``config.py``. See docs/architecture.md.

Imports here stay at layer 0 at module level (config, errors): the extension modules import the trainer's
package, which imports this registry, so they are imported inside the factories.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError


def _nothing(cfg) -> None:
    return None


def _no_lines(cfg) -> list[str]:
    return []


def _no_extensions(cfg, model) -> list:
    return []


def _unchanged(cfg, dry_run: bool):
    return cfg, []


@dataclass(frozen=True)
class Mode:
    """One training mode. Every callable takes the resolved ``Config``; the defaults do nothing."""

    name: str
    summary: str
    section: str | None = None  # the config section whose ``enabled`` switches the mode on
    curriculum: bool | None = None  # True: needs curriculum.enabled; False: needs it off; None: either
    network: Callable = _nothing  # cfg → registered model name, None = model.name
    extensions: Callable = _no_extensions  # (cfg, model) → [TrainingExtension]
    update: Callable = _nothing  # cfg → update rule class (training/updates.py), None = GradientUpdate
    prepare: Callable = _unchanged  # (cfg, dry_run) → (cfg, notes), before a new run starts (not on resume)
    validate: Callable = _nothing  # cfg → None, raises UserError
    describe: Callable = _no_lines  # cfg → extra --dry-run lines
    stage_notes: Callable = _no_lines  # cfg → one note per curriculum stage for --dry-run

    def switches(self) -> dict[str, bool]:
        """The ``section.enabled`` keys this mode sets: its own section on, every other mode's off, and the
        curriculum as it needs it."""
        out = {f"{m.section}.enabled": m is self for m in MODES.values() if m.section}
        if self.curriculum is not None:
            out["curriculum.enabled"] = self.curriculum
        return out


# ------------------------------------------------------------------------------- the modes' parts


def _cs_network(cfg) -> str:
    from ..models import GATED_MODEL_NAMES  # with an all-ones mask it computes exactly what "unet" computes

    return GATED_MODEL_NAMES[cfg.sparsity.location]


def _cs_extensions(cfg, model) -> list:
    from ..sparsity.channel_mask import ChannelSparsity

    return [ChannelSparsity(cfg, model)]


def _cr_extensions(cfg, model) -> list:
    from ..sparsity.group_l1 import GroupL1

    return [GroupL1(cfg, model)]


def _cs_validate(cfg) -> None:
    from ..sparsity.schedules import stage_active_channels

    stage_active_channels(cfg)  # raises on a bad schedule
    if cfg.sparsity.location == "decoder" and cfg.sparsity.regrowth_method in ("weight_gradient", "gradient"):
        raise UserError(f"'sparsity.regrowth_method' = '{cfg.sparsity.regrowth_method}' reads the bottleneck's "
                        f"weights; with 'sparsity.location' = 'decoder' use gate_gradient or random")


def _cr_validate(cfg) -> None:
    from ..sparsity.schedules import stage_lambdas

    stage_lambdas(cfg)  # raises on a bad schedule


def _cs_describe(cfg) -> list[str]:
    sp = cfg.sparsity
    seed = " (the seed's criterion, = weight_gradient; the default gate_gradient is the sound one)" \
        if sp.regrowth_method == "gradient" else ""
    return [f"sparsity: schedule {sp.schedule}, regrowth {sp.regrowth_method}{seed}, regrow_init {sp.regrow_init}"]


def _cr_describe(cfg) -> list[str]:
    reg = cfg.regularization
    return [f"regularization: {reg.target}, schedule {reg.schedule}, loss = mse + "
            f"{'reg/batch_size' if reg.combine == 'reg_over_batch' else 'reg'}{', prox' if reg.prox else ''}"]


def _cs_stage_notes(cfg) -> list[str]:
    from ..sparsity.schedules import stage_active_channels

    if cfg.sparsity.location == "decoder":
        from ..training.builders import make_model

        segments = make_model(cfg).gate_segments
        per_stage = zip(*[stage_active_channels(cfg, c) for c in segments], strict=True)
        return [f"active {sum(k)}/{sum(segments)} decoder input channels ({len(segments)} up blocks)"
                for k in per_stage]
    channels = cfg.model.ch_multipliers[-1] * cfg.model.hid_channels
    return [f"active {k}/{channels} bottleneck channels" for k in stage_active_channels(cfg)]


def _cr_stage_notes(cfg) -> list[str]:
    from ..sparsity.schedules import stage_lambdas

    return [f"λ = {lam:.3g}" for lam in stage_lambdas(cfg)]


def _prune_extensions(cfg, model) -> list:
    if cfg.maskpro.phase != "finetune":
        return []
    from ..pruning.finetune import MaskedFinetune

    return [MaskedFinetune(cfg, model)]


def _prune_update(cfg):
    if cfg.maskpro.phase != "learn":
        return None  # masked fine-tuning: gradient steps with the pruned entries frozen
    from ..pruning.learn import PolicyGradientUpdate

    return PolicyGradientUpdate


def _prune_prepare(cfg, dry_run: bool):
    """A new prune-mode run takes its architecture and diffusion from ``maskpro.source``."""
    if dry_run and not cfg.maskpro.source:
        return cfg, ["maskpro.source is not set; a real run needs it and takes its architecture from it"]
    from ..pruning.finetune import adopt_source_architecture  # its load_source names a missing source

    cfg, changed = adopt_source_architecture(cfg)
    return cfg, [f"took {', '.join(changed)} from maskpro.source {cfg.maskpro.source}"] if changed else []


def _prune_validate(cfg) -> None:
    mp = cfg.maskpro
    if mp.n >= mp.m:
        raise UserError(f"'maskpro.n' = {mp.n} must be smaller than 'maskpro.m' = {mp.m} (e.g. 2:4)")


# ----------------------------------------------------------------------------------- the registry

MODES: dict[str, Mode] = {m.name: m for m in [
    Mode("baseline", "standard DDPM training: t uniform over 0..T−1 for the whole run", curriculum=False),
    Mode("C", "timestep curriculum: stage by stage over growing t ranges", curriculum=True),
    Mode("CS", "curriculum + sparsity curriculum: channel gates that regrow at every stage transition",
         section="sparsity", curriculum=True, network=_cs_network, extensions=_cs_extensions,
         validate=_cs_validate, describe=_cs_describe, stage_notes=_cs_stage_notes),
    Mode("CR", "curriculum + Group-L1 regularisation with λ decaying over the stages",
         section="regularization", curriculum=True, extensions=_cr_extensions, validate=_cr_validate,
         describe=_cr_describe, stage_notes=_cr_stage_notes),
    Mode("prune", "N:M masks learnt with MaskPro (phase learn) or masked fine-tuning (phase finetune)",
         section="maskpro", extensions=_prune_extensions, update=_prune_update, prepare=_prune_prepare,
         validate=_prune_validate),
]}


def mode_names() -> list[str]:
    """Every valid ``mode`` (the config's choices)."""
    return list(MODES)


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise UserError(f"config key 'mode' = {name!r} is not a mode; choose one of {list(MODES)} (or null: "
                        f"derived from the sections' 'enabled' switches)")
    return MODES[name]


def apply_mode_key(raw: dict) -> dict:
    """A raw config whose explicit ``mode`` sets its switches (``Mode.switches``) where the config does not give
    them; a switch the config gives with the other value is a one-line error. No ``mode``: ``raw`` unchanged."""
    name = raw.get("mode")
    if name is None:
        return raw
    if not isinstance(name, str):
        raise UserError(f"config key 'mode' must be str, got {name!r}")
    for key, value in get_mode(name).switches().items():
        section, field = key.split(".")
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            continue  # build_section names the malformed section
        if field in node and node[field] != value:
            raise UserError(f"'mode' = {name!r} needs '{key}' = {str(value).lower()}, but the config sets it to "
                            f"{json.dumps(node[field])}; remove one of the two")
        node[field] = value
    return raw


def _default_mode(curriculum: bool) -> Mode:
    """The mode of a config without ``mode`` and with no section switched on: the first registered mode
    without a section that fits ``curriculum.enabled`` (baseline or C)."""
    return next(m for m in MODES.values() if not m.section and m.curriculum == curriculum)


def resolve_mode(cfg) -> None:
    """Set ``cfg.mode`` to the mode in force (explicit, else derived from the section switches), check that the
    switches agree with it, and run that mode's own checks."""
    on = [m for m in MODES.values() if m.section and getattr(cfg, m.section).enabled]
    if len(on) > 1:
        raise UserError(f"{' and '.join(repr(m.section + '.enabled') for m in on)} are true together; pick one "
                        f"mode ({' or '.join(m.name for m in on)})")
    if cfg.mode is None:
        mode = on[0] if on else _default_mode(cfg.curriculum.enabled)
    else:
        mode = get_mode(cfg.mode)
        if on != ([mode] if mode.section else []):  # a config whose sections were replaced after it was resolved
            switch = f"'{on[0].section}.enabled' is true" if on else f"'{mode.section}.enabled' is false"
            raise UserError(f"'mode' = {mode.name!r} but {switch}; remove 'mode' or the switch")
    if mode.curriculum and not cfg.curriculum.enabled:
        raise UserError(f"mode {mode.name} follows the curriculum stages; set 'curriculum.enabled' to true")
    if mode.curriculum is False and cfg.curriculum.enabled:
        raise UserError(f"mode {mode.name} trains without stages; set 'curriculum.enabled' to false")
    cfg.mode = mode.name
    mode.validate(cfg)


def mode_of(cfg) -> Mode:
    """The registered mode of a resolved config."""
    return MODES[cfg.mode]


__all__ = ["Mode", "MODES", "mode_names", "get_mode", "apply_mode_key", "resolve_mode", "mode_of"]

"""Config sections → objects (dataset, network, diffusion). The only place that reads config keys
to construct things, so scripts and tests build exactly what training builds."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..config import Config
from ..data import class_names, dataset_from_config, dataset_shape, default_flip
from ..diffusion import CurriculumDiffusion, make_betas, make_loss_weights, matched_histogram
from ..errors import UserError
from ..modes import mode_of
from ..models import build_model
from ..models.widths import set_widths


def image_shape(cfg: Config) -> tuple[int, int, int]:
    """(C, H, W) of the configured dataset, without reading it from disk."""
    return dataset_shape(cfg.dataset)


def make_dataset(cfg: Config, split: str = "train", use_cache: bool = True):
    """The training dataset, unflipped: flips are drawn per step by the trainer (exact resume). ``use_cache``
    False skips ``dataset.cache`` (listing the files without decoding them, e.g. for ``--dry-run``)."""
    return dataset_from_config(cfg.dataset, split, use_cache)


def _short(names: list[str]) -> str:
    return str(names) if len(names) <= 12 else f"{names[:12]} … ({len(names)} names)"


def check_labels(cfg: Config, dataset) -> int:
    """Check the dataset's classes against the config and record them: ``dataset.class_names`` is set to the
    classes found (in label order) when the run uses labels (model.num_classes > 0 or dataset.labels
    subfolders); a list given in the config must equal them. Returns model.num_classes (0 = unconditional)."""
    d, k = cfg.dataset, cfg.model.num_classes
    names = class_names(dataset)
    if names is None:
        if k:
            raise UserError(f"model.num_classes = {k} needs class labels but dataset '{d.name}' has none; set "
                            f"dataset.labels=subfolders (image_folder with one subfolder per class) or "
                            f"model.num_classes=0")
        if d.class_names:
            raise UserError(f"dataset.class_names is set but dataset '{d.name}' has no labels; remove it")
        return 0
    if k and k != len(names):
        raise UserError(f"model.num_classes = {k} but the dataset has {len(names)} classes {_short(names)}; set "
                        f"model.num_classes={len(names)}")
    if k or d.labels == "subfolders":
        if d.class_names and d.class_names != names:
            raise UserError(f"dataset.class_names = {_short(d.class_names)} but the dataset's classes are "
                            f"{_short(names)}; fix the class folders or the list (or remove it)")
        cfg.dataset = dataclasses.replace(d, class_names=names)  # sections are frozen: a new one, recorded
    return k


def use_random_flip(cfg: Config) -> bool:
    return default_flip(cfg.dataset)


def make_model(cfg: Config, name: str | None = None) -> nn.Module:
    """The configured network; ``name`` overrides the registered model (default: the mode's)."""
    m = cfg.model
    c, h, w = image_shape(cfg)
    if m.in_channels != c:
        raise UserError(f"'model.in_channels' = {m.in_channels} but the dataset has {c} channels; "
                        f"set model.in_channels={c}")
    factor = 2 ** (len(m.ch_multipliers) - 1)
    if h % factor or w % factor:
        raise UserError(f"image size {h}x{w} is not divisible by {factor} "
                        f"({len(m.ch_multipliers)} UNet levels); change dataset.image_size or model.ch_multipliers")
    name = name or mode_of(cfg).network(cfg) or m.name  # mode CS trains its gated network
    model = build_model(name, in_channels=m.in_channels, hid_channels=m.hid_channels,
                        ch_multipliers=tuple(m.ch_multipliers), num_res_blocks=m.num_res_blocks,
                        apply_attn=tuple(m.apply_attn), drop_rate=m.drop_rate,
                        resample_with_conv=m.resample_with_conv, norm_groups=m.norm_groups, norm_eps=m.norm_eps,
                        num_classes=m.num_classes)
    if m.widths:  # a structurally pruned network (prune.py --method structured): narrower layers
        if name != "unet":
            raise UserError(f"model.widths (a structurally pruned network) needs model 'unet', not {name!r}; "
                            f"mode CS's gated network cannot be structurally pruned")
        set_widths(model, m.widths)
    return model


def make_diffusion(cfg: Config) -> CurriculumDiffusion:
    d = cfg.diffusion
    betas = make_betas(d.beta_schedule, d.timesteps, d.beta_start, d.beta_end)
    return CurriculumDiffusion(betas, prediction_type=d.model_mean_type, var_type=d.model_var_type,
                               loss_type=d.loss_type, space=cfg.curriculum.space)


def loss_weights(cfg: Config, diffusion: CurriculumDiffusion):
    """``train.loss_weighting`` as a callable t [B] → w [B], or None for `none`."""
    t = cfg.train
    params = {"min_snr": dict(gamma=t.min_snr_gamma), "p2": dict(k=t.p2_k, gamma=t.p2_gamma)}
    return make_loss_weights(t.loss_weighting, diffusion, **params.get(t.loss_weighting, {}))


def timestep_probs(cfg: Config, diffusion: CurriculumDiffusion, steps_per_epoch: int):
    """The matched-histogram sampler's p(t) [T] (float64), or None for the stage sampler."""
    if cfg.curriculum.sampler != "matched_histogram":
        return None
    from .plan import curriculum_layout

    layout = curriculum_layout(cfg, steps_per_epoch)
    return matched_histogram([diffusion.range_indices(s.t_min, s.t_max) for s in layout],
                             [s.num_steps for s in layout], diffusion.timesteps)

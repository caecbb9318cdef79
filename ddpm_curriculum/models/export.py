"""Export a network to a diffusers ``save_pretrained`` folder (the inverse of ``convert.import_diffusers``).

The folder holds what ``UNet2DModel.from_pretrained(folder)`` reads, plus the DDPMScheduler config of the
network's diffusion process (``DDPMScheduler.from_pretrained(folder)``; this project's importer reads it too)::

    config.json                              UNet2DModel config (``convert.diffusers_unet_config``)
    diffusion_pytorch_model.safetensors      weights, when the ``safetensors`` package is installed;
    diffusion_pytorch_model.bin              otherwise a torch.save'd state dict (diffusers falls back to it)
    scheduler_config.json                    DDPMScheduler: T, β schedule, prediction and variance type

Keys are translated by ``convert.to_diffusers_state``, the same correspondence the importer reads back. The
layout (widths, attention levels, blocks per level) is read off the tensors' shapes, not the config, so a
structured-pruned network exports when its widths are still one per level (what ``block_out_channels``
expresses); anything else is refused with the keys whose shapes no UNet2DModel has. Pruned weights are
exported as their zeros; the masks themselves have no place in a diffusers folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..errors import UserError
from .convert import (_PREDICTIONS, _SCHEDULES, describe_mismatch, diffusers_unet_config,
                      infer_unet_kwargs, meta_state, state_mismatch, to_diffusers_state)
from .unet import UNet

CONFIG_NAME, SCHEDULER_CONFIG_NAME = "config.json", "scheduler_config.json"
SAFETENSORS_NAME, BIN_NAME = "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"
# Written into the configs' ``_diffusers_version`` when diffusers is not installed (the version whose
# UNet2DModel/DDPMScheduler options the configs use; diffusers only logs a note when it differs).
FALLBACK_DIFFUSERS_VERSION = "0.42.1"
# training-only settings that are not part of the architecture, copied from the config
CONFIG_ONLY_KEYS = ("norm_eps", "norm_groups", "drop_rate")


def _diffusers_version() -> str:
    try:
        import diffusers
    except ImportError:
        return FALLBACK_DIFFUSERS_VERSION
    return diffusers.__version__


def diffusers_layout(state_dict: dict[str, torch.Tensor], model_cfg: dict) -> dict:
    """Our UNet keyword arguments for ``state_dict``, read off its shapes; UserError if UNet2DModel cannot hold it.

    ``model_cfg``: the network's ``model`` config section (GroupNorm eps/groups and dropout come from it).
    """
    what = "cannot export to diffusers"
    try:
        kwargs = infer_unet_kwargs(state_dict)
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None
    kwargs.update({k: model_cfg[k] for k in CONFIG_ONLY_KEYS})
    unexpected, missing, wrong = state_mismatch(meta_state(kwargs), state_dict)
    if wrong:
        shapes = [f"{k} {tuple(given)} (a UNet2DModel with block_out_channels "
                  f"{[kwargs['hid_channels'] * c for c in kwargs['ch_multipliers']]} has {tuple(need)})"
                  for k, given, need in wrong]
        raise UserError(f"{what}: {len(wrong)} tensors have per-block widths that differ within a level, e.g. "
                        f"{'; '.join(shapes[:2])}; UNet2DModel has one width per level, so keep this network in "
                        f"this project's format (pruned.pt / its run directory), or prune whole levels uniformly")
    if unexpected or missing:
        raise UserError(f"{what}: the state dict is not the DDPM UNet's ({describe_mismatch(unexpected, missing, [])})"
                        f"; only the plain UNet (model.name=unet) maps to UNet2DModel")
    groups = kwargs["norm_groups"]
    norms = [v for k, v in state_dict.items() if k.endswith(("norm1.weight", "norm2.weight", "norm.weight"))
             or k == "out_conv.0.weight"]
    narrow = sorted({v.shape[0] for v in norms if v.shape[0] % groups})
    if narrow:
        raise UserError(f"{what}: GroupNorm layers of width {narrow} are not multiples of norm_groups={groups} (this "
                        f"project then uses one group per channel, diffusers cannot); use norm_groups dividing "
                        f"every width")
    return kwargs


def diffusers_scheduler_config(diffusion_cfg: dict) -> tuple[dict | None, str]:
    """(The DDPMScheduler config of our ``diffusion`` section, ''): the inverse of
    ``convert.diffusion_from_scheduler``; (None, why) when DDPMScheduler has no equivalent."""
    inverse = [({v: k for k, v in _SCHEDULES.items()}, "beta_schedule"),
               ({v: k for k, v in _PREDICTIONS.items()}, "model_mean_type"),
               ({"fixed-small": "fixed_small", "fixed-large": "fixed_large"}, "model_var_type")]
    values = {}
    for table, key in inverse:
        if diffusion_cfg[key] not in table:
            return None, f"DDPMScheduler has no {key} {diffusion_cfg[key]!r} (it has {sorted(table)})"
        values[key] = table[diffusion_cfg[key]]
    return {"_class_name": "DDPMScheduler", "_diffusers_version": _diffusers_version(),
            "num_train_timesteps": int(diffusion_cfg["timesteps"]), "beta_start": float(diffusion_cfg["beta_start"]),
            "beta_end": float(diffusion_cfg["beta_end"]), "beta_schedule": values["beta_schedule"],
            "prediction_type": values["model_mean_type"], "variance_type": values["model_var_type"],
            "clip_sample": True, "trained_betas": None}, ""


def _save_weights(path_dir: Path, state: dict[str, torch.Tensor], weights_format: str) -> Path:
    if weights_format == "safetensors":
        from safetensors.torch import save

        data = save(state, metadata={"format": "pt"})
        return atomic_write(path_dir / SAFETENSORS_NAME, lambda f: f.write(data))
    return atomic_write(path_dir / BIN_NAME, lambda f: torch.save(state, f))


def default_weights_format() -> str:
    """``safetensors`` when the package is installed (diffusers' default), else ``bin``."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return "bin"
    return "safetensors"


WEIGHTS_FORMATS = ("safetensors", "bin")


def export_diffusers(model: torch.nn.Module, model_cfg: dict, diffusion_cfg: dict, image_size: int,
                     out_dir: str | Path, weights_format: str | None = None) -> dict:
    """Write ``model`` (a ``UNet``) as a diffusers UNet2DModel folder ``out_dir``; returns what was written."""
    if type(model) is not UNet:
        raise UserError(f"cannot export a {type(model).__name__} to diffusers: only the plain UNet (model.name=unet) "
                        f"maps to UNet2DModel")
    weights_format = weights_format or default_weights_format()
    if weights_format not in WEIGHTS_FORMATS:
        raise UserError(f"unknown weights format {weights_format!r}; choose one of {list(WEIGHTS_FORMATS)}")
    if weights_format == "safetensors" and default_weights_format() != "safetensors":
        raise UserError("--weights_format safetensors needs the safetensors package (pip install safetensors); "
                        "or use --weights_format bin")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    kwargs = diffusers_layout(sd, model_cfg)
    config = {"_class_name": "UNet2DModel", "_diffusers_version": _diffusers_version(),
              **diffusers_unet_config(kwargs, image_size)}
    state = {k: v.float().contiguous().clone() for k, v in
             to_diffusers_state(sd, len(kwargs["ch_multipliers"]), kwargs["num_res_blocks"]).items()}
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out} ({exc.strerror or exc}); choose a writable --save_path") from None
    weights = _save_weights(out, state, weights_format)
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(out / CONFIG_NAME, lambda f: f.write(text.encode()))
    scheduler, note = diffusers_scheduler_config(diffusion_cfg)
    if scheduler is not None:
        text = json.dumps(scheduler, indent=2) + "\n"
        atomic_write(out / SCHEDULER_CONFIG_NAME, lambda f: f.write(text.encode()))
    return {"dir": str(out), "weights": weights.name, "config": config, "tensors": len(state),
            "scheduler": scheduler is not None, "scheduler_note": note}


EXPORTERS = {"diffusers": export_diffusers}  # prune.py export --format NAME

"""Checkpoints: plain state dicts written atomically, loaded with ``weights_only=True``.

Layout in a run directory::

    checkpoints/ckpt_00001024.pt     model, EMA, optimizer, scheduler, position, RNG states, config
    checkpoints/ckpt_00001024.json   sidecar: step, epoch, stage, mode (readable without torch)
    checkpoints/latest               name of the newest complete checkpoint

A checkpoint file is written to a temporary name, flushed and renamed, and only then is ``latest``
replaced (also by rename), so a crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..models.convert import (describe_mismatch, import_ddpm_torch, import_diffusers, is_ddpm_torch,
                              is_diffusers_folder, state_mismatch)
from ..pruning.masks import apply_masks
from ..pruning.nm import import_compact, is_compact

FORMAT_VERSION = 1
LATEST = "latest"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(path: Path, obj) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written ``path``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:08d}.pt"


def save_checkpoint(ckpt_dir: Path, state: dict, sidecar: dict, keep: int = 0) -> Path:
    """Write ``state`` atomically, then its JSON sidecar, then the ``latest`` pointer.

    ``keep`` > 0 deletes all but the ``keep`` newest checkpoints afterwards.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / checkpoint_name(state["step"])
    _atomic_write(path, lambda f: torch.save(state, f))
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(sidecar, indent=2).encode()))
    _atomic_write(ckpt_dir / LATEST, lambda f: f.write(path.name.encode()))
    if keep > 0:
        for old in sorted(ckpt_dir.glob("ckpt_*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint named by ``run_dir/checkpoints/latest``, or None if there is none yet."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_file():
        raise UserError(f"{pointer} names {path.name}, which is missing; "
                        f"resume from an existing file with --resume PATH")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise UserError(f"no checkpoint in {path / 'checkpoints'}; pass a checkpoint file or a run "
                            f"directory that has one")
        return found
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; pass an existing .pt file or run directory")
    return path


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, pickled code, ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read checkpoint {path} (truncated or not a ddpm-curriculum "
                        f"checkpoint): {msg[:200]}") from None


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (tensors and plain containers only)."""
    path = resolve_checkpoint(path)
    state = _torch_load(path)
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not a ddpm-curriculum checkpoint (no 'model' entry)")
    return state


def check_compatible(model: nn.Module, state_dict: dict, source: str) -> None:
    """Raise a one-line UserError when ``state_dict`` does not fit ``model`` (keys or shapes)."""
    unexpected, missing, wrong = state_mismatch(model.state_dict(), state_dict)
    problems = describe_mismatch(unexpected, missing, [f"{k} {given} (model {own})" for k, given, own in wrong])
    if problems:
        raise UserError(f"checkpoint {source} does not match the model: {problems}; "
                        f"use the config the checkpoint was trained with")


@dataclass
class LoadedNetwork:
    """A trained network ready for sampling: weights loaded, in eval mode, on the CPU."""

    model: nn.Module
    diffusion: object  # CurriculumDiffusion built from the checkpoint's config
    config: object  # the checkpoint's resolved Config (built from their config for imported networks)
    step: int
    weights: str  # "ema" or "model"
    source: Path
    masks: dict | None = None  # {layer: bool, True = kept} of pruned / mask-learning checkpoints
    format: str = "ddpm-curriculum"  # or "ddpm-torch", "diffusers", "nm-compact"


@dataclass
class _RawNetwork:
    config: dict
    state_dict: dict
    step: int
    weights: str
    masks: dict | None = None


def _read_project(state: dict, use_ema: bool, source: Path) -> _RawNetwork:
    weights = "ema" if use_ema and state.get("ema") is not None else "model"
    # pruned.pt and MaskPro checkpoints store "masks"; masked fine-tuning keeps them in its extension state
    masks = state.get("masks") or ((state.get("extensions") or {}).get("masked_finetune") or {}).get("masks")
    return _RawNetwork(state["config"], state[weights], int(state.get("step", 0)), weights, masks)


def _read_compact(state: dict, use_ema: bool, source: Path) -> _RawNetwork:
    sd, masks = import_compact(state)
    return _RawNetwork(state["config"], sd, int(state.get("step", 0)), "model", masks)


def _imported_config(imported) -> dict:
    return {"dataset": imported.dataset, "diffusion": imported.diffusion, "model": imported.model,
            "train": {"steps": max(1, imported.step)}}


def _read_ddpm_torch(state: dict, use_ema: bool, source: Path) -> _RawNetwork:
    try:
        imported = import_ddpm_torch(state, use_ema)
    except UserError as exc:
        raise UserError(f"{source} has no stored config and is not a ddpm-torch UNet checkpoint ({exc})") from None
    return _RawNetwork(_imported_config(imported), imported.state_dict, imported.step, imported.weights)


# Checkpoint files load_network understands, tried in order: (name, detect(state), read(state, use_ema, path)).
NETWORK_FORMATS = [
    ("nm-compact", is_compact, _read_compact),
    ("ddpm-curriculum", lambda s: isinstance(s, dict) and "config" in s and "model" in s, _read_project),
    ("ddpm-torch", is_ddpm_torch, _read_ddpm_torch),
]


def _read_network(path: Path, use_ema: bool) -> tuple[_RawNetwork, str, Path]:
    if is_diffusers_folder(path):
        imported = import_diffusers(path)
        return _RawNetwork(_imported_config(imported), imported.state_dict, 0, "model"), "diffusers", path
    source = resolve_checkpoint(path)
    state = _torch_load(source)
    for name, detect, read in NETWORK_FORMATS:
        if detect(state):
            return read(state, use_ema, source), name, source
    raise UserError(f"{source} has no stored config, so its network cannot be rebuilt; pass a checkpoint "
                    f"written by train_curriculum.py or prune.py, a ddpm-torch .pt or a diffusers folder")


def load_network(path: str | Path, use_ema: bool = True, overrides=()) -> LoadedNetwork:
    """The network of a checkpoint file or run directory (its EMA weights unless ``use_ema`` is False).

    Also reads, detected from their contents: prune.py's pruned checkpoints and N:M compact files (pruned
    entries zero, ``masks`` set), MaskPro checkpoints (their learned masks are applied), ddpm-torch
    ``.pt`` files and diffusers ``UNet2DModel`` folders (``models/convert.py``; their config is built from
    what they store, with DDPM's CIFAR-10 process where they store nothing). The network is rebuilt from
    the config, so every registered model variant loads without extra flags; ``overrides`` are ``--set``
    items applied to that config (e.g. ``dataset.name=celeba64`` for an imported CelebA model).
    ``generate.py``, ``eval.py`` and ``prune.py`` load models through here.
    """
    from ..config import config_from_dict
    from . import builders

    raw, fmt, source = _read_network(Path(path), use_ema)
    cfg = config_from_dict(raw.config, list(overrides))
    model = builders.make_model(cfg)
    check_compatible(model, raw.state_dict, str(source))
    model.load_state_dict(raw.state_dict)
    if raw.masks:
        apply_masks(model, raw.masks)
    if cfg.model.channels_last:  # sample in the layout it trained in (faster CPU convolutions)
        model = model.to(memory_format=torch.channels_last)
    return LoadedNetwork(model.eval(), builders.make_diffusion(cfg), cfg, raw.step, raw.weights, source,
                         raw.masks, fmt)

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


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (tensors and plain containers only)."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, pickled code, ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read checkpoint {path} (truncated or not a ddpm-curriculum "
                        f"checkpoint): {msg[:200]}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not a ddpm-curriculum checkpoint (no 'model' entry)")
    return state


def check_compatible(model: nn.Module, state_dict: dict, source: str) -> None:
    """Raise a one-line UserError when ``state_dict`` does not fit ``model`` (keys or shapes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (checkpoint vs model), e.g. {wrong[0]}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        raise UserError(f"checkpoint {source} does not match the model: {'; '.join(parts)}; "
                        f"use the config the checkpoint was trained with")


@dataclass
class LoadedNetwork:
    """A trained network ready for sampling: weights loaded, in eval mode, on the CPU."""

    model: nn.Module
    diffusion: object  # CurriculumDiffusion built from the checkpoint's config
    config: object  # the checkpoint's resolved Config
    step: int
    weights: str  # "ema" or "model"
    source: Path


def load_network(path: str | Path, use_ema: bool = True) -> LoadedNetwork:
    """The network of a checkpoint file or run directory (its EMA weights unless ``use_ema`` is False).

    The network is rebuilt from the config stored in the checkpoint, so every registered model variant
    loads without extra flags. ``generate.py``, ``eval.py`` and ``prune.py`` load models through here.
    """
    from ..config import config_from_dict
    from . import builders

    source = resolve_checkpoint(path)
    state = load_checkpoint(source)
    if "config" not in state:
        raise UserError(f"{source} has no stored config, so its network cannot be rebuilt; "
                        f"pass a checkpoint written by train_curriculum.py or prune.py")
    cfg = config_from_dict(state["config"])
    weights = "ema" if use_ema and state.get("ema") is not None else "model"
    model = builders.make_model(cfg)
    check_compatible(model, state[weights], str(source))
    model.load_state_dict(state[weights])
    return LoadedNetwork(model.eval(), builders.make_diffusion(cfg), cfg, int(state.get("step", 0)),
                         weights, source)

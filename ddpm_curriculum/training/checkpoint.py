"""Checkpoints: plain state dicts written atomically, loaded with ``weights_only=True``.

Layout in a run directory::

    checkpoints/ckpt_00001024.pt     model, EMA, optimizer, scheduler, position, RNG states, config
    checkpoints/ckpt_00001024.json   sidecar: step, epoch, stage, mode (readable without torch)
    checkpoints/latest               name of the newest complete checkpoint

A checkpoint file is written with the one atomic writer (``ddpm_curriculum/atomic.py``: temporary name,
fsync, rename, fsync of the directory), and only then is ``latest`` replaced (also by rename), so a crash at any
moment leaves the previous checkpoint usable. Pruning to ``train.keep_checkpoints`` goes by step and never
removes the checkpoint just written or the one ``latest`` names. Loading checks every entry the reader uses
(``check_entries``): a missing or mistyped one is a one-line UserError naming the file and the entry.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import UserError
from ..models.convert import (DIFFUSERS_WEIGHT_FILES, describe_mismatch, import_ddpm_torch, import_diffusers,
                              is_ddpm_torch, is_diffusers_folder, state_mismatch)
from ..pruning.masks import apply_masks
from ..pruning.nm import import_compact, is_compact

FORMAT_VERSION = 1
LATEST = "latest"


def atomic_torch_save(path: Path, obj) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written ``path``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:08d}.pt"


CHECKPOINT_RE = re.compile(r"^ckpt_(\d+)\.pt$")


def save_checkpoint(ckpt_dir: Path, state: dict, sidecar: dict, keep: int = 0) -> Path:
    """Write ``state`` atomically, then its JSON sidecar, then the ``latest`` pointer.

    ``keep`` > 0 then deletes all but the ``keep`` checkpoints of highest step, never the one just written.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / checkpoint_name(state["step"])
    atomic_write(path, lambda f: torch.save(state, f))
    atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(sidecar, indent=2).encode()))
    atomic_write(ckpt_dir / LATEST, lambda f: f.write(path.name.encode()))
    if keep > 0:
        prune_checkpoints(ckpt_dir, keep, protect=path)
    return path


def prune_checkpoints(ckpt_dir: Path, keep: int, protect: Path) -> list[Path]:
    """Delete checkpoints (and sidecars) beyond the ``keep`` of highest step, by step number, not name.

    ``protect`` (the checkpoint just written) and the one ``latest`` names always stay and count towards
    ``keep``: after a resume from an earlier step the newest file is not the one of highest step.
    """
    pointer = ckpt_dir / LATEST
    protected = {protect.name, _read_pointer(pointer) if pointer.is_file() else protect.name}
    by_step = sorted(((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))),
                     reverse=True)
    others = [p for _, p in by_step if p.name not in protected]
    removed = others[max(0, keep - (len(by_step) - len(others))):]
    for old in removed:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return removed


def _read_pointer(pointer: Path) -> str:
    try:
        return pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {pointer} ({exc}); it should hold a checkpoint file name; pass one of "
                        f"the checkpoint files instead") from None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint named by ``run_dir/checkpoints/latest``, or None if there is none yet."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    name = _read_pointer(pointer)
    path = pointer.parent / name
    if not CHECKPOINT_RE.match(name):
        raise UserError(f"{pointer} holds {name[:80]!r}, not a checkpoint name like {checkpoint_name(0)}; pass "
                        f"one of the checkpoint files instead")
    if not path.is_file():
        raise UserError(f"{pointer} names {name}, which is missing; pass one of the checkpoint files instead")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None and (path / "pruned.pt").is_file():
            raise UserError(f"{path} is a prune.py output folder, not a run directory; pass {path / 'pruned.pt'}")
        if found is None and any((d / "config.json").is_file() for d in (path, path / "unet")):
            raise UserError(f"{path} has a config.json but no weights file, so it is not a complete diffusers "
                            f"folder (need one of {', '.join(DIFFUSERS_WEIGHT_FILES)}); download it again")
        if found is None:
            raise UserError(f"no checkpoint in {path / 'checkpoints'}; pass a checkpoint file or a run "
                            f"directory that has one")
        return found
    if not path.is_file():
        hub = bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(path))) and not path.parent.exists() \
            and path.suffix not in (".pt", ".pth", ".ckpt", ".bin", ".safetensors")  # looks like owner/name
        raise UserError(f"checkpoint not found: {path}; " + (
            f"a Hugging Face Hub id is not downloaded here: fetch it where there is internet "
            f"(huggingface-cli download {path} --local-dir {path.name}) and pass that diffusers folder"
            if hub else "pass an existing .pt file, run directory or diffusers folder"))
    return path


def _torch_load(path: Path):
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes; an interrupted copy?); pass a complete file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, pickled code, ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read checkpoint {path} (truncated or not a ddpm-curriculum "
                        f"checkpoint): {msg[:200]}") from None


def _is_state_dict(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, torch.Tensor) for k, x in v.items())


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What a checkpoint entry must be: kind → test. Entries are declared as {name: kind} below.
ENTRY_KINDS = {
    "state dict of tensors": _is_state_dict,
    "dict": lambda v: isinstance(v, dict),
    "integer ≥ 0": lambda v: _is_int(v) and v >= 0,
    "integer": _is_int,
    "string": lambda v: isinstance(v, str),
    "optimizer state dict": lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
    and isinstance(v.get("param_groups"), list),
    "list of per-rank RNG states": lambda v: isinstance(v, list) and all(
        isinstance(r, dict) and isinstance(r.get("cpu"), torch.Tensor) and r["cpu"].dtype == torch.uint8 for r in v),
    "dict of N:M layers": lambda v: isinstance(v, dict) and all(
        isinstance(e, dict) and isinstance(e.get("pattern"), torch.Tensor) and isinstance(e.get("values"), torch.Tensor)
        and isinstance(e.get("shape"), (list, tuple)) for e in v.values()),
}
# Entries every checkpoint of this project has (training, pruned.pt), those a resume needs as well, and
# those it may have (absent or None allowed; checked when present).
NETWORK_ENTRIES = {"model": "state dict of tensors", "config": "dict"}
# (the update rule checks its own entries when it loads them: training/updates.py)
TRAINING_ENTRIES = {**NETWORK_ENTRIES, "step": "integer ≥ 0"}
TRAINING_OPTIONAL = {"optimizer": "optimizer state dict", "scheduler": "dict", "scaler": "dict",
                     "ema": "state dict of tensors", "ema_num_updates": "integer ≥ 0", "stage_entered": "integer",
                     "pacing": "dict", "extensions": "dict", "rng": "list of per-rank RNG states",
                     "masks": "state dict of tensors"}
# What load_network reads from this project's checkpoints and from N:M compact files.
NETWORK_OPTIONAL = {"ema": "state dict of tensors", "step": "integer ≥ 0", "masks": "state dict of tensors",
                    "extensions": "dict"}
COMPACT_ENTRIES = {"config": "dict", "dense": "state dict of tensors", "nm": "dict of N:M layers",
                   "m": "integer ≥ 0", "order": "string"}
COMPACT_OPTIONAL = {"step": "integer ≥ 0"}


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _what(v) -> str:
    return _a(type(v).__name__) + (f" ({v!r:.40})" if isinstance(v, (str, int, float)) else "")


def check_entries(state, source: Path, required: dict, optional: dict | None = None) -> None:
    """One-line UserError naming ``source`` and the first missing or mistyped entry of ``state``."""
    fix = "the file is damaged or was not written by this project; pass another checkpoint"
    if not isinstance(state, dict):
        raise UserError(f"{source} holds {_what(state)}, not a checkpoint dict; {fix}")
    for name, kind in {**required, **(optional or {})}.items():
        if name not in state or (state[name] is None and name not in required):
            if name in required:
                raise UserError(f"{source} has no '{name}' entry ({_a(kind)}); {fix}")
            continue
        value = state[name]
        if not ENTRY_KINDS[kind](value):
            bad = next((k for k, x in value.items() if not isinstance(x, torch.Tensor)), None) \
                if kind == "state dict of tensors" and isinstance(value, dict) else None
            what = f"has {bad!r:.60} = {_what(value[bad])}" if bad is not None else f"is {_what(value)}"
            raise UserError(f"{source}: entry '{name}' {what}, not {_a(kind)}; {fix}")


def load_checkpoint(path: str | Path, for_resume: bool = False) -> dict:
    """Load a checkpoint of this project safely (tensors and plain containers only) and check its entries:
    'model' and 'config', the types of the others present, and with ``for_resume`` all a resume needs."""
    path = resolve_checkpoint(path)
    state = _torch_load(path)
    check_entries(state, path, TRAINING_ENTRIES if for_resume else NETWORK_ENTRIES,
                  {**TRAINING_ENTRIES, **TRAINING_OPTIONAL})
    if state.get("ema") is not None:
        unexpected, missing, wrong = state_mismatch(state["model"], state["ema"])
        if unexpected or missing or wrong:
            raise UserError(f"{path}: entry 'ema' does not match 'model' "
                            f"({describe_mismatch(unexpected, missing, [k for k, *_ in wrong])}); the file is "
                            f"damaged; resume from another checkpoint")
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
    check_entries(state, source, NETWORK_ENTRIES, NETWORK_OPTIONAL)
    weights = "ema" if use_ema and state.get("ema") is not None else "model"
    # pruned.pt and MaskPro checkpoints store "masks"; an extension that fixes masks (masked fine-tuning) keeps
    # them as "masks" in its own state
    extensions = state.get("extensions") or {}
    check_entries({"extensions": extensions}, source, {}, {"extensions": "dict"})
    for name, ext in extensions.items():
        check_entries({f"extensions.{name}": ext}, source, {}, {f"extensions.{name}": "dict"})
    masks = state.get("masks") or next((ext["masks"] for ext in extensions.values() if ext.get("masks")), None)
    check_entries({"masks": masks}, source, {}, {"masks": "state dict of tensors"})
    return _RawNetwork(state["config"], state[weights], state.get("step") or 0, weights, masks)


def _read_compact(state: dict, use_ema: bool, source: Path) -> _RawNetwork:
    check_entries(state, source, COMPACT_ENTRIES, COMPACT_OPTIONAL)
    sd, masks = import_compact(state)
    return _RawNetwork(state["config"], sd, state.get("step") or 0, "model", masks)


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
    ("ddpm-curriculum", lambda s: isinstance(s, dict) and ("format_version" in s or {"config", "model"} <= s.keys()),
     _read_project),
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
    if not isinstance(state, dict) or "config" in state:  # no checkpoint at all, or one of ours lacking an entry
        check_entries(state, source, NETWORK_ENTRIES)
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

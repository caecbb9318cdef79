"""Sampler settings, the sampler registry and the batch sampler, fed by per-image noise streams.

``SAMPLERS`` maps a sampler's name to an object with one shared interface (``Sampler``):

* ``fields``: the ``SamplerSpec`` fields it reads besides ``name`` (what ``generate.json`` records, so
  two specs that sample alike compare equal);
* ``validate(spec, T)``: raise a ``UserError`` for settings it cannot run on a T-step diffusion;
* ``num_noise_draws(spec, T)``: how many per-step noise tensors (``noise_fn()`` calls) one run makes after x_T;
* ``describe(spec, T)``: one line for logs; ``tag(spec, T)``: the short form in default folder names;
* ``run(diffusion, model, x_T, spec, noise_fn)``: x_T [B, C, H, W] → x0 [B, C, H, W], drawing every
  per-step noise tensor from ``noise_fn()`` (so image i stays a function of (seed, i)).

Adding a sampler (e.g. DPM-Solver) is one new entry here, plus its math in ``diffusion/`` when it is new;
``sample_batch``, ``generate.py --sampler NAME``, the config's ``sampler.name`` (training grids, ``eval.json``,
prune.py's preview, the experiment grid's ``eval.sampler``), the manifests and the folder names pick it up.
``tests/test_samplers.py`` registers a toy one-step sampler this way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..diffusion import DDIM_SKIP_TYPES, ddim_sample, ddim_timesteps
from ..errors import UserError
from .guidance import ClassConditioned
from .noise import PerImageNoise


class Sampler:
    """The interface of a ``SAMPLERS`` entry (see the module doc); subclasses set ``fields`` and the methods."""

    fields: tuple[str, ...] = ("t_max", "clip_denoised")

    def validate(self, spec: SamplerSpec, timesteps: int) -> None:
        pass

    def num_noise_draws(self, spec: SamplerSpec, timesteps: int) -> int:
        raise NotImplementedError

    def describe(self, spec: SamplerSpec, timesteps: int) -> str:
        raise NotImplementedError

    def tag(self, spec: SamplerSpec, timesteps: int) -> str:
        return spec.name

    def run(self, diffusion, model, x_T: torch.Tensor, spec: SamplerSpec,
            noise_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def _from_t(spec: SamplerSpec) -> str:
    return "" if spec.t_max is None else f", from t={spec.t_max}"


class Ancestral(Sampler):
    """Full ancestral DDPM over every timestep (``GaussianDiffusion.p_sample_loop``, the config's variance)."""

    fields = ("t_max", "clip_denoised")

    def num_noise_draws(self, spec, timesteps):
        return timesteps - 1 if spec.t_max is None else spec.t_max  # steps t ≥ 1

    def describe(self, spec, timesteps):
        return f"ancestral DDPM {timesteps if spec.t_max is None else spec.t_max + 1} steps{_from_t(spec)}"

    def tag(self, spec, timesteps):
        return f"ddpm{timesteps}"

    def run(self, diffusion, model, x_T, spec, noise_fn):
        return diffusion.p_sample_loop(model, x_T, t_start=spec.t_max, clip_denoised=spec.clip_denoised,
                                       noise_fn=noise_fn)


class DDIM(Sampler):
    """DDIM (``diffusion/ddim.py``): ``steps`` visited timesteps spaced by ``skip_type``, noise scale ``eta``."""

    fields = ("steps", "eta", "skip_type", "t_max", "clip_denoised")

    def validate(self, spec, timesteps):
        if spec.skip_type not in DDIM_SKIP_TYPES:
            raise UserError(f"unknown --skip-type '{spec.skip_type}'; choose one of {list(DDIM_SKIP_TYPES)}")
        if not math.isfinite(spec.eta) or spec.eta < 0:
            raise UserError(f"--eta {spec.eta} is not a finite number ≥ 0; use 0 (deterministic DDIM) … 1 (DDPM-like)")
        ddim_timesteps(timesteps, spec.steps, spec.skip_type, spec.t_max)  # raises on a bad step count

    def num_noise_draws(self, spec, timesteps):
        return spec.steps if spec.eta > 0 else 0

    def describe(self, spec, timesteps):
        return f"DDIM {spec.steps} steps ({spec.skip_type}, eta {spec.eta:g}{_from_t(spec)})"

    def tag(self, spec, timesteps):
        return f"ddim{spec.steps}-{spec.skip_type}-eta{spec.eta:g}"

    def run(self, diffusion, model, x_T, spec, noise_fn):
        return ddim_sample(diffusion, model, x_T, steps=spec.steps, eta=spec.eta, skip_type=spec.skip_type,
                           clip_denoised=spec.clip_denoised, t_max=spec.t_max, noise_fn=noise_fn)


SAMPLERS: dict[str, Sampler] = {"ancestral": Ancestral(), "ddim": DDIM()}


def get_sampler(name: str) -> Sampler:
    """The ``SAMPLERS`` entry ``name``; a ``UserError`` naming the registered samplers otherwise."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None


@dataclass(frozen=True, init=False)
class SamplerSpec:
    """What to run: the sampler ``name`` (a ``SAMPLERS`` key) and its settings; each sampler reads only its
    ``fields``. DDIM: ``steps`` kept timesteps, ``eta``, ``skip_type``; ``t_max`` starts ancestral and DDIM
    sampling from a lower noise level (a timestep index ≤ T−1).

    ``use_ddim=True/False`` (the older spelling) is still accepted as a keyword, and readable, as name
    ``"ddim"`` / ``"ancestral"``."""

    name: str = "ancestral"
    steps: int = 100
    eta: float = 0.0
    skip_type: str = "uniform"
    t_max: int | None = None
    clip_denoised: bool = True

    def __init__(self, name: str | None = None, steps: int = 100, eta: float = 0.0, skip_type: str = "uniform",
                 t_max: int | None = None, clip_denoised: bool = True, *, use_ddim: bool | None = None):
        if isinstance(name, bool):  # the old first positional argument, use_ddim
            name, use_ddim = None, name if use_ddim is None else use_ddim
        if use_ddim is not None:
            implied = "ddim" if use_ddim else "ancestral"
            if name is not None and name != implied:
                raise ValueError(f"SamplerSpec(name={name!r}, use_ddim={use_ddim}) contradict each other; "
                                 f"pass name only")
            name = implied
        name = "ancestral" if name is None else name
        get_sampler(name)  # raises for an unknown name
        for key, value in (("name", name), ("steps", steps), ("eta", eta), ("skip_type", skip_type),
                           ("t_max", t_max), ("clip_denoised", clip_denoised)):
            object.__setattr__(self, key, value)

    @property
    def sampler(self) -> Sampler:
        return get_sampler(self.name)

    @property
    def use_ddim(self) -> bool:
        return self.name == "ddim"

    def validate(self, timesteps: int) -> None:
        if self.t_max is not None and not 0 <= self.t_max < timesteps:
            raise UserError(f"--t-max {self.t_max} is outside [0, {timesteps - 1}]; pick a timestep of this model")
        self.sampler.validate(self, timesteps)

    def num_noise_draws(self, timesteps: int) -> int:
        """How many per-step noise tensors one run consumes after x_T."""
        return self.sampler.num_noise_draws(self, timesteps)

    def describe(self, timesteps: int) -> str:
        return self.sampler.describe(self, timesteps)

    def tag(self, timesteps: int) -> str:
        """Short folder-name form, e.g. ``ddim100-uniform-eta0`` or ``ddpm1000`` (``-tmaxN`` appended)."""
        tag = self.sampler.tag(self, timesteps)
        return tag if self.t_max is None else f"{tag}-tmax{self.t_max}"

    def to_dict(self) -> dict:
        """``name`` and the fields its sampler reads (the others cannot change an image): manifests of two
        specs that sample alike are equal."""
        return {"name": self.name, **{key: getattr(self, key) for key in self.sampler.fields}}

    @classmethod
    def from_dict(cls, d: dict) -> SamplerSpec:
        """Inverse of ``to_dict``; also reads the older form ``{"use_ddim": bool, …}`` of generate.json."""
        return cls(**d)


def normalize_sampler_dict(d):
    """A manifest's ``sampler`` entry in the current ``to_dict`` form (``{"use_ddim": true, …}`` of older
    generate.json files → ``{"name": "ddim", …}``); returned unchanged when it is not a readable spec."""
    if not isinstance(d, dict):
        return d
    try:
        return SamplerSpec.from_dict(d).to_dict()
    except (TypeError, ValueError, UserError):
        return d


def spec_from_sample_steps(sample_steps: int) -> SamplerSpec:
    """The seeds' ``sample_steps`` integer (``train.sample_steps``, the grid's ``eval.sample_steps``, prune.py's
    ``--sample_steps``) → a spec: S > 0 is DDIM with S steps (η = 0, uniform spacing), 0 is ancestral over all T."""
    if isinstance(sample_steps, bool) or not isinstance(sample_steps, int) or sample_steps < 0:
        raise UserError(f"sample_steps = {sample_steps!r} must be an integer ≥ 0 (0 = ancestral, S > 0 = DDIM S steps)")
    return SamplerSpec(name="ddim", steps=sample_steps) if sample_steps > 0 else SamplerSpec(name="ancestral")


# The SamplerSpec settings a ``sampler`` config block may give (``config.SamplerConfig``, the experiment grid's
# ``eval.sampler``); ``t_max`` (partial sampling from a lower noise level) stays a generate.py flag.
BLOCK_FIELDS = ("steps", "eta", "skip_type", "clip_denoised")


def spec_from_block(block, sample_steps: int) -> SamplerSpec:
    """A ``sampler`` block (``name`` and ``BLOCK_FIELDS``, None = unset) → a spec: with ``name`` set, that sampler
    with the given settings (the ``SamplerSpec`` defaults for the others); with ``name`` null, the
    ``sample_steps`` rule (``spec_from_sample_steps``) exactly as without a block."""
    if block is None or block.name is None:
        return spec_from_sample_steps(sample_steps)
    return SamplerSpec(name=block.name, **{k: getattr(block, k) for k in BLOCK_FIELDS if getattr(block, k) is not None})


def sampler_spec(cfg) -> SamplerSpec:
    """The training-side sampler of a ``Config``: sample grids, the end-of-training ``eval.json``, prune.py's
    preview. Its ``sampler`` block when ``sampler.name`` is set, else ``train.sample_steps``'s rule."""
    return spec_from_block(getattr(cfg, "sampler", None), cfg.train.sample_steps)


def check_sampler_block(block, sample_steps: int, default_steps: int, timesteps: int | None = None,
                        key: str = "sampler", steps_key: str = "train.sample_steps", where: str = "") -> None:
    """One-line ``UserError`` for a block that cannot mean one sampler: settings without ``name``, settings the
    named sampler does not read, steps the diffusion lacks (when ``timesteps`` is known), or a ``sample_steps``
    other than its default ``default_steps`` that names another sampler than the block."""
    given = [k for k in BLOCK_FIELDS if getattr(block, k) is not None]
    if block.name is None:
        if given:
            raise UserError(f"{where}'{key}.{given[0]}' is set but '{key}.name' is null; set '{key}.name' (one of "
                            f"{list(SAMPLERS)}) or remove '{key}.{given[0]}'")
        return
    sampler = get_sampler(block.name)
    unread = [k for k in given if k not in sampler.fields]
    if unread:
        reads = [k for k in BLOCK_FIELDS if k in sampler.fields]
        raise UserError(f"{where}'{key}.{unread[0]}' does not apply to sampler '{block.name}' (it reads "
                        f"{reads or 'none of them'}); remove it or pick another '{key}.name'")
    spec = spec_from_block(block, sample_steps)
    if timesteps is not None:
        try:
            spec.validate(timesteps)
        except UserError as exc:
            raise UserError(f"{where}'{key}' ({block.name}): {exc}") from None
    derived = spec_from_sample_steps(sample_steps)
    if sample_steps != default_steps and spec.to_dict() != derived.to_dict():
        def named(s):
            return s.describe(timesteps) if timesteps is not None else json.dumps(s.to_dict())

        raise UserError(f"{where}'{key}' names {named(spec)} but '{steps_key}' = {sample_steps} names "
                        f"{named(derived)}; remove '{steps_key}' (or set it to its default {default_steps}): "
                        f"the '{key}' block replaces it")


@torch.no_grad()
def sample_batch(diffusion, model, spec: SamplerSpec, indices: Sequence[int], seed: int,
                 image_shape: Sequence[int], device, labels: Sequence[int] | None = None,
                 guidance: float = 0.0) -> torch.Tensor:
    """Images ``indices`` → x0 [B, C, H, W] in model space (≈ [−1, 1]); image i is a function of (seed, i) and,
    for a class-conditional network, of its label ``labels[i]`` and the guidance w (``guidance.py``)."""
    T = diffusion.timesteps
    if labels is not None:
        if len(labels) != len(indices):
            raise ValueError(f"{len(labels)} labels for {len(indices)} images")
        model = ClassConditioned(model, torch.tensor(list(labels), dtype=torch.long, device=device), guidance)
    elif guidance:
        raise UserError("guidance needs class labels; pass --class-label K or --classes balanced")
    sampler = spec.sampler
    noise = PerImageNoise(seed, indices, image_shape, device, sampler.num_noise_draws(spec, T))
    return sampler.run(diffusion, model, noise.initial(), spec, noise.next)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [B, C, H, W] (≈ [−1, 1]) → uint8 [B, H, W, C] on the CPU, rounded like saved PNGs."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def from_uint8(images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 [B, H, W, C] (saved images, ``to_uint8``'s output) → model space [B, C, H, W] in [−1, 1]."""
    return images.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1

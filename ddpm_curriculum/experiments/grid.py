"""Experiment grids: a base config, arms, seeds and evaluation points, read from one JSON file.

A grid file looks like (keys starting with ``_`` are comments)::

    {
      "base_config": "configs/twoscale_c.json",       # config of arms that name none
      "set": ["train.steps=640"],                     # --set overrides for every arm
      "arms": [
        {"name": "baseline", "config": "configs/twoscale_baseline.json"},
        {"name": "C"},
        {"name": "CS_random", "config": "configs/twoscale_cs.json", "set": ["sparsity.regrowth_method=random"]}
      ],
      "baseline_arm": "baseline",                     # differences are reported against this arm
      "seeds": [0, 1, 2],                             # each sets train.seed
      "eval_at": [0.25, 0.5, 1.0],                    # fractions of the training length
      "eval": {"num_samples": 512, "sample_steps": 25, "seed": 1234},   # or "sampler": {"name": "ddim", …}
      "quick": {"seeds": [0], "set": ["train.steps=8"], "eval": {"num_samples": 16}, "eval_at": [1.0]}
    }

A run's config is: the arm's config file (or ``base_config``) ← grid ``set`` ← arm ``set`` ← the seed ←
(with ``--quick``) the quick ``set``. Paths are relative to the working directory, like every config path.
Every arm at one seed gets the same ``train.seed``, hence the same initial weights, data order and noise
draws, so differences between arms are paired by seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import (Config, ExtraEvalOptions, SamplerConfig, build_section, load_config, opt, read_json_file,
                      validate_extra_eval)
from ..errors import UserError
from ..sampling.samplers import SamplerSpec, check_sampler_block, spec_from_block

RUN_OVERRIDES = (  # what the runner changes in every training run (it evaluates checkpoints itself)
    "eval.num_samples=0", "train.num_samples=0", "train.chkpt_intv=0", "train.keep_checkpoints=2")


@dataclass
class ArmConfig:
    name: str = opt("", "Arm name: a column in the report and a folder in the output directory.")
    config: str | None = opt(None, "Config file of this arm; null = the grid's base_config.")
    set: list[str] = opt([], "--set overrides for this arm (applied after the grid's).")


GRID_SAMPLE_STEPS = 25  # GridEvalConfig.sample_steps's default


@dataclass(frozen=True)
class GridEvalConfig(ExtraEvalOptions):
    num_samples: int = opt(512, "Samples generated per evaluation (the same noise for every arm and seed).", lo=1)
    sample_steps: int = opt(GRID_SAMPLE_STEPS, "DDIM steps (eta 0) for those samples; 0 = ancestral with T steps.",
                            lo=0)
    sampler: SamplerConfig = opt(SamplerConfig(), "The sampler of those samples as a block like the config's "
                                 "`sampler` (name, steps, eta, skip_type, clip_denoised); name null = "
                                 "`sample_steps`. A sample_steps other than 25 that names another sampler is an "
                                 "error.")
    batch_size: int = opt(512, "Sampling batch size.", lo=1)
    val_samples: int = opt(1024, "Held-out training images for the validation denoising loss.", lo=1)
    seed: int = opt(1234, "Seed of the evaluation noise and the validation timesteps.", lo=0)
    tki_t: list[int] = opt([50, 100, 300, 400, 500], "twoscale: timesteps of the template-knowledge index "
                                                     "(metrics/bayes.py; no sampling); t >= T are skipped; [] = off.")
    tki_samples: int = opt(256, "twoscale: held-out images of the template-knowledge index.", lo=1)
    fid_ref: str | None = opt(None, "FID reference: a statistics .npz (eval.py --save-stats, pytorch-fid), an "
                                    "image folder, or \"dataset\" (the run's training set, statistics cached); "
                                    "null = no FID.")
    fid_dims: int = opt(2048, "Inception feature dims for FID (2048 = the standard pool3 features).", lo=1)
    inception_weights: str | None = opt(None, "pt_inception-2015-12-05 weights file for FID; null = the default "
                                              "location (downloaded when online), as for eval.py.")


@dataclass
class AttributionConfig:
    nulls: list[list[str]] = opt([], "Null pairs [ARM, LIKE]: ARM's final network attributed with random channel "
                                     "groups of LIKE's birth-group sizes at LIKE's gate location. Arms whose "
                                     "networks have gates (mode CS) are always attributed with their own groups.")
    ts: list[int] = opt([450, 100, 50], "Probe timesteps (one inside the minor decision window, two low t).")
    n: int = opt(256, "Held-out images per probe.", lo=1)
    num_samples: int = opt(256, "Samples of the generation ablation (late-born channels closed); 0 = off.", lo=0)
    sample_steps: int = opt(25, "DDIM steps of those samples.", lo=1)
    null_repeats: int = opt(4, "Random group draws averaged for a null.", lo=1)
    seed: int = opt(0, "Seed of the probe noise and of the random groups.", lo=0)


@dataclass
class QuickConfig:
    seeds: list[int] = opt([0], "Seeds used with --quick.")
    set: list[str] = opt([], "Overrides applied last with --quick (shrink steps, data, model).")
    eval: GridEvalConfig | None = opt(None, "Evaluation settings with --quick; null = the grid's.")
    eval_at: list[float] | None = opt(None, "Evaluation points with --quick; null = the grid's.")
    attribution: AttributionConfig | None = opt(None, "Attribution settings with --quick; null = the grid's.")


@dataclass
class EndpointConfig:
    t50_metric: str = opt("minor_present", "Metric whose first crossing of t50_threshold is the T50 endpoint.")
    t50_threshold: float = opt(0.5, "Threshold of the T50 endpoint.")
    auc_metrics: list[str] = opt([], "Metrics averaged over training (trapezoid area / budget) as AUC endpoints.")
    end_metrics: list[str] = opt([], "Metrics compared at the end of training (\"better\").")
    exposure_below: float = opt(0.2, "Exposure = training samples drawn with t < exposure_below·T so far.",
                                lo=0, hi=1, lo_open=True)
    alpha: float = opt(0.05, "Family-wise error rate of each endpoint's contrasts (Holm).", lo=0, hi=1,
                       lo_open=True)


@dataclass
class GridConfig:
    base_config: str | None = opt(None, "Config of the arms that name none.")
    set: list[str] = opt([], "--set overrides applied to every arm.")
    arms: list[ArmConfig] = opt([], "The arms (at least one).")
    baseline_arm: str | None = opt(None, "Arm the others are compared with; null = the first arm.")
    seeds: list[int] = opt([0, 1, 2], "Training seeds (train.seed); every arm runs every seed.")
    eval_at: list[float] = opt([1.0], "Evaluation points as fractions of the training length, in (0, 1].")
    eval: GridEvalConfig = field(default_factory=GridEvalConfig)
    quick: QuickConfig = field(default_factory=QuickConfig)
    contrasts: list[list[str]] = opt([], "Pre-registered contrasts [A, B] (A − B paired by seed, Holm-corrected "
                                         "per endpoint); empty = the exploratory report against baseline_arm.")
    endpoints: EndpointConfig = field(default_factory=EndpointConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid: an arm at a seed, with its resolved config."""

    arm: str
    seed: int
    config: Config
    eval_steps: tuple[int, ...]  # optimizer steps at which the run is evaluated (the last = the end)

    @property
    def key(self) -> str:
        return f"{self.arm}/seed{self.seed}"


def load_grid(path: str | Path) -> GridConfig:
    """Read and validate a grid file (unknown keys, bad values → one-line UserError)."""
    raw = read_json_file(path, "grid file", "configs/experiments/twoscale_modes.json")
    grid = build_section(GridConfig, raw, "")
    names = [a.name for a in grid.arms]
    if not names or not all(names):
        raise UserError(f"grid {path}: give at least one arm, each with a 'name'")
    if len(set(names)) != len(names):
        raise UserError(f"grid {path}: arm names must be unique, got {names}")
    if grid.baseline_arm is not None and grid.baseline_arm not in names:
        raise UserError(f"grid {path}: baseline_arm '{grid.baseline_arm}' is not one of the arms {names}")
    for key, fractions in (("eval_at", grid.eval_at), ("quick.eval_at", grid.quick.eval_at or [1.0])):
        if not fractions or not all(0 < f <= 1 for f in fractions):
            raise UserError(f"grid {path}: '{key}' = {fractions} must be fractions in (0, 1]")
    for pair in grid.contrasts:
        if len(pair) != 2 or not set(pair) <= set(names) or pair[0] == pair[1]:
            raise UserError(f"grid {path}: contrast {pair} must name two different arms of {names}")
    for pair in grid.attribution.nulls + (grid.quick.attribution.nulls if grid.quick.attribution else []):
        if len(pair) != 2 or not set(pair) <= set(names) or pair[0] == pair[1]:
            raise UserError(f"grid {path}: attribution null {pair} must be [ARM, LIKE], two different arms of {names}")
    if not grid.seeds or (not grid.quick.seeds):
        raise UserError(f"grid {path}: 'seeds' and 'quick.seeds' must not be empty")
    if len(set(grid.seeds)) != len(grid.seeds):
        raise UserError(f"grid {path}: 'seeds' has duplicates: {grid.seeds}")
    for key, ev in (("eval", grid.eval), ("quick.eval", grid.quick.eval or grid.eval)):
        validate_extra_eval(ev, key, f"grid {path}: ")
        check_sampler_block(ev.sampler, ev.sample_steps, GRID_SAMPLE_STEPS, key=f"{key}.sampler",
                            steps_key=f"{key}.sample_steps", where=f"grid {path}: ")
        if ev.fid_ref and ev.num_samples <= ev.fid_dims:
            raise UserError(f"grid {path}: FID needs more samples than feature dims ({key}.num_samples = "
                            f"{ev.num_samples} <= {key}.fid_dims = {ev.fid_dims}); raise num_samples or lower fid_dims")
        if ev.fid_ref and ev.fid_ref != "dataset" and not Path(ev.fid_ref).exists():
            raise UserError(f"grid {path}: {key}.fid_ref {ev.fid_ref} not found; give a statistics .npz, an "
                            f"image folder or \"dataset\"")
    return grid


def expand_runs(grid: GridConfig, quick: bool = False, steps_per_epoch=None) -> list[RunSpec]:
    """Every (arm, seed) run with its resolved config and evaluation steps.

    ``steps_per_epoch(cfg)`` converts epoch-based lengths into steps (the runner passes one that builds
    the dataset); evaluation points are rounded to whole steps, at least 1, and always include the end.
    """
    seeds = grid.quick.seeds if quick else grid.seeds
    runs = []
    for arm in grid.arms:
        source = arm.config or grid.base_config
        if source is None:
            raise UserError(f"arm '{arm.name}' has no config and the grid has no base_config; set one")
        for seed in seeds:
            overrides = [*grid.set, *arm.set, f"train.seed={seed}", *(grid.quick.set if quick else ()),
                         *RUN_OVERRIDES]
            cfg = load_config(source, overrides)
            try:  # the evaluation's sampler must run on this arm's diffusion
                eval_spec(eval_settings(grid, quick)).validate(cfg.diffusion.timesteps)
            except UserError as exc:
                raise UserError(f"arm '{arm.name}': the grid's eval sampler: {exc}") from None
            total = cfg.train.steps if cfg.train.steps is not None else cfg.train.epochs * steps_per_epoch(cfg)
            fractions = grid.quick.eval_at if quick and grid.quick.eval_at is not None else grid.eval_at
            points = sorted({max(1, min(total, round(f * total))) for f in fractions} | {total})
            runs.append(RunSpec(arm.name, seed, cfg, tuple(points)))
    return runs


def eval_settings(grid: GridConfig, quick: bool) -> GridEvalConfig:
    return grid.quick.eval if quick and grid.quick.eval is not None else grid.eval


def eval_spec(settings: GridEvalConfig) -> SamplerSpec:
    """The sampler of a grid's evaluation: its ``sampler`` block when ``sampler.name`` is set, else
    ``sample_steps``'s rule (``spec_from_sample_steps``)."""
    return spec_from_block(settings.sampler, settings.sample_steps)


def attribution_settings(grid: GridConfig, quick: bool) -> AttributionConfig:
    return grid.quick.attribution if quick and grid.quick.attribution is not None else grid.attribution


def baseline_arm(grid: GridConfig) -> str:
    return grid.baseline_arm or grid.arms[0].name

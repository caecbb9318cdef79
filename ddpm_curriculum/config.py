"""Typed experiment configs: JSON file → dataclasses, with overrides and validation.

The JSON file *is* the experiment (one section per dataclass below); the command line only sets
run-level things, plus dotted overrides ``--set train.lr=2e-4``. Everything the user can get wrong
is rejected with a one-line :class:`~ddpm_curriculum.errors.UserError` that names the key path, the
bad value and the valid choices (and the nearest key for typos). Keys starting with ``_`` are
comments and are dropped. ``"dataset": "celeba32"`` (the seeds' shorthand) means
``"dataset": {"name": "celeba32"}``.

Each field carries its documentation in ``metadata["doc"]``; ``docs/config.md`` is generated from
it (``python -m ddpm_curriculum.config --markdown``) and a test keeps the two in sync.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .sections import build_section, field_choices, key_aliases, opt, read_json_file, top_level_keys
from .sections import apply_override as _apply_override
# re-exported: callers read JSON and build sections through this module
from .sections import parse_json, parse_override_value, read_jsonl  # noqa: F401


MAX_SEED = 2 ** 63 - 1  # torch.manual_seed takes 64-bit seeds
TRAIN_SAMPLE_STEPS = 50  # TrainConfig.sample_steps's default (a sampler block may replace only the default)


def _registry_names(module: str, name: str) -> list[str]:
    """The names of a registry that sits above this module (a function such as ``data.dataset_names``,
    ``modes.mode_names``, or a mapping such as ``sampling.samplers.SAMPLERS``), read when a config is checked or
    documented: the choices are the registry's, never a copy."""
    import importlib

    registry = getattr(importlib.import_module(f"ddpm_curriculum.{module}"), name)
    return list(registry() if callable(registry) else registry)


# --------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DatasetConfig:
    name: str = opt("twoscale", "Dataset from the `DATASETS` registry (data/__init__.py): `twoscale` (built-in, no "
                    "download), `cifar10`, `celeba` (`celeba32`/`celeba64` fix image_size), `image_folder`.",
                    choices=lambda: _registry_names("data", "dataset_names"))
    root: str | None = opt(None, "Dataset location; null = from `.env`/environment "
                           "(`CIFAR10_PATH`, `CELEBA_PATH`, `DATA_ROOT`; `IMAGE_FOLDER_PATH` for image_folder).")
    image_size: int | None = opt(None, "Side length in pixels; null = dataset default "
                                 "(twoscale 16, cifar10 32, celeba 64). Required for image_folder.", lo=4, hi=4096)
    random_flip: bool | None = opt(None, "Random horizontal flip while training; null = on for "
                                   "natural images, off for twoscale (it would break the prototypes).")
    download: bool = opt(False, "Download CIFAR-10 when it is missing (needs internet).")
    labels: str = opt("none", "image_folder: `none` (every image below root, label unknown) or `subfolders` (the "
                      "torchvision ImageFolder convention: each subfolder of root is a class, class index = "
                      "position in the sorted folder names).", choices=["none", "subfolders"])
    split: str | None = opt(None, "image_folder: read the subfolder root/<split> (e.g. `train`, `test`); "
                            "null = root itself.")
    class_names: list[str] = opt([], "The classes in label order. Filled in when a run uses labels "
                                 "(model.num_classes > 0 or labels `subfolders`) from the class subfolders, or "
                                 "CIFAR-10's and twoscale's fixed names, and recorded in config.json and every "
                                 "checkpoint; a non-empty list that differs from the data is an error.")
    cache: bool = opt(False, "image_folder/celeba: decode every image once into a uint8 array cached as .npy "
                      "(keyed by folder, file list with sizes and mtimes, and image size) and read that on "
                      "later runs.")
    cache_dir: str | None = opt(None, "Where `cache` keeps its arrays; null = `DDPM_CACHE_DIR` from `.env`/the "
                                "environment, else ~/.cache/ddpm_curriculum.")
    channels: int = opt(3, "twoscale: image channels.", lo=1)
    k1: int = opt(4, "twoscale: number of major classes (low-frequency prototypes).", lo=1)
    k2: int = opt(4, "twoscale: minor sub-classes per major class (high-frequency prototypes).", lo=1)
    alpha1: float = opt(0.6, "twoscale: amplitude of the major (coarse) feature.", lo=0.0)
    alpha2: float = opt(0.15, "twoscale: amplitude of the minor (fine) feature.", lo=0.0)
    sigma0: float = opt(0.05, "twoscale: per-pixel Gaussian noise std.", lo=0.0)
    num_samples: int = opt(16384, "twoscale: samples per epoch (sample i is a fixed function of (seed, i)).", lo=1)
    seed: int = opt(0, "twoscale: seed of the prototypes and samples.", lo=0, hi=MAX_SEED)


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = opt(1000, "Number of diffusion steps T.", lo=2, hi=100_000)
    beta_start: float = opt(1e-4, "β_1 of the linear/quad schedules.", lo=0.0, lo_open=True, hi=1.0)
    beta_end: float = opt(0.02, "β_T of the linear/quad schedules.", lo=0.0, lo_open=True, hi=1.0)
    beta_schedule: str = opt("linear", "β schedule.", choices=["linear", "cosine", "quad"])
    model_mean_type: str = opt("eps", "What the network predicts.", choices=["eps", "x0", "v"])
    model_var_type: str = opt("fixed-large", "Reverse-process variance: `fixed-large` (σ²=β_t, DDPM "
                              "CIFAR-10) or `fixed-small` (posterior β̃_t).",
                              choices=["fixed-large", "fixed-small"])
    loss_type: str = opt("mse", "Per-sample loss.", choices=["mse", "l1"])


@dataclass(frozen=True)
class ModelConfig:
    name: str = opt("unet", "Network from the `MODELS` registry. Mode CS always builds `sparse_unet` "
                    "(the UNet plus the bottleneck channel gate).", choices=["unet", "sparse_unet"])
    in_channels: int = opt(3, "Image channels (must match the dataset).", lo=1)
    hid_channels: int = opt(128, "Base width of the UNet.", lo=1)
    ch_multipliers: list[int] = opt([1, 2, 2, 2], "Width multiplier per resolution level.")
    num_res_blocks: int = opt(2, "Residual blocks per level.", lo=1)
    apply_attn: list[bool] = opt([False, True, False, False], "Self-attention per level "
                                 "(same length as ch_multipliers).")
    drop_rate: float = opt(0.0, "Dropout inside residual blocks.", lo=0.0, hi=1.0)
    resample_with_conv: bool = opt(True, "Strided-conv downsampling and conv after upsampling.")
    norm_groups: int = opt(32, "GroupNorm groups (32 in DDPM). Narrower layers get one group per channel, "
                           "which normalises away the time embedding: use 16 with hid_channels 32.", lo=1)
    norm_eps: float = opt(1e-6, "GroupNorm epsilon (1e-6 as in TF DDPM and diffusers; ddpm-torch used 1e-5).",
                          lo=0.0, lo_open=True)
    num_classes: int = opt(0, "Class conditioning: number of classes (a learned class embedding, key "
                           "`class_embed`, added to the time embedding; index num_classes is the null label of "
                           "classifier-free guidance); 0 = unconditional.", lo=0)
    channels_last: bool = opt(False, "Run convolutions in channels_last memory format "
                              "(faster on CPU and on tensor-core GPUs).")
    compile: bool = opt(False, "Wrap the network in `torch.compile`.")
    widths: dict[str, list[int]] | None = opt(None, "Layer widths of a structurally pruned network, written by "
                                             "`prune.py --method structured` (never by hand): module name → "
                                             "[out, in] of a Conv2d/Linear or [groups, channels] of a GroupNorm "
                                             "that differs from the architecture above; null = unpruned.")


@dataclass(frozen=True)
class TrainConfig:
    KEY_ALIASES = {"ema_update_rate": "ema_update_every", "ema_start": "ema_start_step"}  # seed 002's spellings

    lr: float = opt(2e-4, "Peak learning rate.", lo=0.0, lo_open=True)
    batch_size: int = opt(128, "Global batch size (all ranks and accumulation steps together).", lo=1)
    accum_steps: int = opt(1, "Gradient-accumulation micro-batches per optimizer step.", lo=1)
    grad_norm: float | None = opt(1.0, "Clip the global gradient norm to this; null = no clipping.",
                                  lo=0.0, lo_open=True)
    skip_nonfinite_steps: int = opt(0, "Skip up to this many steps whose loss is NaN/inf (no update; the step "
                                    "still counts, so data, noise and lr move on; each skip is logged), then "
                                    "stop as with 0. The escape when a resumed run diverges at the same step "
                                    "again: `--resume --set train.skip_nonfinite_steps=1`.", lo=0)
    epochs: int | None = opt(None, "Training length in epochs (exactly one of epochs/steps).", lo=1)
    steps: int | None = opt(None, "Training length in optimizer steps (exactly one of epochs/steps).", lo=1)
    warmup: int = opt(5000, "Linear learning-rate warm-up, in optimizer steps.", lo=0)
    optimizer: str = opt("adam", "Optimizer.", choices=["adam", "adamw"])
    weight_decay: float = opt(0.0, "Weight decay (decoupled for adamw).", lo=0.0)
    betas: list[float] = opt([0.9, 0.999], "Adam β1, β2.")
    use_ema: bool = opt(True, "Keep an exponential moving average of the weights (used for samples).")
    ema_decay: float = opt(0.9999, "EMA decay per optimizer step.", lo=0.0, hi=1.0)
    ema_update_every: int = opt(1, "Update the EMA after every k-th optimizer step (alias `ema_update_rate`, "
                                "seed 002); its decay and warm-up count these updates.", lo=1)
    ema_start_step: int = opt(0, "Before this optimizer step the EMA is a copy of the weights (at its update "
                              "steps; alias `ema_start`, seed 002); averaging and its warm-up start here.", lo=0)
    cond_drop_prob: float = opt(0.0, "Classifier-free guidance training: probability that a sample's class label is "
                                "replaced by the null label (model.num_classes), so the network also learns the "
                                "unconditional ε. Needs model.num_classes > 0.", lo=0.0, hi=1.0)
    early_stop_loss_change: float | None = opt(None, "Early stopping: let L̄ be the EMA (factor "
                                               "`early_stop_smoothing`) of the global-batch train loss; at every "
                                               "step s that is a multiple of `early_stop_window` with s ≥ 2·window, "
                                               "training ends (as at its last step) when |L̄_s − L̄_{s−window}| / "
                                               "L̄_{s−window} < this. null = off.", lo=0.0, lo_open=True)
    early_stop_window: int = opt(1000, "Early stopping: steps between the compared smoothed losses.", lo=1)
    early_stop_smoothing: float = opt(0.99, "Early stopping: EMA factor β of L̄_s = β·L̄_{s−1} + (1−β)·loss_s "
                                      "(L̄_1 = loss_1).", lo=0.0, hi=1.0)
    amp: str = opt("none", "Mixed precision (autocast; fp32 weights, optimizer, EMA): `none`, `bf16`, `fp16` "
                   "(CPU: `bf16` where it has native bf16, never `fp16`).",
                   choices=["none", "bf16", "fp16"])
    seed: int = opt(0, "Seed of initialisation, data order, timesteps and noise.", lo=0, hi=MAX_SEED)
    num_workers: int = opt(0, "DataLoader worker processes per rank.", lo=0)
    log_intv: int = opt(50, "Steps between `metrics.jsonl` lines.", lo=1)
    tensorboard: bool = opt(False, "Also write each `metrics.jsonl` line's numeric fields as TensorBoard "
                            "scalars at its step, to `<run_dir>/tensorboard/` (rank 0; needs the "
                            "`tensorboard` extra).")
    num_samples: int = opt(64, "Images in each sample grid (fixed noise).", lo=0)
    image_intv: int = opt(1, "Epochs between sample grids (grids are also made at every stage end); "
                          "0 = only at stage ends.", lo=0)
    chkpt_intv: int = opt(1, "Epochs between checkpoints (one is always written at the end and "
                          "on stop).", lo=0)
    keep_checkpoints: int = opt(3, "Keep this many newest checkpoints; 0 = keep all.", lo=0)
    sample_steps: int = opt(TRAIN_SAMPLE_STEPS, "DDIM steps for sample grids and evaluation; 0 = full ancestral "
                            "sampling with T steps. The `sampler` block, when it names a sampler, replaces it.",
                            lo=0)
    loss_weighting: str = opt("none", "Per-timestep loss weight, any mode: `none`, `min_snr` (Min-SNR-γ, "
                              "Hang et al. 2023), `p2` (Choi et al. 2022). Defined on the ε-loss and "
                              "converted for x0/v prediction (see README).", choices=["none", "min_snr", "p2"])
    min_snr_gamma: float = opt(5.0, "γ of `min_snr`: ε-prediction weight min(1, γ/snr).", lo=0.0, lo_open=True)
    p2_k: float = opt(1.0, "k of `p2`: ε-prediction weight 1/(k + snr)^γ.", lo=0.0, lo_open=True)
    p2_gamma: float = opt(1.0, "γ of `p2` (the paper uses 0.5 or 1).", lo=0.0)


@dataclass(frozen=True)
class StageConfig:
    t_min: float = opt(0.0, "Lower bound of the stage's timesteps, as a fraction of T.", lo=0.0, hi=1.0)
    t_max: float = opt(1.0, "Upper bound (exclusive; 1.0 includes T−1), fraction of T.", lo=0.0, hi=1.0)
    epochs: int | None = opt(None, "Stage length in epochs (or give steps).", lo=1)
    steps: int | None = opt(None, "Stage length in optimizer steps (or give epochs).", lo=1)
    name: str | None = opt(None, "Stage name used in logs and file names; null = `stage<k>`.")


@dataclass(frozen=True)
class CurriculumConfig:
    enabled: bool = opt(False, "Train stage by stage on growing timestep ranges (mode C); "
                        "false = one full-range stage (baseline).")
    stages: list[StageConfig] = opt([], "Stages in order; the last one runs to the end of training.")
    space: str = opt("t", "What the stage bounds are fractions of: `t` (the seeds: t_min·T ≤ t < t_max·T) or "
                     "`logsnr` (fractions of the log-SNR range, 0 = least noise, 1 = most noise).",
                     choices=["t", "logsnr"])
    pacing: str = opt("fixed", "`fixed`: each stage lasts its `epochs`/`steps` (the seeds). `patience` (Kim et al. "
                      "2024): a stage ends early once its smoothed loss has not improved by a relative `min_delta` "
                      "for `patience` steps; its `epochs`/`steps` become the maximum length.",
                      choices=["fixed", "patience"])
    patience: int = opt(500, "pacing `patience`: steps without improvement before the next stage starts.", lo=1)
    min_delta: float = opt(0.01, "pacing `patience`: relative improvement of the smoothed loss that counts.",
                           lo=0.0)
    loss_smoothing: float = opt(0.98, "pacing `patience`: EMA factor of the all-reduced step loss it watches.",
                                lo=0.0, hi=1.0)
    sampler: str = opt("stage", "`stage`: t uniform in the current stage's range. `matched_histogram`: a baseline "
                       "control (needs `enabled: false`) drawing t i.i.d. from the training-averaged histogram "
                       "that `stages` would produce, so ordering can be told apart from reweighting.",
                       choices=["stage", "matched_histogram"])


@dataclass(frozen=True)
class SparsityConfig:
    enabled: bool = opt(False, "Mode CS: a binary mask on the bottleneck channels (the middle block's output) "
                        "that regrows at every stage transition; masked channels' own weights stay frozen.")
    initial_sparsity: float = opt(0.8, "Share of bottleneck channels masked in the first stage "
                                  "(`linear`/`cosine` decay it to 0 in the last stage).", lo=0.0, hi=1.0)
    schedule: str = opt("linear", "Sparsity per stage i of n: `linear` s0·(n−1−i)/(n−1) (seed 001), `cosine` "
                        "s0·½(1+cos(πi/(n−1))), `list` = `per_stage` (seed 000).",
                        choices=["linear", "cosine", "list"])
    per_stage: list[float] = opt([], "schedule `list`: the sparsity of each stage (non-increasing), "
                                 "e.g. [0.8, 0.6, 0.4, 0.2, 0.0].")
    regrowth_method: str = opt("gate_gradient", "Which masked channels regrow: `gate_gradient` (largest "
                               "accumulated |∂L/∂m_c| of the channel gate over the stage), `weight_gradient` (the "
                               "seed's criterion: gradient magnitude of the middle block's first res block's conv2 "
                               "weights), `gradient` (the seed's name; same as `weight_gradient`), `random` "
                               "(seeded; the SET control).",
                               choices=["gate_gradient", "weight_gradient", "gradient", "random"])
    location: str = opt("bottleneck", "Where the channel gates sit: `bottleneck` (the seeds: the middle block's "
                        "output) or `decoder` (the input of every up block after the skip concatenation, so "
                        "masked capacity is unused by the skip path too; models/sparse_unet.py).",
                        choices=["bottleneck", "decoder"])
    regrow_init: str = opt("keep", "Weights of a regrown channel: `keep` (the seed: its untouched "
                           "initialisation) or `zero_out` (its fan-out into the first up block starts at zero).",
                           choices=["keep", "zero_out"])


@dataclass(frozen=True)
class RegularizationConfig:
    enabled: bool = opt(False, "Mode CR: Group-L1 penalty λ·Σ_layers Σ_c ‖W[c]‖₂ over every conv layer, "
                        "λ decaying over the stages.")
    lambda_max: float = opt(3e-5, "Penalty weight λ in the first stage.", lo=0.0)
    schedule: str = opt("linear", "λ per stage i of n: `linear` λmax·(n−1−i)/(n−1) (seed 001), `cosine` "
                        "λmax·½(1+cos(πi/(n−1))) (seed 000), `list` = `per_stage`.",
                        choices=["linear", "cosine", "list"])
    per_stage: list[float] = opt([], "schedule `list`: λ of each stage.")
    target: str = opt("conv_weight", "What is penalised: `conv_weight` (Group L1 on conv output channels, the "
                      "seeds) or `norm_scale` (L1 on GroupNorm scales γ, Network Slimming).",
                      choices=["conv_weight", "norm_scale"])
    combine: str = opt("reg_over_batch", "Loss: `reg_over_batch` = mse + reg/batch_size (seed 001; the global "
                       "batch size) or `reg` = mse + reg (seed 000).", choices=["reg_over_batch", "reg"])
    prox: bool = opt(False, "Proximal step instead of the penalty's gradient: after each optimizer step "
                     "W_c ← W_c·max(0, 1 − lr·λ'/‖W_c‖) (λ' = the loss coefficient), giving exact zeros.")
    threshold: float = opt(0.01, "Structured sparsity report: a channel counts as pruned when its norm is below "
                           "this share of the largest channel norm of its layer.", lo=0.0, hi=1.0)


@dataclass(frozen=True)
class MaskProConfig:
    enabled: bool = opt(False, "Mode `prune`: learn N:M masks with MaskPro (phase `learn`) or fine-tune a pruned "
                        "network with its masks fixed (phase `finetune`). Model and diffusion sections are taken "
                        "from `source` when a run starts.")
    phase: str = opt("learn", "`learn`: policy-gradient mask learning, weights frozen (one update per step, "
                     "the loss uses the timesteps of the current curriculum stage, all of 0..T−1 without a "
                     "curriculum). `finetune`: ordinary training with the pruned weights held at exactly 0.",
                     choices=["learn", "finetune"])
    source: str | None = opt(None, "Network to start from: a run directory or checkpoint (also prune.py's "
                             "`pruned.pt` and MaskPro runs), a ddpm-torch `.pt`, or a diffusers folder. "
                             "`learn` needs the dense (unpruned) network.")
    masks: str | None = opt(None, "Mask file `{layer: bool}` (prune.py's `masks.pt`) or a folder of "
                            "`{layer}.pt` files (prune.py --mask_dir). null: `learn` starts from "
                            "N:M magnitude masks of the source; `finetune` uses the source's own masks "
                            "(a pruned or MaskPro checkpoint).")
    use_ema: bool = opt(True, "Take the source's EMA weights (when it has them).")
    n: int = opt(2, "N of N:M (kept weights per group).", lo=1)
    m: int = opt(4, "M of N:M (group size).", lo=2, hi=16)
    order: str = opt("asp", "Where N:M groups lie: `asp` = along input channels at each kernel tap "
                     "(sparse cuDNN/TensorRT layout), `im2col` = along the flattened C_in·kh·kw.",
                     choices=["asp", "im2col"])
    target_layers: list[str] = opt([], "Regexes of layer names to learn masks for; empty = every layer in the "
                                   "mask file (or every eligible, unprotected Conv2d/Linear without one).")
    lr: float = opt(50.0, "MaskPro logit learning rate.", lo=0.0, lo_open=True)
    logits_magnitude: float = opt(10.0, "Initial logits = initial mask × this (10: a sampled mask differs from "
                                  "the initial one in ≈0.014% of 2:4 groups; 5: ≈2%).", lo=0.0, lo_open=True)
    baseline_beta: float = opt(0.99, "Decay β of the running baseline δ of the paired reward.", lo=0.0, hi=1.0)


EXTRA_EVAL_METRICS = ("nll", "spectrum", "fd_classifier")  # evaluation/extra.py's registry, for validation


@dataclass(frozen=True)
class ExtraEvalOptions:
    """Opt-in metrics of a run's eval.json and of experiment grids (evaluation/extra.py)."""

    metrics: list[str] = opt([], "Opt-in metrics: any of `nll` (bits/dim bound on the test split), `spectrum` "
                             "(radial power spectrum vs the train split), `fd_classifier` (Fréchet distance + KID "
                             "in `feature_net`'s features; not FID); [] = none.")
    nll_samples: int = opt(256, "nll: N test images, evenly spaced over the split.", lo=1)
    nll_timesteps: int = opt(50, "nll: network evaluations per image K (decoder + K−1 stratified KL terms, "
                             "unbiased; capped at T, where it is exact).", lo=2)
    spectrum_bands: int = opt(6, "spectrum: equal-width radial frequency bands up to Nyquist.", lo=1)
    feature_net: str | None = opt(None, "fd_classifier: weights file of scripts/train_feature_net.py.")
    ref_samples: int = opt(5000, "spectrum / fd_classifier: N training images, evenly spaced over the split, "
                                 "as the reference.", lo=2)


@dataclass(frozen=True)
class EvalConfig(ExtraEvalOptions):
    num_samples: int = opt(1024, "Samples generated for the end-of-training evaluation (`eval.json`); "
                           "0 = skip.", lo=0)
    batch_size: int = opt(256, "Batch size for that sampling.", lo=1)


@dataclass(frozen=True)
class SamplerConfig:
    """Which sampler the training side uses (also the experiment grid's ``eval.sampler``); null keys are unset."""

    name: str | None = opt(None, "Sampler of the sample grids, the end-of-training evaluation (`eval.json`) and "
                           "prune.py's preview, from the `SAMPLERS` registry (sampling/samplers.py); null = "
                           "from `train.sample_steps` (DDIM with that many steps, eta 0, uniform; 0 = ancestral). "
                           "A `train.sample_steps` other than its default that names another sampler is an "
                           "error. generate.py does not read it: its flags choose (default ancestral).",
                           choices=lambda: _registry_names("sampling.samplers", "SAMPLERS"))
    steps: int | None = opt(None, "DDIM: timesteps visited (≤ diffusion.timesteps); null = 100.", lo=1)
    eta: float | None = opt(None, "DDIM: η (0 = deterministic, 1 = DDPM-like noise); null = 0.", lo=0.0)
    skip_type: str | None = opt(None, "DDIM: spacing of the visited timesteps; null = `uniform`.",
                                choices=lambda: _registry_names("diffusion", "DDIM_SKIP_TYPES"))
    clip_denoised: bool | None = opt(None, "Clamp the predicted x0 to [−1, 1] at every step; null = true.")


@dataclass
class Config:
    mode: str | None = opt(None, "Training mode from the `MODES` registry (ddpm_curriculum/modes): `baseline`, `C`, "
                           "`CS`, `CR`, `prune`. Given, it sets its sections' `enabled` switches (`CS`: "
                           "curriculum and sparsity on, …); null = derived from those switches (the seeds' "
                           "configs). Resolved configs record the mode in force.",
                           choices=lambda: _registry_names("modes", "mode_names"))
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    maskpro: MaskProConfig = field(default_factory=MaskProConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TOP_LEVEL_KEYS = top_level_keys(Config)  # keys of Config that are values, not sections (``mode``)


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``--set`` item (``section.key=value``, ``section.list.INDEX.key=value`` or ``mode=…``) to ``raw``."""
    _apply_override(raw, item, Config)


# ----------------------------------------------------------------------------------- parsing


def _normalise(raw: dict) -> dict:
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    if isinstance(raw.get("dataset"), str):  # seed shorthand: "dataset": "celeba32"
        raw["dataset"] = {"name": raw["dataset"]}
    return raw


def config_from_dict(raw: dict, overrides: list[str] | tuple = ()) -> Config:
    """Build and validate a :class:`Config` from a JSON-like dict plus ``section.key=value`` overrides."""
    if not isinstance(raw, dict):
        raise UserError(f"a config must be a JSON object at the top level, got {type(raw).__name__}")
    raw = _normalise(json.loads(json.dumps(raw)))
    for item in overrides:
        apply_override(raw, item)
    from .modes import apply_mode_key  # the registry of modes sits above this module

    cfg = build_section(Config, apply_mode_key(raw))
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple = ()) -> Config:
    """Read a JSON config file, apply ``--set`` overrides and validate."""
    return config_from_dict(read_json_file(path, "config file", "configs/quickstart.json"), overrides)


# ------------------------------------------------------------------------------- cross-checks


def validate(cfg: Config) -> None:
    """Checks that involve more than one key."""
    t = cfg.train
    if (t.epochs is None) == (t.steps is None):
        raise UserError("set exactly one of 'train.epochs' and 'train.steps' (the total training length)")
    if t.batch_size % t.accum_steps:
        raise UserError(f"'train.batch_size' = {t.batch_size} is not divisible by "
                        f"'train.accum_steps' = {t.accum_steps}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise UserError(f"'train.betas' = {t.betas} must be two numbers in [0, 1)")
    m = cfg.model
    if len(m.apply_attn) != len(m.ch_multipliers):
        raise UserError(f"'model.apply_attn' has {len(m.apply_attn)} entries but 'model.ch_multipliers' "
                        f"has {len(m.ch_multipliers)}; give one flag per level")
    if not m.ch_multipliers or min(m.ch_multipliers) < 1:
        raise UserError(f"'model.ch_multipliers' = {m.ch_multipliers} must be a non-empty list of positive ints")
    if cfg.diffusion.beta_start > cfg.diffusion.beta_end:
        raise UserError(f"'diffusion.beta_start' = {cfg.diffusion.beta_start} exceeds "
                        f"'diffusion.beta_end' = {cfg.diffusion.beta_end}")
    _validate_stages(cfg)
    from .modes import resolve_mode

    resolve_mode(cfg)  # the one mode the switches select, and that mode's own checks
    _validate_variants(cfg)
    _validate_conditioning(cfg)
    validate_extra_eval(cfg.eval, "eval")
    _validate_sampler(cfg)


def _validate_sampler(cfg: Config) -> None:
    """The ``sampler`` block names one sampler, with settings it reads, agreeing with ``train.sample_steps``."""
    if cfg.sampler == SamplerConfig():
        return  # no block: train.sample_steps decides, as before the block existed
    from .sampling.samplers import check_sampler_block  # the registry sits above this module

    check_sampler_block(cfg.sampler, cfg.train.sample_steps, TRAIN_SAMPLE_STEPS, cfg.diffusion.timesteps)


def _validate_conditioning(cfg: Config) -> None:
    if cfg.train.cond_drop_prob > 0 and cfg.model.num_classes == 0:
        raise UserError(f"'train.cond_drop_prob' = {cfg.train.cond_drop_prob} drops class labels but the model is "
                        f"unconditional; set model.num_classes or train.cond_drop_prob=0")
    d = cfg.dataset
    if d.name != "image_folder" and (d.labels != "none" or d.split is not None):
        key = "labels" if d.labels != "none" else "split"
        raise UserError(f"'dataset.{key}' applies to dataset 'image_folder' only (dataset is '{d.name}'); remove it")
    if d.class_names and len(set(d.class_names)) != len(d.class_names):
        raise UserError(f"'dataset.class_names' has repeated names: {d.class_names}")


def validate_extra_eval(ev: ExtraEvalOptions, key: str, where: str = "") -> None:
    """Known opt-in metric names; fd_classifier needs a feature_net (whose file is checked when it is used)."""
    bad = [m for m in ev.metrics if m not in EXTRA_EVAL_METRICS]
    if bad:
        raise UserError(f"{where}config key '{key}.metrics' has unknown metric(s) {bad}; choose from "
                        f"{list(EXTRA_EVAL_METRICS)}")
    if "fd_classifier" in ev.metrics and not ev.feature_net:
        raise UserError(f"{where}'{key}.metrics' has fd_classifier but '{key}.feature_net' is null; train one "
                        f"with scripts/train_feature_net.py and set its path")


def _validate_variants(cfg: Config) -> None:
    """Curriculum variants: pacing and the matched sampler."""
    cur = cfg.curriculum
    if cur.sampler == "matched_histogram" and cur.enabled:
        raise UserError("'curriculum.sampler' = 'matched_histogram' is a baseline control: set "
                        "'curriculum.enabled' to false (its 'stages' then only define the histogram)")
    if cur.pacing == "patience" and not cur.enabled:
        raise UserError("'curriculum.pacing' = 'patience' paces curriculum stages; set 'curriculum.enabled' "
                        "to true or use pacing 'fixed'")


def _validate_stages(cfg: Config) -> None:
    cur = cfg.curriculum
    if not (cur.enabled or cur.sampler == "matched_histogram"):
        return
    if not cur.stages:
        why = "'curriculum.enabled' is true" if cur.enabled else "the matched_histogram sampler needs stages"
        raise UserError(f"{why} but 'curriculum.stages' is empty; "
                        "list stages like {\"t_min\": 0.8, \"t_max\": 1.0, \"epochs\": 1}")
    for i, st in enumerate(cur.stages):
        where = f"curriculum.stages[{i}]"
        if st.t_min >= st.t_max:
            raise UserError(f"'{where}': t_min = {st.t_min} must be smaller than t_max = {st.t_max}")
        if (st.epochs is None) == (st.steps is None):
            raise UserError(f"'{where}': give exactly one of 'epochs' and 'steps' (the stage length)")
    names = [s.name for s in cur.stages if s.name]
    if len(names) != len(set(names)):
        raise UserError(f"'curriculum.stages' names must be unique, got {names}")
    unit = "epochs" if cfg.train.epochs is not None else "steps"
    total = cfg.train.epochs if unit == "epochs" else cfg.train.steps
    lengths = [getattr(s, unit) for s in cur.stages]
    if None not in lengths and sum(lengths) > total:
        raise UserError(f"the stages last {sum(lengths)} {unit} but 'train.{unit}' = {total}; "
                        f"shorten the stages or train longer")


# ----------------------------------------------------------------------------------- docs


def _doc_row(f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    doc = f.metadata.get("doc", "")
    if field_choices(f.metadata):
        doc += " One of: " + ", ".join(f"`{c}`" for c in field_choices(f.metadata)) + "."
    return f"| `{f.name}` | `{json.dumps(default)}` | {doc} |"


def config_markdown() -> str:
    """Markdown reference of every config key with its default and meaning (docs/config.md)."""
    lines = ["# Config reference", "",
             "Generated by `python -m ddpm_curriculum.config --markdown` from `ddpm_curriculum/config.py`.",
             "Keys starting with `_` are comments. `\"dataset\": \"celeba32\"` is shorthand for "
             "`\"dataset\": {\"name\": \"celeba32\"}`. Override any key from the command line with "
             "`--set section.key=value` (JSON values; `--set curriculum.stages.0.epochs=2` indexes lists).", ""]
    lines += ["## top level", "", "| key | default | meaning |", "|---|---|---|"]
    lines += [_doc_row(f) for f in dataclasses.fields(Config) if f.name in TOP_LEVEL_KEYS] + [""]
    sections = [(f.name, f.default_factory) for f in dataclasses.fields(Config) if f.name not in TOP_LEVEL_KEYS]
    sections.insert(sections.index(("curriculum", CurriculumConfig)) + 1, ("curriculum.stages[]", StageConfig))
    for name, cls in sections:
        lines += [f"## `{name}`", "", "| key | default | meaning |", "|---|---|---|"]
        lines += [_doc_row(f) for f in dataclasses.fields(cls)]
        aliases = key_aliases(cls)
        if aliases:
            lines += ["", "Aliases: " + ", ".join(f"`{a}` = `{k}`" for a, k in aliases.items()) + "."]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--markdown"]:
        print(config_markdown())
    else:
        print("usage: python -m ddpm_curriculum.config --markdown")

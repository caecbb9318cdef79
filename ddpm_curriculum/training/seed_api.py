"""Seed 001's trainer call, ``CurriculumTrainer(curriculum_config=…, sparsity_config=…, regularization_config=…,
**kwargs)``, as ``CurriculumTrainer.from_configs(...)`` with the same arguments.

The seed's three dicts are this package's ``curriculum``, ``sparsity`` and ``regularization`` config sections
(the seed's JSON loads unchanged). Its ``**kwargs`` went to ddpm-torch's base ``Trainer``, which was handed
ready-made objects; here the trainer builds them from the config, so ``kwargs`` holds the other config
sections as dicts (``dataset``, ``diffusion``, ``model``, ``train``, ``eval``, ``maskpro``), the base Trainer's
plain settings (mapped to ``train`` keys by ``TRAIN_KEYS``) and the run-level ``run_dir``, ``device``,
``resume_state``, ``stop_at_step``, ``progress``. Objects the trainer builds itself raise ``UserError``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import dist
from ..config import Config, config_from_dict
from ..errors import UserError

SECTIONS = ("dataset", "diffusion", "model", "train", "eval", "maskpro")
# ddpm-torch Trainer keyword → train.<key>
TRAIN_KEYS = {"epochs": "epochs", "num_accum": "accum_steps", "use_ema": "use_ema", "grad_norm": "grad_norm",
              "chkpt_intv": "chkpt_intv", "image_intv": "image_intv", "num_save_images": "num_samples",
              "ema_decay": "ema_decay"}
# ddpm-torch Trainer keywords that have no meaning here → what to do instead
BUILT_FROM_CONFIG = {
    "model": "the network is built from the config: pass its section as a dict, model={...}",
    "diffusion": "the diffusion is built from the config: pass its section as a dict, diffusion={...}",
    "optimizer": "the optimizer is built from train.optimizer, train.lr, train.betas and train.weight_decay",
    "scheduler": "the LR schedule is the linear warm-up of train.warmup",
    "trainloader": "the data comes from the dataset section (dataset={...})",
    "sampler": "the data order is the trainer's own (seeded by train.seed, sharded over ranks)",
    "shape": "the image shape comes from the dataset section",
    "rank": "ranks come from torchrun's environment (or train_curriculum.py --num-gpus)",
    "distributed": "several processes come from torchrun's environment (or train_curriculum.py --num-gpus)",
    "dry_run": "use train_curriculum.py --config-path FILE --dry-run",
}
RUN_ARGS = ("run_dir", "device", "resume_state", "stop_at_step", "progress")


def seed_config(curriculum_config: dict | None = None, sparsity_config: dict | None = None,
                regularization_config: dict | None = None, **kwargs) -> Config:
    """The validated Config of seed 001's trainer arguments (``kwargs``: config sections and base-Trainer
    settings, no run-level arguments)."""
    raw: dict = {"curriculum": curriculum_config or {}, "sparsity": sparsity_config or {},
                 "regularization": regularization_config or {}}
    train: dict = {}
    for key, value in kwargs.items():
        if key in SECTIONS and isinstance(value, dict):
            raw[key] = value
        elif key in TRAIN_KEYS:
            train[TRAIN_KEYS[key]] = value
        elif key in BUILT_FROM_CONFIG:
            raise UserError(f"CurriculumTrainer: {key}= (a {type(value).__name__}) is not accepted: "
                            f"{BUILT_FROM_CONFIG[key]}")
        elif key in ("curriculum", "sparsity", "regularization"):
            raise UserError(f"CurriculumTrainer: pass the {key} section as {key}_config=")
        else:
            raise UserError(f"CurriculumTrainer: unknown argument {key!r}; valid: curriculum_config, "
                            f"sparsity_config, regularization_config, the sections {', '.join(SECTIONS)} (dicts), "
                            f"{', '.join(TRAIN_KEYS)}, {', '.join(RUN_ARGS)}")
    clash = sorted(set(train) & set(raw.get("train", {})))
    if clash:
        raise UserError(f"CurriculumTrainer: train.{clash[0]} is given twice (in train= and as a keyword)")
    raw["train"] = {**raw.get("train", {}), **train}
    return config_from_dict(raw)


def run_args(run_dir=None, device=None, **rest) -> dict:
    """The trainer's run-level arguments with their defaults: ``runs/seed001-<timestamp>``, CUDA when
    available (``device`` as ``--device``: a string or a torch.device)."""
    if run_dir is None:
        run_dir = Path("runs") / f"seed001-{time.strftime('%Y%m%d-%H%M%S')}"
    device = device if isinstance(device, torch.device) else dist.parse_device(device)
    return {"run_dir": run_dir, "device": device, **rest}

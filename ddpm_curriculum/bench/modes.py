"""Cost of the training modes on one model, batch and data: baseline, C, CS and CR run the real
``CurriculumTrainer.train_step`` (hooks, frozen entries, penalty, EMA) in their first stage — CS with its initial
sparsity and the gate-gradient probe recording, CR with λ > 0 — and mode prune's own update rule
(``PolicyGradientUpdate``, phase learn: sample 2:4 masks, two no-grad forwards, the step's status all-reduce,
policy-gradient step on the logits) on the same network and batch.
Targets (issue 3): CS within 2 % of C, CR within 5 % of C.
"""

from __future__ import annotations

import torch

from ..config import load_config
from ..modes import MODES as REGISTRY
from ..pruning.learn import PolicyGradientUpdate
from ..pruning.maskpro import MaskProUpdate, wrap_model_with_maskpro
from ..training import CurriculumTrainer, builders
from ..training.updates import StepBatch, step_status
from .train import fixed_batch

# The modes trained by CurriculumTrainer.train_step, as --set switches applied to a mode-C config (mode prune
# has its own update, make_maskpro_step).
MODES = {name: [f"{key}={str(value).lower()}" for key, value in mode.switches().items()]
         for name, mode in REGISTRY.items() if name != "prune"}


def mode_config(config: str, mode: str, batch: int, overrides=()):
    return load_config(config, [f"train.batch_size={batch}", "eval.num_samples=0", *overrides, *MODES[mode]])


def make_mode_step(config: str, mode: str, batch: int, run_dir: str, overrides=(), device="cpu"):
    """The trainer's own step for ``mode`` (a mode-C ``config`` with the mode's switches) on a fixed batch."""
    cfg = mode_config(config, mode, batch, overrides)
    trainer = CurriculumTrainer(cfg, run_dir, torch.device(device), progress=False)
    trainer._enter_stage(trainer.plan[0])  # CS: initial mask (+ gate probe); CR: λ of stage 1
    images = torch.stack([trainer.dataset[i][0] for i in range(batch)]).to(device)
    return lambda: trainer.train_step(images)


def make_maskpro_step(config: str, batch: int, overrides=(), device="cpu"):
    """One step of mode prune's update rule on the config's network with 2:4 masks (magnitude-initialised) on a
    fixed batch: the rule's forward, the trainer's status reduce and the rule's apply, as ``train_step`` runs them
    (without the trainer, which would need a trained source checkpoint)."""
    cfg = mode_config(config, "baseline", batch, overrides)
    torch.manual_seed(0)
    device = torch.device(device)
    model = builders.make_model(cfg).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    diffusion = builders.make_diffusion(cfg)
    x0, t, noise = fixed_batch(cfg, batch, device, cfg.model.channels_last)
    rule = PolicyGradientUpdate(cfg, model, diffusion, MaskProUpdate(wrap_model_with_maskpro(model, 2, 4)), device)
    step_batch = StepBatch(0, x0, t, noise)

    def step():
        result = rule.forward(step_batch, None)
        rule.apply(result, step_status(result, False, device), None)

    return step

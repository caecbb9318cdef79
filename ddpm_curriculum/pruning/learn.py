"""Mode ``prune``, phase ``learn``: MaskPro mask learning inside the ordinary training loop.

``PolicyGradientUpdate`` is the mode's update rule (``training/updates.py``): the ordinary ``CurriculumTrainer``
runs it, so data order, timesteps and noise, the curriculum's time range, logging, sample grids, checkpoints,
exact resume, signals, the step's status all-reduce and DDP are the trainer's own; the rule updates mask logits
instead of weights and has no optimizer, LR schedule, grad scaler or EMA. One step::

    batch → (x0, t, ε) of this step → masks sampled for every wrapped layer (seeded by the step: the same
    on every rank) → L(initial masks) and L(sampled masks) on the same (x0, t, ε), network in eval mode
    (no dropout, so the pair differs only by the mask) → both sums added over all ranks in the step's status
    all-reduce → r = their difference per sample → δ and logits updated

The loss is restricted to the timesteps the trainer draws: the current curriculum stage's range when
``curriculum.enabled``, all of 0..T−1 otherwise. Checkpoints hold the dense weights (``model``/``ema``,
never changed: ``ema`` is the same weights, for readers that prefer the EMA copy), the learned top-N ``masks``
(``load_network`` applies them) and the logits, initial masks and δ (``extensions.maskpro``).
"""

from __future__ import annotations

import torch

from .. import dist
from ..errors import UserError
from ..hooks import HookContext, TrainingExtension
from ..training.sampler import mix_seed
from ..training.updates import StepBatch, StepResult, StepStatus, UpdateRule
from .finetune import load_source
from .masks import load_masks
from .maskpro import MaskProUpdate, maskpro_layers, wrap_model_with_maskpro


class MaskProLearning(TrainingExtension):
    """Checkpoint state (logits, initial masks, δ) and log fields of the mask learning."""

    name = "maskpro"

    def __init__(self, update: MaskProUpdate):
        self.update = update
        self.last = {}

    def log_fields(self, ctx: HookContext) -> dict:
        return {**self.last, "maskpro_delta": self.update.delta,
                "maskpro_changed_groups": self.update.changed_fraction()}

    def state_dict(self) -> dict:
        return self.update.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.update.load_state_dict(state)


class PolicyGradientUpdate(UpdateRule):
    """Learns N:M masks with MaskPro (weights frozen); see the module docstring."""

    name = "maskpro"

    def __init__(self, cfg, model, diffusion, policy: MaskProUpdate, device):
        self.cfg, self.model, self.diffusion, self.device = cfg, model, diffusion, device
        self.policy = policy
        self.learning = MaskProLearning(policy)
        self.extensions = [self.learning]  # its log fields, and its state in the checkpoint's extensions

    @classmethod
    def for_run(cls, cfg, model, diffusion, extensions, device, resume_state):
        """Wrap ``model``'s layers: a new run loads ``maskpro.source``'s dense weights and its initial masks
        (``maskpro.masks``, else N:M magnitude); a resumed run takes the initial masks from the checkpoint."""
        mp = cfg.maskpro
        if resume_state is None:
            initial = _load_source(cfg, model)
        else:
            saved = (resume_state.get("extensions") or {}).get(MaskProLearning.name)
            if saved is None:
                raise UserError("the checkpoint has no MaskPro state (it was trained in another mode); "
                                "resume with the config it was trained with")
            initial = saved["initial_masks"]
        layers = wrap_model_with_maskpro(model, mp.n, mp.m, mp.target_layers, initial_masks=initial,
                                         order=mp.order, logits_magnitude=mp.logits_magnitude,
                                         **({"protect": ()} if initial is not None else {}))
        dist.print0(f"MaskPro: {len(layers)} layers, {mp.n}:{mp.m} ({mp.order}), lr {mp.lr}, "
                    f"logits magnitude {mp.logits_magnitude}, baseline β {mp.baseline_beta}")
        return cls(cfg, model, diffusion, MaskProUpdate(layers, mp.lr, mp.baseline_beta), device)

    @property
    def lr(self) -> float:
        return self.policy.lr

    @torch.no_grad()
    def _losses(self, batch: StepBatch) -> torch.Tensor:
        """Per-sample losses [B] of this rank's batch with the masks in use (accum_steps micro-batches)."""
        x0, t, noise, y = batch.x0, batch.t, batch.noise, batch.y
        micro = -(-x0.shape[0] // self.cfg.train.accum_steps)
        return torch.cat([self.diffusion.training_losses(self.model, x0[i:i + micro], t[i:i + micro],
                                                         noise[i:i + micro],
                                                         **({} if y is None else {"y": y[i:i + micro]}))
                          for i in range(0, x0.shape[0], micro)])

    def forward(self, batch: StepBatch, ctx) -> StepResult:
        """Masks sampled by the step's seed (the same on every rank), then the paired losses; the sampled
        masks' losses are the step's losses, the initial masks' sum goes into the status all-reduce."""
        g = torch.Generator(device=self.device).manual_seed(mix_seed(self.cfg.train.seed, batch.step, 0x3A5C))
        positions = self.policy.sample(g)
        self.model.eval()  # dropout would make the two losses differ by more than the mask
        loss_initial, loss_sampled = self.policy.paired_losses(positions, lambda: self._losses(batch))
        self.model.train()
        return StepResult(loss_sampled.float(), sums={"initial": loss_initial.double().sum()}, payload=positions)

    def apply(self, result: StepResult, status: StepStatus, ctx) -> torch.Tensor:
        r = (status.loss_sum - status.sums["initial"]) / status.count  # paired reward over the global batch
        advantage = self.policy.step(result.payload, r)
        self.learning.last = {"maskpro_r": r, "maskpro_advantage": advantage,
                              "loss_initial_mask": status.sums["initial"] / status.count}
        return torch.zeros((), device=self.device)  # no gradients

    def sampling_model(self, model):
        """The network with the learned (top-N) masks, for sample grids and the final evaluation."""
        self.policy.use_top()
        return model

    def state_dict(self) -> dict:
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return {"ema": weights, "ema_num_updates": 0,
                "masks": {name: layer.top_mask().cpu() for name, layer in maskpro_layers(self.model).items()}}


def _load_source(cfg, model) -> dict | None:
    """Dense source weights into ``model``; the initial masks (None: N:M magnitude)."""
    net = load_source(cfg)
    if net.masks:
        raise UserError(f"maskpro.source {cfg.maskpro.source} is a pruned network (its pruned weights "
                        f"are 0); MaskPro learns from the dense one: set maskpro.source to the unpruned "
                        f"network and maskpro.masks to the mask file")
    model.load_state_dict(net.model.state_dict())
    return load_masks(cfg.maskpro.masks) if cfg.maskpro.masks else None

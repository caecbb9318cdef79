"""Mode ``prune``, phase ``learn``: MaskPro mask learning inside the ordinary training loop.

``MaskProTrainer`` is a ``CurriculumTrainer`` whose step updates mask logits instead of weights; data order,
timesteps and noise (``_draw``), the curriculum's time range, logging, sample grids, checkpoints, exact
resume, signals and DDP are the trainer's own. One step::

    batch → (x0, t, ε) of this step → masks sampled for every wrapped layer (seeded by the step: the same
    on every rank) → L(initial masks) and L(sampled masks) on the same (x0, t, ε), network in eval mode
    (no dropout, so the pair differs only by the mask) → r summed over all ranks → δ and logits updated

The loss is restricted to the timesteps the trainer draws: the current curriculum stage's range when
``curriculum.enabled``, all of 0..T−1 otherwise. Checkpoints hold the dense weights (``model``/``ema``,
never changed), the learned top-N ``masks`` (``load_network`` applies them) and the logits, initial masks
and δ (``extensions.maskpro``).
"""

from __future__ import annotations

import torch

from .. import dist
from ..errors import UserError
from ..hooks import HookContext, TrainingExtension
from ..training.sampler import mix_seed
from ..training.trainer import CurriculumTrainer
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


class MaskProTrainer(CurriculumTrainer):
    """Learns N:M masks with MaskPro (weights frozen); see the module docstring."""

    def __init__(self, cfg, run_dir, device, resume_state: dict | None = None, **kwargs):
        super().__init__(cfg, run_dir, device, resume_state=resume_state, **kwargs)
        mp = cfg.maskpro
        if resume_state is None:
            initial = self._load_source()
        else:
            saved = (resume_state.get("extensions") or {}).get(MaskProLearning.name)
            if saved is None:
                raise UserError("the checkpoint has no MaskPro state (it was trained in another mode); "
                                "resume with the config it was trained with")
            initial = saved["initial_masks"]
        layers = wrap_model_with_maskpro(self.model, mp.n, mp.m, mp.target_layers, initial_masks=initial,
                                         order=mp.order, logits_magnitude=mp.logits_magnitude,
                                         **({"protect": ()} if initial is not None else {}))
        self.update = MaskProUpdate(layers, mp.lr, mp.baseline_beta)
        self.learning = MaskProLearning(self.update)
        if resume_state is not None:
            self.learning.load_state_dict(resume_state["extensions"][MaskProLearning.name])
        self.extensions.append(self.learning)
        dist.print0(f"MaskPro: {len(layers)} layers, {mp.n}:{mp.m} ({mp.order}), lr {mp.lr}, "
                    f"logits magnitude {mp.logits_magnitude}, baseline β {mp.baseline_beta}")

    def _load_source(self) -> dict | None:
        """Dense source weights into the network and the EMA copy; the initial masks (None: N:M magnitude)."""
        net = load_source(self.cfg)
        if net.masks:
            raise UserError(f"maskpro.source {self.cfg.maskpro.source} is a pruned network (its pruned weights "
                            f"are 0); MaskPro learns from the dense one: set maskpro.source to the unpruned "
                            f"network and maskpro.masks to the mask file")
        self.model.load_state_dict(net.model.state_dict())
        if self.ema is not None:
            self.ema.load_state_dict(net.model.state_dict(), 0)
        return load_masks(self.cfg.maskpro.masks) if self.cfg.maskpro.masks else None

    @torch.no_grad()
    def _losses(self, x0, t, noise, y=None) -> torch.Tensor:
        """Per-sample losses [B] of this rank's batch with the masks in use (accum_steps micro-batches); ``y``:
        class labels of a conditional network."""
        micro = -(-x0.shape[0] // self.cfg.train.accum_steps)
        return torch.cat([self.diffusion.training_losses(self.model, x0[i:i + micro], t[i:i + micro],
                                                         noise[i:i + micro],
                                                         **({} if y is None else {"y": y[i:i + micro]}))
                          for i in range(0, x0.shape[0], micro)])

    def train_step(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[float | None, bool]:
        """One MaskPro update (see the module docstring). Returns (sum of sampled-mask losses, stop?)."""
        x0, t, noise = self._draw(images, self.cfg.train.batch_size)
        y = self._draw_labels(labels, self.cfg.train.batch_size)
        g = torch.Generator(device=self.device).manual_seed(mix_seed(self.cfg.train.seed, self.step, 0x3A5C))
        positions = self.update.sample(g)
        self.model.eval()  # dropout would make the two losses differ by more than the mask
        loss_initial, loss_sampled = self.update.paired_losses(positions, lambda: self._losses(x0, t, noise, y))
        self.model.train()
        sums = torch.stack([loss_sampled.double().sum(), loss_initial.double().sum(),
                            torch.tensor(float(x0.shape[0]), dtype=torch.float64, device=self.device),
                            (~torch.isfinite(loss_sampled)).any().double(),
                            torch.tensor(float(self._stop_requested), dtype=torch.float64, device=self.device)])
        sampled, initial, count, bad, stop = dist.all_reduce_sum(sums).tolist()
        if bad:
            self._skip_nonfinite_step()
            return None, bool(stop)
        r = (sampled - initial) / count  # paired reward over the global batch: identical on every rank
        advantage = self.update.step(positions, r)
        self.learning.last = {"maskpro_r": r, "maskpro_advantage": advantage, "loss_initial_mask": initial / count}
        self.log.add(loss_sampled.float(), None, t, torch.zeros((), device=self.device), x0.shape[0])
        return float(loss_sampled.sum()), bool(stop)

    def sampling_model(self):
        """The network with the learned (top-N) masks, for sample grids and the final evaluation."""
        self.update.use_top()
        return self.model

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["masks"] = {name: layer.top_mask().cpu() for name, layer in maskpro_layers(self.model).items()}
        return state

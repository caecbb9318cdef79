"""Update rules: how one training step changes the run, chosen by the mode (``modes.Mode.update``).

Every rule takes a step in the same three phases, so the trainer's loop, logging, checkpoints, resume and DDP
are shared::

    result = rule.forward(batch, ctx)         this rank's per-sample losses (the gradient rule also runs backward)
    status = step_status(result, stop)        ONE all-reduce per step for every rule: any rank's loss non-finite,
                                              any rank asked to stop, the global mean loss, the rule's own sums
    rule.apply(result, status, ctx)           the update, identical on every rank
      or rule.skip()                          a non-finite loss: no update (train.skip_nonfinite_steps)

``GradientUpdate`` trains the weights (modes baseline, C, CS, CR, prune's fine-tuning): the optimizer, the LR
schedule, the fp16 grad scaler and the EMA copy are its own. ``pruning.learn.PolicyGradientUpdate`` (mode prune,
phase learn) updates MaskPro's mask logits from a paired reward and has none of them. A rule's ``state_dict``
entries are top-level checkpoint entries (``optimizer``, ``scheduler``, ``scaler``, ``ema`` …: the checkpoint
format did not change when the rules were split out of the trainer); ``extensions`` are training extensions the
rule brings (their state goes under the checkpoint's ``extensions``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import dist
from ..errors import UserError
from .checkpoint import check_entries
from .ema import EMA


@dataclass(frozen=True)
class StepBatch:
    """This rank's share of one step's global batch: ``step`` is the number of steps done before it."""

    step: int
    x0: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    y: torch.Tensor | None = None  # class labels (conditional networks), null label where dropped
    weights: torch.Tensor | None = None  # w(t) of the loss weighting, None = unweighted


@dataclass
class StepResult:
    """What ``forward`` computed on this rank: ``per_sample`` unweighted losses [B] (the status checks them and
    averages them over the global batch), the ``weights`` the log uses with them, ``sums`` (scalars the status
    all-reduce adds over ranks), ``terms`` (the modes' loss terms, detached, for the log) and ``payload``
    (whatever the rule's ``apply`` needs from its ``forward``)."""

    per_sample: torch.Tensor
    weights: torch.Tensor | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    payload: Any = None


@dataclass(frozen=True)
class StepStatus:
    """The step's all-reduced status: ``bad`` (a non-finite loss on any rank), ``stop`` (a stop request on any
    rank), ``loss_sum`` and ``count`` of the global batch's per-sample losses, and the rules' ``sums``."""

    bad: bool
    stop: bool
    loss_sum: float
    count: float
    sums: dict[str, float]

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.count


def step_status(result: StepResult, stop_requested: bool, device: torch.device) -> StepStatus:
    """The one collective of a step (float64, so sums of many losses stay exact enough to compare)."""
    per_sample, names = result.per_sample, list(result.sums)
    head = torch.tensor([0.0, float(stop_requested), 0.0, float(per_sample.numel())], dtype=torch.float64,
                        device=device)
    head[0] = (~torch.isfinite(per_sample)).any()
    head[2] = per_sample.double().sum()
    status = torch.cat([head, *[result.sums[k].double().reshape(1).to(device) for k in names]])
    bad, stop, loss_sum, count, *sums = dist.all_reduce_sum(status).tolist()
    return StepStatus(bad > 0, stop > 0, loss_sum, count, dict(zip(names, sums, strict=True)))


def frozen_entries(extensions) -> list:
    """The extensions' ``FrozenEntries`` (their ``frozen``, read anew each time: an extension may replace it)."""
    return [f for f in (getattr(ext, "frozen", None) for ext in extensions) if f is not None]


def autocast(cfg, device: torch.device):
    """Reduced precision for the network's forward only (weights, gradients, optimizer state and EMA stay fp32)."""
    amp = cfg.train.amp
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class UpdateRule:
    """The interface of an update rule (see the module doc). The defaults are those of a rule without an
    optimizer or EMA; ``for_run`` builds one for a run (``resume_state``: the checkpoint it resumes, else None)."""

    name = "rule"
    trains_weights = False  # True: the weights get gradients, so several processes wrap the network in DDP
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    ema: EMA | None = None
    extensions: list = []

    @classmethod
    def for_run(cls, cfg, model, diffusion, extensions, device, resume_state: dict | None) -> UpdateRule:
        raise NotImplementedError

    def attach(self, ddp_model, train_model) -> None:
        """The network as the step runs it: ``ddp_model`` (DDP-wrapped with several processes) and ``train_model``
        (that, compiled with ``model.compile``); set once the trainer has wrapped it."""

    @property
    def lr(self) -> float:
        raise NotImplementedError

    def grad_scale(self) -> float:
        return 1.0

    def forward(self, batch: StepBatch, ctx) -> StepResult:
        raise NotImplementedError

    def apply(self, result: StepResult, status: StepStatus, ctx) -> torch.Tensor:
        """The update; returns the gradient norm the log records (0 for rules without gradients)."""
        raise NotImplementedError

    def skip(self) -> None:
        """A step skipped for a non-finite loss: drop what ``forward`` left behind."""

    def sampling_model(self, model):
        return model

    def load_weights(self, model, state: dict) -> None:
        model.load_state_dict(state)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# The entries a resume of a gradient-trained run needs (load_checkpoint checks the network's own entries).
GRADIENT_RESUME_ENTRIES = {"optimizer": "optimizer state dict", "scheduler": "dict", "scaler": "dict"}


class GradientUpdate(UpdateRule):
    """loss (+ mode terms) → backward (accumulated over ``train.accum_steps`` micro-batches, one DDP all-reduce)
    → extensions read gradients → frozen entries zeroed → clip → optimizer step → LR schedule → extensions fix
    weights → frozen entries restored → EMA."""

    name = "gradient"
    trains_weights = True

    def __init__(self, cfg, model, diffusion, extensions, device):
        t = cfg.train
        self.cfg, self.model, self.diffusion, self.device = cfg, model, diffusion, device
        self.extensions_of_mode = extensions
        self.ema = EMA(model, t.ema_decay, t.ema_update_every, t.ema_start_step) if t.use_ema else None
        cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = cls(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / t.warmup) if t.warmup > 0 else 1.0)
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.amp == "fp16")
        self.ddp_model = self.train_model = model

    @classmethod
    def for_run(cls, cfg, model, diffusion, extensions, device, resume_state):
        return cls(cfg, model, diffusion, extensions, device)

    def attach(self, ddp_model, train_model) -> None:
        self.ddp_model, self.train_model = ddp_model, train_model

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def grad_scale(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def forward(self, batch: StepBatch, ctx) -> StepResult:
        accum = self.cfg.train.accum_steps
        micro = batch.x0.shape[0] // accum
        losses, terms = [], {}
        for k in range(accum):
            sl = slice(k * micro, (k + 1) * micro)
            sync = k == accum - 1 or dist.world_size() == 1
            with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
                with autocast(self.cfg, self.device):
                    per_sample = self.diffusion.training_losses(
                        self.train_model, batch.x0[sl], batch.t[sl], batch.noise[sl],
                        **({} if batch.y is None else {"y": batch.y[sl]}))
                per_sample = per_sample.float()  # loss reduction (and mode terms) in fp32
                objective = per_sample if batch.weights is None else per_sample * batch.weights[sl]
                loss = objective.mean() / accum
                if k == accum - 1:  # mode terms once per step, inside DDP's forward/backward
                    for ext in self.extensions_of_mode:
                        terms.update(ext.loss_terms(ctx))
                    loss = loss + sum(terms.values())
            self.scaler.scale(loss).backward()
            losses.append(per_sample.detach().float())
        return StepResult(torch.cat(losses), batch.weights, terms={k: v.detach() for k, v in terms.items()},
                          payload=batch.step)

    def apply(self, result: StepResult, status: StepStatus, ctx) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)
        for ext in self.extensions_of_mode:
            ext.after_backward(ctx)
        for frozen in frozen_entries(self.extensions_of_mode):  # after every after_backward: those may read them
            frozen.zero_grads()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_norm or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for ext in self.extensions_of_mode:
            ext.after_step(ctx)
        for frozen in frozen_entries(self.extensions_of_mode):
            frozen.restore(self.optimizer)
        if self.ema is not None:
            self.ema.after_step(self.model, result.payload + 1)
        return grad_norm.detach()

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the lr stays a function of the step

    def sampling_model(self, model):
        return self.ema.model if self.ema is not None else model

    def load_weights(self, model, state: dict) -> None:
        """Load ``state`` into the network and restart the EMA copy from it (0 updates)."""
        model.load_state_dict(state)
        if self.ema is not None:
            self.ema.load_state_dict(model.state_dict(), 0)

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict() if self.ema is not None else None,
                "ema_num_updates": self.ema.num_updates if self.ema is not None else 0,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_entries(state, "the checkpoint", GRADIENT_RESUME_ENTRIES)
        if self.ema is not None:
            if state.get("ema") is None:
                raise UserError("the checkpoint has no EMA weights but train.use_ema is true; "
                                "resume with --set train.use_ema=false")
            self.ema.load_state_dict(state["ema"], int(state.get("ema_num_updates", 0)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_optimizer_config()
        if state.get("scaler"):  # empty when saved without fp16 (a resume may switch train.amp)
            self.scaler.load_state_dict(state["scaler"])

    def _apply_optimizer_config(self) -> None:
        """Loaded optimizer/scheduler state, but the config's hyper-parameters (a resume may change them).

        Loading restores the saved lr, betas and weight decay into the param groups and the saved base lr
        into the LR schedule, so ``--set train.lr=…`` would be recorded but not used. They are set again
        here, and the lr of the next step is the schedule (built from this config, warm-up included) at the
        current step: the same value an uninterrupted run with this config would use.
        """
        t, sched = self.cfg.train, self.scheduler
        sched.base_lrs = [t.lr] * len(self.optimizer.param_groups)
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group.update(lr=lr, initial_lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        sched._last_lr = lrs  # what get_last_lr() reports until the next step

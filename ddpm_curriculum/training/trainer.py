"""CurriculumTrainer: the training loop for baseline DDPM, the timestep curriculum and its modes.

One step reads like the algorithm::

    batch → t from the current stage's range, ε, flips, dropped labels (seeded by the step)
          → the mode's update rule (``updates.py``): forward, one status all-reduce, update or skip

The gradient rule is w(t)·loss (+ mode terms) → backward → (mode: read/zero gradients) → clip → optimizer step
→ (mode: fix weights) → LR schedule → EMA; mode prune's mask learning has its own rule (``pruning/learn.py``).

Modes plug in as ``TrainingExtension`` objects (``hooks.py``) instead of forking this loop; their hooks get a
``HookContext`` (the step, the raw model, the EMA copy, the optimizer, the grad scale, … and the services
``probe_loss`` and ``load_weights``), not the trainer, and return what the trainer records for them.
Everything else (logging, sample grids, checkpoints, stop requests) lives in named methods that run
between steps. With fixed pacing the stage is a pure function of the global step (see ``plan.py``), so
ranks and resumed runs agree without communication; patience pacing decides on the all-reduced loss and
keeps its state in the checkpoint.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import dist
from ..config import Config, config_from_dict
from ..diffusion.timestep_sampling import TimestepSampler
from ..errors import UserError, interrupt_note
from ..hooks import HookContext
from ..modes import mode_of
from ..sampling import sampler_spec
from . import builders, seed_api
from .checkpoint import FORMAT_VERSION, check_compatible, save_checkpoint
from .early_stop import EarlyStop
from .extensions import build_extensions
from .updates import GradientUpdate, StepBatch, step_status
from .plan import PACINGS, stage_at, total_steps
from .reporting import MetricsLog, TensorBoardSink, append_jsonl, evaluate_samples, save_grid
from .sampler import ShardedBatchSampler, mix_seed, step_generator

NUM_T_BINS = 10  # metrics.jsonl reports the loss averaged over 10 equal timestep bins
PROBE_BATCH = 32  # images in the fixed batch of probe_loss (CS logs it before and after each regrowth)


def _fmt(value: float) -> str:
    """4 decimals as in the seeds' log line; small non-zero terms (a Group-L1 reg) in scientific notation."""
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3e}"


NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # /proc/cpuinfo: x86 AVX512-BF16, AMX-BF16; Arm BF16


def _cpu_flags() -> set[str] | None:
    """The CPU feature flags of /proc/cpuinfo (x86 ``flags``, Arm ``Features``); None where it cannot be read."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return {f for ln in lines if ln.startswith(("flags", "Features")) for f in ln.partition(":")[2].split()}


def cpu_bf16_supported(flags: set[str] | None = None) -> bool:
    """Whether this CPU runs bf16 natively: oneDNN has bf16 kernels for it and, where the feature flags can be read,
    it has bf16 instructions (oneDNN also accepts plain AVX-512, where it emulates bf16, slower than fp32).

    A capability check, not a CPU-name list; tests replace it to simulate a CPU without bf16."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    flags = _cpu_flags() if flags is None else flags
    return flags is None or bool(flags & NATIVE_BF16_FLAGS)


def grid_layout(num_samples: int, num_classes: int) -> tuple[torch.Tensor | None, int | None]:
    """Labels of a conditional sample grid, one row per class (row c: max(1, num_samples // num_classes) images
    of class c), and the images per row; (None, None) for unconditional networks (a square grid)."""
    if not num_classes or not num_samples:
        return None, None
    per_row = max(1, num_samples // num_classes)
    return torch.arange(num_classes).repeat_interleave(per_row), per_row


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; a checkpoint of the last good state was written."""


class CurriculumTrainer:
    def __init__(self, cfg: Config, run_dir: str | Path, device: torch.device,
                 resume_state: dict | None = None, stop_at_step: int | None = None,
                 progress: bool = True):
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), device
        self.rank, self.world = dist.rank(), dist.world_size()
        self.stop_at_step, self.progress = stop_at_step, progress
        self._check_device()
        t = cfg.train
        if t.batch_size % (self.world * t.accum_steps):
            raise UserError(f"'train.batch_size' = {t.batch_size} must be divisible by world size "
                            f"{self.world} × 'train.accum_steps' {t.accum_steps}")
        # on every rank, so that a missing tensorboard package stops all of them at once; rank 0 writes
        tensorboard = TensorBoardSink(self.run_dir / "tensorboard") if t.tensorboard else None
        # Initialisation is identical on every rank (DDP also broadcasts rank 0's weights);
        # the global RNG is then reseeded per rank, so dropout differs between ranks.
        torch.manual_seed(t.seed)
        self.dataset = builders.make_dataset(cfg)
        self.num_classes = builders.check_labels(cfg, self.dataset)  # 0 = unconditional
        self.image_shape = tuple(self.dataset.image_shape)
        self.flip = builders.use_random_flip(cfg)
        self.diffusion = builders.make_diffusion(cfg)
        self.loss_weights = builders.loss_weights(cfg, self.diffusion)  # None = unweighted
        self.model = builders.make_model(cfg).to(device)
        if cfg.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.extensions = build_extensions(cfg, self.model)
        # the mode's update rule: the optimizer, LR schedule, grad scaler and EMA are the gradient rule's
        rule = mode_of(cfg).update(cfg) or GradientUpdate
        self.update_rule = rule.for_run(cfg, self.model, self.diffusion, self.extensions, device, resume_state)
        self.extensions = self.extensions + list(self.update_rule.extensions)
        torch.manual_seed(mix_seed(t.seed, self.rank, 0xD0))

        self.sampler = ShardedBatchSampler(len(self.dataset), t.batch_size, self.rank, self.world, t.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = total_steps(cfg, self.steps_per_epoch)
        self.timestep_probs = builders.timestep_probs(cfg, self.diffusion, self.steps_per_epoch)
        self._timestep_samplers: dict[int, TimestepSampler] = {}
        self.pacing = PACINGS[cfg.curriculum.pacing](cfg, self.steps_per_epoch)
        self.plan = self.pacing.plan()
        self.step = 0
        self.stage_entered = -1  # index of the last stage whose on_stage_start hooks ran
        self.loss_terms: dict[str, torch.Tensor] = {}  # the mode's loss terms of the last step (detached)
        self.skipped_steps: list[int] = []  # steps skipped for a non-finite loss (train.skip_nonfinite_steps)
        self.early_stop = EarlyStop(t.early_stop_loss_change, t.early_stop_window, t.early_stop_smoothing)
        if resume_state is not None:
            self._load_state(resume_state)
        if stop_at_step is not None and stop_at_step <= self.step:
            raise UserError(f"--stop-at-step {stop_at_step} is not after the current step {self.step}; nothing "
                            f"to train (pass a larger step, or drop --stop-at-step)")

        self.ddp_model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None) \
            if self.world > 1 and self.update_rule.trains_weights else self.model
        self.train_model = torch.compile(self.ddp_model) if cfg.model.compile else self.ddp_model
        self.update_rule.attach(self.ddp_model, self.train_model)
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", NUM_T_BINS, self.diffusion.timesteps, device,
                              sink=tensorboard) \
            if dist.is_main() else MetricsLog(None, NUM_T_BINS, self.diffusion.timesteps, device)
        self._stop_requested = False
        # Sample grids: images 0 … n−1 of generate.py --seed train.seed with the run's sampler (sampler_spec; fixed
        # per-image noise streams, and fixed labels), so grids over training are comparable.
        self.grid_labels, self.grid_rows = grid_layout(t.num_samples, self.num_classes)
        self.grid_size = t.num_samples if self.grid_labels is None else len(self.grid_labels)
        self.grid_spec = sampler_spec(cfg)

    @classmethod
    def from_configs(cls, curriculum_config: dict | None = None, sparsity_config: dict | None = None,
                     regularization_config: dict | None = None, **kwargs) -> CurriculumTrainer:
        """Seed 001's constructor, ``CurriculumTrainer(curriculum_config=…, sparsity_config=…,
        regularization_config=…, **kwargs)``: the three dicts are config sections; ``kwargs`` the other
        sections as dicts, ddpm-torch Trainer settings (``epochs``, ``num_accum``, …) and ``run_dir``,
        ``device``, ``resume_state``, ``stop_at_step``, ``progress`` (see ``seed_api.py``)."""
        run = {k: kwargs.pop(k) for k in seed_api.RUN_ARGS if k in kwargs}
        cfg = seed_api.seed_config(curriculum_config, sparsity_config, regularization_config, **kwargs)
        args = seed_api.run_args(**run)
        return cls(cfg, args.pop("run_dir"), args.pop("device"), **args)

    # ------------------------------------------------------------------ construction helpers

    def _check_device(self) -> None:
        amp, kind = self.cfg.train.amp, self.device.type
        if amp == "none" or kind == "cuda":
            return
        if kind == "cpu" and amp == "bf16":
            if not cpu_bf16_supported():
                raise UserError("'train.amp' = 'bf16' needs a CPU with native bf16 (AVX512-BF16, AMX-BF16 or Arm "
                                "BF16); this one has none, so it would be slower than fp32; set train.amp=none")
            return
        hint = "train.amp=bf16 (CPUs with native bf16) or none" if kind == "cpu" else "train.amp=none"
        raise UserError(f"'train.amp' = {amp!r} needs CUDA on device {kind!r}; set {hint}")

    # the update rule's state, by the names the trainer had before the rules were split out (None for rules
    # without it: MaskPro's mask learning has no optimizer, schedule, scaler or EMA)
    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.update_rule.optimizer

    @property
    def ema(self):
        return self.update_rule.ema

    @property
    def scheduler(self):
        return self.update_rule.scheduler

    @property
    def scaler(self):
        return self.update_rule.scaler

    @property
    def stage(self):
        return stage_at(self.plan, self.step)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    # ------------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Train to the end (or until stopped); returns a summary dict."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        restore = self._install_signal_handlers()
        self.img_per_sec = None  # of the last logged interval, for the bar
        bar = tqdm(total=self.total_steps, initial=self.step, dynamic_ncols=True, smoothing=0.05,
                   disable=not (dist.is_main() and self.progress))
        try:
            stopped = False
            while self.step < self.total_steps and not stopped and self.early_stop.stopped_at is None:
                stopped = self._train_epoch(bar)
            if self._stop_requested and not stopped:  # the signal came after the last step's stop check
                self._stop()
                stopped = True
        finally:
            bar.close()
            restore()
            self.log.close()  # the TensorBoard event file; no metrics line follows the loop
        if stopped:
            return {"stopped": True, "step": self.step}
        return self._finish()

    def _train_epoch(self, bar) -> bool:
        """Train from the current position to the end of its epoch; True if a stop was requested."""
        self.sampler.set_epoch(self.epoch, self.step % self.steps_per_epoch)
        # Own generator: creating an iterator must not consume the global RNG (dropout), or a resumed
        # run's random stream would shift. Worker seeds only matter for datasets with random transforms.
        loader_rng = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, self.epoch, self.rank))
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.cfg.train.num_workers,
                            pin_memory=self.device.type == "cuda", generator=loader_rng)
        for images, labels in loader:
            stage = self.stage
            if stage.index != self.stage_entered:
                self._enter_stage(stage)
            loss, stop = self.train_step(images, labels if self.num_classes else None)
            self.step += 1
            if loss is not None and self.pacing.update(self.plan, self.step, loss):  # patience ended the stage
                self.plan = self.pacing.plan()
            if self.early_stop.update(self.step, loss):
                dist.print0(f"early stop at step {self.step}: the smoothed loss changed by "
                            f"{self.early_stop.last_change:.3e} (< train.early_stop_loss_change = "
                            f"{self.early_stop.threshold:g}) over the last {self.early_stop.window} steps")
            self._show_progress(bar, self.plan[stage.index], loss)
            bar.update(1)
            self._after_step(self.plan[stage.index], bar)
            if stop or (self.stop_at_step is not None and self.step >= self.stop_at_step):
                self._stop()
                return True
            if self.step >= self.total_steps or self.early_stop.stopped_at is not None:
                break
        return False

    def timesteps_for(self, stage) -> TimestepSampler:
        """The timesteps ``stage`` trains on (its range, or the matched histogram): a stateless object that the
        stage plan determines, so nothing is set at a stage start or restored after a resume."""
        if stage.index not in self._timestep_samplers:
            self._timestep_samplers[stage.index] = TimestepSampler.for_stage(
                self.diffusion, stage.t_min, stage.t_max, self.timestep_probs, self.device)
        return self._timestep_samplers[stage.index]

    @property
    def timesteps(self) -> TimestepSampler:
        """The timesteps of the stage in force: the last one entered (a pacing may end a stage early)."""
        return self.timesteps_for(self.plan[max(self.stage_entered, 0)])

    # ------------------------------------------------------------- the extensions' view

    def hook_context(self) -> HookContext:
        """What the extensions' hooks see of the trainer now (``hooks.HookContext``)."""
        return HookContext(step=self.step, model=self.model, ema_model=self.ema.model if self.ema is not None else None,
                           optimizer=self.optimizer, grad_scale=self.update_rule.grad_scale(),
                           world=self.world, run_dir=self.run_dir, device=self.device, cfg=self.cfg,
                           probe_loss=self.probe_loss, load_weights=self.load_weights)

    @torch.no_grad()
    def probe_loss(self) -> float:
        """Mean loss of a fixed batch (first images of the dataset, seeded t and ε), eval mode; same on all ranks."""
        n = min(PROBE_BATCH, self.cfg.train.batch_size, len(self.dataset))
        items = [self.dataset[i] for i in range(n)]
        x0 = torch.stack([x for x, _ in items]).to(self.device)
        # a class-conditional network is probed with the images' labels (no dropout)
        y = torch.tensor([label for _, label in items], device=self.device) if self.num_classes else None
        g = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, 0x960BE))
        t = torch.randint(0, self.diffusion.timesteps, (n,), generator=g).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            return float(self.diffusion.training_losses(model, x0, t, noise, y=y).mean())
        finally:
            model.train(was_training)

    def load_weights(self, state: dict) -> None:
        """Load ``state`` into the network (the gradient rule also restarts the EMA copy from it, 0 updates)."""
        self.update_rule.load_weights(self.model, state)

    def _enter_stage(self, stage) -> None:
        # One line per stage start in transitions.jsonl; extensions add their fields from on_stage_start.
        transition = {"step": self.step, "stage": stage.name, "stage_index": stage.index,
                      "t_range": list(self.timesteps_for(stage).time_range)}
        ctx = self.hook_context()
        for ext in self.extensions:
            transition.update(ext.on_stage_start(ctx, stage) or {})
        self.stage_entered = stage.index
        if dist.is_main():
            append_jsonl(self.run_dir / "transitions.jsonl", transition)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[float | None, bool]:
        """One step of the mode's update rule on this rank's share of the global batch (``labels``:
        class-conditional networks).

        Returns (mean unweighted per-sample loss over the global batch, whether any rank asked to stop).
        On a NaN/inf loss the step is skipped (loss None) while train.skip_nonfinite_steps allows, else
        TrainingDiverged is raised after checkpointing the last good state.
        """
        G = self.cfg.train.batch_size
        # one view for the step's hooks: the step and the grad scale stay as they are until the scaler's update
        ctx = self.hook_context() if self.extensions else None
        x0, t, noise = self._draw(images, G)
        batch = StepBatch(self.step, x0, t, noise, self._draw_labels(labels, G),
                          self.loss_weights(t) if self.loss_weights is not None else None)
        result = self.update_rule.forward(batch, ctx)
        self.loss_terms = result.terms
        status = step_status(result, self._stop_requested, self.device)
        if status.bad:
            self._skip_nonfinite_step()
            return None, status.stop
        grad_norm = self.update_rule.apply(result, status, ctx)
        self.log.add(result.per_sample, result.weights, t, grad_norm, x0.shape[0], self.loss_terms)
        return status.mean_loss, status.stop

    def _draw(self, images: torch.Tensor, global_batch: int):
        """This rank's x0, t and ε for the current step (drawn for the global batch, then sliced)."""
        g = step_generator(self.cfg.train.seed, self.step, self.device)
        lo = self.rank * (global_batch // self.world)
        sl = slice(lo, lo + global_batch // self.world)
        t = self.timesteps.sample(global_batch, device=self.device, generator=g)[sl]
        noise = torch.randn((global_batch, *self.image_shape), generator=g, device=self.device)[sl]
        x0 = images.to(self.device, non_blocking=True)
        if self.flip:
            flip = (torch.rand(global_batch, generator=g, device=self.device) < 0.5)[sl]
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        if self.cfg.model.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)
        return x0, t, noise

    def _draw_labels(self, labels: torch.Tensor | None, global_batch: int) -> torch.Tensor | None:
        """This rank's class labels, each replaced by the null label (num_classes) with probability
        train.cond_drop_prob. The drops are drawn for the global batch from a generator of (seed, step) of their own,
        so they are the same for any world size and on resume, and other draws are as without dropout."""
        if labels is None:
            return None
        y = labels.to(self.device, non_blocking=True).long()
        p = self.cfg.train.cond_drop_prob
        if p > 0:
            g = torch.Generator(device=self.device).manual_seed(mix_seed(self.cfg.train.seed, self.step, 0xC1A55))
            lo = self.rank * (global_batch // self.world)
            drop = (torch.rand(global_batch, generator=g, device=self.device) < p)[lo:lo + y.shape[0]]
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return y

    # -------------------------------------------------------------------- maintenance

    def _after_step(self, stage, bar) -> None:
        t = self.cfg.train
        # also at --stop-at-step, so the per-t sample counts of metrics.jsonl (exposure) miss no step
        last = (self.total_steps, self.stop_at_step, self.early_stop.stopped_at)
        if self.step % t.log_intv == 0 or self.step in last:
            fields = {}
            ctx = self.hook_context() if self.extensions else None
            for ext in self.extensions:
                fields.update(ext.log_fields(ctx))
            rec = self.log.flush(step=self.step, epoch=self.step / self.steps_per_epoch, stage=stage.name,
                                 t_range=list(self.timesteps.time_range), lr=self.update_rule.lr,
                                 **fields)
            if rec is not None:
                self.img_per_sec = rec["img_per_sec"]
        stage_end = self.step == stage.end_step
        epoch_end = self.step % self.steps_per_epoch == 0
        if epoch_end:
            summary = self.log.epoch_summary()  # collective: every rank calls it
            # loss alone as before, unless a weighting or a mode term makes mse (and reg) differ from it
            if not self.loss_terms and self.loss_weights is None:
                summary = {"loss": summary["loss"]}
            dist.print0(f"{self.epoch}/{self.total_steps / self.steps_per_epoch:g} epochs [{stage.name}]: "
                        + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
        if stage_end:
            ctx = self.hook_context()
            for ext in self.extensions:
                records = ext.on_stage_end(ctx, stage) or {}
                if dist.is_main():
                    for name, rec in records.items():
                        append_jsonl(self.run_dir / name, rec)
        if stage_end and self.step < self.total_steps:
            dist.print0(f"stage {stage.index + 1}/{len(self.plan)} '{stage.name}' done at step {self.step}; "
                        f"next: '{self.plan[stage.index + 1].name}'")
        grid_due = stage_end or (epoch_end and t.image_intv and self.epoch % t.image_intv == 0)
        if grid_due and self.step < self.total_steps:  # the last step's grid is the "final" one
            self.sample_grid(stage.name)
        if epoch_end and t.chkpt_intv and self.epoch % t.chkpt_intv == 0 and self.step < self.total_steps:
            self.save()

    def _show_progress(self, bar, stage, loss: float | None) -> None:
        """The bar's postfix from the first step on: this step's stage, t range and loss (global batch mean;
        "skipped" for a step skipped for a non-finite loss), and the speed of the last logged interval."""
        if bar.disable:
            return
        lo, hi = self.timesteps.time_range
        speed = f" {self.img_per_sec:.0f} img/s" if self.img_per_sec else ""
        shown = "skipped" if loss is None else f"{loss:.4f}"
        bar.set_postfix_str(f"{stage.name} t∈[{lo},{hi}] loss={shown}{speed}", refresh=False)

    def sampling_model(self):
        """The network sample grids and the final evaluation use (the EMA copy, or MaskPro's learned masks)."""
        return self.update_rule.sampling_model(self.model)

    def sample_grid(self, tag: str) -> None:
        if self.cfg.train.num_samples == 0:
            return
        if dist.is_main():
            path = self.run_dir / "samples" / f"step{self.step:08d}_{tag}.png"
            # one row per class for a conditional network (grid_labels), without guidance
            save_grid(self.diffusion, self.sampling_model(), self.grid_spec, self.cfg.train.seed, self.grid_size,
                      self.image_shape, path, self.device, nrow=self.grid_rows, labels=self.grid_labels)
        dist.barrier()

    def _stop(self) -> None:
        path = self.save()
        dist.print0(f"stopped at step {self.step}; checkpoint {path}\nresume with: python train_curriculum.py "
                    f"--run-dir {self.run_dir} --resume")

    def _skip_nonfinite_step(self) -> None:
        """A NaN/inf loss at step ``self.step + 1``: skip it while ``train.skip_nonfinite_steps`` allows (no update
        of the weights, optimizer state or EMA; the step still counts, so the next step's batch, noise and lr
        follow as usual), with a note on stdout and in metrics.jsonl; otherwise stop (``_diverged``)."""
        allowed = self.cfg.train.skip_nonfinite_steps
        if len(self.skipped_steps) >= allowed:
            self._diverged()
        self.skipped_steps.append(self.step + 1)
        self.update_rule.skip()  # gradients dropped; the lr schedule still steps, so lr stays a function of the step
        note = {"step": self.step + 1, "skipped": "non-finite loss", "stage": self.stage.name,
                "skipped_so_far": len(self.skipped_steps), "skip_nonfinite_steps": allowed}
        dist.print0(f"skipped step {self.step + 1} (stage '{self.stage.name}'): non-finite loss, no update "
                    f"({len(self.skipped_steps)} of train.skip_nonfinite_steps={allowed})")
        if dist.is_main():
            append_jsonl(self.run_dir / "metrics.jsonl", note)

    def _diverged(self) -> None:
        path = self.save()
        resume = f"python train_curriculum.py --run-dir {self.run_dir} --resume"
        raise TrainingDiverged(
            f"loss became NaN/inf at step {self.step + 1} (stage '{self.stage.name}'); last good state saved to "
            f"{path}. Resuming repeats the same step (its batch and noise are fixed by the step), so either lower "
            f"the lr: {resume} --set train.lr={self.cfg.train.lr / 10:g}, or skip that step's batch: {resume} "
            f"--set train.skip_nonfinite_steps={len(self.skipped_steps) + 1}")

    def _install_signal_handlers(self):
        """SIGINT/SIGTERM finish the current step, checkpoint and exit; a second SIGINT aborts."""
        def request_stop(signum, frame):
            self._stop_requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        try:
            old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave handlers alone
            return lambda: None
        return lambda: [signal.signal(s, h) for s, h in old.items()]

    def _finish(self) -> dict:
        """Final checkpoint, then the final grid and evaluation. A stop signal here ends the run at once
        (errors.Interrupted) with a note on what was saved; resuming the finished run redoes what is missing."""
        again = f"python train_curriculum.py --run-dir {self.run_dir} --resume"
        latest = self.run_dir / "checkpoints" / "latest"
        with interrupt_note(f"after the last step ({self.step}), while writing the final checkpoint; the newest "
                            f"complete one is named in {latest}; finish with: {again}"):
            path = self.save()
        with interrupt_note(f"during the final sample grid and evaluation; training is complete and saved in "
                            f"{path}; make the grid and eval.json with: {again}"):
            self.sample_grid("final")
            result = {"stopped": False, "step": self.step}
            if dist.is_main():
                result["eval"] = evaluate_samples(self.cfg, self.diffusion, self.sampling_model(), self.dataset,
                                                  self.device, self.run_dir / "eval.json", self.step)
            dist.barrier()
        return result

    # ------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            **self.update_rule.state_dict(),  # gradient rule: ema, ema_num_updates, optimizer, scheduler, scaler
            "step": self.step,
            "epoch": self.epoch,
            "pos_in_epoch": self.step % self.steps_per_epoch,
            "stage": self.stage.index,
            "stage_entered": self.stage_entered,
            "pacing": self.pacing.state_dict(),
            "skipped_steps": list(self.skipped_steps),
            "early_stop": self.early_stop.state_dict(),
            "extensions": {ext.name: ext.state_dict() for ext in self.extensions},
            "world_size": self.world,
            "rng": dist.all_gather_object(rng),  # one entry per rank
            "config": self.cfg.to_dict(),
        }

    def save(self) -> Path | None:
        """Checkpoint the current state (rank 0 writes; every rank joins the RNG gather)."""
        state = self.state_dict()
        path = None
        if dist.is_main():
            sidecar = {k: state[k] for k in ("step", "epoch", "pos_in_epoch", "stage", "world_size")}
            sidecar.update(stage_name=self.stage.name, mode=self.cfg.mode, config=state["config"])
            path = save_checkpoint(self.run_dir / "checkpoints", state, sidecar, self.cfg.train.keep_checkpoints)
        dist.barrier()
        return dist.broadcast_object(path)

    def _check_resumed_lengths(self, state: dict) -> None:
        """New lengths (train.steps/epochs, stage lengths) may not move what already happened."""
        if self.step > self.total_steps:
            raise UserError(f"the checkpoint is at step {self.step} but the run now lasts {self.total_steps} "
                            f"steps; resume with train.steps/train.epochs of at least that")
        saved_cfg = config_from_dict(state["config"])
        saved = PACINGS[saved_cfg.curriculum.pacing](saved_cfg, self.steps_per_epoch)
        saved.load_state_dict(state.get("pacing") or {})
        before, after = ([(s.name, s.start_step) for s in plan if s.start_step < self.step]
                         for plan in (saved.plan(), self.plan))
        if before != after:
            raise UserError(f"the new stage lengths move stages that already started (the checkpoint is at step "
                            f"{self.step}: {before}); change only stages that start at or after step {self.step}")

    def _load_state(self, state: dict) -> None:
        check_compatible(self.model, state["model"], "model")
        self.model.load_state_dict(state["model"])
        self.update_rule.load_state_dict(state)
        self.step = int(state["step"])
        self.skipped_steps = [int(s) for s in state.get("skipped_steps", [])]
        self.early_stop.load_state_dict(state.get("early_stop") or {})
        self.pacing.load_state_dict(state.get("pacing") or {})
        self.plan = self.pacing.plan()
        self._check_resumed_lengths(state)
        self.stage_entered = int(state.get("stage_entered", -1))
        saved = state.get("extensions") or {}
        for ext in self.extensions:
            if ext.name not in saved:
                raise UserError(f"the checkpoint has no state for '{ext.name}' (it was trained in another "
                                f"mode); resume with the config it was trained with")
            ext.load_state_dict(saved[ext.name])
        rngs = state.get("rng") or []
        if len(rngs) == self.world:  # exact resume; with another world size only data order is exact
            torch.set_rng_state(rngs[self.rank]["cpu"])
            if self.device.type == "cuda" and "cuda" in rngs[self.rank]:
                torch.cuda.set_rng_state(rngs[self.rank]["cuda"], self.device)


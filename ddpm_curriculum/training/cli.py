"""Command line of ``train_curriculum.py`` (the script itself only calls :func:`main`)."""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from pathlib import Path

from .. import dist
from ..atomic import remove_stale_temps
from ..config import Config, config_from_dict, load_config
from ..errors import UserError
from ..metrics.bayes import feature_window_lines
from ..modes import MODES, mode_of
from .checkpoint import latest_checkpoint, load_checkpoint
from .plan import build_plan, curriculum_layout, total_steps
from .runlock import lock_run_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a DDPM: baseline or timestep curriculum (modes C/CS/CR).")
    p.add_argument("--config-path", "--config", dest="config_path", help="experiment JSON (see configs/)")
    p.add_argument("--run-dir", help="output directory (default runs/<config-name>-<timestamp>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="resume from a checkpoint file or run directory (no PATH: latest in --run-dir)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stage plan, then exit")
    p.add_argument("--distributed", action="store_true",
                   help="accepted for the seeds' commands, no effect: several processes come from torchrun "
                        "(detected from its environment) or --num-gpus N")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="spawn this many local processes (rank i on cuda:i, or gloo on CPU); not under torchrun")
    p.add_argument("--rigid-launch", action="store_true",
                   help="accepted for the seeds' commands, no effect: --num-gpus N always spawns its processes")
    p.add_argument("--stop-at-step", type=int, help="checkpoint and stop after this global step")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads per process (default: torch's, i.e. OMP_NUM_THREADS or one per core; "
                        "on a shared machine use fewer, e.g. 1)")
    p.add_argument("--force-unlock", action="store_true",
                   help="take over the run directory's train.lock even if its holder may be alive")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: need at least 1")
    return args


def resolve(args) -> tuple[Config, dict | None]:
    """The config to train with and, when resuming, the checkpoint state."""
    if args.resume is None:
        if not args.config_path:
            raise UserError("--config-path is required (e.g. --config-path configs/quickstart.json)")
        return load_config(args.config_path, args.overrides), None
    source = args.resume or args.run_dir
    if not source:
        raise UserError("--resume without a PATH needs --run-dir (the run to continue)")
    if not args.resume and latest_checkpoint(Path(args.run_dir)) is None:
        raise UserError(f"nothing to resume: no checkpoint in {Path(args.run_dir) / 'checkpoints'}; "
                        f"drop --resume to start a new run")
    state = load_checkpoint(source)
    # The checkpoint's config is the run's config; --set may change what RESUME_RULES let take effect.
    cfg = config_from_dict(state["config"], args.overrides)
    refuse_fixed_changes(config_from_dict(state["config"]).to_dict(), cfg.to_dict())
    if args.config_path:
        given = load_config(args.config_path, args.overrides).to_dict()
        diff = _diff(cfg.to_dict(), given)
        if diff:
            dist.print0(f"note: resuming with the checkpoint's config; {args.config_path} differs in "
                        f"{', '.join(diff[:6])}{' …' if len(diff) > 6 else ''} (change them with --set)")
    return cfg, state


def _diff(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (list items by index, as ``--set`` names them)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [key for k in sorted(set(a) | set(b)) for key in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and any(isinstance(x, dict) for x in a):
        return [key for i, (x, y) in enumerate(zip(a, b, strict=True)) for key in _diff(x, y, f"{prefix}{i}.")]
    return [] if a == b else [prefix.rstrip(".")]


# What --set may change on --resume, as one ordered table: (dotted-key pattern, None if the new value takes
# effect | why it cannot). The first matching pattern decides; keys matching none are fixed. The rule: what
# is read again when training continues may change (optimisation hyper-parameters, which the trainer writes
# back into the loaded optimizer and LR schedule; lengths, which it checks against the step reached;
# intervals, logging, evaluation, where the data lives); what the checkpoint's weights, optimizer state,
# step numbering or random streams were built from is refused, since the new value would be recorded but
# not in force, or would break the exact resume.
RESUME_RULES: list[tuple[str, str | None]] = [
    ("train.lr", None), ("train.warmup", None), ("train.betas", None), ("train.weight_decay", None),
    ("train.grad_norm", None), ("train.accum_steps", None), ("train.amp", None), ("train.ema_decay", None),
    ("train.skip_nonfinite_steps", None), ("train.loss_weighting", None), ("train.min_snr_gamma", None),
    ("train.p2_k", None), ("train.p2_gamma", None),
    ("train.ema_update_every", None), ("train.ema_start_step", None), ("train.cond_drop_prob", None),
    ("train.early_stop_loss_change", None), ("train.tensorboard", None),
    ("train.early_stop_window", "the checkpointed early-stop state compares windows of the saved length"),
    ("train.early_stop_smoothing", "the checkpointed smoothed loss was averaged with the saved factor"),
    ("train.epochs", None), ("train.steps", None),
    ("curriculum.stages.*.epochs", None), ("curriculum.stages.*.steps", None),
    ("train.num_workers", None), ("train.log_intv", None), ("train.num_samples", None),
    ("train.image_intv", None), ("train.chkpt_intv", None), ("train.keep_checkpoints", None),
    ("train.sample_steps", None), ("sampler.*", None), ("eval.*", None),
    ("dataset.root", None), ("dataset.download", None), ("dataset.cache", None), ("dataset.cache_dir", None),
    ("model.channels_last", None), ("model.compile", None),
    ("mode", "the run's network, extensions and checkpoint state belong to the saved mode"),
    ("train.seed", "the data order, timesteps and noise of every step derive from it"),
    ("train.batch_size", "the steps per epoch, the data order and the position in the epoch derive from it"),
    ("train.optimizer", "the checkpoint's optimizer state belongs to the other optimizer"),
    ("train.use_ema", "the checkpoint's EMA weights were kept or not from the start"),
    ("model.*", "the checkpoint's weights have the saved architecture"),
    ("dataset.*", "the run trains on the saved dataset"),
    ("diffusion.*", "the network was trained for the saved diffusion process"),
    ("curriculum.*", "the stage layout is part of the run; only stage lengths may change"),
    *[(f"{m.section}.*", f"mode {m.name}'s state in the checkpoint was built with it")
      for m in MODES.values() if m.section],
]


def resume_rule(key: str) -> str | None:
    """None if ``key`` may change on resume, else why it cannot."""
    return next((why for pattern, why in RESUME_RULES if fnmatch.fnmatchcase(key, pattern)),
                "it is fixed when a run starts")


def refuse_fixed_changes(saved: dict, new: dict) -> None:
    """One-line UserError naming every key that ``new`` changes but RESUME_RULES keep fixed."""
    fixed = [(key, why) for key in _diff(saved, new) if (why := resume_rule(key)) is not None]
    if fixed:
        raise UserError("--resume cannot change " + "; ".join(f"{k} ({why})" for k, why in fixed)
                        + "; drop that --set, or start a new run with --config-path")


def default_run_dir(args) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    if args.resume:
        p = Path(args.resume)
        return p if p.is_dir() else p.parent.parent
    name = Path(args.config_path).stem
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def describe_plan(cfg: Config) -> str:
    """The stage plan as text: t-range (integers) and length of each stage, plus what the mode does per stage
    (active channels for CS, λ for CR) and the timestep sampler/weighting/pacing when not the defaults."""
    from .builders import make_dataset, make_diffusion
    from .sampler import ShardedBatchSampler

    try:
        dataset = make_dataset(cfg, use_cache=False)  # lists the files; decoding waits for the run
        n = len(dataset)
    except UserError as exc:
        dataset, n, spe, note = None, None, None, f"(dataset not available: {exc})"
    else:  # the real run's check, with its message (e.g. fewer samples than one batch)
        spe, note = ShardedBatchSampler(n, cfg.train.batch_size, 0, 1, cfg.train.seed).steps_per_epoch, ""
    diffusion, T, cur = make_diffusion(cfg), cfg.diffusion.timesteps, cfg.curriculum
    notes = mode_of(cfg).stage_notes(cfg) if cur.enabled else []
    where = "of T" if cur.space == "t" else "of the log-SNR range"
    lines = [f"mode: {cfg.mode}"] + _variant_lines(cfg)
    if spe:
        lines.append(f"dataset: {cfg.dataset.name}, {n} samples, {spe} steps per epoch at global batch "
                     f"{cfg.train.batch_size}; total {total_steps(cfg, spe)} steps")
        for s in build_plan(cfg, spe):
            lo, hi = diffusion.range_indices(s.t_min, s.t_max)
            lines.append(f"  stage {s.index + 1} {s.name}: t in [{lo}, {hi}] ({s.t_min:g}-{s.t_max:g} {where}, "
                         f"T={T}), steps {s.start_step}..{s.end_step - 1} ({s.num_steps} steps, "
                         f"{s.num_steps / spe:g} epochs){'; ' + notes[s.index] if notes else ''}")
        if cur.sampler == "matched_histogram":
            total = total_steps(cfg, spe)
            for s in curriculum_layout(cfg, spe):
                lo, hi = diffusion.range_indices(s.t_min, s.t_max)
                lines.append(f"  matched to {s.name}: t in [{lo}, {hi}] for {s.num_steps} steps "
                             f"({s.num_steps / total:.1%} of the run)")
    else:
        lines.append(note)
        stages = cur.stages if cur.enabled else []
        for i, s in enumerate(stages):
            lo, hi = diffusion.range_indices(s.t_min, s.t_max)
            length = f"{s.epochs} epochs" if s.epochs is not None else f"{s.steps} steps"
            lines.append(f"  stage {i + 1} {s.name or f'stage{i + 1}'}: t in [{lo}, {hi}], {length}"
                         f"{' (runs to the end)' if i == len(stages) - 1 else ''}{'; ' + notes[i] if notes else ''}")
    lines += class_lines(cfg, dataset)
    lines += feature_window_lines(cfg, diffusion)
    return "\n".join(lines)


def class_lines(cfg: Config, dataset) -> list[str]:
    """The classes with their image counts (labelled datasets), and whether the network is conditioned on them."""
    from ..data import class_counts

    counts = class_counts(dataset) if dataset is not None else None
    k = cfg.model.num_classes
    cond = f"class-conditional, {k} classes, cond_drop_prob {cfg.train.cond_drop_prob:g}" if k else "unconditional"
    if counts is None:
        return [f"model: {cond}"] if k else []
    return [f"classes ({len(counts)}; model {cond}): " + ", ".join(f"{name} {c}" for name, c in counts.items())]


def _variant_lines(cfg: Config) -> list[str]:
    cur, t = cfg.curriculum, cfg.train
    lines = []
    if cur.sampler == "matched_histogram":
        lines.append("timestep sampler: matched_histogram (t i.i.d. from the histogram the stages below would "
                     "produce over the whole run; no ordering)")
    if cur.pacing == "patience" and cur.enabled:
        lines.append(f"pacing: patience {cur.patience} steps, min_delta {cur.min_delta:g} (stage lengths below "
                     f"are maxima)")
    if t.loss_weighting != "none":
        params = f"γ={t.min_snr_gamma:g}" if t.loss_weighting == "min_snr" else f"k={t.p2_k:g}, γ={t.p2_gamma:g}"
        lines.append(f"loss weighting: {t.loss_weighting} ({params}, {cfg.diffusion.model_mean_type}-prediction)")
    return lines + mode_of(cfg).describe(cfg)


def worker(args, cfg_dict: dict, run_dir: str, resume: bool) -> int:
    """Body of every training process (single, torchrun rank or spawned rank)."""
    from .trainer import CurriculumTrainer, TrainingDiverged

    device = dist.init(args.device)
    lock = None
    try:
        cfg = config_from_dict(cfg_dict)
        state = load_checkpoint(args.resume or run_dir, for_resume=True) if resume else None
        run_dir = Path(dist.broadcast_object(str(run_dir)))
        threads = dist.set_threads(args.threads)
        lock = lock_run_dir(run_dir, args.force_unlock)  # one training per run directory; rank 0 holds it
        # temp files of killed saves: with the lock held, no other writer can own them
        if dist.is_main() and (removed := remove_stale_temps(run_dir / "checkpoints")):
            print(f"note: removed {len(removed)} temporary file(s) of interrupted checkpoint saves")
        dist.print0(f"mode {cfg.mode}, world size {dist.world_size()}, device {device}, run dir {run_dir}")
        dist.print0(f"CPU threads per process: {threads}" + ("" if args.threads else
                    " (torch's default; on a busy machine --threads 1 is often much faster)"))
        for line in _variant_lines(cfg):
            dist.print0(line)
        trainer = CurriculumTrainer(cfg, run_dir, device, resume_state=state,
                                    stop_at_step=args.stop_at_step, progress=not args.no_progress)
        if dist.is_main():  # after the trainer accepted the config (and the checkpoint): nothing unchecked recorded
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if state is not None:
            dist.print0(f"resumed at step {trainer.step} (epoch {trainer.epoch}, stage '{trainer.stage.name}')")
        trainer.train()
        return 0
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if lock is not None:
            lock.release()
        dist.cleanup()


def _spawned(args, cfg_dict, run_dir, resume):
    from ..errors import run_cli

    code = run_cli(lambda _: worker(args, cfg_dict, run_dir, resume))
    if code:
        sys.exit(code)


def _launch_notes(args) -> list[str]:
    """What the seeds' launch flags do here, when they would otherwise suggest more than happens."""
    several = args.num_gpus > 1 or (dist.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1)
    notes = []
    if args.distributed and not several:
        notes.append("--distributed alone trains one process; launch with torchrun --nproc_per_node N "
                     "or add --num-gpus N")
    if args.rigid_launch and args.num_gpus <= 1:
        notes.append("--rigid-launch has no effect without --num-gpus N (which always spawns N processes)")
    return notes


def main(argv=None) -> int:
    args = parse_args(argv)
    for note in _launch_notes(args):
        print(f"note: {note}")
    cfg, state = resolve(args)
    if state is None:  # a new run: the mode may complete its config (mode prune takes its source's architecture)
        cfg, notes = mode_of(cfg).prepare(cfg, args.dry_run)
        for note in notes:
            print(f"note: {note}")
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        print(describe_plan(cfg))
        return 0
    run_dir = default_run_dir(args)
    resume = state is not None
    if not resume and latest_checkpoint(run_dir) is not None:
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    del state  # each process loads its own copy
    if args.num_gpus > 1:
        if dist.launched_by_torchrun():
            raise UserError("--num-gpus spawns its own processes; under torchrun use --nproc_per_node instead")
        import torch.multiprocessing as mp

        try:
            dist.spawn(_spawned, args.num_gpus, (args, cfg.to_dict(), str(run_dir), resume))
        except mp.ProcessExitedException as exc:
            return exc.exit_code if exc.exit_code and exc.exit_code > 0 else 1
        return 0
    return worker(args, cfg.to_dict(), str(run_dir), resume)

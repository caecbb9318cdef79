"""Command line of ``generate.py`` (the script itself only calls :func:`main`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import dist
from ..errors import UserError, check_output_file
from .samplers import SAMPLERS, SamplerSpec


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample a trained DDPM into a folder of numbered PNGs "
                                            "(reproducible per image, resumable, torchrun-sharded).")
    p.add_argument("--chkpt-path", "--checkpoint", "--model_path", dest="checkpoint",
                   help="checkpoint file, or a run directory (its latest checkpoint)")
    p.add_argument("--pruned_model_ckpt", help="seed 003: sample this checkpoint instead of --model_path")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--no-ema", dest="use_ema", action="store_false", help="use the raw (non-EMA) weights")
    ema.add_argument("--use-ema", dest="use_ema", action="store_true", default=True,
                     help="use the EMA weights (default; falls back to raw weights when there is no EMA)")
    p.add_argument("--sampler", metavar="NAME",
                   help=f"sampler: one of {', '.join(sorted(SAMPLERS))} (sampling/samplers.py SAMPLERS); default "
                        f"ancestral, or ddim with --use-ddim (the checkpoint config's sampler block and "
                        f"train.sample_steps are not read)")
    p.add_argument("--use-ddim", action="store_true", help="DDIM instead of full ancestral DDPM sampling "
                                                           "(= --sampler ddim)")
    p.add_argument("--ddim-steps", "--subseq-size", dest="ddim_steps", type=int, default=100,
                   help="DDIM: number of timesteps visited (default 100)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM: η (0 = deterministic, 1 = DDPM-like noise)")
    p.add_argument("--skip-type", "--skip-schedule", dest="skip_type", default="uniform",
                   help="DDIM: spacing of the visited timesteps, uniform (default) or quadratic")
    # seed 003 (ddpm_sample.py) always samples with DDIM: its step/spacing options imply --use-ddim
    p.add_argument("--ddim_steps", "--num_inference_steps", dest="seed_ddim_steps", type=int,
                   help="seed 003: --use-ddim --ddim-steps N")
    p.add_argument("--skip_type", dest="seed_skip_type", help="seed 003: --use-ddim --skip-type, uniform or quad")
    p.add_argument("--t-max", type=int, help="start from this timestep (index ≤ T−1) instead of T−1")
    p.add_argument("--num-samples", "--total-size", "--total_samples", "--num_samples", dest="num_samples", type=int,
                   default=50000,
                   help="images 0 … N−1 (default 50000, the standard FID sample count)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=128, help="images per forward pass (per process)")
    p.add_argument("--seed", type=int, default=0, help="image i is a function of (seed, i)")
    p.add_argument("--save-dir", "--output_dir", dest="save_dir",
                   help="output folder (default images/eval/<dataset>/<step, weights, sampler, seed>)")
    p.add_argument("--npz", nargs="?", const="", metavar="PATH",
                   help="also write all images as uint8 NHWC under key arr_0 (default name "
                        "<save-dir>/samples_NxHxWxC.npz)")
    p.add_argument("--grid", type=int, default=64, help="images in <save-dir>/preview/grid.png (0 = none)")
    cls = p.add_mutually_exclusive_group()
    cls.add_argument("--class-label", type=int, metavar="K",
                     help="class-conditional networks: every image of class K (0 … num_classes−1)")
    cls.add_argument("--classes", choices=["balanced"],
                     help="class-conditional networks: image i has class i mod num_classes (the default)")
    p.add_argument("--guidance", type=float, default=0.0, metavar="W",
                   help="classifier-free guidance: eps = (1+W)·eps(x, y) − W·eps(x, null); 0 (default) = "
                        "conditional sampling without guidance (needs a model trained with train.cond_drop_prob > 0)")
    p.add_argument("--dataset", help="optional check: the dataset the checkpoint must have been trained on")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return seed_spellings(p.parse_args(argv))


# seed 003's --skip_type (the DDIM paper's code: uniform, quad) → this project's DDIM timestep spacing
SEED_SKIP_TYPES = {"uniform": "uniform", "quad": "quadratic", "quadratic": "quadratic"}


def seed_spellings(args: argparse.Namespace) -> argparse.Namespace:
    """Resolve seed 003's options (``ddpm_sample.py``) into the project's: ``--pruned_model_ckpt`` replaces the
    checkpoint, ``--ddim_steps`` / ``--skip_type`` select DDIM with those settings."""
    args.checkpoint = args.pruned_model_ckpt or args.checkpoint
    if not args.checkpoint:
        raise UserError("generate.py needs the network: --chkpt-path PATH (seed 003: --model_path PATH)")
    if args.seed_skip_type is not None:
        if args.seed_skip_type not in SEED_SKIP_TYPES:
            raise UserError(f"--skip_type {args.seed_skip_type!r} is not supported; choose uniform or quad "
                            f"(= --skip-type quadratic)")
        args.use_ddim, args.skip_type = True, SEED_SKIP_TYPES[args.seed_skip_type]
    if args.seed_ddim_steps is not None:
        args.use_ddim, args.ddim_steps = True, args.seed_ddim_steps
    return args


MAX_SAMPLES = 10 ** 6  # file names have six digits, so name order is index order (eval.py reads sorted names)


def _check_args(args) -> None:
    for name in ("num_samples", "batch_size", "ddim_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.num_samples > MAX_SAMPLES:
        raise UserError(f"--num-samples {args.num_samples} exceeds {MAX_SAMPLES} (images are named 000000.png "
                        f"… 999999.png); generate at most {MAX_SAMPLES} per --save-dir")
    if args.seed < 0:
        raise UserError(f"--seed must be ≥ 0, got {args.seed}")
    if args.grid < 0:
        raise UserError(f"--grid must be ≥ 0, got {args.grid}")
    if args.npz:
        check_output_file(args.npz, "--npz")


def sampler_tag(spec: SamplerSpec, timesteps: int) -> str:
    """Short folder-name form of the sampler, e.g. ``ddim100-uniform-eta0`` or ``ddpm1000`` (``SamplerSpec.tag``)."""
    return spec.tag(timesteps)


def sampler_name(args) -> str:
    """``--sampler``, or what ``--use-ddim`` (and seed 003's DDIM options) imply."""
    if args.sampler is None:
        return "ddim" if args.use_ddim else "ancestral"
    if args.use_ddim and args.sampler != "ddim":
        raise UserError(f"--sampler {args.sampler} contradicts --use-ddim (or seed 003's --ddim_steps / --skip_type, "
                        f"which imply it); drop one")
    return args.sampler


def conditioning_tag(conditioning: dict | None) -> str:
    """``-balanced-w0``, ``-class3-w1.5``, or "" for unconditional networks."""
    if conditioning is None:
        return ""
    c = conditioning["classes"]
    return f"-{'balanced' if c == 'balanced' else f'class{c}'}-w{conditioning['guidance']:g}"


def default_save_dir(net, spec: SamplerSpec, seed: int, conditioning: dict | None = None) -> Path:
    tag = sampler_tag(spec, net.diffusion.timesteps) + conditioning_tag(conditioning)
    return Path("images") / "eval" / net.config.dataset.name / f"step{net.step}-{net.weights}-{tag}-seed{seed}"


def main(argv=None) -> int:
    from ..training.checkpoint import load_network
    from .folder import check_conditioning, generate_to_folder

    args = parse_args(argv)
    _check_args(args)
    device = dist.init(args.device)
    try:
        net = load_network(args.checkpoint, use_ema=args.use_ema)
        if args.dataset and args.dataset != net.config.dataset.name:
            raise UserError(f"--dataset {args.dataset} but {net.source} was trained on "
                            f"'{net.config.dataset.name}'; drop --dataset or pick the right checkpoint")
        spec = SamplerSpec(name=sampler_name(args), steps=args.ddim_steps, eta=args.eta,
                           skip_type=args.skip_type, t_max=args.t_max)
        spec.validate(net.diffusion.timesteps)
        classes = args.class_label if args.class_label is not None else args.classes
        conditioning = check_conditioning(net, classes, args.guidance)
        save_dir = Path(args.save_dir) if args.save_dir else default_save_dir(net, spec, args.seed, conditioning)
        what = "" if conditioning is None else \
            f", classes {conditioning['classes']}, guidance w={conditioning['guidance']:g}"
        dist.print0(f"{net.source} (step {net.step}, {net.weights} weights): {args.num_samples} images with "
                    f"{spec.describe(net.diffusion.timesteps)}, seed {args.seed}{what}, batch {args.batch_size} "
                    f"× {dist.world_size()} process(es) on {device} → {save_dir}")
        res = generate_to_folder(net, spec, save_dir, args.num_samples, args.batch_size, args.seed, device,
                                 npz=args.npz, grid=args.grid, progress=not args.no_progress, classes=classes,
                                 guidance=args.guidance)
        for note in res.notes:
            dist.print0(f"note: {note}")
        for label, path in (("npz", res.npz), ("grid", res.grid)):
            if path is not None:
                dist.print0(f"{label}: {path}")
        dist.print0(f"{res.num_samples} images in {save_dir} ({res.num_samples - res.generated} kept); "
                    f"generated {res.generated} in {res.seconds:.1f} s: {res.images_per_sec:.2f} images/s")
        return 0
    finally:
        dist.cleanup()

"""Command line of ``eval.py`` (the script itself only calls :func:`main`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import dist
from ..atomic import atomic_write
from ..errors import UserError, check_output_file
from ..metrics.inception import BLOCK_DIMS, FID_WEIGHTS_NAME
from .evaluate import METRICS, EvalSettings, evaluate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FID, precision/recall, density/coverage, (twoscale) oracle "
                                            "metrics, classifier-feature FD/KID and power spectrum of generated "
                                            "images against a reference; bits/dim of a checkpoint.")
    p.add_argument("--sample-folder", "--samples", dest="samples", metavar="DIR_OR_NPZ",
                   help="generated images: a folder (top level only) or an .npz (uint8 NHWC, key arr_0)")
    ref = p.add_argument_group("reference (one of)")
    ref.add_argument("--ref-stats", metavar="FILE.npz", help="precomputed statistics (keys mu, sigma)")
    ref.add_argument("--ref-folder", metavar="DIR_OR_NPZ", help="a folder or .npz of reference images")
    ref.add_argument("--dataset-config", metavar="CONFIG", help="the dataset of an experiment JSON (statistics "
                                                              "cached, see --stats-cache)")
    ref.add_argument("--dataset", help="shorthand for a dataset with default settings, e.g. cifar10")
    p.add_argument("--ref-split", help="dataset split: train (default) or test; for nll without a reference, "
                                       "the split of the checkpoint's dataset (default test)")
    p.add_argument("--ref-samples", type=int, help="dataset references: only N images, evenly spaced over "
                                                    "the split (default all)")
    p.add_argument("--save-stats", metavar="OUT.npz", help="write mu, sigma (+ features, num_images) of the "
                                                           "reference folder/dataset, else of the samples")
    p.add_argument("--metrics", nargs="+", metavar="M",
                   help=f"any of {', '.join(METRICS)} (default fid pr dc, plus oracle for twoscale)")
    p.add_argument("--dims", type=int, default=2048,
                   help=f"Inception feature size: {', '.join(map(str, BLOCK_DIMS))} (default 2048, pool_3)")
    p.add_argument("--inception-weights", metavar="PATH",
                   help=f"{FID_WEIGHTS_NAME} (default: torch hub cache, else downloaded)")
    p.add_argument("--no-download", action="store_true", help="never download the Inception weights")
    p.add_argument("--pr-samples", type=int, default=10000,
                   help="points per side for precision/recall and density/coverage (default 10000)")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception forward (per process)")
    p.add_argument("--stats-cache", metavar="DIR", help="where dataset statistics are cached "
                                                        "(default ~/.cache/ddpm_curriculum/ref_stats)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached dataset statistics")
    p.add_argument("--json", metavar="OUT", help="write every number, the sample count and the settings here")
    fd = p.add_argument_group("fd_classifier (not FID: features of a classifier trained here)")
    fd.add_argument("--feature-net", metavar="PATH", help="weights written by scripts/train_feature_net.py")
    fd.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets (default 100)")
    fd.add_argument("--kid-subset-size", type=int, default=1000, help="KID: images per subset (default 1000)")
    p.add_argument("--spectrum-bands", type=int, default=6,
                   help="spectrum: equal-width radial bands up to Nyquist (default 6)")
    nll = p.add_argument_group("nll (bits/dim bound of a checkpoint on --ref-folder / dataset images)")
    nll.add_argument("--checkpoint", "--chkpt-path", dest="checkpoint", metavar="PATH",
                     help="checkpoint file or run directory")
    nll.add_argument("--no-ema", dest="use_ema", action="store_false", help="raw weights instead of the EMA")
    nll.add_argument("--nll-timesteps", type=int, metavar="K", help="network evaluations per image: the "
                     "decoder plus K-1 stratified KL terms (unbiased); default all T (exact)")
    nll.add_argument("--nll-samples", type=int, metavar="N", help="only the first N images (default all)")
    nll.add_argument("--nll-seed", type=int, default=0, help="seed of the noise and of the timestep picks")
    nll.add_argument("--nll-var", choices=["fixed-small", "fixed-large"],
                     help="reverse variance: posterior beta-tilde or beta (default: the checkpoint's, the sampler's)")
    nll.add_argument("--nll-no-clip", dest="nll_clip", action="store_false",
                     help="do not clamp x0_pred to [-1, 1] (the sampler clamps)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p.parse_args(argv)


def settings_from_args(args) -> EvalSettings:
    from ..config import config_from_dict, load_config

    if args.dataset_config and args.dataset:
        raise UserError("give --dataset-config or --dataset, not both")
    cfg = None
    if args.dataset_config:
        cfg = load_config(args.dataset_config)
    elif args.dataset:  # a config that only names the dataset (the train length is required, not used)
        cfg = config_from_dict({"dataset": {"name": args.dataset}, "train": {"steps": 1}})
    metrics = None if args.metrics is None else [m for item in args.metrics for m in item.split(",") if m]
    if args.ref_samples is not None and (args.ref_samples < 1 or cfg is None):
        raise UserError("--ref-samples N takes the first N ≥ 1 images of a --dataset-config/--dataset reference; "
                        "for a folder, copy the images you want into one")
    return EvalSettings(samples=args.samples, ref_stats=args.ref_stats, ref_folder=args.ref_folder,
                        dataset_config=cfg, ref_split=args.ref_split or "train", ref_samples=args.ref_samples,
                        save_stats=args.save_stats, metrics=metrics, dims=args.dims,
                        inception_weights=args.inception_weights, download=not args.no_download,
                        pr_samples=args.pr_samples, batch_size=args.batch_size,
                        stats_cache="" if args.no_cache else args.stats_cache, progress=not args.no_progress,
                        feature_net=args.feature_net, kid_subsets=args.kid_subsets,
                        kid_subset_size=args.kid_subset_size, spectrum_bands=args.spectrum_bands,
                        checkpoint=args.checkpoint, use_ema=args.use_ema, nll_timesteps=args.nll_timesteps,
                        nll_samples=args.nll_samples, nll_seed=args.nll_seed, nll_var=args.nll_var,
                        nll_clip=args.nll_clip, nll_split=args.ref_split or "test")


LABELS = {"fid": "FID", "precision": "precision (k=3)", "recall": "recall (k=3)", "density": "density (k=5)",
          "coverage": "coverage (k=5)", "fd_classifier": "FD, classifier features (not FID)",
          "kid_classifier": "KID, classifier features", "kid_classifier_std": "  its std over subsets",
          "spectrum_high_log10_ratio": "spectrum log10 power ratio, high band", "spectrum_high_error":
          "spectrum high-band error |log10 ratio|", "nll_bpd": "NLL bound (bits/dim)",
          "nll_bpd_sem": "  std error over images", "nll_bpd_subsample_sem": "  of which timestep subsampling",
          "nll_prior_bpd": "  prior term L_T", "nll_kl_bpd": "  KL terms", "nll_decoder_bpd": "  decoder term L_0"}


def format_table(result: dict) -> str:
    """The result as aligned text: what was compared, on which features, then one metric per line."""
    lines = []
    if result["samples"]:
        s = result["samples"]
        h, w, c = s["image_shape_hwc"]
        lines.append(f"samples     {s['source']} ({s['num_images']} images, {w}x{h}x{c})")
    if result["reference"]:
        r = result["reference"]
        count = f" ({r['num_images']} images)" if r["num_images"] else ""
        cache = f"; statistics cached in {r['cache']}" if r["cache"] else ""
        lines.append(f"reference   {r['source']}{count}{cache}")
    st = result["settings"]
    if set(st["metrics"]) & {"fid", "pr", "dc"}:
        pts = st["pr_points"]
        pr = f"; precision/recall/density/coverage on {pts[0]} vs {pts[1]} points" if pts else ""
        lines.append(f"features    {st['features']}{pr}")
    rows = [(LABELS[k], v) for k, v in result["metrics"].items() if k in LABELS]
    rows += [(f"oracle {k}", v) for k, v in result["metrics"].get("oracle", {}).items() if k != "num_samples"]
    width = max([len(k) for k, _ in rows], default=0)
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in rows]
    if "spectrum_log10_ratio" in result["metrics"]:
        edges = st["spectrum"]["band_edges"]
        bands = "  ".join(f"({lo:.2f},{hi:.2f}] {v:+.3f}" for lo, hi, v in
                          zip(edges[:-1], edges[1:], result["metrics"]["spectrum_log10_ratio"], strict=True))
        lines.append(f"spectrum log10 ratio per band (r / Nyquist): {bands}")
    if "nll" in st:
        n = st["nll"]
        lines.append(f"nll on {result['metrics']['nll_num_images']} images of {n['images']}, {n['var_type']} "
                     f"variance, {n['estimator']}")
    lines += [f"note: {n}" for n in result["notes"]]
    if result.get("saved_stats"):
        lines.append(f"statistics saved to {result['saved_stats']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    for flag, path in (("--json", args.json), ("--save-stats", args.save_stats)):
        if path:
            check_output_file(path, flag)
    device = dist.init(args.device)
    try:
        result = evaluate(settings, device)
        if dist.is_main():
            print(format_table(result), flush=True)
            if args.json:
                path = Path(args.json)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda f: f.write(json.dumps(result, indent=2).encode()))
                print(f"json: {path}", flush=True)
        return 0
    finally:
        dist.cleanup()

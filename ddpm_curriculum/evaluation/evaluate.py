"""One evaluation: samples vs a reference → FID, precision/recall, density/coverage, twoscale oracle metrics.

Collective under torchrun (feature extraction is split over ranks); the metrics themselves are computed on
rank 0, and only rank 0's return value carries them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dist
from ..errors import UserError
from ..metrics.fid import frechet_distance, save_stats
from ..metrics.inception import BLOCK_DIMS, FEATURE_NAMES, find_weights, load_fid_inception
from ..metrics.prdc import prdc
from . import reference as refs
from .features import extract_features
from .sources import open_images

METRICS = ("fid", "pr", "dc", "oracle")
INCEPTION_METRICS = {"fid", "pr", "dc"}
PR_K, DC_K = 3, 5


@dataclass
class EvalSettings:
    samples: str | None = None  # folder or .npz
    ref_stats: str | None = None
    ref_folder: str | None = None
    dataset_config: object | None = None  # a Config (from --dataset-config or --dataset)
    ref_split: str = "train"
    ref_samples: int | None = None
    save_stats: str | None = None
    metrics: list[str] | None = None  # None: fid, pr, dc (+ oracle for twoscale)
    dims: int = 2048
    inception_weights: str | None = None
    download: bool = True
    pr_samples: int = 10000
    batch_size: int = 50
    stats_cache: str | None = None  # None: refs.default_cache_dir(); "" disables caching
    progress: bool = True


def choose_metrics(s: EvalSettings) -> list[str]:
    twoscale = s.dataset_config is not None and s.dataset_config.dataset.name == "twoscale"
    if s.metrics is None:
        metrics = ["fid", "pr", "dc"] + (["oracle"] if twoscale else [])
    else:
        metrics = list(dict.fromkeys(s.metrics))
        bad = [m for m in metrics if m not in METRICS]
        if bad:
            raise UserError(f"unknown metric(s) {bad}; choose from {list(METRICS)}")
    if "oracle" in metrics and not twoscale:
        raise UserError("oracle metrics need a twoscale reference: pass --dataset-config with a twoscale config")
    return metrics


def check_settings(s: EvalSettings) -> None:
    refs_given = [n for n, v in (("--ref-stats", s.ref_stats), ("--ref-folder", s.ref_folder),
                                 ("--dataset-config/--dataset", s.dataset_config)) if v is not None]
    if len(refs_given) > 1:
        raise UserError(f"give one reference, not {' and '.join(refs_given)}")
    if s.samples is None and not (s.save_stats and refs_given):
        raise UserError("nothing to do: pass --sample-folder (and a reference), or a reference with "
                        "--save-stats OUT.npz to precompute its statistics")
    if s.samples is not None and not refs_given and not s.save_stats:
        raise UserError("no reference: pass --ref-stats FILE.npz, --ref-folder DIR or --dataset-config CONFIG")
    if s.ref_split not in ("train", "test"):
        raise UserError(f"--ref-split {s.ref_split}: choose train or test")
    if s.dims not in BLOCK_DIMS:
        raise UserError(f"--dims {s.dims} is not an Inception feature size; choose from {list(BLOCK_DIMS)}")
    for name in ("batch_size", "pr_samples"):
        if getattr(s, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1")
    if s.pr_samples <= max(PR_K, DC_K):
        raise UserError(f"--pr-samples must exceed {max(PR_K, DC_K)} (the nearest-neighbour k)")


def load_inception(s: EvalSettings, device):
    """The FID Inception on ``device``; rank 0 resolves (and maybe downloads) the weights for everyone."""
    found, error = None, None
    if dist.is_main():
        try:
            found = str(find_weights(s.inception_weights, s.download))
        except UserError as exc:
            error = str(exc)
    found, error = dist.broadcast_object((found, error))
    if error:
        twoscale = s.dataset_config is not None and s.dataset_config.dataset.name == "twoscale"
        raise UserError(error + ("; for twoscale, --metrics oracle needs no Inception" if twoscale else ""))
    return load_fid_inception(found, device), found


def _check_count(n: int, dims: int, what: str) -> None:
    if n <= dims:
        raise UserError(f"{n} {what} give a singular covariance at {dims} dims (need more than {dims}); use "
                        f"more images or a smaller --dims ({', '.join(str(d) for d in BLOCK_DIMS if d < n)})"
                        if any(d < n for d in BLOCK_DIMS) else
                        f"{n} {what} are too few for a covariance at any --dims (need more than 64)")


def _check_shapes(samples, ref_shape) -> None:
    if samples is not None and tuple(samples.shape) != tuple(ref_shape):
        raise UserError(f"samples are {_shape(samples.shape)} but the reference images are {_shape(ref_shape)}; "
                        f"compare images of one size (resize the reference or pick the matching dataset)")


def _shape(shape) -> str:
    h, w, c = shape
    return f"{w}x{h}x{c}"


def _needs_covariance(s: EvalSettings, metrics) -> bool:
    return "fid" in metrics or s.save_stats is not None


def _reference(s: EvalSettings, metrics, samples, extract, keep: int, weights: str | None):
    """Build the reference (statistics computed through ``extract``, or read from a file / the cache)."""
    from .sources import DatasetImages

    if s.ref_stats:
        return refs.from_stats_file(s.ref_stats, s.dims)
    if s.ref_folder:
        source = open_images(s.ref_folder)
    elif s.dataset_config is not None:
        source = DatasetImages(s.dataset_config, s.ref_split, s.ref_samples)
    else:
        return None
    _check_shapes(samples, source.shape)
    if extract is not None and _needs_covariance(s, metrics):
        _check_count(len(source), s.dims, "reference images")
    if s.ref_folder or extract is None or s.stats_cache == "":
        return refs.from_images(source, extract, keep)
    cache = Path(s.stats_cache) if s.stats_cache else refs.default_cache_dir()
    return refs.from_dataset(source, s.dataset_config, s.ref_split, s.ref_samples, extract, keep, s.dims,
                             cache, refs.file_fingerprint(weights))


def _prdc_metrics(s, metrics, sample_feats, ref, device, notes: list) -> tuple[dict, list[int] | None]:
    if ref.features is None or len(ref.features) <= DC_K:
        notes.append("precision/recall/density/coverage not computed: the reference has no features (a "
                     "statistics file without 'features'); use --ref-folder, --dataset-config or a file "
                     "written by --save-stats")
        return {}, None
    n_fake, n_real = min(s.pr_samples, len(sample_feats)), min(s.pr_samples, len(ref.features))
    if n_fake <= DC_K:
        raise UserError(f"{n_fake} samples are too few for precision/recall (need more than {DC_K})")
    vals = prdc(ref.features[:n_real].to(device), sample_feats[:n_fake].to(device), PR_K, DC_K)
    wanted = (["precision", "recall"] if "pr" in metrics else []) + \
        (["density", "coverage"] if "dc" in metrics else [])
    return {k: vals[k] for k in wanted}, [n_fake, n_real]


def _oracle(samples, dataset) -> dict:
    from ..metrics.oracle import twoscale_oracle_metrics
    from ..sampling import from_uint8

    return twoscale_oracle_metrics(from_uint8(torch.from_numpy(samples.load(range(len(samples)))), torch.float64),
                                   dataset)


def evaluate(s: EvalSettings, device) -> dict:
    """Run the evaluation described by ``s``; collective. Returns the result dict (metrics on rank 0)."""
    check_settings(s)
    metrics = choose_metrics(s)
    samples = open_images(s.samples) if s.samples else None
    need_features = bool(INCEPTION_METRICS & set(metrics)) or s.save_stats is not None
    if samples is not None and _needs_covariance(s, metrics):
        _check_count(len(samples), s.dims, "sample images")
    if s.ref_stats:  # cheap checks before any feature extraction
        refs.from_stats_file(s.ref_stats, s.dims)
    model, weights = load_inception(s, device) if need_features else (None, None)
    keep = s.pr_samples if need_features and ({"pr", "dc"} & set(metrics) or s.save_stats) else 0

    def extract(source, keep_n, desc):
        return extract_features(source, model, s.dims, s.batch_size, device, keep_n, s.progress, desc)

    ref = _reference(s, metrics, samples, extract if model is not None else None, keep, weights)
    sample_feats = extract(samples, keep, "sample features") if samples is not None and model else None
    result = _describe(s, metrics, samples, ref, weights)
    if dist.is_main():
        result["saved_stats"] = _save_requested_stats(s, ref, sample_feats, samples)
        if samples is not None and ref is not None:
            result["metrics"], result["settings"]["pr_points"] = \
                _compute(s, metrics, samples, sample_feats, ref, device, result["notes"])
    return result


def _compute(s, metrics, samples, sample_feats, ref, device, notes) -> tuple[dict, list | None]:
    out, pr_points = {}, None
    if "fid" in metrics:
        mu, sigma = sample_feats.stats.mean_cov()
        out["fid"] = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    if {"pr", "dc"} & set(metrics):
        vals, pr_points = _prdc_metrics(s, metrics, sample_feats.kept, ref, device, notes)
        out.update(vals)
    if "oracle" in metrics:
        out["oracle"] = _oracle(samples, ref.dataset)
    return out, pr_points


def _save_requested_stats(s, ref, sample_feats, samples) -> str | None:
    """``--save-stats``: the reference's statistics when it is a folder/dataset, else the samples'."""
    if not s.save_stats:
        return None
    if ref is not None and ref.mu is not None and not s.ref_stats:
        mu, sigma, feats, n = ref.mu, ref.sigma, ref.features, ref.num_images
    else:
        (mu, sigma), feats, n = sample_feats.stats.mean_cov(), sample_feats.kept, len(samples)
    return str(save_stats(s.save_stats, mu, sigma, features=feats.numpy(), num_images=n))


def _describe(s, metrics, samples, ref, weights) -> dict:
    return {
        "samples": None if samples is None else {"source": samples.description, "num_images": len(samples),
                                                  "image_shape_hwc": list(samples.shape)},
        "reference": None if ref is None else {"source": ref.description, "num_images": ref.num_images,
                                              "cache": None if ref.cache is None else str(ref.cache)},
        "settings": {"metrics": metrics, "dims": s.dims,
                     "features": f"Inception-v3 {FEATURE_NAMES[s.dims]}, {s.dims}-d (pytorch-fid FID weights)",
                     "inception_weights": weights, "batch_size": s.batch_size, "world_size": dist.world_size(),
                     "pr_k": PR_K, "dc_k": DC_K, "pr_samples": s.pr_samples, "pr_points": None},
        "metrics": {},
        "notes": [],
    }

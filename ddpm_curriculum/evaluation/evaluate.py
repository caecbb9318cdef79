"""One evaluation: samples vs a reference → FID, precision/recall, density/coverage, twoscale oracle metrics,
Fréchet distance / KID in a trained classifier's features (``fd_classifier``), the radial power spectrum
(``spectrum``); and a checkpoint's bits/dim bound on held-out images (``nll``).

Every metric is an entry of ``METRICS``: what it needs (samples, reference images, Inception, …), an optional
collective ``prepare`` step run on every rank, and ``compute``, run on rank 0. Collective under torchrun
(feature extraction is split over ranks); only rank 0's return value carries the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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
    feature_net: str | None = None  # fd_classifier: a scripts/train_feature_net.py weights file
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    spectrum_bands: int = 6
    checkpoint: str | None = None  # nll: checkpoint file or run directory
    use_ema: bool = True
    nll_timesteps: int | None = None  # K network evaluations per image; None = all T
    nll_samples: int | None = None  # the first N images; None = all
    nll_seed: int = 0
    nll_var: str | None = None  # fixed-small / fixed-large; None = the checkpoint's (the sampler's)
    nll_clip: bool = True  # clamp x0_pred to [−1, 1] as the sampler does
    nll_split: str = "test"  # split of the checkpoint's dataset when no reference is given


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


def _needing(metrics, need: str) -> list[str]:
    return [m for m in metrics if need in METRICS[m].needs]


def check_settings(s: EvalSettings, metrics) -> None:
    refs_given = [n for n, v in (("--ref-stats", s.ref_stats), ("--ref-folder", s.ref_folder),
                                 ("--dataset-config/--dataset", s.dataset_config)) if v is not None]
    if len(refs_given) > 1:
        raise UserError(f"give one reference, not {' and '.join(refs_given)}")
    with_samples = _needing(metrics, "samples")
    without = [m for m in metrics if m not in with_samples]
    if s.samples is None and without and with_samples and s.metrics is not None and not s.save_stats:
        raise UserError(f"--metrics {' '.join(with_samples)} compare samples: pass --sample-folder, or drop them")
    if s.samples is None and not without and not (s.save_stats and refs_given):
        raise UserError("nothing to do: pass --sample-folder (and a reference), or a reference with "
                        "--save-stats OUT.npz to precompute its statistics")
    if s.samples is not None and with_samples and not refs_given and not s.save_stats:
        raise UserError("no reference: pass --ref-stats FILE.npz, --ref-folder DIR or --dataset-config CONFIG")
    if s.ref_split not in ("train", "test") or s.nll_split not in ("train", "test"):
        raise UserError(f"--ref-split {s.ref_split}: choose train or test")
    if s.dims not in BLOCK_DIMS:
        raise UserError(f"--dims {s.dims} is not an Inception feature size; choose from {list(BLOCK_DIMS)}")
    for name in ("batch_size", "pr_samples", "kid_subsets", "kid_subset_size"):
        if getattr(s, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1")
    if s.pr_samples <= max(PR_K, DC_K):
        raise UserError(f"--pr-samples must exceed {max(PR_K, DC_K)} (the nearest-neighbour k)")
    if s.ref_stats and _needing(metrics, "ref_images"):
        raise UserError(f"--metrics {' '.join(_needing(metrics, 'ref_images'))} need reference images, not "
                        f"statistics: pass --ref-folder or --dataset-config")
    if _needing(metrics, "feature_net") and not s.feature_net:
        raise UserError("--metrics fd_classifier needs --feature-net PATH (train one with "
                        "scripts/train_feature_net.py)")
    if _needing(metrics, "checkpoint") and not s.checkpoint:
        raise UserError("--metrics nll needs --checkpoint PATH (a checkpoint file or run directory)")
    if s.nll_samples is not None and s.nll_samples < 1:
        raise UserError("--nll-samples must be ≥ 1")


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


def _needs_covariance(s: EvalSettings, metrics) -> bool:  # Inception statistics
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


@dataclass
class Context:
    """What the metrics of one evaluation share."""

    s: EvalSettings
    metrics: list
    samples: object | None  # image source
    ref: object | None  # refs.Reference
    sample_feats: object | None  # Inception Features of the samples
    device: object
    notes: list
    settings: dict  # the result's "settings" (metrics may add their own entries)
    state: dict = field(default_factory=dict)  # what prepare steps hand to compute steps


def evaluate(s: EvalSettings, device) -> dict:
    """Run the evaluation described by ``s``; collective. Returns the result dict (metrics on rank 0)."""
    metrics = choose_metrics(s)
    check_settings(s, metrics)
    samples = open_images(s.samples) if s.samples and (_needing(metrics, "samples") or s.save_stats) else None
    need_features = bool(_needing(metrics, "inception")) or s.save_stats is not None
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
    ctx = Context(s, metrics, samples, ref, sample_feats, device, result["notes"], result["settings"])
    ready = [m for m in metrics if (samples is not None and ref is not None) or "samples" not in METRICS[m].needs]
    for m in ready:  # collective steps (feature extraction), on every rank
        if METRICS[m].prepare is not None:
            METRICS[m].prepare(ctx)
    if dist.is_main():
        result["saved_stats"] = _save_requested_stats(s, ref, sample_feats, samples)
        for m in ready:
            result["metrics"].update(METRICS[m].compute(ctx))
    return result


# ----- the metrics -----

def _fid(ctx: Context) -> dict:
    mu, sigma = ctx.sample_feats.stats.mean_cov()
    return {"fid": frechet_distance(mu, sigma, ctx.ref.mu, ctx.ref.sigma)}


def _prdc_values(ctx: Context) -> dict:
    """precision, recall, density and coverage, computed once for pr and dc."""
    if "prdc" not in ctx.state:
        vals, ctx.settings["pr_points"] = _prdc_metrics(ctx.s, ctx.metrics, ctx.sample_feats.kept, ctx.ref,
                                                        ctx.device, ctx.notes)
        ctx.state["prdc"] = vals
    return ctx.state["prdc"]


def _pr(ctx: Context) -> dict:
    return {k: v for k, v in _prdc_values(ctx).items() if k in ("precision", "recall")}


def _dc(ctx: Context) -> dict:
    return {k: v for k, v in _prdc_values(ctx).items() if k in ("density", "coverage")}


def _oracle_metric(ctx: Context) -> dict:
    return {"oracle": _oracle(ctx.samples, ctx.ref.dataset)}


def _fd_classifier_prepare(ctx: Context) -> None:
    """Collective: the feature net's penultimate features of both sides (statistics + kept rows for KID)."""
    from ..metrics.feature_net import FeatureExtractor, load_feature_net

    s = ctx.s
    net, meta = load_feature_net(s.feature_net)
    extractor = FeatureExtractor(net.to(ctx.device), meta, s.feature_net)
    extractor.check_shape(ctx.samples.shape, "samples")
    extractor.check_shape(ctx.ref.source.shape, "reference images")
    feats = [extract_features(src, extractor, extractor.dims, s.batch_size, ctx.device, s.pr_samples, s.progress,
                              f"{what} classifier features")
             for src, what in ((ctx.samples, "sample"), (ctx.ref.source, "reference"))]
    ctx.state["fd_classifier"] = (feats, meta)


def _fd_classifier(ctx: Context) -> dict:
    from ..metrics.feature_net import fd_kid

    (fake, real), meta = ctx.state["fd_classifier"]
    s = ctx.s
    dims = fake.stats.dims
    ctx.settings["feature_net"] = {"path": s.feature_net, "feature_dim": dims,
                                   "test_accuracy": meta.get("test_accuracy"), "classes": meta.get("classes"),
                                   "data": meta.get("data"), "kid_points": [len(fake.kept), len(real.kept)],
                                   "kid_subsets": s.kid_subsets,
                                   "kid_subset_size": min(s.kid_subset_size, len(fake.kept), len(real.kept))}
    ctx.notes.append("fd_classifier is not FID: a Fréchet distance in the features of the trained classifier "
                     f"{s.feature_net}, comparable only between evaluations with that file")
    if fake.stats.n <= dims or real.stats.n <= dims:
        ctx.notes.append(f"fd_classifier: fewer images than its {dims} feature dims, so a covariance is "
                         f"singular; the distance is biased (use more images)")
    return fd_kid(fake.stats, fake.kept.numpy(), real.stats, real.kept.numpy(), s.kid_subsets, s.kid_subset_size)


def _spectrum(ctx: Context) -> dict:
    from ..metrics.spectrum import compare_spectra, spectrum_stats

    gen = spectrum_stats(ctx.samples, ctx.s.spectrum_bands, ctx.s.batch_size)
    real = spectrum_stats(ctx.ref.source, ctx.s.spectrum_bands, ctx.s.batch_size)
    out = compare_spectra(gen, real)
    ctx.settings["spectrum"] = {"bands": ctx.s.spectrum_bands, "band_edges": out.pop("spectrum_band_edges"),
                                "high_band": "r in (2/3, 1] of Nyquist", "channels": "per-channel mean",
                                "images": [gen.n // ctx.samples.shape[2], real.n // ctx.ref.source.shape[2]]}
    return out


class _FirstImages:
    """The first ``n`` images of a source."""

    def __init__(self, source, n: int | None):
        self.source, self.shape = source, source.shape
        self.n = len(source) if n is None else min(n, len(source))
        self.description = source.description

    def __len__(self) -> int:
        return self.n

    def load(self, indices):
        return self.source.load(indices)


def _nll_prepare(ctx: Context) -> None:
    """Load the checkpoint and pick the held-out images; checks on every rank, before any work."""
    from ..metrics.likelihood import check_timesteps, with_var_type
    from ..training.builders import image_shape
    from ..training.checkpoint import load_network
    from .sources import DatasetImages

    s = ctx.s
    net = load_network(s.checkpoint, use_ema=s.use_ema)
    source = ctx.ref.source if ctx.ref is not None and ctx.ref.source is not None else \
        DatasetImages(net.config, s.nll_split)
    c, h, w = image_shape(net.config)
    if tuple(source.shape) != (h, w, c):
        raise UserError(f"nll images ({source.description}) are {_shape(source.shape)} but {net.source} models "
                        f"{_shape((h, w, c))}; evaluate it on images of its dataset")
    k = check_timesteps(net.diffusion.timesteps, s.nll_timesteps)
    ctx.state["nll"] = (net, with_var_type(net.diffusion, s.nll_var), _FirstImages(source, s.nll_samples), k)


def _nll(ctx: Context) -> dict:
    from ..metrics.likelihood import nll_bpd

    net, diffusion, images, k = ctx.state["nll"]
    s = ctx.s
    res = nll_bpd(diffusion, net.model.to(ctx.device), images, k, s.nll_seed, s.batch_size, ctx.device,
                  s.nll_clip, s.progress)
    ctx.settings["nll"] = {"checkpoint": str(net.source), "step": net.step, "weights": net.weights,
                           "images": images.description, "var_type": diffusion.var_type,
                           "clip_denoised": s.nll_clip, "timesteps": k, "seed": s.nll_seed,
                           "estimator": "exact sum" if k == diffusion.timesteps else
                           f"prior + decoder exact, {k - 1} stratified KL timesteps of {diffusion.timesteps - 1}"}
    return res.to_dict()


@dataclass(frozen=True)
class Metric:
    compute: Callable[[Context], dict]  # rank 0
    needs: frozenset  # samples, inception, ref_images, feature_net, checkpoint
    prepare: Callable[[Context], None] | None = None  # collective, every rank, before compute


_SAMPLE_METRIC = frozenset({"samples", "inception"})
METRICS = {
    "fid": Metric(_fid, _SAMPLE_METRIC),
    "pr": Metric(_pr, _SAMPLE_METRIC),
    "dc": Metric(_dc, _SAMPLE_METRIC),
    "oracle": Metric(_oracle_metric, frozenset({"samples"})),
    "fd_classifier": Metric(_fd_classifier, frozenset({"samples", "ref_images", "feature_net"}),
                            _fd_classifier_prepare),
    "spectrum": Metric(_spectrum, frozenset({"samples", "ref_images"})),
    "nll": Metric(_nll, frozenset({"checkpoint"}), _nll_prepare),
}


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

"""Score one checkpoint for an experiment: held-out denoising loss and the dataset's sample metrics.

Everything random here is drawn from ``settings.seed``, never from the run's seed, so every arm and every
seed is scored on the same held-out images, timesteps, noise and initial sample noise: differences between
checkpoints are differences between networks.

- ``val_loss``: the unweighted per-sample training loss (ε-MSE for ε-prediction) of the EMA network on
  ``val_samples`` held-out images evenly spaced over the dataset's ``test`` split, t uniform over 0..T−1;
  ``val_loss_low_t`` and ``val_loss_high_t`` are its means over t < 0.2·T (fine detail, the curriculum's last stage) and
  t ≥ 0.8·T (the curriculum's first stage). Lower is better; it is the quantity training minimises, so it
  is the low-variance signal.
- ``tki_<t>`` / ``tki_mse_<t>`` (twoscale): the template-knowledge index at each of ``settings.tki_t`` on the
  first ``tki_samples`` held-out images (``metrics.bayes.template_knowledge_index``: 1 = recovers the true
  minor template as well as the Bayes-optimal denoiser, 0 = no better than knowing only the minor power;
  ``tki_mse`` is the error-based variant, which an untrained "ε̂ = 0" network cannot game).
- ``minor_amplitude_excess_norm`` (twoscale): the floor-corrected minor amplitude divided by the ceiling's, i.e.
  by what the exact Bayes denoiser scores through the same sampler, sample count, noise and quantisation
  (``metrics.bayes.ceiling_metrics``, computed once per process and setting): 1 = as good as a perfect denoiser.
- Samples: images 0 … num_samples−1 exactly as ``generate.py --seed <eval seed>`` makes them with the grid's
  ``eval.sampler`` block, or ``eval.sample_steps`` (DDIM, η = 0, or ancestral) when it names none, quantised
  like saved PNGs, scored with the twoscale oracle metrics when the dataset is twoscale, and with FID (eval.py's
  code) when the grid's ``eval.fid_ref`` names a reference.
- Opt-in (``eval.metrics``, evaluation/extra.py): ``nll_*`` (bits/dim bound on ``nll_samples`` test
  images, ``nll_timesteps`` stratified terms, seeded by the eval seed), ``spectrum_*`` (the samples' radial
  power spectrum against ``ref_samples`` training images; both evenly spaced) and ``fd_classifier`` / ``kid_classifier``
  (in ``feature_net``'s features; not FID).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..data import evenly_spaced
from ..training import builders
from ..training.checkpoint import load_network
from ..training.reporting import eval_samples
from .grid import GridEvalConfig, eval_spec

LOW_T, HIGH_T = 0.2, 0.8  # the seeds' last and first curriculum stage boundaries, as fractions of T


@torch.no_grad()
def validation_losses(net, settings: GridEvalConfig, device, batch_size: int = 256) -> dict[str, float]:
    """Held-out denoising loss overall and in the low-t / high-t regimes (see the module docstring)."""
    cfg, diffusion, model = net.config, net.diffusion, net.model
    test = builders.make_dataset(cfg, split="test")
    picks = evenly_spaced(len(test), settings.val_samples)
    n = len(picks)
    g = torch.Generator().manual_seed(settings.seed)
    T = diffusion.timesteps
    t = torch.randint(0, T, (n,), generator=g)
    losses = []
    for lo in range(0, n, batch_size):
        idx = range(lo, min(n, lo + batch_size))
        x0 = torch.stack([test[picks[i]][0] for i in idx])
        noise = torch.randn(x0.shape, generator=g)
        losses.append(diffusion.training_losses(model, x0.to(device), t[lo:lo + len(idx)].to(device),
                                                noise.to(device)).double().cpu())
    loss = torch.cat(losses)
    low, high = t < LOW_T * T, t >= HIGH_T * T
    return {"val_loss": loss.mean().item(), "val_loss_low_t": loss[low].mean().item(),
            "val_loss_high_t": loss[high].mean().item()}


def sample_metrics(net, settings: GridEvalConfig, device) -> dict[str, float]:
    """Images 0 … num_samples−1 of ``generate.py --seed settings.seed``, scored: twoscale oracle metrics for a
    twoscale run, FID when ``settings.fid_ref`` is set, and the opt-in ``settings.metrics``."""
    from ..evaluation.extra import extra_metrics, needs_samples

    cfg = net.config
    twoscale = cfg.dataset.name == "twoscale"
    if not (twoscale or settings.fid_ref or settings.metrics):
        return {}
    images = None
    if twoscale or settings.fid_ref or needs_samples(settings):
        images = eval_samples(net.diffusion, net.model, builders.image_shape(cfg), settings.num_samples,
                              eval_spec(settings), settings.seed, settings.batch_size, device)
    metrics = extra_metrics(settings, cfg, net.diffusion, net.model, images, settings.seed, device) \
        if settings.metrics else {}
    if twoscale:
        from ..metrics.oracle import twoscale_oracle_metrics
        from ..sampling import from_uint8

        metrics.update(twoscale_oracle_metrics(from_uint8(images), builders.make_dataset(cfg)))
        metrics.pop("num_samples")
        best = ceiling(net, settings)["minor_amplitude_excess"]
        metrics["minor_amplitude_excess_norm"] = metrics["minor_amplitude_excess"] / best
    if settings.fid_ref:
        metrics["fid"] = sample_fid(images, cfg, settings, device)
    return metrics


_CEILINGS: dict = {}  # (dataset, diffusion, sampling settings) → the ceiling's oracle metrics, per process


def ceiling(net, settings: GridEvalConfig) -> dict:
    """Oracle metrics of the exact Bayes denoiser's samples under ``settings`` (metrics/bayes.py), cached."""
    from ..metrics.bayes import ceiling_metrics

    cfg = net.config
    key = (json.dumps(cfg.to_dict()["dataset"], sort_keys=True), json.dumps(cfg.to_dict()["diffusion"], sort_keys=True),
           settings.num_samples, eval_spec(settings), settings.seed, settings.batch_size)
    if key not in _CEILINGS:
        _CEILINGS[key] = ceiling_metrics(net.diffusion, builders.make_dataset(cfg), settings.num_samples,
                                         eval_spec(settings), settings.seed, settings.batch_size)
    return _CEILINGS[key]


def sample_fid(images: torch.Tensor, cfg, settings: GridEvalConfig, device) -> float:
    """FID of uint8 ``images`` against ``settings.fid_ref`` — computed by eval.py's code on the same images
    ``generate.py`` would save, so it equals ``eval.py --sample-folder … --ref-…`` on them."""
    import tempfile

    import numpy as np

    from ..evaluation import EvalSettings, evaluate

    ref = settings.fid_ref
    where = ({"dataset_config": cfg} if ref == "dataset" else {"ref_stats": ref} if ref.endswith(".npz")
             else {"ref_folder": ref})
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/samples.npz", images.numpy())
        result = evaluate(EvalSettings(samples=f"{tmp}/samples.npz", metrics=["fid"], dims=settings.fid_dims,
                                       inception_weights=settings.inception_weights, progress=False, **where),
                          device)
    return float(result["metrics"]["fid"])


def template_knowledge(net, settings: GridEvalConfig, device) -> dict[str, float]:
    """``tki_<t>`` and ``tki_mse_<t>`` of a twoscale network (see the module docstring); {} otherwise."""
    ts = [t for t in settings.tki_t if t < net.diffusion.timesteps]
    if net.config.dataset.name != "twoscale" or not ts:
        return {}
    from ..metrics.bayes import template_knowledge_index

    dataset = builders.make_dataset(net.config)
    tki = template_knowledge_index(net.model, net.diffusion, dataset, ts, settings.tki_samples, settings.seed,
                                   device=device)
    return {f"{key}_{t}": v[key] for t, v in tki.items() for key in ("tki", "tki_mse")}


def real_image_floor(cfg, settings: GridEvalConfig, device="cpu") -> dict:
    """The sample metrics' floor: ``settings.num_samples`` held-out real images (evenly spaced over the test
    split, quantised like samples) scored exactly as a network's samples are, against the same reference. A
    perfect generator scores this, not 0: FD and the spectrum error of a finite sample are biased upwards.
    Metrics without samples (``nll``) are skipped."""
    from ..evaluation.extra import EXTRA_METRICS, extra_metrics
    from ..evaluation.sources import DatasetImages

    held_out = DatasetImages(cfg, "test", settings.num_samples)
    images = torch.from_numpy(held_out.load(range(len(held_out))))
    sampled = [m for m in settings.metrics if EXTRA_METRICS[m][1]]
    settings = dataclasses.replace(settings, metrics=sampled)
    return {"num_images": len(held_out),
            **extra_metrics(settings, cfg, None, torch.nn.Identity(), images, settings.seed, device)}


def evaluate_checkpoint(path: str | Path, settings: GridEvalConfig, device="cpu") -> dict:
    """Metrics of the EMA network in checkpoint ``path`` plus the time they took (``eval_sec``)."""
    start = time.perf_counter()
    device = torch.device(device)
    net = load_network(path)
    net.model.to(device)
    metrics = validation_losses(net, settings, device)
    metrics.update(template_knowledge(net, settings, device))
    metrics.update(sample_metrics(net, settings, device))
    metrics["eval_sec"] = time.perf_counter() - start
    return metrics

"""The opt-in metrics of in-process evaluations (a run's ``eval.json``, experiment grids): ``nll``,
``spectrum`` and ``fd_classifier``, computed on one process with the same functions eval.py uses.

Both config sections (``eval`` of a run, ``eval`` of a grid) carry the same keys: ``metrics`` (a list of
these names; empty = none), ``nll_samples``, ``nll_timesteps``, ``spectrum_bands``, ``feature_net`` and
``ref_samples``. References: the run's dataset — its ``test`` split (``nll_samples`` images) for the
bound, its ``train`` split (``ref_samples`` images) for the sample metrics, each evenly spaced over the split.
"""

from __future__ import annotations

import torch


def _nll(ctx) -> dict:
    from ..metrics.likelihood import check_timesteps, nll_bpd
    from .sources import DatasetImages

    s = ctx["settings"]
    images = DatasetImages(ctx["cfg"], "test", s.nll_samples)
    k = check_timesteps(ctx["diffusion"].timesteps, min(s.nll_timesteps, ctx["diffusion"].timesteps))
    res = nll_bpd(ctx["diffusion"], ctx["model"], images, k, seed=ctx["seed"], batch_size=s.batch_size,
                  device=ctx["device"])
    out = res.to_dict()
    out.pop("nll_total_timesteps")
    return out


def _reference(ctx):
    from .sources import DatasetImages

    if "reference" not in ctx:
        ctx["reference"] = DatasetImages(ctx["cfg"], "train", ctx["settings"].ref_samples)
    return ctx["reference"]


class _Tensor:
    """uint8 [N, H, W, C] images as an image source."""

    def __init__(self, images: torch.Tensor):
        self.images, self.shape = images, tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def load(self, indices):
        return self.images[list(indices)].numpy()


def _spectrum(ctx) -> dict:
    from ..metrics.spectrum import compare_spectra, spectrum_stats

    bands = ctx["settings"].spectrum_bands
    out = compare_spectra(spectrum_stats(_Tensor(ctx["images"]), bands), spectrum_stats(_reference(ctx), bands))
    ratios = out.pop("spectrum_log10_ratio")
    out.pop("spectrum_band_edges")
    return {**out, **{f"spectrum_band{k}_log10_ratio": v for k, v in enumerate(ratios)}}


def _fd_classifier(ctx) -> dict:
    from ..metrics.feature_net import FeatureExtractor, fd_kid, load_feature_net, local_features

    path = ctx["settings"].feature_net
    net, meta = load_feature_net(path)
    fake, ref = _Tensor(ctx["images"]), _reference(ctx)
    check = FeatureExtractor(net, meta, path)
    check.check_shape(fake.shape, "samples")
    net = net.to(ctx["device"])
    (fs, fk), (rs, rk) = local_features(net, fake, device=ctx["device"]), local_features(net, ref, device=ctx["device"])
    return fd_kid(fs, fk, rs, rk)


# name → (function(ctx) → flat dict of numbers, needs generated samples); config.EXTRA_EVAL_METRICS lists the names
EXTRA_METRICS = {"nll": (_nll, False), "spectrum": (_spectrum, True), "fd_classifier": (_fd_classifier, True)}


def needs_samples(settings) -> bool:
    return any(EXTRA_METRICS[m][1] for m in settings.metrics)


def extra_metrics(settings, cfg, diffusion, model, images: torch.Tensor | None, seed: int, device) -> dict:
    """``settings.metrics`` for one network: ``images`` uint8 [N, H, W, C] are its samples (None when no
    requested metric needs them). Returns flat {name: number}."""
    ctx = {"settings": settings, "cfg": cfg, "diffusion": diffusion, "model": model, "images": images,
           "seed": seed, "device": device}
    out = {}
    was_training = model.training
    model.eval()
    try:
        for name in settings.metrics:
            out.update(EXTRA_METRICS[name][0](ctx))
    finally:
        model.train(was_training)
    return out

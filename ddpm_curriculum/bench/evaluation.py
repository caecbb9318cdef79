"""Evaluation and sampling speed against the reference implementations, on identical inputs:

- Fréchet distance at 2048 dims vs pytorch-fid's ``calculate_frechet_distance`` (scipy sqrtm);
  target ≥ 5× faster at ≤ 1e-6 relative difference.
- Inception feature extraction (images/s) vs pytorch-fid's ``InceptionV3``, identical random weights (no
  download needed); target ≥ 1.0×.
- DDIM sampling (images/s) of ``sampling.sample_batch`` (per-image noise streams) vs a diffusers
  ``DDIMScheduler`` loop driving the same network from the same x_T; target ≥ 1.0×, and the sampler's own
  overhead under 2 %: (sampling time − time inside the network) / time inside the network, measured within
  each run.

Each ``*_cases`` function returns {name: factory} for the two sides, a factory building that side's callable;
the CLI times the callables alternately and builds and runs each alone in a child process for its peak memory.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from unittest import mock

import numpy as np
import torch

from ..errors import UserError
from .timing import sync


def fid_stats(dims: int):
    """Two Inception-like statistics: a decaying spectrum, covariances estimated from 2.5·d samples."""
    rng = np.random.default_rng(0)
    scales = 1.0 / np.sqrt(1.0 + np.arange(dims))
    return [(rng.standard_normal(dims) * 0.1, np.cov(rng.standard_normal((5 * dims // 2, dims)) * scales, rowvar=False))
            for _ in range(2)]


def fid_cases(args, out: dict) -> dict:
    def ours():
        from ..metrics.fid import frechet_distance
        return side("ours", frechet_distance)

    def pytorch_fid():
        from pytorch_fid.fid_score import calculate_frechet_distance
        return side("pytorch_fid", calculate_frechet_distance)

    def side(name, fn):
        stats = fid_stats(args.fid_dims)

        def go():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pytorch-fid passes scipy's deprecated disp= argument
                out[name] = fn(*stats[0], *stats[1])
        return go

    return {"ours": ours, "pytorch_fid": pytorch_fid}


def fid_summary(args, secs: dict, out: dict) -> dict:
    return {"dims": args.fid_dims, "ours_sec": secs["ours"], "pytorch_fid_sec": secs["pytorch_fid"],
            "speedup": secs["pytorch_fid"] / secs["ours"], "fid": out["ours"],
            "rel_diff": abs(out["ours"] - out["pytorch_fid"]) / abs(out["pytorch_fid"])}


def inception_cases(args, out: dict) -> dict:
    from ..metrics.inception import no_tf32, random_state_dict

    device, bs = args.device, args.inception_batch

    def ours():
        from ..metrics.inception import load_fid_inception

        with tempfile.TemporaryDirectory() as tmp:  # load through the real loader, then discard the 95 MB file
            torch.save(random_state_dict(0), f"{tmp}/inception.pth")
            model = load_fid_inception(f"{tmp}/inception.pth", device)
        return side("ours", lambda x: model(x, dims=(2048,))[2048])

    def pytorch_fid():
        import pytorch_fid.inception as pfi

        with mock.patch.object(pfi, "load_state_dict_from_url", return_value=random_state_dict(0)):
            model = pfi.InceptionV3([3]).eval().to(device)
        return side("pytorch_fid", lambda x: model(x)[0].flatten(1))

    def side(name, features):
        images = torch.rand(args.inception_images, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad(), no_tf32():
            out[name] = features(images[:2]).cpu()  # compared in the summary

        def go():
            with torch.no_grad(), no_tf32():
                for i in range(0, len(images), bs):
                    features(images[i:i + bs])
        return go

    return {"ours": ours, "pytorch_fid": pytorch_fid}


def inception_summary(args, secs: dict, out: dict) -> dict:
    n = args.inception_images
    return {"batch": args.inception_batch, "images": n, "ours_img_per_sec": n / secs["ours"],
            "pytorch_fid_img_per_sec": n / secs["pytorch_fid"], "speedup": secs["pytorch_fid"] / secs["ours"],
            "max_abs_feature_diff": float((out["ours"] - out["pytorch_fid"]).abs().max())}


def _diffusers_ddim(cfg, steps, args_config):
    from diffusers import DDIMScheduler

    d = cfg.diffusion
    if d.beta_schedule != "linear" or d.model_mean_type != "eps":
        raise UserError(f"--ddim-config {args_config}: the DDIM benchmark compares against diffusers' DDIMScheduler, "
                        f"which needs a linear-β ε-prediction config (e.g. configs/cifar10_c.json)")
    sched = DDIMScheduler(num_train_timesteps=d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                          beta_schedule="linear", clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                          timestep_spacing="leading", prediction_type="epsilon")
    sched.set_timesteps(steps)
    return sched


class TimedNetwork:
    """Calls the network and adds up the seconds spent inside it, so a sampler's own overhead is measured
    within the same run (robust to background load that varies between runs)."""

    def __init__(self, model, device):
        self.model, self.device, self.seconds = model, device, 0.0

    def __call__(self, x, t):
        sync(self.device)
        t0 = time.perf_counter()
        out = self.model(x, t)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def ddim_cases(args, out: dict) -> dict:
    from ..config import load_config
    from ..sampling import PerImageNoise, SamplerSpec, sample_batch
    from ..training import builders

    cfg = load_config(args.ddim_config, args.ddim_set)
    device, bs, steps, eta = args.device, args.ddim_batch, args.ddim_steps, args.ddim_eta
    diffusion, shape, indices = builders.make_diffusion(cfg), builders.image_shape(cfg), list(range(bs))
    out.setdefault("overhead", {"ours": [], "diffusers": []})

    def network():
        torch.manual_seed(0)
        return TimedNetwork(builders.make_model(cfg).eval().to(device), device)

    def ours():
        net, spec = network(), SamplerSpec(name="ddim", steps=steps, eta=eta, skip_type="uniform")
        return timed("ours", net, lambda: sample_batch(diffusion, net, spec, indices, 0, shape, device))

    def diffusers():
        net, sched = network(), _diffusers_ddim(cfg, steps, args.ddim_config)
        x_T = PerImageNoise(0, indices, shape, device).initial()  # the x_T sample_batch starts from

        def reference():
            x, g = x_T.clone(), torch.Generator(device).manual_seed(0)
            for t in sched.timesteps:
                eps = net(x, t.to(device).expand(bs))
                x = sched.step(eps, t, x, eta=eta, use_clipped_model_output=True, generator=g).prev_sample
            return x
        return timed("diffusers", net, reference)

    def timed(name, net, fn):
        @torch.no_grad()
        def go():
            net.seconds = 0.0
            t0 = time.perf_counter()
            out[name] = fn()
            sync(device)
            total = time.perf_counter() - t0
            out["overhead"][name].append((total - net.seconds) / net.seconds)
        return go

    return {"ours": ours, "diffusers": diffusers}


def ddim_summary(args, secs: dict, out: dict) -> dict:
    bs = args.ddim_batch
    diff = float((out["ours"] - out["diffusers"]).abs().max()) if args.ddim_eta == 0 else None  # η > 0: other noise
    return {"config": args.ddim_config, "batch": bs, "steps": args.ddim_steps, "eta": args.ddim_eta,
            "ours_img_per_sec": bs / secs["ours"], "diffusers_img_per_sec": bs / secs["diffusers"],
            "speedup": secs["diffusers"] / secs["ours"],
            "ours_overhead": float(np.median(out["overhead"]["ours"][1:])),  # [0] is the warm-up
            "diffusers_overhead": float(np.median(out["overhead"]["diffusers"][1:])),
            "max_abs_diff_vs_diffusers": diff}

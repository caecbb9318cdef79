"""Evaluation and sampling speed against the reference implementations, measured side by side in one run:

- Fréchet distance at 2048 dims vs pytorch-fid's ``calculate_frechet_distance`` (scipy sqrtm);
  target ≥ 5× faster at ≤ 1e-6 relative difference.
- Inception feature extraction (images/s) vs pytorch-fid's ``InceptionV3`` on the same images and batch,
  identical random weights (no download needed); target ≥ 1.0×.
- DDIM sampling (images/s) of ``ddpm_curriculum.sampling.sample_batch`` (per-image noise streams) vs a
  diffusers ``DDIMScheduler`` loop driving the same network from the same x_T; target ≥ 1.0×, and the
  sampler's own overhead under 2 %: (sampling time − time inside the network) / time inside the network,
  measured within each run (median over the timed rounds).

    python scripts/bench_eval.py                                  # all three, CPU defaults
    python scripts/bench_eval.py --parts ddim --device cuda --ddim-batch 256 --json runs/bench_eval.json

Timed sections alternate between the two sides each round and the best round counts, so background load
hurts both alike. Needs the ``test`` extra (pytorch-fid, diffusers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from unittest import mock

import numpy as np
import torch

from ddpm_curriculum.errors import run_cli


def best_of(rounds: int, fns: dict) -> dict:
    """Run every fn once per round, alternating; → {name: fastest seconds}."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_fid(args) -> dict:
    from pytorch_fid.fid_score import calculate_frechet_distance

    from ddpm_curriculum.metrics.fid import frechet_distance

    rng = np.random.default_rng(0)
    d = args.dims
    # Inception-like statistics: a decaying spectrum, estimated from 2.5·d samples
    scales = 1.0 / np.sqrt(1.0 + np.arange(d))
    stats = [(rng.standard_normal(d) * 0.1, np.cov(rng.standard_normal((5 * d // 2, d)) * scales, rowvar=False))
             for _ in range(2)]
    out = {}
    t = {"ours": [], "pytorch_fid": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytorch-fid passes scipy's deprecated disp= argument
        for _ in range(args.rounds):
            for name, fn in (("ours", frechet_distance), ("pytorch_fid", calculate_frechet_distance)):
                t0 = time.perf_counter()
                out[name] = fn(*stats[0], *stats[1])
                t[name].append(time.perf_counter() - t0)
            if args.quick:
                break
    secs = {k: min(v) for k, v in t.items()}
    return {"dims": d, "ours_sec": secs["ours"], "pytorch_fid_sec": secs["pytorch_fid"],
            "speedup": secs["pytorch_fid"] / secs["ours"], "fid": out["ours"],
            "rel_diff": abs(out["ours"] - out["pytorch_fid"]) / abs(out["pytorch_fid"])}


def bench_inception(args) -> dict:
    import pytorch_fid.inception as pfi

    from ddpm_curriculum.metrics.inception import load_fid_inception, no_tf32, random_state_dict

    device, bs = args.device, args.inception_batch
    weights = random_state_dict(0)
    with tempfile.TemporaryDirectory() as tmp:  # load through the real loader, then discard the 95 MB file
        torch.save(weights, f"{tmp}/inception.pth")
        ours = load_fid_inception(f"{tmp}/inception.pth", device)
    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=weights):
        theirs = pfi.InceptionV3([3]).eval().to(device)
    images = torch.rand(args.inception_images, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)

    def run(fn):
        def go():
            with torch.no_grad(), no_tf32():
                for i in range(0, len(images), bs):
                    fn(images[i:i + bs])
            sync(device)
        return go

    run(lambda x: ours(x, dims=(2048,)))()  # warm-up (oneDNN / cuDNN kernel selection)
    run(theirs)()
    secs = best_of(args.rounds, {"ours": run(lambda x: ours(x, dims=(2048,))), "pytorch_fid": run(theirs)})
    n = len(images)
    with torch.no_grad(), no_tf32():
        diff = (ours(images[:2], dims=(2048,))[2048] - theirs(images[:2])[0].flatten(1)).abs().max().item()
    return {"batch": bs, "images": n, "ours_img_per_sec": n / secs["ours"],
            "pytorch_fid_img_per_sec": n / secs["pytorch_fid"], "speedup": secs["pytorch_fid"] / secs["ours"],
            "max_abs_feature_diff": diff}


def _diffusers_ddim(diffusion, cfg, steps):
    from diffusers import DDIMScheduler

    d = cfg.diffusion
    if d.beta_schedule != "linear" or d.model_mean_type != "eps":
        raise SystemExit("the DDIM benchmark compares against diffusers with a linear-β ε-prediction config")
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


def bench_ddim(args) -> dict:
    from ddpm_curriculum.config import load_config
    from ddpm_curriculum.sampling import PerImageNoise, SamplerSpec, sample_batch
    from ddpm_curriculum.training import builders

    cfg = load_config(args.ddim_config)
    device, bs, steps = args.device, args.ddim_batch, args.ddim_steps
    torch.manual_seed(0)
    net = TimedNetwork(builders.make_model(cfg).eval().to(device), device)
    diffusion, shape = builders.make_diffusion(cfg), builders.image_shape(cfg)
    eta = args.ddim_eta
    spec = SamplerSpec(use_ddim=True, steps=steps, eta=eta, skip_type="uniform")
    sched = _diffusers_ddim(diffusion, cfg, steps)
    indices = list(range(bs))
    x_T = PerImageNoise(0, indices, shape, device).initial()
    out, overhead = {}, {"ours": [], "diffusers": []}

    def timed(name, fn):
        def go():
            net.seconds = 0.0
            t0 = time.perf_counter()
            out[name] = fn()
            sync(device)
            total = time.perf_counter() - t0
            overhead[name].append((total - net.seconds) / net.seconds)
        return go

    def reference():
        x, g = x_T.clone(), torch.Generator(device).manual_seed(0)
        for t in sched.timesteps:
            eps = net(x, t.to(device).expand(bs))
            x = sched.step(eps, t, x, eta=eta, use_clipped_model_output=True, generator=g).prev_sample
        return x

    fns = {"ours": timed("ours", lambda: sample_batch(diffusion, net, spec, indices, 0, shape, device)),
           "diffusers": timed("diffusers", reference)}
    with torch.no_grad():
        fns["ours"](), fns["diffusers"]()  # warm-up
        secs = best_of(args.rounds, fns)
    diff = (out["ours"] - out["diffusers"]).abs().max().item() if eta == 0 else None  # η > 0: other noise
    return {"config": args.ddim_config, "batch": bs, "steps": steps, "eta": eta,
            "ours_img_per_sec": bs / secs["ours"], "diffusers_img_per_sec": bs / secs["diffusers"],
            "speedup": secs["diffusers"] / secs["ours"],
            "ours_overhead": float(np.median(overhead["ours"][1:])),
            "diffusers_overhead": float(np.median(overhead["diffusers"][1:])),
            "max_abs_diff_vs_diffusers": diff}


def table(res: dict) -> str:
    rows = [("part", "ours", "reference", "ratio", "target", "check")]
    if "fid" in res:
        r = res["fid"]
        rows.append((f"Fréchet distance, {r['dims']}-d", f"{r['ours_sec']:.2f} s", f"{r['pytorch_fid_sec']:.2f} s",
                     f"{r['speedup']:.1f}x", ">= 5x", f"rel diff {r['rel_diff']:.1e} (<= 1e-6)"))
    if "inception" in res:
        r = res["inception"]
        rows.append((f"Inception features, batch {r['batch']}", f"{r['ours_img_per_sec']:.1f} img/s",
                     f"{r['pytorch_fid_img_per_sec']:.1f} img/s", f"{r['speedup']:.2f}x", ">= 1.0x",
                     f"max |feature diff| {r['max_abs_feature_diff']:.1e}"))
    if "ddim" in res:
        r = res["ddim"]
        diff = r["max_abs_diff_vs_diffusers"]
        rows.append((f"DDIM {r['steps']} steps, eta {r['eta']:g}, batch {r['batch']}",
                     f"{r['ours_img_per_sec']:.2f} img/s", f"{r['diffusers_img_per_sec']:.2f} img/s",
                     f"{r['speedup']:.2f}x", ">= 1.0x",
                     f"overhead {100 * r['ours_overhead']:.2f}% (< 2%; diffusers {100 * r['diffusers_overhead']:.2f}%)"
                     + ("" if diff is None else f", max |x0 diff| {diff:.1e}")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="fid,inception,ddim", help="comma-separated subset of fid,inception,ddim")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds; the best counts")
    p.add_argument("--quick", action="store_true", help="one sqrtm run only (it takes ≈15 s at 2048 dims)")
    p.add_argument("--dims", type=int, default=2048)
    p.add_argument("--inception-images", type=int, default=64)
    p.add_argument("--inception-batch", type=int, default=16)
    p.add_argument("--ddim-config", default="configs/cifar10_c.json")
    p.add_argument("--ddim-batch", type=int, default=4)
    p.add_argument("--ddim-steps", type=int, default=10)
    p.add_argument("--ddim-eta", type=float, default=0.0, help="η > 0 also times the per-image noise draws")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    parts = {"fid": bench_fid, "inception": bench_inception, "ddim": bench_ddim}
    res = {"device": str(args.device), "threads": torch.get_num_threads(), "torch": torch.__version__}
    for name in args.parts.split(","):
        res[name] = parts[name](args)
        print(f"{name}: {json.dumps(res[name])}", flush=True)
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

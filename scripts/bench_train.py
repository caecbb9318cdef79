"""Training throughput of a config's UNet on this machine: full optimizer steps (loss, backward, clip,
Adam, EMA) in NCHW and channels_last, measured alternately in one run so the ratio is fair.

    python scripts/bench_train.py --config configs/cifar10_c.json --batch 16 --steps 5 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ddpm_curriculum.config import load_config
from ddpm_curriculum.errors import run_cli
from ddpm_curriculum.training import builders
from ddpm_curriculum.training.ema import EMA


def setup(cfg, channels_last: bool, batch: int):
    """The config's model, diffusion and one fixed batch (x0, t, noise), all seeded: the same every call."""
    torch.manual_seed(0)
    model = builders.make_model(cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    shape = (batch, *builders.image_shape(cfg))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x0 = torch.randn(shape).contiguous(memory_format=fmt)
    noise = torch.randn(shape).contiguous(memory_format=fmt)
    t = torch.randint(0, cfg.diffusion.timesteps, (batch,))
    return model, builders.make_diffusion(cfg), x0, t, noise


def make_step(cfg, channels_last: bool, batch: int):
    model, diffusion, x0, t, noise = setup(cfg, channels_last, batch)
    ema = EMA(model, 0.9999)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)

    def step():
        loss = diffusion.training_losses(model, x0, t, noise).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)

    return step


def time_alternately(steps: dict, n: int, rounds: int) -> dict[str, float]:
    """Seconds per call of each function: best of ``rounds`` rounds of ``n`` calls, the functions taking
    turns so that machine load affects them alike; one warm-up call each."""
    for fn in steps.values():
        fn()
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
    return {k: min(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cifar10_c.json")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    steps = {"nchw": make_step(cfg, False, args.batch), "channels_last": make_step(cfg, True, args.batch)}
    sec = time_alternately(steps, args.steps, args.rounds)
    result = {"config": args.config, "batch": args.batch, "threads": torch.get_num_threads(),
              "img_per_sec": {k: args.batch / v for k, v in sec.items()}}
    result["channels_last_speedup"] = result["img_per_sec"]["channels_last"] / result["img_per_sec"]["nchw"]
    report(result, args.json)


def report(result: dict, json_path: str | None) -> None:
    print(json.dumps(result, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

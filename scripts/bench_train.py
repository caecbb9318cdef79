"""Training throughput of a config's UNet on this machine: full optimizer steps (loss, backward, clip,
Adam, EMA) in NCHW and channels_last, measured alternately in one run so the ratio is fair.

    python scripts/bench_train.py --config configs/cifar10_c.json --batch 16 --steps 5 --rounds 3
"""

from __future__ import annotations

import argparse

import torch

from ddpm_curriculum.config import load_config
from ddpm_curriculum.errors import run_cli
from ddpm_curriculum.training import builders
from ddpm_curriculum.training.benchmark import print_result, time_interleaved
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
    times = time_interleaved(steps, args.rounds, args.steps)
    result = {"config": args.config, "batch": args.batch, "threads": torch.get_num_threads(),
              "img_per_sec": {k: args.batch / min(v) for k, v in times.items()}}
    result["channels_last_speedup"] = result["img_per_sec"]["channels_last"] / result["img_per_sec"]["nchw"]
    print_result(result, args.json)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

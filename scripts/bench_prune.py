"""Cost of one MaskPro update against one dense training step, same model and batch, timed alternately in
one run so the ratio is fair.

A dense step is loss → backward → clip → Adam → EMA (``bench_train.make_step``). A MaskPro update (mode
prune, phase learn) is: sample 2:4 masks for every eligible layer → loss with the initial masks and with
the sampled ones (two no-grad forwards) → policy-gradient update of the logits.

    python scripts/bench_prune.py --config configs/cifar10_c.json --batch 16 --steps 3 --rounds 3
"""

from __future__ import annotations

import argparse

import torch

from bench_train import make_step, setup  # scripts/ is on sys.path
from ddpm_curriculum.config import load_config
from ddpm_curriculum.errors import run_cli
from ddpm_curriculum.pruning.maskpro import MaskProUpdate, wrap_model_with_maskpro
from ddpm_curriculum.training.benchmark import print_result, time_interleaved


def make_maskpro_update(cfg, channels_last: bool, batch: int):
    """The same model and batch as ``make_step`` (``setup``), wrapped for MaskPro with 2:4 magnitude masks."""
    model, diffusion, x0, t, noise = setup(cfg, channels_last, batch)
    update = MaskProUpdate(wrap_model_with_maskpro(model, 2, 4))
    model.eval()
    g = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def step():
        positions = update.sample(g)
        initial, sampled = update.paired_losses(positions, lambda: diffusion.training_losses(model, x0, t, noise))
        update.step(positions, float((sampled - initial).mean()))

    return step, len(update.layers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cifar10_c.json")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    maskpro, num_layers = make_maskpro_update(cfg, args.channels_last, args.batch)
    steps = {"dense_train_step": make_step(cfg, args.channels_last, args.batch), "maskpro_update": maskpro}
    sec = {k: min(v) for k, v in time_interleaved(steps, args.rounds, args.steps).items()}
    result = {"config": args.config, "batch": args.batch, "threads": torch.get_num_threads(),
              "channels_last": args.channels_last, "maskpro_layers": num_layers, "sec_per_step": sec,
              "maskpro_over_dense": sec["maskpro_update"] / sec["dense_train_step"]}
    print_result(result, args.json)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

"""Training throughput of modes baseline, C, CS and CR on the same model, data and batch, measured in
interleaved rounds in one run so the ratios are fair. Each mode runs the real ``CurriculumTrainer.train_step``
(hooks, frozen entries, penalty, EMA) in its first stage: CS with its initial sparsity and the gate-gradient
probe recording, CR with λ_max > 0.

    python scripts/bench_modes.py --config configs/twoscale_c.json --batch 128 --steps 5 --rounds 5

Targets (issue 3): CS within 2% of C, CR within 5% of C.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from ddpm_curriculum.config import load_config
from ddpm_curriculum.errors import run_cli
from ddpm_curriculum.training import CurriculumTrainer
from ddpm_curriculum.training.benchmark import print_result, time_interleaved

MODES = {
    "baseline": ["curriculum.enabled=false", "curriculum.stages=[]"],
    "C": [],
    "CS": ["sparsity.enabled=true"],
    "CR": ["regularization.enabled=true"],
}


def make_step(config: str, mode: str, batch: int, extra: list[str], run_dir: str):
    overrides = [f"train.batch_size={batch}", "eval.num_samples=0", *extra, *MODES[mode]]
    cfg = load_config(config, overrides)
    trainer = CurriculumTrainer(cfg, run_dir, torch.device("cpu"), progress=False)
    trainer._enter_stage(trainer.plan[0])  # CS: initial mask (+ gate probe); CR: λ of stage 1
    images = torch.stack([trainer.dataset[i][0] for i in range(batch)])
    return lambda: trainer.train_step(images)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/twoscale_c.json", help="a mode-C config (its stages are used)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override (repeatable)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        steps = {m: make_step(args.config, m, args.batch, args.overrides, f"{tmp}/{m}") for m in MODES}
        times = time_interleaved(steps, args.rounds, args.steps)
    ips = {m: args.batch / statistics.median(v) for m, v in times.items()}
    best = {m: args.batch / min(v) for m, v in times.items()}
    print_result({"config": args.config, "batch": args.batch, "threads": torch.get_num_threads(),
                  "img_per_sec_median": ips, "img_per_sec_best": best,
                  "ratio_vs_C_median": {m: ips[m] / ips["C"] for m in ips},
                  "ratio_vs_C_best": {m: best[m] / best["C"] for m in best},
                  "targets": {"CS": ">= 0.98", "CR": ">= 0.95"}}, args.json)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

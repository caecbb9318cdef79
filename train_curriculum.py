"""Train a DDPM (baseline or curriculum). See README.md and `python train_curriculum.py --help`."""

from ddpm_curriculum.errors import run_cli
from ddpm_curriculum.training.cli import main

if __name__ == "__main__":
    raise SystemExit(run_cli(main))

"""Prune a trained DDPM (magnitude, random, N:M) or extract a pruned one's masks. See README.md, "Pruning",
and ``python prune.py --help``."""

from ddpm_curriculum.errors import run_cli
from ddpm_curriculum.pruning.cli import main

if __name__ == "__main__":
    raise SystemExit(run_cli(main))

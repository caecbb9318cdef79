"""Prune a trained DDPM (magnitude, random, N:M) or extract a pruned one's masks. See README.md, "Pruning",
and ``python prune.py --help``. The same as ``python -m ddpm_curriculum.prune`` / ``ddpm-prune``."""

from ddpm_curriculum.prune import run

if __name__ == "__main__":
    raise SystemExit(run())

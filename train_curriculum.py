"""Train a DDPM (baseline or curriculum). See README.md and `python train_curriculum.py --help`.
The same as ``python -m ddpm_curriculum.train`` / ``ddpm-train``."""

from ddpm_curriculum.train import run

if __name__ == "__main__":
    raise SystemExit(run())

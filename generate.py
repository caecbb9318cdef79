"""Sample a trained DDPM into numbered PNGs. See README.md ("Generating and evaluating") and
`python generate.py --help`. The same as ``python -m ddpm_curriculum.generate`` / ``ddpm-generate``."""

from ddpm_curriculum.generate import run

if __name__ == "__main__":
    raise SystemExit(run())

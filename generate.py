"""Sample a trained DDPM into numbered PNGs. See README.md ("Generating and evaluating") and
`python generate.py --help`."""

from ddpm_curriculum.errors import run_cli
from ddpm_curriculum.sampling.cli import main

if __name__ == "__main__":
    raise SystemExit(run_cli(main))

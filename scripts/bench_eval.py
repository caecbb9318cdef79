"""Sampling and evaluation speed: DDIM vs diffusers, Inception features and Frechet distance vs pytorch-fid.

Same as `python scripts/bench.py --parts ddim,inception,fid [options]`; every bench.py option is accepted.
"""

import sys

from ddpm_curriculum.bench.cli import main
from ddpm_curriculum.errors import run_cli

if __name__ == "__main__":
    raise SystemExit(run_cli(main, ["--parts", "ddim,inception,fid", *sys.argv[1:]]))

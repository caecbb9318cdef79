"""Sampling and evaluation speed: DDIM vs diffusers, Inception features and Frechet distance vs pytorch-fid.

Same as `python scripts/bench.py --parts ddim,inception,fid [options]`; every bench.py option is accepted.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from ddpm_curriculum.bench.cli import main  # noqa: E402
from ddpm_curriculum.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run_cli(main, ["--parts", "ddim,inception,fid", *sys.argv[1:]]))

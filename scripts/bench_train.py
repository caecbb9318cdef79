"""Training throughput of the CIFAR-10 UNet vs diffusers, NCHW and channels_last.

Same as `python scripts/bench.py --parts peaks,train [options]`; every bench.py option is accepted.
"""

import sys

from ddpm_curriculum.bench.cli import main
from ddpm_curriculum.errors import run_cli

if __name__ == "__main__":
    raise SystemExit(run_cli(main, ["--parts", "peaks,train", *sys.argv[1:]]))

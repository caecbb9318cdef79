"""Mode overheads: baseline, C, CS, CR and a MaskPro update on the twoscale model.

Same as `python scripts/bench.py --parts modes [options]`; every bench.py option is accepted.
"""

import sys

from ddpm_curriculum.bench.cli import main
from ddpm_curriculum.errors import run_cli

if __name__ == "__main__":
    raise SystemExit(run_cli(main, ["--parts", "modes", *sys.argv[1:]]))

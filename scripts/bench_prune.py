"""MaskPro update vs the dense training steps on the same model and batch.

Same as `python scripts/bench.py --parts modes [options]`; every bench.py option is accepted.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from ddpm_curriculum.bench.cli import main  # noqa: E402
from ddpm_curriculum.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run_cli(main, ["--parts", "modes", *sys.argv[1:]]))

"""Benchmarks: training, modes, sampling and evaluation speed against diffusers and pytorch-fid, peak memory.

    python scripts/bench.py                         # every part, CPU or the first GPU
    python scripts/bench.py --parts train,modes --json bench.json

Needs the ``bench`` extra (diffusers, pytorch-fid). See ``python scripts/bench.py --help`` and docs/benchmarks.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from ddpm_curriculum.bench.cli import main  # noqa: E402
from ddpm_curriculum.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run_cli(main))

"""Run an experiment grid and write results.jsonl + report.md. See README.md, "Experiments".

    python scripts/run_experiments.py configs/experiments/twoscale_modes.json --jobs 2
    python scripts/run_experiments.py configs/experiments/twoscale_modes.json --quick
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ddpm_curriculum.errors import run_cli  # noqa: E402
from ddpm_curriculum.experiments.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run_cli(main))

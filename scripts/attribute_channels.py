"""Which channels carry the fine twoscale features? Ablation and gradient × activation per channel group.

    python scripts/attribute_channels.py runs/experiments/twoscale_study/CS/seed0
    python scripts/attribute_channels.py runs/experiments/twoscale_study/baseline/seed0 \
        --like runs/experiments/twoscale_study/CS/seed0

See ddpm_curriculum/experiments/attribution.py for what is measured.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ddpm_curriculum.errors import run_cli  # noqa: E402
from ddpm_curriculum.experiments.attribution import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run_cli(main))

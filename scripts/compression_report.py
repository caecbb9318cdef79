"""Dense, structured, N:M and hybrid networks side by side (README.md, "Pruning"; ddpm_curriculum/pruning/report.py).

    python scripts/compression_report.py --out runs/compression --candidate dense=runs/quickstart-… \\
        --candidate structured=runs/tw_struct_ft --candidate nm24=runs/tw_final/pruned.pt --candidate hybrid=…
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from ddpm_curriculum.errors import run_cli  # noqa: E402
from ddpm_curriculum.pruning.report import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(run_cli(main))

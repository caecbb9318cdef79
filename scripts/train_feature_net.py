"""Train the feature net of eval.py's fd_classifier metric on a class-subfolder image tree (train/ and test/
splits); the weights file records its test accuracy. See README.md ("Generating and evaluating")."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from ddpm_curriculum.errors import run_cli
from ddpm_curriculum.metrics.feature_net import main

if __name__ == "__main__":
    raise SystemExit(run_cli(main))

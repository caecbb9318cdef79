"""FID, precision/recall, density/coverage, oracle metrics, classifier-feature FD/KID and power spectrum of
generated images; bits/dim of a checkpoint. See README.md
("Generating and evaluating") and `python eval.py --help`."""

from ddpm_curriculum.errors import run_cli
from ddpm_curriculum.evaluation.cli import main

if __name__ == "__main__":
    raise SystemExit(run_cli(main))

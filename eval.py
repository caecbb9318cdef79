"""FID, precision/recall, density/coverage, oracle metrics, classifier-feature FD/KID and power spectrum of
generated images; bits/dim of a checkpoint. See README.md ("Generating and evaluating") and
`python eval.py --help`. The same as ``python -m ddpm_curriculum.evaluate`` / ``ddpm-evaluate``."""

from ddpm_curriculum.evaluate import run

if __name__ == "__main__":
    raise SystemExit(run())

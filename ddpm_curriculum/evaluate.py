"""``python -m ddpm_curriculum.evaluate`` and the ``ddpm-evaluate`` command: FID, precision/recall,
density/coverage and oracle metrics of generated images, exactly as ``python eval.py`` (which only calls
:func:`run`). See README.md and ``--help``."""

from .errors import run_cli


def run(argv=None) -> int:
    from .evaluation.cli import main

    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(run())

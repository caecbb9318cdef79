"""``python -m ddpm_curriculum.generate`` and the ``ddpm-generate`` command: Sample a trained DDPM into
numbered PNGs, exactly as ``python generate.py`` (which only calls :func:`run`). See README.md and ``--help``."""

from .errors import run_cli


def run(argv=None) -> int:
    from .sampling.cli import main

    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(run())

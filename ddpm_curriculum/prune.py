"""``python -m ddpm_curriculum.prune`` and the ``ddpm-prune`` command: Prune a trained DDPM or extract a
pruned one's masks, exactly as ``python prune.py`` (which only calls :func:`run`). See README.md and
``--help``."""

from .errors import run_cli


def run(argv=None) -> int:
    from .pruning.cli import main

    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(run())

"""``python -m ddpm_curriculum.train`` and the ``ddpm-train`` command: train a DDPM, exactly as
``python train_curriculum.py`` (which only calls :func:`run`). See README.md and ``--help``."""

from .errors import interrupt_on_signals, run_cli


def run(argv=None) -> int:
    interrupt_on_signals()  # before the heavy imports: a stop signal at any moment gets the one-line message
    from .training.cli import main

    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(run())

"""Train a DDPM (baseline or curriculum). See README.md and `python train_curriculum.py --help`."""

from ddpm_curriculum.errors import interrupt_on_signals, run_cli

interrupt_on_signals()  # before the heavy imports: a stop signal at any moment gets the one-line message

from ddpm_curriculum.training.cli import main  # noqa: E402 (after the signal handlers, on purpose)

if __name__ == "__main__":
    raise SystemExit(run_cli(main))

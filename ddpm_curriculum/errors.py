"""The one exception type for bad user input, and the one for a stop signal outside the training loop.

Anything the user can fix (a bad config value, a missing dataset, an incompatible checkpoint)
raises ``UserError`` with a one-line message naming the problem and the fix. The scripts catch
it, print ``error: <message>`` and exit with code 2, without a traceback.

SIGINT/SIGTERM: inside the training loop the trainer finishes the step, checkpoints and exits 0. Anywhere
else (start-up, the final evaluation) :func:`interrupt_on_signals` makes them raise :class:`Interrupted`,
which the scripts turn into one line saying what was saved and how to continue, and exit code 128 + the
signal number (130 for SIGINT, 143 for SIGTERM, as a shell reports a process killed by it).
"""

import contextlib
import signal


class UserError(Exception):
    """Bad input the user can fix; printed as one line, exit code 2."""

    exit_code = 2


class Interrupted(BaseException):
    """SIGINT/SIGTERM outside the training loop. A BaseException, as KeyboardInterrupt, so that no
    ``except Exception`` on the way turns it into another error."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.exit_code = signum, 128 + signum
        self.note = ""  # what was saved and how to continue; set by the innermost interrupt_note

    def message(self) -> str:
        note = self.note or "during start-up, before the first training step: no checkpoint was written; run " \
                            "the same command again"
        return f"interrupted by {signal.Signals(self.signum).name} {note}"


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def interrupt_on_signals() -> None:
    """Make SIGINT and SIGTERM raise Interrupted (the training loop installs its own handler while it runs)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupted)


@contextlib.contextmanager
def interrupt_note(note: str):
    """An Interrupted raised inside says ``note`` (what was saved, how to continue) unless an inner one did."""
    try:
        yield
    except Interrupted as exc:
        exc.note = exc.note or note
        raise


def run_cli(main, argv=None) -> int:
    """Run a script's ``main(argv)``; a UserError becomes ``error: <message>`` on stderr and exit code 2,
    an Interrupted its one-line message and exit code 128 + signal."""
    import sys

    try:
        return main(argv) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Interrupted as exc:
        print(exc.message(), file=sys.stderr, flush=True)
        return exc.exit_code

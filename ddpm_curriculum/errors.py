"""The one exception type for bad user input, and the one for a stop signal outside the training loop.

Anything the user can fix (a bad config value, a missing dataset, an incompatible checkpoint)
raises ``UserError`` with a one-line message naming the problem and the fix. The scripts catch
it, print ``error: <message>`` and exit with code 2, without a traceback. Running out of memory
(sizes too large for this machine) is reported the same way.

SIGINT/SIGTERM: inside the training loop the trainer finishes the step, checkpoints and exits 0. Anywhere
else (start-up, the final evaluation) :func:`interrupt_on_signals` makes them raise :class:`Interrupted`,
which the scripts turn into one line saying what was saved and how to continue, and exit code 128 + the
signal number (130 for SIGINT, 143 for SIGTERM, as a shell reports a process killed by it).
"""

import contextlib
import signal


class UserError(ValueError):
    """Bad input the user can fix; printed as one line, exit code 2. A ValueError (bad values are what it
    reports), so callers of the library may catch it as one."""

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


def check_output_file(path, flag: str) -> None:
    """Before the work, not after it: ``path`` (an output file option) must not be a folder, and its folder
    must exist or be creatable."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot create {path.parent} ({exc.strerror or exc}); "
                        f"choose a writable place") from None


def user_message(exc: UserError) -> str:
    """The one-line message of ``exc``. A UserError raised inside a DataLoader worker reaches the main
    process re-created by torch with the worker's whole traceback as its message ("Caught UserError in
    DataLoader worker process 0. Original Traceback …"); its last line holds the original message."""
    text = str(exc)
    if text.startswith("Caught ") and "\n" in text:
        last = text.rstrip().splitlines()[-1]  # "ddpm_curriculum.errors.UserError: <message>"
        name, sep, original = last.partition(": ")
        if sep and name.endswith(type(exc).__name__):
            return original
    return text


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    import torch  # CUDA: torch.OutOfMemoryError; CPU: a RuntimeError from the allocator

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def run_cli(main, argv=None) -> int:
    """Run a script's ``main(argv)``; a UserError becomes ``error: <message>`` on stderr and exit code 2,
    an Interrupted its one-line message and exit code 128 + signal."""
    import sys

    try:
        return main(argv) or 0
    except UserError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Interrupted as exc:
        print(exc.message(), file=sys.stderr, flush=True)
        return exc.exit_code
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        print(f"error: out of memory ({first}); lower the sizes (batch size, image size, model width, "
              f"timesteps, number of samples)", file=sys.stderr, flush=True)
        return UserError.exit_code

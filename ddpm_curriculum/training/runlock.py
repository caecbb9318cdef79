"""One training per run directory: a lock file ``<run_dir>/train.lock`` held while a training writes there.

The file is created atomically (``O_CREAT | O_EXCL``) and holds the holder's host, pid and start time as
JSON. A second training into the same directory (a new run or a ``--resume``) is refused while the holder
lives. A lock whose process is gone (same host, ``os.kill(pid, 0)`` fails) is stale and is taken over
with a note. A lock from another host cannot be checked; ``--force-unlock`` (or deleting the file) takes
over a lock known to be stale. The lock is removed when the training ends, also on an error, Ctrl-C or
SIGTERM. Under DDP only rank 0 takes it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from .. import dist
from ..errors import UserError

LOCK_NAME = "train.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:  # invalid pid (≤ 0, too large)
        return False
    return True


class RunLock:
    """The lock of one run directory; :meth:`acquire` takes it (or raises), :meth:`release` drops it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False
        self._old_sigterm = None

    def _holder(self) -> dict | None:
        """The lock file's contents; None when it vanished, {} when it is unreadable or half-written."""
        for _ in range(20):  # a holder writes its record right after creating the file
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            except (OSError, UnicodeDecodeError):
                return {}
            try:
                holder = json.loads(text)
                if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                    return holder
            except ValueError:
                pass
            time.sleep(0.05)
        return {}

    def _stale_reason(self, holder: dict, force: bool) -> str | None:
        """Why the lock may be taken over, or None when its holder may still be running."""
        if not holder:
            return "its contents are unreadable"
        if force:
            return "--force-unlock"
        if holder.get("host") == socket.gethostname() and not _alive(holder["pid"]):
            return f"process {holder['pid']} is gone"
        return None

    def acquire(self, force: bool = False) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. A live holder → UserError."""
        note = None
        for _ in range(5):
            try:
                if not self.path.parent.is_dir():
                    self.path.parent.mkdir(parents=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self.path.parent.is_dir():
                    raise UserError(f"--run-dir {self.path.parent} is a file; choose a directory") from None
                holder = self._holder()
                if holder is None:  # released meanwhile
                    continue
                reason = self._stale_reason(holder, force)
                if reason is None:
                    raise UserError(f"another training (pid {holder['pid']} on {holder.get('host')}, started "
                                    f"{holder.get('started', '?')}) holds {self.path}; wait for it to finish, "
                                    f"or if it is gone pass --force-unlock") from None
                note = f"note: took over the stale lock {self.path} ({reason})"
                if self._holder() == holder:  # not replaced by a starting training meanwhile
                    self.path.unlink(missing_ok=True)
                continue
            except OSError as exc:  # the run directory is a file, read-only, ...
                raise UserError(f"cannot create {self.path} ({exc.strerror or exc}); choose a writable "
                                f"--run-dir") from None
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}, f)
            self.held = True
            self._catch_sigterm()
            return note
        raise UserError(f"could not take {self.path} (other processes keep replacing it); retry")

    def _catch_sigterm(self) -> None:
        # SIGTERM kills without unwinding by default; as SystemExit it passes the finally that releases the
        # lock. The trainer installs its own handler (checkpoint and stop) while it trains.
        try:
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                self._old_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        except ValueError:  # not the main thread
            pass

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if not self.held:
            return
        self.held = False
        if self._old_sigterm is not None:
            try:
                signal.signal(signal.SIGTERM, self._old_sigterm)
            except ValueError:
                pass
            self._old_sigterm = None
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def lock_run_dir(run_dir: str | Path, force: bool = False) -> RunLock | None:
    """Rank 0 takes ``run_dir``'s lock and every rank raises when it is refused (rank 0 says why, once).

    Returns the held lock on rank 0, None elsewhere. Collective: call it on every rank.
    """
    lock, error = None, None
    if dist.is_main():
        lock = RunLock(run_dir)
        try:
            note = lock.acquire(force)
            if note:
                print(note, flush=True)
        except UserError as exc:
            error = str(exc)
    error = dist.broadcast_object(error)
    if error is not None:
        if dist.is_main():
            raise UserError(error)
        raise SystemExit(2)
    return lock

"""One writer per run directory: an OS file lock held while a `Journal` writes it.

Two processes appending to one journal would interleave sequence numbers and break replay, and a second
`run --resume` on a run that is still going would drive the same microscope twice. The lock is advisory
(`flock` on POSIX, `msvcrt.locking` on Windows, where Nanonis PCs run); the OS drops it when the holder
dies, so a `kill -9` never leaves a stale lock behind and resume needs no clean-up. Readers (`status`,
`report`, `replay`) do not take it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO

LOCK_FILE = ".lock"


class RunDirInUse(RuntimeError):
    """Another process holds the run directory's lock."""


def _try_lock(handle: IO[str]) -> bool:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class RunDirLock:
    """Exclusive lock on `run_dir/.lock`; the file names the holder's pid for the error message."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        if not _try_lock(handle):
            try:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
            except OSError:  # Windows refuses reads of a region another process has locked
                holder = "unknown"
            handle.close()
            raise RunDirInUse(f"{self.path.parent} is in use by another deepspm process (pid {holder}); "
                              "wait for it to stop, or stop it (STOP file or Ctrl-C) before resuming")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Idempotent. Closing the handle drops the lock; the file stays (deleting it would race a waiter)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    @property
    def held(self) -> bool:
        return self._handle is not None

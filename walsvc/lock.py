"""One writer per log directory, enforced by the OS: an exclusive flock on `DIR/LOCK`.

The lock dies with its process (kill -9 included), so a stale lock never blocks a restart.  The file holds
the owner's PID so that a refused second writer can say who holds the log.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable

from .access import open_file
from .errors import LogLockedError
from .fsync import pwrite_all

NAME = "LOCK"


class PidLock:
    """An exclusive flock on `path` that records the holder's PID, so a refusal can name it: `busy(pid)`
    builds the error to raise when another process holds the lock."""

    def __init__(self, path: Path, busy: Callable[[int | None], Exception]) -> None:
        self.path = path
        fd = open_file(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = int(os.pread(fd, 32, 0).decode().strip() or 0) or None
            except (ValueError, UnicodeDecodeError):
                pid = None
            os.close(fd)
            raise busy(pid) from None
        os.ftruncate(fd, 0)
        pwrite_all(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DirectoryLock(PidLock):
    """The writer's lock on the whole log directory."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory / NAME, lambda pid: LogLockedError(str(directory), pid))


def holder_pid(directory: Path) -> int | None:
    """The PID written by the current (or last) owner, if readable."""
    try:
        return int((directory / NAME).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None

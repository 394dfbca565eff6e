"""One writer per log directory, enforced by the OS: an exclusive flock on `DIR/LOCK`.

The lock dies with its process (kill -9 included), so a stale lock never blocks a restart.  The file holds
the owner's PID, so that a refused second writer can say who holds the log, and the owner's start time, so
that a reader can tell the writer from another process that got its PID after a kill -9 (`WriterProbe`).
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


def start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat field 22): with the PID it names
    one process, where the PID alone may name a later one.  None where /proc cannot tell: no /proc (not
    Linux), a /proc that hides other users' processes (hidepid), or no such process (kill(pid, 0) then says
    which).  ProcessLookupError when it exited, zombies included (no lock, no socket: its parent has not yet
    reaped it, as a container's PID 1 often never does)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 1024)
    except OSError:  # ESRCH: it exited since the open
        raise ProcessLookupError(pid) from None
    finally:
        os.close(fd)
    # Field 2, the command, is in parentheses and may hold spaces or ')': fields 3 on follow the last ')'.
    fields = data[data.rfind(b")") + 2:].split(None, 20)
    if len(fields) < 20 or not fields[19].isdigit():
        return None
    if fields[0] in (b"Z", b"X"):
        raise ProcessLookupError(pid)
    return int(fields[19])


def signalable(pid: int) -> bool:
    """Whether a process `pid` exists (kill(pid, 0)): all that can be known where /proc cannot tell more."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, under another account
    return True


def pid_namespace() -> int | None:
    """This process's PID namespace (the inode of /proc/self/ns/pid), or None where /proc cannot tell: PIDs
    and start times from another namespace name other processes here (a writer in a container is often 1)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def parse(data: bytes) -> tuple[int, int | None, int | None] | None:
    """(PID, start ticks or None, PID namespace or None) from a lock file's first line, "PID START NS" ("PID"
    or "PID START" from older writers, or where /proc is missing); None for anything else (empty: never
    locked, or another format)."""
    fields = data.split(b"\n", 1)[0].split()
    try:
        pid = int(fields[0])
        started = int(fields[1]) if len(fields) > 1 else None
        namespace = int(fields[2]) if len(fields) > 2 else None
    except (ValueError, IndexError):
        return None
    return (pid, started, namespace) if pid > 0 and len(fields) <= 3 else None


class WriterProbe:
    """Whether a PID (from HEAD or ENDPOINTS) is this log's writer, not merely a running process.

    kill(pid, 0) says a process with that PID exists; after a kill -9 the PID may soon belong to another one
    (in a container PIDs are few and reused fast), and every tool would then wait on a dead writer.  So the
    PID is the writer only while the LOCK file names it with the start time /proc gives for it now.  LOCK is
    read, never locked (a reader's flock, even shared, would make a starting writer's LOCK_EX|LOCK_NB fail),
    and read again only when the PID or its start time differ from what it said last: about 6 µs a call, for
    a tailing reader only when HEAD stands still.  Where /proc or LOCK cannot tell (another OS, hidepid, an
    unreadable or old-format LOCK) it falls back to kill(pid, 0); a writer in another PID namespace is taken
    to run (`_elsewhere`).
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / NAME
        self._said: tuple[int, int | None, int | None] | None = None  # what LOCK said when last read
        self._namespace = pid_namespace()

    def _read(self) -> tuple[int, int | None, int | None] | None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            return parse(os.pread(fd, 64, 0))
        finally:
            os.close(fd)

    def _elsewhere(self, said: tuple[int, int | None, int | None] | None) -> bool:
        """Whether LOCK was written in another PID namespace (a writer in a container, a reader outside it, or
        the reverse): its PID and start time name other processes here, so nothing here can tell whether it
        runs.  It is then taken to run: HEAD still bounds readers, which is safe, where taking a live writer
        for dead would let them read past its commits."""
        return said is not None and said[2] is not None and said[2] != self._namespace

    def running(self, pid: int) -> bool:
        if pid <= 0:
            return False
        said = self._said
        if said is None or said[0] != pid:
            said = self._said = self._read()
        if self._elsewhere(said):
            return True
        try:
            started = start_ticks(pid)
        except ProcessLookupError:
            return False
        if started is None:
            return signalable(pid)
        if said is None or said[:2] != (pid, started):
            said = self._said = self._read()
            if self._elsewhere(said):
                return True
        if said is None or said[1] is None:
            return True  # the process exists; LOCK cannot say whether it is the writer
        # Another PID in LOCK: a later writer took the lock (so this one is gone); the same PID with another
        # start time: the writer died and the PID went to an unrelated process.
        return said[:2] == (pid, started)


class PidLock:
    """An exclusive flock on `path` that records the holder's PID and start time, so a refusal can name it:
    `busy(pid)` builds the error to raise when another process holds the lock."""

    def __init__(self, path: Path, busy: Callable[[int | None], Exception]) -> None:
        self.path = path
        fd = open_file(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = parse(os.pread(fd, 64, 0))
            os.close(fd)
            raise busy(holder[0] if holder else None) from None
        pid = os.getpid()
        started, namespace = start_ticks(pid), pid_namespace()
        data = f"{pid}\n" if started is None or namespace is None else f"{pid} {started} {namespace}\n"
        # Written over the old line, then cut: a reader never finds the file empty, and its first line whole.
        pwrite_all(fd, data.encode(), 0)
        os.ftruncate(fd, len(data))
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
        holder = parse((directory / NAME).read_bytes())
    except OSError:
        return None
    return holder[0] if holder else None

"""Named reader cursors: `DIR/cursors/NAME.cursor`, the last LSN a named reader has processed.

Written with write-to-temp, fsync, rename, fsync-directory, so a cursor is either the old or the new value
after any crash.  A named cursor has one reader at a time: `CursorLock` holds an flock on
`DIR/cursors/NAME.lock` (holding the owner's PID) for as long as the reader is open, and dies with it.
Cursors only move forward through `advance` (a reader's commit); `reset_cursor` moves one anywhere on
purpose.  Retention reads them so that it never deletes what a named reader still needs (within
`max_cursor_lag_bytes`).  The flock on the `cursors/` folder itself orders the two: a store holds it shared
while it decides and writes a position, retention holds it exclusively from reading the cursors until its
deletes are durable (`for_retention`), so no store lands between retention's decision and its deletes.

    0 8  last processed LSN
    8 4  CRC32C over bytes 0..8
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from crc32c import crc32c

from .access import make_dir, replace_file
from .config import check_lsn, directory_path
from .errors import ConfigError, CursorBusyError, CursorError, TruncatedError
from .fsync import fail_stop, sync_dir
from .lock import PidLock, holder_pid

DIRNAME = "cursors"
SUFFIX = ".cursor"
LOCK_SUFFIX = ".lock"
_LAYOUT = struct.Struct("<QI")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_RETRY_S = 0.001  # how often retention retries the folder's flock while stores hold it


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.startswith("."):
        raise ConfigError("name", f"reader name {name!r} must be 1-100 letters, digits, '_', '-' or '.', "
                          "not starting with '.'")
    return name


def load(directory: Path, name: str) -> int | None:
    """The stored LSN, or None if the reader never committed (or the file is damaged)."""
    try:
        data = (directory / DIRNAME / (check_name(name) + SUFFIX)).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) != _LAYOUT.size:
        return None
    lsn, crc = _LAYOUT.unpack(data)
    return lsn if crc32c(data[:8]) == crc else None


def _cursor_dir(directory: Path) -> Path:
    """`DIR/cursors`, made (and its entry fsynced) if it is missing."""
    cdir = directory / DIRNAME
    if not cdir.is_dir():
        make_dir(cdir)
        sync_dir(directory, "directory fsync after making the cursors folder")
    return cdir


def _open_cursor_dir(directory: Path) -> int:
    """A descriptor of `DIR/cursors` (made if missing) to flock.  Every cursor store pays for this: no stat
    first, and a str path (a Path join costs more than the open and the flock together)."""
    try:
        return os.open(os.path.join(directory, DIRNAME), os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return os.open(_cursor_dir(directory), os.O_RDONLY | os.O_DIRECTORY)


@contextlib.contextmanager
def _storing(directory: Path) -> Iterator[None]:
    """A shared flock on the cursors folder while a position is decided and written: a retention pass
    (exclusive) then sees the stored position, or ran wholly before the decision.  A descriptor of its own
    each time (under 10 us with the flock, against 0.5 ms for the store): an flock belongs to an open file,
    so threads or a forked child sharing one would release each other's."""
    fd = _open_cursor_dir(directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the flock


def _write(directory: Path, name: str, lsn: int) -> None:
    body = struct.pack("<Q", lsn)
    replace_file(directory / DIRNAME / (name + SUFFIX), body + struct.pack("<I", crc32c(body)))


def store(directory: Path, name: str, lsn: int) -> None:
    """Store `lsn` as the cursor `name`, whatever it was (the writer's group positions; tests)."""
    check_name(name)
    with _storing(directory):
        _write(directory, name, lsn)


@contextlib.contextmanager
def for_retention(directory: Path, wait_s: float) -> Iterator[dict[str, int] | None]:
    """Every cursor (`load_all`), read under an exclusive flock on the cursors folder that lasts until the
    block ends: retention deletes and fsyncs inside it, so no cursor store lands in between.  None when
    stores hold the flock for `wait_s`: retention then deletes nothing this time rather than hold up the
    rotation thread (and the appends waiting on its next spare segment)."""
    fd = _open_cursor_dir(directory)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield None
                    return
                time.sleep(_RETRY_S)
        yield load_all(directory)
    finally:
        os.close(fd)  # releases the flock


class CursorStorer:
    """Stores cursors on a thread of its own, for the writer's consumer groups: a store is a write, an fsync,
    a rename and a directory fsync (0.5 ms at the median on the test VM's disk, 4 ms at p99), which the
    writer's loop, and every record behind it, must not wait out.  A position put while an older one of the
    same cursor waits replaces it.  A failed store calls `fail(operation, error)` (it stops the log) and
    stores nothing more: the thread never ends silently."""

    def __init__(self, directory: Path, fail: Callable[[str, BaseException], object]) -> None:
        self.directory = directory
        self._fail = fail
        self._pending: dict[str, int] = {}
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="walsvc-cursors", daemon=True)
        self._thread.start()

    def put(self, positions: dict[str, int]) -> None:
        """Store these LSNs (cursor name -> LSN) soon; returns at once."""
        with self._cond:
            self._pending.update(positions)
            self._cond.notify_all()

    def close(self) -> None:
        """Store what is pending, then end the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        fail_stop(self._store_until_stopped, lambda exc: self._fail("cursor thread", exc))

    def _store_until_stopped(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, {}
            for name, lsn in batch.items():
                try:
                    store(self.directory, name, lsn)
                except OSError as exc:  # a write-path I/O error like any other: fail-stop, never retried
                    self._fail(f"group cursor store ({name})", exc)
                    return


def load_all(directory: Path) -> dict[str, int]:
    """Every named cursor that holds a valid LSN."""
    cdir = directory / DIRNAME
    out: dict[str, int] = {}
    try:
        names = os.listdir(cdir)
    except FileNotFoundError:
        return out
    for fname in names:
        name = fname[:-len(SUFFIX)]
        if fname.endswith(SUFFIX) and _NAME_RE.match(name) and not name.startswith("."):
            lsn = load(directory, name)  # a file no reader could have written is ignored, not fatal
            if lsn is not None:
                out[name] = lsn
    return out


class CursorLock(PidLock):
    """Exclusive use of one named cursor, released by `release()` or by the process's death."""

    def __init__(self, directory: Path, name: str) -> None:
        check_name(name)
        super().__init__(_cursor_dir(Path(directory)) / (name + LOCK_SUFFIX),
                         lambda pid: CursorBusyError(str(directory), name, pid,
                                                     by_writer=pid is not None and pid == holder_pid(Path(directory))))


def lag_rows(cursors: dict[str, int], last_lsn: int) -> dict[str, dict[str, int]]:
    """Each cursor as status, `walsvc cursors list` and `Log.cursors` show it: its LSN and how many records up
    to `last_lsn` its reader has yet to process."""
    return {name: {"lsn": lsn, "lag_records": max(0, last_lsn - lsn)} for name, lsn in cursors.items()}


def advance(directory: Path, name: str, lsn: int) -> None:
    """A reader's commit: forward only.  The same LSN again is a no-op; an earlier one is an error, because
    storing it would make the reader process those records twice after a restart."""
    check_lsn("lsn", lsn, lowest=0)
    check_name(name)
    with _storing(directory):
        stored = load(directory, name)
        if stored is not None and lsn <= stored:
            if lsn == stored:
                return
            raise CursorError(f"cursor {name!r} is at LSN {stored}; commit({lsn}) would move it backwards "
                              "(walsvc.reset_cursor or `walsvc cursors reset` moves it on purpose)")
        _write(directory, name, lsn)


def list_cursors(directory: str | os.PathLike) -> dict[str, int]:
    """Every named cursor of the log in `directory`: name -> last processed LSN."""
    return load_all(directory_path(directory))


def reset_cursor(directory: str | os.PathLike, name: str, start: int | str) -> int:
    """Make the reader `name` resume at `start` (an LSN, "earliest" or "latest") on its next open.

    Refused while a reader holds the cursor, and (TruncatedError) for an LSN retention already deleted: the
    reader could not resume there.  Returns the stored value (the LSN before `start`)."""
    from .seek import committed_end
    from .segment import list_segments
    directory = directory_path(directory)
    check_name(name)
    if not directory.is_dir():
        raise ConfigError("directory", f"{directory} is not a log directory (it does not exist)")
    end = committed_end(directory)
    explicit = isinstance(start, int) and not isinstance(start, bool)
    if not (start in ("earliest", "latest") or explicit and 1 <= start <= end + 1):
        raise CursorError(f"cannot reset cursor {name!r} to {start!r}: give 'earliest', 'latest' or an LSN "
                          f"from 1 to {end + 1} (one past the committed end)")
    lock = CursorLock(directory, name)
    try:
        with _storing(directory):  # the oldest segment listed here stays until the cursor is stored
            segments = list_segments(directory)
            first = segments[0][0] if segments else 1
            if explicit and start < first:
                raise TruncatedError(start, first)
            lsn = first - 1 if start == "earliest" else end if start == "latest" else start - 1
            _write(directory, name, lsn)
    finally:
        lock.release()
    return lsn


def delete_cursor(directory: str | os.PathLike, name: str) -> bool:
    """Forget the reader `name` (retention stops protecting its records).  Refused while a reader holds it;
    False if there was no such cursor."""
    directory = directory_path(directory)
    path = directory / DIRNAME / (check_name(name) + SUFFIX)
    if not path.exists():
        return False
    lock = CursorLock(directory, name)  # the .lock file stays: removing it could let two readers in
    try:
        path.unlink()
        sync_dir(directory / DIRNAME)
    finally:
        lock.release()
    return True

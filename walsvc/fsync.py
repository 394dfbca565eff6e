"""Making bytes durable: the fsync calls of each platform and the three policies.

- `always`: an append is acknowledged only after an fsync covered it.  Callers that wait (`sync_through`)
  queue on one lock, and the first to get it syncs for all: N concurrent appends share one fsync (group
  commit, as PostgreSQL does it).  Appends that do not wait are fsynced by a background thread as soon as
  anything is unsynced, or, with `thread=False`, when their owner says: the writer service fsyncs in its
  loop after a drain that took one batch and left nothing waiting, so whatever arrived during one fsync
  shares the next, with no thread hand-off on the way to the ack (Redis's `appendfsync always` works the
  same way); when it took several or more is waiting (pipelined producers) it hands the fsync to the
  thread (`sync_soon`), which overlaps with taking the next batches in.
- `batch`: at most one fsync per `window_ms`, and never later than `window_ms` after the first unsynced
  write, whether or not another write follows (nori-wal waited for the next append, so a burst's last write
  could stay unsynced).  After a quiet spell the first write is synced at once; under load, each fsync
  covers a whole window of writes.
- `os`: never fsync; written is committed.

Any fsync error stops the log for good: on Linux a failed fsync may drop the dirty pages, so a retry could
report success for data that is gone (PostgreSQL's "fsyncgate").  The Syncer holds the one stop reason of the
log (`failed`, set by `fail` from any thread, first failure wins); the flusher thread's body is wrapped so that
no exception ends it without stopping the log.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import LogStoppedError, WriteStepError
from .metrics import Histogram

logger = logging.getLogger("walsvc.log")


@contextmanager
def write_step(operation: str, path: str | os.PathLike | None) -> Iterator[None]:
    """Name the write-path step an OSError comes from (the innermost name wins), for the stop reason."""
    try:
        yield
    except WriteStepError:
        raise
    except OSError as exc:
        raise WriteStepError(operation, path, exc) from exc


def pwrite_all(fd: int, data: bytes, offset: int, done: int = 0) -> None:
    """Write `data[done:]` at `offset + done`, all of it.  A write may legally stop short (a disk filling up
    mid-write); its count must not be taken for the whole, or the file holds bytes that never check.
    The rest is written until it fails with the errno that cut it short (EIO if a write makes no progress)."""
    view = memoryview(data)
    while done < len(data):
        n = os.pwrite(fd, view[done:], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"write made no progress at {done} of {len(data)} bytes")
        done += n


if sys.platform == "darwin":
    import fcntl

    def sync_data(fd: int) -> None:
        """macOS fsync does not flush the drive cache; F_FULLFSYNC does."""
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
        except OSError:
            os.fsync(fd)
elif hasattr(os, "fdatasync"):
    sync_data = os.fdatasync
else:
    sync_data = os.fsync


def sync_dir(path: str | os.PathLike, operation: str = "directory fsync") -> None:
    """Fsync a directory so a created, renamed or deleted entry survives power loss; `operation` names the
    step in a stop reason (after a segment create, or after a retention delete)."""
    with write_step(operation, path):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def preallocate(fd: int, size: int) -> None:
    """Reserve `size` bytes so a full disk shows up at segment creation, not in the middle of a write."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    elif sys.platform == "darwin":
        import fcntl
        import struct
        for flags in (0x6, 0x4):  # F_ALLOCATECONTIG | F_ALLOCATEALL, then F_ALLOCATEALL alone
            fstore = struct.pack("IiqqQ", flags, 3, 0, size, 0)  # F_PEOFPOSMODE
            try:
                fcntl.fcntl(fd, 42, fstore)  # F_PREALLOCATE
                break
            except OSError:
                continue
    os.ftruncate(fd, size)


def fail_stop(body: Callable[[], None], fail: Callable[[BaseException], object]) -> None:
    """Run a storage thread's `body`: whatever ends it early, other than the log's own stop, is handed to
    `fail`, which stops the log with it as the reason (a thread never dies silently)."""
    try:
        body()
    except LogStoppedError:
        pass
    except BaseException as exc:
        fail(exc)


class Syncer:
    """Applies an fsync policy.  Positions here are *ends*: one past the last LSN covered.  The log supplies
    `snapshot()` -> (fd, end written so far, path of that file); `publish(end)` must succeed before an end
    counts as committed (the HEAD update), and `on_commit(end)` is told each new committed end after that.
    `on_stop(error)` is told the stop reason once, from the thread that failed.  The caller must hold `lock`
    while it swaps or closes the fd that `snapshot` returns, so an fsync never runs on a closed descriptor.
    `thread=False`: under `always` a write does not wake the fsync thread; the owner calls `sync()` (the
    fsync in its own thread) or `sync_soon()` (handed to the thread) after its writes.  Under `os` a write
    does not commit; the owner calls `commit_written()`.  `batch` wakes its thread either way, for the
    window's timer.
    """

    def __init__(self, policy: str, window_ms: int, snapshot: Callable[[], tuple[int, int, object]],
                 on_commit: Callable[[int], None], committed_end: int, *,
                 publish: Callable[[int], None] | None = None,
                 on_stop: Callable[[LogStoppedError], None] | None = None, thread: bool = True) -> None:
        self.latency = Histogram()
        self.policy = policy
        self.window = window_ms / 1000.0 if policy == "batch" else 0.0
        self.lock = threading.Lock()
        self.committed_end = committed_end
        self.durable_end = committed_end
        self.failed: LogStoppedError | None = None
        self._snapshot = snapshot
        self._publish = publish
        self._on_commit = on_commit
        self._on_stop = on_stop
        # Orders commits against the stop: once `failed` is set, no commit follows (an fsync that was already
        # running when another thread stopped the log does not commit), so whoever reads the committed end
        # after seeing the stop reads its final value.  Reentrant: a failing HEAD update stops the log from
        # inside a commit.
        self._fail_lock = threading.RLock()
        self._written_end = committed_end  # the end of the last whole write (`written`)
        self._publishing = False
        self._dirty_since: float | None = None
        self._last_sync = 0.0  # monotonic time the last fsync ended
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._auto = thread or policy == "batch"  # each write commits or wakes the thread (else: the owner)
        if policy != "os":
            self._thread = threading.Thread(target=self._flusher, name="walsvc-fsync", daemon=True)
            self._thread.start()

    def check(self) -> None:
        if self.failed is not None:
            raise self.failed

    def fail(self, operation: str, path: str | os.PathLike | None, exc: BaseException) -> LogStoppedError:
        """Stop the log for good because `operation` on `path` raised `exc`; returns the stop reason (the
        first failure's, if another thread stopped the log first), to raise."""
        with self._fail_lock:
            if self.failed is None and self._commits_owed():
                # The owner commits each loop turn's writes after the turn: commit the whole writes made
                # before this failure first, as a commit after every write would have (so they are acked,
                # not refused, though they are in the log).  A failing HEAD update stops the log itself.
                try:
                    self._commit(self._written_end)
                except LogStoppedError:
                    pass
            first = self.failed is None
            if first:
                self.failed = LogStoppedError.from_exception(operation, path, exc)
                self.failed.__cause__ = exc
        if first:
            logger.error("%s", self.failed, exc_info=None if isinstance(exc, OSError) else exc)
            if self._on_stop is not None:
                self._on_stop(self.failed)
        return self.failed

    def _commits_owed(self) -> bool:
        """Whether whole writes wait for the owner's `commit_written`, and no HEAD update is under way (one
        that failed is not tried again: fail-stop)."""
        return (self.policy == "os" and not self._auto and not self._publishing
                and self._written_end > self.committed_end)

    def written(self, end_lsn: int) -> None:
        """Called after each write (write lock held): commit now (os), or wake the flusher; with
        `thread=False`, neither: the owner says when (`commit_written`, `sync`, `sync_soon`)."""
        self._written_end = end_lsn
        if self._auto:
            if self.policy == "os":
                self._commit(end_lsn)
            else:
                self.sync_soon()

    def commit_written(self) -> None:
        """Under `os` with `thread=False`: commit everything written so far, without an fsync.  The owner
        calls it once per turn of its loop: one HEAD update, and one wake-up of each reader, for all of the
        turn's writes (the writer acks them after it anyway)."""
        self._commit(self._written_end)

    def sync_soon(self) -> None:
        """Have the background thread fsync what is written, without waiting for it: the owner of a
        `thread=False` syncer calls this instead of `sync()` when more input is waiting, so the fsync
        overlaps with taking that input in."""
        if self._dirty_since is None and self._thread is not None:
            with self._wake:
                self._dirty_since = time.monotonic()
                self._wake.notify()

    def sync(self) -> int:
        """Fsync everything written so far (any policy); returns the committed end."""
        with self.lock:
            return self._sync_locked()

    def sync_through(self, end_lsn: int) -> None:
        """Block until everything below `end_lsn` is durable, sharing an fsync with whoever else waits."""
        if self.durable_end >= end_lsn:
            return
        with self.lock:
            if self.durable_end < end_lsn:
                self._sync_locked()

    def _sync_locked(self) -> int:
        self.check()
        # Clear before the snapshot: a write landing after it sets the flag again and gets its own fsync
        # (cleared after, such a write was stranded until the next one).
        self._dirty_since = None
        fd, end, path = self._snapshot()
        if end <= self.durable_end:
            return self.committed_end
        start = time.perf_counter()
        try:
            sync_data(fd)
        except OSError as exc:
            raise self.fail("fdatasync", path, exc) from exc
        self.latency.record(time.perf_counter() - start)
        self._last_sync = time.monotonic()
        self.durable_end = end
        self._commit(end)
        return self.committed_end

    def _commit(self, end_lsn: int) -> None:
        # Compared under the lock: the loop's `commit_written` and the rotation thread's `mark_durable` may
        # commit at once, and the lower end must not be published after the higher one (HEAD going back).
        with self._fail_lock:
            if end_lsn <= self.committed_end:
                return
            self.check()
            if self._publish is not None:
                self._publishing = True  # a failure in it is no time to commit (`fail`)
                try:
                    self._publish(end_lsn)  # raises LogStoppedError if HEAD could not be updated: no commit
                finally:
                    self._publishing = False
            self.committed_end = end_lsn
        self._on_commit(end_lsn)

    def mark_durable(self, end_lsn: int) -> None:
        """The log fsynced on its own (sealing a segment): everything up to `end_lsn` is durable."""
        self.durable_end = max(self.durable_end, end_lsn)
        self._commit(end_lsn)

    def _flusher(self) -> None:
        fail_stop(self._flush_until_stopped, lambda exc: self.fail("fsync thread", None, exc))

    def _flush_until_stopped(self) -> None:
        while True:
            with self._wake:
                # Read the flag once: a sync() on another thread may clear it at any moment.
                while (since := self._dirty_since) is None and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return
                delay = max(since, self._last_sync + self.window) - time.monotonic()
                if delay > 0:
                    self._wake.wait(delay)
                if self._stop:
                    return
            self.sync()

    def close(self) -> None:
        if self._thread is not None:
            with self._wake:
                self._stop = True
                self._wake.notify()
            self._thread.join()

"""The service's tailing reader: reads the files itself (walsvc/scan.py), woken by the writer's commits.

Its bound is the committed LSN, read from HEAD after every wake-up.  What wakes it is walsvc/wakeup.py's
choice: the writer's rewrite of HEAD (inotify) or its COMMIT message; either way HEAD also names the writer,
and a new one means the bytes past the old one's commits may have been cut and written over.  A missed or late
wake-up costs at most `recheck_s`, after which HEAD is read again.  A named reader keeps a durable cursor,
and `Reader(group=...)` is a consumer of a group instead (`GroupReader`, at the end of this module: it is a
reader that claims its ranges from the writer before it reads them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import os
import time
import weakref
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, TypeVar

import zmq

from . import cursor
from . import protocol as P
from .config import Config, LogConfig, ReaderConfig, check_timeout, client_config
from .endpoints import load as load_endpoints
from .errors import ConfigError, CursorError, GroupError, LogClosedError, ServiceUnavailableError
from .head import Head, HeadReader
from .record import Record
from .scan import LogReader
from .segment import list_segments
from .wakeup import CommitSubscription, HeadWatch, Wakeup, close_context, wait_for_commit

T = TypeVar("T")
logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0  # a group consumer's wait for the writer's answer to one control request


def _checked_start(directory: Path, start: int | str | datetime.datetime) -> int | str:
    """A reader's start as an LSN or "earliest"/"latest": a datetime becomes the first LSN written at or after
    it; an LSN past the committed end is refused, as `walsvc tail --from` refuses it."""
    from .seek import committed_end, lsn_at_time
    if isinstance(start, datetime.datetime):
        return lsn_at_time(directory, start)
    if isinstance(start, int) and not isinstance(start, bool) and directory.is_dir():
        end = committed_end(directory)
        if start > end + 1:
            raise ConfigError("start", f"LSN {start} is past the end of the log in {directory} (committed up to "
                                       f"LSN {end}); start='latest' waits for new records")
    return start


def _weak(method: Callable[[], T]) -> Callable[[], T]:
    """`method` without a reference to its object: a Reader's LogReader calls back into the Reader, and a
    strong reference would make a cycle, so a reader dropped without close would keep its files and its
    cursor's lock until the next garbage collection instead of being freed at once."""
    ref = weakref.WeakMethod(method)
    return lambda: ref()()


def reader_settings(config: Config | None, **given: object) -> ReaderConfig:
    """The `[reader]` section of `config` (or its defaults) with the keyword arguments given (not None)."""
    return dataclasses.replace(config.reader if config else ReaderConfig(),
                               **{k: v for k, v in given.items() if v is not None})


def read_limits(directory: Path, config: Config | None, max_record_bytes: int | None,
                max_batch_bytes: int | None) -> tuple[int, int]:
    """The largest record and batch a reader accepts: as given, else the largest the writer (its ENDPOINTS),
    the config's [log] section or the defaults allow, so that no record a writer took is refused."""
    try:
        endpoints = load_endpoints(directory)
    except ServiceUnavailableError:
        endpoints = None
    own = (config.log if config else LogConfig()).read_limits  # the config's, never below the defaults
    limits = []
    for key, given in (("max_record_bytes", max_record_bytes), ("max_batch_bytes", max_batch_bytes)):
        if given is not None and (type(given) is not int or given < 1):
            raise ConfigError(key, f"must be a positive integer, got {given!r}")
        limits.append(given or max(own[key], getattr(endpoints, key, 0)))
    return limits[0], limits[1]


class Reader:
    """A tailing reader for another process: reads the files itself, wakes on the writer's commits.

    `start` is an LSN, "earliest", "latest" or a datetime (the first record written at or after it); an LSN
    past the committed end is a ConfigError (never a silent skip to it: "latest" waits for new records).  A
    Config or a TOML config file path names the directory too, and then its `[reader]` section gives the
    defaults of `start`, `wake` and `recheck_s` (a keyword argument wins over the file).  The record and batch
    limits default to the largest the writer (ENDPOINTS), the config or the defaults allow.  A
    named reader (`name=`) resumes after its stored cursor and feeds retention with `commit(lsn)`.  The bound
    is HEAD's committed LSN, read after each wake-up and at least every `recheck_s` (50 ms by default) while
    idle, so a missed or late wake-up costs at most that.  `wake` chooses what wakes it: "auto" (the default)
    watches HEAD with inotify where it can, "commit" subscribes to the writer's COMMIT messages
    (walsvc/wakeup.py).
    With no writer running `offline` is True and the reader reads what the next open will keep; damage short
    of that end raises CorruptionError (see `LogReader._check_offline_stop`).
    """

    def __new__(cls, *args: object, group: str | None = None, **kwargs: object) -> "Reader":
        """`Reader(dir, group="billing", consumer="w1")` is a consumer of a group (GroupReader below):
        it shares the records with the group's other consumers instead of reading them all."""
        if group is not None and cls is Reader:
            return super().__new__(GroupReader)
        return super().__new__(cls)

    def __init__(self, directory: str | os.PathLike | Config = "./wal-data",
                 start: int | str | datetime.datetime | None = None, *, name: str | None = None,
                 max_record_bytes: int | None = None, max_batch_bytes: int | None = None,
                 recheck_s: float | None = None, wake: str | None = None) -> None:
        self.directory, config = client_config(directory)
        settings = reader_settings(config, recheck_s=recheck_s, wake=wake)
        explicit = start is not None and not isinstance(start, str)  # an LSN or a time, not a reset policy
        start = _checked_start(self.directory, settings.start if start is None else start)
        self.name = cursor.check_name(name) if name is not None else None
        max_record_bytes, max_batch_bytes = read_limits(self.directory, config, max_record_bytes, max_batch_bytes)
        self._head = HeadReader(self.directory)
        self.recheck_s = settings.recheck_s
        self.wake = settings.wake
        self.offline = True
        self.last_head: Head | None = None
        self._known = 0  # the highest committed LSN seen, from HEAD or a COMMIT
        self._checked_at = 0.0  # monotonic time of the last HEAD read
        self._wakeup: Wakeup | None = None
        self._cursor_lock: cursor.CursorLock | None = None
        self._log: LogReader | None = None
        try:
            self._watch_head()  # before HEAD is first read: a commit in between must still wake us
            self._read_head()  # set `offline` now: it said True beside a live writer until the first poll
            if self.name is not None:
                self._cursor_lock = cursor.CursorLock(self.directory, self.name)
                stored = cursor.load(self.directory, self.name)
                if stored is not None and explicit:  # silently resuming elsewhere would hide the mistake
                    raise ConfigError("start", f"the cursor {self.name!r} exists (at LSN {stored}): a named reader "
                                      f"resumes there; give no start (or 'earliest'/'latest', which only "
                                      f"start a new cursor), or move it with walsvc.reset_cursor")
                if stored is not None:
                    start = stored + 1
            self._log = LogReader(self.directory, start, bound=_weak(self._read_head),
                                  written_end=_weak(self._written_end), max_record_bytes=max_record_bytes,
                                  max_batch_bytes=max_batch_bytes)
        except BaseException:
            if self._cursor_lock is not None:
                self._cursor_lock.release()
            if self._wakeup is not None:
                self._wakeup.close()
            self._head.close()
            raise
        self._closed = False

    def _watch_head(self) -> None:
        """Choose how to sleep until a commit (walsvc/wakeup.py): with `wake="auto"` a watch on HEAD where
        inotify works (HEAD that does not exist yet, before any writer ran, is watched once it does), else a
        subscription to the writer's COMMIT messages."""
        if self.wake == "auto":
            try:
                self._wakeup = HeadWatch(self._head.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                logger.info("reader of %s: no inotify watch on HEAD (%s); COMMIT messages wake it", self.directory,
                            exc)
        self._wakeup = CommitSubscription(self.directory)

    @property
    def woken_by(self) -> str | None:
        """What wakes this reader now: "head" (an inotify watch of HEAD), "commit" (COMMIT messages), or None
        while HEAD does not exist yet (then it rereads HEAD every `recheck_s`).  `wake="auto"` falls back to
        "commit" where inotify is unavailable, and logs why."""
        if self._wakeup is None:
            return None
        return "head" if isinstance(self._wakeup, HeadWatch) else "commit"

    def _wait(self, wait_s: float) -> int | None:
        """Sleep until a commit or `wait_s` (0: only look): see `Wakeup.wait`."""
        if self._wakeup is None:
            self._watch_head()
            if self._wakeup is None:
                if wait_s > 0:
                    time.sleep(wait_s)
                return None
            return 0  # a commit may have come between our last HEAD read and the watch: read HEAD again
        return self._wakeup.wait(wait_s)

    def _read_head(self) -> int | None:
        """HEAD's committed LSN, or None with no writer running (then `offline`)."""
        h, last = self._head.read(), self.last_head
        self.last_head = h
        self._checked_at = time.monotonic()
        # A HEAD that moved since our last read, under the same writer we saw alive then, is proof enough
        # that the writer runs: no kill(pid, 0) on every poll of a tailing reader.  A HEAD that stands
        # still is asked about, so a writer's death is noticed on the next poll that finds nothing new.
        moved = (last is not None and not self.offline and h is not None and h.writer_pid == last.writer_pid
                 and h.committed_lsn != last.committed_lsn)
        if last is not None and h is not None and h.writer_pid != last.writer_pid and self._log is not None:
            self._log.reopen()  # another writer: what we buffered past the old one's commits may be gone
        self.offline = h is None or not (moved or h.writer_alive())
        if self.offline:
            return None
        self._known = max(self._known, h.committed_lsn)
        return h.committed_lsn

    def _written_end(self) -> tuple[int, int] | None:
        """Where the writer's frames end in the active segment, for the scan limit: from HEAD, read again
        if the one we have predates the commit we read up to (the writer updated HEAD before the COMMIT)."""
        h = self.last_head
        if h is not None and not self.offline and h.committed_lsn < self._known:
            h = self.last_head = self._head.read() or h
        return None if h is None or self.offline else (h.active_base_lsn, h.active_end)

    def _caught_up(self) -> bool:
        """True while nothing can be new for us: everything we know of is read, HEAD was read within
        `recheck_s`, and no COMMIT is waiting (so a poll can go straight to sleep)."""
        if self._log.next_lsn <= self._known or self.offline or time.monotonic() - self._checked_at >= self.recheck_s:
            return False
        committed = self._wait(0)
        return committed is None or not self._news(committed)

    def _news(self, committed: int) -> bool:
        """Note a COMMIT's LSN (0: unreadable); True if it names a record we have not read (or is unreadable)."""
        self._known = max(self._known, committed)
        return committed == 0 or committed >= self._log.next_lsn

    @property
    def next_lsn(self) -> int:
        return self._log.next_lsn

    def poll(self, timeout: float | None = None) -> list[Record]:
        """The next records (a batch), waiting up to `timeout` seconds (None: forever); [] on timeout."""
        if self._closed:
            raise LogClosedError("reader is closed")
        deadline = None if check_timeout(timeout) is None else time.monotonic() + timeout
        read = not self._caught_up()
        while True:
            if read:
                batch = self._log.read_batch()
                if batch:
                    return batch
            wait = self.recheck_s if deadline is None else min(self.recheck_s, deadline - time.monotonic())
            if wait <= 0:
                return []
            committed = self._wait(wait)
            if committed is None and self.offline and self._wakeup is not None:
                self._wakeup.refresh()
            # HEAD is read again at least every recheck_s, whatever came: PUB may have dropped a COMMIT.
            read = ((committed is not None and self._news(committed))
                    or time.monotonic() - self._checked_at >= self.recheck_s)

    def __iter__(self) -> Iterator[Record]:
        """Every record from the start position, forever (waits for new ones)."""
        while True:
            yield from self.poll(None)

    def __aiter__(self) -> AsyncIterator[Record]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Record]:
        loop = asyncio.get_running_loop()
        while True:
            for record in await loop.run_in_executor(None, self.poll, 0.5):
                yield record

    def commit(self, lsn: int) -> None:
        """Durably record that this named reader has processed everything up to `lsn`.

        Only what this reader has delivered can be committed: a cursor past it would skip records nobody
        read, and after close the cursor is no longer this reader's to move."""
        if self.name is None:
            raise ConfigError("name", "only a named reader (Reader(..., name=...)) keeps a cursor to commit")
        if self._closed:
            raise LogClosedError(f"reader {self.name!r} is closed: its cursor is no longer its to commit")
        delivered = self._log.next_lsn - 1
        if isinstance(lsn, int) and not isinstance(lsn, bool) and lsn > delivered:
            raise CursorError(f"cursor {self.name!r}: commit({lsn}) is past the last record this reader delivered "
                              f"(LSN {delivered}); committing it would skip records nobody read")
        cursor.advance(self.directory, self.name, lsn)

    def lag(self) -> dict[str, int]:
        """How far behind the committed LSN this reader is, in records and (to segment granularity) bytes."""
        if self._closed:
            raise LogClosedError("reader is closed")
        committed = self._read_head()
        h = self.last_head
        if committed is None or h is None:
            return {"records": 0, "bytes": 0, "committed_lsn": committed or 0}
        records = max(0, committed - self._log.next_lsn + 1)
        position = self._log.position()
        byte_lag = 0
        if records and position is not None:
            seg_base, offset = position
            for base, path in list_segments(self.directory):
                if base < seg_base:
                    continue
                size = h.active_end if base == h.active_base_lsn else path.stat().st_size
                byte_lag += max(0, size - (offset if base == seg_base else 0))
        return {"records": records, "bytes": byte_lag, "committed_lsn": committed}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._log.close()
            self._head.close()
            if self._cursor_lock is not None:
                self._cursor_lock.release()
            if self._wakeup is not None:
                self._wakeup.close()

    def __del__(self) -> None:
        """A reader dropped without close frees its files, its wake-up and its cursor's lock (a named cursor
        would otherwise stay busy until the process ends)."""
        if not getattr(self, "_closed", True):
            self.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GroupReader(Reader):
    """One consumer of a group: claims LSN ranges from the writer, reads them from the segment files.

    Each poll first acks the range the previous poll returned (its records count as processed once the caller
    asks for more, as with Kafka's auto-commit), then claims the next range over the control socket and reads
    it straight from the files, as any reader does.  The writer decides who gets what (walsvc/group.py); a
    consumer that dies or stalls past `lease_ms` loses its range to the next consumer that claims.

    See `walsvc.Reader` for the options it shares.  `max_records` bounds one claimed range; `lease_ms` is how
    long the group waits for its ack before giving the range to another.  These two, `start` and `recheck_s`
    take their defaults from the `[reader]` section of a given Config or config file."""

    def __init__(self, directory: str | os.PathLike | Config = "./wal-data",
                 start: int | str | datetime.datetime | None = None, *, group: str, consumer: str,
                 max_records: int | None = None, lease_ms: int | None = None,
                 max_record_bytes: int | None = None, max_batch_bytes: int | None = None,
                 recheck_s: float | None = None) -> None:
        self.directory, config = client_config(directory)
        settings = reader_settings(config, max_records=max_records, lease_ms=lease_ms, recheck_s=recheck_s)
        self.group = group
        self.consumer = consumer
        # A time becomes its LSN here, as for a named reader (the writer's claim takes LSNs only).
        self.start = _checked_start(self.directory, settings.start if start is None else start)
        self.max_records = settings.max_records
        self.lease_ms = settings.lease_ms
        self.max_record_bytes, self.max_batch_bytes = read_limits(self.directory, config, max_record_bytes,
                                                                  max_batch_bytes)
        self.recheck_s = settings.recheck_s
        self.redelivered = 0
        self.expired_acks = 0  # acks the group refused: their ranges went to other consumers as well
        self._yielded: int | None = None  # the last record iteration handed out (None: the range went by poll)
        self._lease: dict | None = None  # the range the last poll returned, acked by the next poll
        self._end = 0  # end of the range being read: the bound of the file reader
        self._log: LogReader | None = None
        self._ctx = zmq.Context()
        self._req: zmq.Socket | None = None
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, P.TOPIC_COMMIT)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._closed = False
        try:
            self._endpoints = load_endpoints(self.directory)
        except ServiceUnavailableError as exc:
            self._closed = True
            close_context(self._ctx, self._sub)
            raise ServiceUnavailableError(f"consumer group {group!r} needs a running writer: {exc}") from None
        self._endpoints.secure(self._sub).connect(self._endpoints.publish)

    def _request(self, op: str, **args: object) -> dict:
        """One control request, with a fresh socket after a timeout (a REQ socket cannot resend)."""
        if self._req is None:
            self._req = self._endpoints.secure(self._ctx.socket(zmq.REQ))
            self._req.setsockopt(zmq.LINGER, 0)
            self._req.connect(self._endpoints.control)
        self._req.send(P.encode_request(op, group=self.group, consumer=self.consumer, **args))
        if not self._req.poll(int(REQUEST_TIMEOUT_S * 1000)):
            self._req.close(linger=0)
            self._req = None
            raise ServiceUnavailableError(f"the writer of {self.directory} did not answer {op} within "
                                          f"{REQUEST_TIMEOUT_S:g} s")
        reply = json.loads(self._req.recv())
        if not reply.get("ok"):
            error = str(reply.get("error", "refused"))
            said = f"consumer group {self.group!r}: "  # the writer's GroupError says it already
            raise GroupError(self.group, error[len(said):] if error.startswith(said) else error)
        return reply

    def _ack_previous(self) -> None:
        """Ack the last polled range.  A refused ack (the lease expired: its records go to another consumer
        too) is counted in `expired_acks` and logged, never silent; `commit` raises it instead."""
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                self._request("group_ack", lease=lease["id"])
            except GroupError as exc:
                self.expired_acks += 1
                logger.warning("consumer %r of group %r: records %d..%d may be delivered again: %s", self.consumer,
                               self.group, lease["first"], lease["end"] - 1, exc)
                raise

    def poll(self, timeout: float | None = None) -> list[Record]:
        """The records of the next claimed range, waiting up to `timeout` s (None: forever); [] on timeout.

        Calling poll again tells the group the previous records are processed."""
        if self._closed:
            raise LogClosedError("group reader is closed")
        check_timeout(timeout)
        try:
            self._ack_previous()
        except GroupError:
            pass  # logged and counted: poll goes on (at-least-once), as Kafka's auto-commit does
        self._yielded = None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            reply = self._request("group_claim", max_records=self.max_records, lease_ms=self.lease_ms,
                                  start=self.start)
            lease = reply["lease"]
            if lease is not None:
                records = self._read(lease["first"], lease["end"])
                self._lease = lease
                if lease["redelivery"]:
                    self.redelivered += len(records)
                return records
            wait = self.recheck_s if deadline is None else min(self.recheck_s, deadline - time.monotonic())
            if wait <= 0:
                return []
            wait_for_commit(self._sub, wait)

    def _read(self, first: int, end: int) -> list[Record]:
        """Records first..end-1 from the files: every one of them is committed (the writer said so)."""
        self._end = end
        if self._log is None or self._log.next_lsn != first:
            if self._log is not None:
                self._log.close()
            self._log = LogReader(self.directory, first, bound=lambda: self._end - 1,
                                  max_record_bytes=self.max_record_bytes, max_batch_bytes=self.max_batch_bytes)
        out: list[Record] = []
        while self._log.next_lsn < end:
            batch = self._log.read_batch()
            if not batch:
                raise GroupError(self.group, f"records {self._log.next_lsn}..{end - 1} of a claimed range are "
                                             "not readable in the log files")
            out.extend(batch)
        if out and out[-1].lsn >= end:  # the last frame ran past the range: keep ours, reopen next time
            out = [r for r in out if r.lsn < end]
            self._log.close()
            self._log = None
        return out

    def __iter__(self) -> Iterator[Record]:
        """Every record the group gives this consumer, forever.  A loop left before the last record of a range
        (break, return) does not ack that range on close: it goes back to the group (see close)."""
        while True:
            for record in self.poll(None):
                self._yielded = record.lsn
                yield record

    async def _aiter(self) -> AsyncIterator[Record]:
        loop = asyncio.get_running_loop()
        while True:
            for record in await loop.run_in_executor(None, self.poll, 0.5):
                self._yielded = record.lsn
                yield record

    def commit(self, lsn: int) -> None:
        """Ack the range the last poll returned now, if `lsn` is its last record or later.

        Raises GroupError when the group refuses the ack (the lease expired, so the range is, or will be,
        delivered to another consumer too), as Kafka's commitSync raises CommitFailedException."""
        if self._closed:
            raise LogClosedError("group reader is closed")
        if self._lease is not None and lsn >= self._lease["end"] - 1:
            self._ack_previous()

    @property
    def woken_by(self) -> str:
        """Always "commit": a consumer's claims go to the writer, and its COMMIT messages wake it."""
        return "commit"

    @property
    def next_lsn(self) -> int:
        return self._lease["end"] if self._lease else 0

    def lag(self) -> dict[str, int]:
        """The group's lag: committed records not yet acked by any consumer (this call is a heartbeat too)."""
        if self._closed:
            raise LogClosedError("group reader is closed")
        reply = self._request("group_renew")
        return {"records": max(0, reply["committed_lsn"] + 1 - reply["position"]),
                "committed_lsn": reply["committed_lsn"]}

    def close(self, ack: bool = True) -> None:
        """Leave the group: the last polled range counts as processed (unless `ack` is False), anything else
        goes to the others at once."""
        if self._closed:
            return
        self._closed = True
        if self._lease is not None and self._yielded is not None and self._yielded < self._lease["end"] - 1:
            ack = False  # iteration stopped inside the range: records after it were never handed out
        if not ack:
            self._lease = None  # group_leave hands it back unacked
        try:
            try:
                self._ack_previous()
            except GroupError:
                pass  # logged and counted; leaving still hands back anything else we hold
            self._request("group_leave")
        except (GroupError, ServiceUnavailableError):
            pass  # the writer is gone or forgot us: our leases expire on their own
        finally:
            self._free()

    def _free(self) -> None:
        if self._log is not None:
            self._log.close()
        close_context(self._ctx, self._sub, self._req)

    def __del__(self) -> None:
        """Dropped without close: free the files and sockets now, without asking the writer (the group
        takes back this consumer's leases when they expire)."""
        if not getattr(self, "_closed", True):
            self._closed = True
            self._free()

    def __enter__(self) -> "GroupReader":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """Leaving the block on an exception acks nothing: the range being processed when the handler failed
        goes back to the group for another consumer, instead of counting as processed."""
        self.close(ack=exc_type is None)

"""The log: nori-wal's `Wal`, in Python, with LSNs, atomic batches, group commit and retention.

One `Log` owns a directory (an OS lock refuses a second writer).  Every `append_batch` becomes one frame:
encoded outside the lock, written with one pwritev under it, and made durable by the fsync policy
(fsync.py).  Readers in any process read the files directly up to the committed LSN, which the log
publishes in the head file after each commit.  Any I/O error while writing (a frame, an fsync, HEAD, a
rotation, a retention delete) stops the log for good, whichever thread meets it (Syncer.fail; docs/GUARANTEES.md,
"Fail-stop").

Rotation stays off the append path (rotation.py): the append that fills a segment renames a prepared spare
into place and carries on; the rotation thread seals the old segment and applies retention.  Until that
thread (or the fsync thread, whichever comes first) has fdatasynced the old segment and fsynced the
directory, nothing past the switch counts as durable: `_sync_target` settles pending rotations before every
fsync, so an ack under `always`/`batch` still means what it meant (docs/FORMAT.md, "Rotation").
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator

from . import frame as F
from . import access, logid, retention, stopped
from .config import LogConfig, check_lsn, directory_path
from .cursor import for_retention, lag_rows, load_all as load_cursors
from .errors import ConfigError, InvalidRecordError, LogClosedError, LogStoppedError, RecordTooLargeError
from .fsync import Syncer, pwrite_all, sync_data, sync_dir
from .head import Head, HeadWriter
from .lock import DirectoryLock
from .scan import LogReader, OpenSegment
from .record import Record, encode_many, implementation
from .recovery import Recovered, RecoveryInfo, recover, remember_batches
from .rotation import Pipeline
from .segment import (SPARE_NAME, ActiveSegment, create_segment, create_spare, install_spare, list_segments, now_us,
                      remove_spare, seal_segment, seal_table, unlink_segment)

logger = logging.getLogger("walsvc.log")

HEAD_SYNC_S = 0.1  # under always/batch, HEAD (and the durable LSN in it) is fsynced at most this often


def _start_empty_at(directory: Path, state: Recovered, info: RecoveryInfo, first_lsn: int) -> None:
    """Make a log with no segment start at `first_lsn` (the `first_lsn` option of `Log.open`)."""
    if list_segments(directory):
        raise ConfigError("first_lsn", f"{directory} already holds segments; first_lsn only starts an empty log")
    if first_lsn < 1:
        raise ConfigError("first_lsn", f"must be >= 1, not {first_lsn}")
    state.next_lsn = info.first_lsn = first_lsn


@dataclass(eq=False)
class _Rotation:
    """A segment switch whose old segment is not yet sealed.  Records from `end` on live in the new segment;
    before any of them counts as durable, the old segment's frames must be fdatasynced and the new name's
    directory entry fsynced (the flags say which is done; both are only touched under the syncer's lock)."""
    old: ActiveSegment
    end: int
    producers: dict[int, list[F.Appended]]
    frames_synced: bool = False
    dir_synced: bool = False


class Log:
    """An open, writable log.  Use `Log.open(directory, **options)`; options are LogConfig fields."""

    def __init__(self, directory: Path, config: LogConfig, on_commit: Callable[[int], None] | None,
                 verify: bool, first_lsn: int | None = None,
                 on_stop: Callable[[LogStoppedError], None] | None = None, fsync_thread: bool = True) -> None:
        self.directory = directory
        self.config = config
        self._on_commit_cb = on_commit
        access.prepare(directory, config.group)
        self._lock_file = DirectoryLock(directory)
        try:
            self.recovery, state = recover(directory, config, verify=verify)
            if first_lsn is not None:
                _start_empty_at(directory, state, self.recovery, first_lsn)
            self.log_id = logid.ensure(directory)
            remove_spare(directory)  # a crash left it half prepared, or unused: it never held a record
        except BaseException:
            self._lock_file.release()
            raise
        self._write_lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._producers: dict[int, collections.deque] = state.producers
        self._next_lsn = state.next_lsn
        self._next_segment_id = state.next_segment_id
        self._head = HeadWriter(directory)
        self._active: ActiveSegment = state.active or self._new_segment()
        self._rotations: list[_Rotation] = []  # in order; the rotation thread removes each once it is sealed
        self._segments_lock = threading.Lock()  # guards _sealed and _rotations together
        self._retention_lock = threading.Lock()  # one retention pass at a time (rotation thread, or a caller)
        # Recovery may have kept frames that were written but never fsynced (a kill -9 under `batch`):
        # make them durable before HEAD calls them committed.
        sync_data(self._active.fd)
        # After the active segment exists: when recovery ended on a sealed segment, that one is sealed too
        # (listing first would take it for the active one and hide it from retention, leaving a hole later).
        self._sealed = self._load_sealed()
        # The last LSN that exists, not next_lsn: LSNs skipped after a torn batch were never committed.
        committed_end = max(self.recovery.last_lsn + 1, self.recovery.first_lsn)
        self._written = (self._active.fd, committed_end, self._active.path)
        self._publish_head(committed_end - 1, self._pid, committed_end - 1, durable=True)
        self._head_synced = time.monotonic()
        self._syncer = Syncer(config.fsync, config.fsync_window_ms, self._sync_target, self._committed,
                              committed_end, publish=self._publish_committed,
                              on_stop=lambda reason: self._record_stop(reason, on_stop), thread=fsync_thread)
        self._last_ts = 0
        self.records_appended = 0
        self.bytes_appended = 0
        self.segments_deleted = 0
        self._pipeline = Pipeline(self._prepare_spare, lambda op, exc: self._syncer.fail(op, None, exc),
                                  lambda: self._syncer.failed)
        if self.recovery.lost_lsns is not None:
            first, end = self.recovery.lost_lsns
            logger.warning("%s: LSNs %d..%d were committed but are not on disk (lost in a crash, or cut as "
                           "damage); they are never handed out again", directory, first, end - 1)
            if end > self._next_lsn:  # (a torn batch's surviving header may have burned them already)
                self.skip_to(end)

    @classmethod
    def open(cls, directory: str | os.PathLike, *, config: LogConfig | None = None,
             on_commit: Callable[[int], None] | None = None, verify: bool = False, first_lsn: int | None = None,
             on_stop: Callable[[LogStoppedError], None] | None = None, fsync_thread: bool = True,
             **options: Any) -> "Log":
        """Open (creating if needed) and recover the log in `directory`.

        `on_commit(committed_lsn)` is called after each commit, and `on_stop(reason)` once if the log stops,
        each from the thread that made it.  `verify=True` also checks every sealed segment's checksum (reads
        the whole log).  `first_lsn` starts a log that has no segment yet at that LSN (restore rebuilds a log
        whose start retention had deleted); it is an error for a log that has one.  `fsync_thread=False`:
        under `always`, an `append_encoded(wait=False)` stays uncommitted until the caller's next `sync()`
        or `sync_soon()` (the writer service syncs once per loop turn), instead of waking the fsync thread;
        under `os`, it stays uncommitted until the caller's next `commit_written()` (once per loop turn in
        the writer service: one HEAD update for the turn's batches).
        """
        if config is None:
            config = LogConfig.from_options(options)
        elif options:
            raise ConfigError("config", "pass either config= or keyword options, not both")
        elif not isinstance(config, LogConfig):
            raise ConfigError("config", f"must be a walsvc.LogConfig, not {type(config).__name__}")
        if first_lsn is not None:
            check_lsn("first_lsn", first_lsn)
        path = directory_path(directory)
        if path.exists() and not path.is_dir():  # else a bare FileExistsError from mkdir
            raise ConfigError("directory", f"{path} is a file, not a log directory")
        return cls(path, config, on_commit, verify, first_lsn, on_stop, fsync_thread)

    # -- state -----------------------------------------------------------------------------------------

    @property
    def committed_lsn(self) -> int:
        """The last LSN made durable as the fsync policy promises (0: nothing yet)."""
        return self._syncer.committed_end - 1

    @property
    def next_lsn(self) -> int:
        return self._next_lsn

    @property
    def first_lsn(self) -> int:
        """The oldest LSN still stored (retention deletes below it)."""
        with self._segments_lock:
            return self._sealed[0].base_lsn if self._sealed else self._active.header.base_lsn

    @property
    def fsync_policy(self) -> str:
        return self.config.fsync

    @property
    def stop_reason(self) -> LogStoppedError | None:
        """Why the log stopped (None while it runs): the failed operation, its file and errno."""
        return self._syncer.failed

    def stop(self, operation: str, exc: BaseException) -> LogStoppedError:
        """Stop the log for good because `operation` failed with `exc` (for a caller's thread that hit an
        unexpected error while writing); returns the stop reason."""
        return self._syncer.fail(operation, None, exc)

    def _record_stop(self, reason: LogStoppedError, on_stop: Callable[[LogStoppedError], None] | None) -> None:
        """The log just stopped, in the thread that failed: record how far it had committed (walsvc/stopped.py),
        so readers with no writer and the next open keep nothing that was never committed; then tell the
        owner.  A disk that refuses even that leaves the files as they are, and says so."""
        # A HEAD written whole whose own fsync then failed did not commit, but readers may have read up to it;
        # its frames were durable before it was written (always, batch) or count as committed (os).
        keep = max(self._syncer.committed_end - 1, self._head.shown)
        try:
            stopped.write(self.directory, stopped.Stopped(keep, str(reason)))
        except OSError as exc:
            logger.error("could not record the stop in %s (%s): the next open keeps what reached the files, "
                         "committed or not", self.directory / stopped.NAME, exc)
        if on_stop is not None:
            on_stop(reason)

    def stats(self) -> dict[str, Any]:
        s = self._syncer
        return {
            "log_id": self.log_id, "first_lsn": self.first_lsn, "committed_lsn": self.committed_lsn,
            "next_lsn": self._next_lsn,
            "segments": len(self._sealed) + 1, "bytes": self.total_bytes(), "fsync": self.config.fsync,
            "records_appended": self.records_appended, "bytes_appended": self.bytes_appended,
            "fsyncs": s.latency.count, "fsync_latency": s.latency.summary(),
            "segments_deleted": self.segments_deleted, "rotation_backlog": self._pipeline.backlog(),
            "producers": len(self._producers),
            "stopped": s.failed.as_dict() if s.failed else None, "codec": implementation(),
        }

    def activity(self) -> dict[str, Any]:
        """The few fields the writer's loop watches four times a second, each O(1): `stats()` sorts the fsync
        latency window (about 0.2 ms), a stall every record behind it in the loop would wait out."""
        s = self._syncer
        return {"segments": len(self._sealed) + 1, "segments_deleted": self.segments_deleted,
                "first_lsn": self.first_lsn, "next_lsn": self._next_lsn, "slow_fsyncs": s.latency.slow_count(),
                "fsync_max_us": s.latency.max_us, "stopped": s.failed.as_dict() if s.failed else None}

    def cursors(self) -> dict[str, dict[str, int]]:
        """Each named reader's cursor and how far it lags (records, and bytes to segment granularity)."""
        sealed = self._sealed_now()
        rows = lag_rows(load_cursors(self.directory), self.committed_lsn)
        for row in rows.values():
            row["lag_bytes"] = retention.cursor_lag_bytes(row["lsn"], sealed, self._active.end)
        return rows

    def total_bytes(self) -> int:
        return sum(s.size for s in self._sealed_now()) + self._active.end

    def _sealed_now(self) -> list[retention.SealedSegment]:
        """A copy of the list of segments before the active one (the rotation thread trims it)."""
        with self._segments_lock:
            return list(self._sealed)

    # -- appending -------------------------------------------------------------------------------------

    def append(self, record: Record) -> int:
        """Append one record; returns its LSN."""
        return self.append_batch([record])[0]

    def append_batch(self, records: Iterable[Record]) -> list[int]:
        """Append records as one atomic batch: after a crash either all of them are there or none."""
        if not isinstance(records, Iterable) or isinstance(records, (bytes, str, Record)):
            raise InvalidRecordError(f"append_batch takes an iterable of walsvc.Record objects, not "
                                     f"{type(records).__name__}")
        records = list(records)
        for r in records:
            if not isinstance(r, Record):
                raise InvalidRecordError(f"append takes walsvc.Record objects, not {type(r).__name__}")
        if not records:
            return []
        base = self.append_encoded(encode_many(records, self.config.max_record_bytes), len(records))
        return list(range(base, base + len(records)))

    def append_encoded(self, payload: bytes, count: int, *, producer_id: int = 0, producer_seq: int = 0,
                       wait: bool | None = None) -> int:
        """Append `count` v1 records already encoded end to end in `payload`; returns the first LSN.

        The caller vouches for the encoding (the writer service checks it with `record.count_records`).
        `wait` (default: only for the `always` policy) blocks until the batch is durable.

        The writer's compiled twin (`_writer_c.BatchAppender`) does the same to the same attributes, under
        the same lock, for a producer's next batch: a change here is a change there
        (tests/test_batch_appender.py compares the two).
        """
        if len(payload) > self.config.max_batch_bytes:
            raise RecordTooLargeError(f"batch of {len(payload)} bytes exceeds max_batch_bytes "
                                      f"({self.config.max_batch_bytes})")
        with self._write_lock:
            self._check_open()
            self._syncer.check()
            seg = self._active
            size = F.FRAME_HEADER_SIZE + len(payload)
            if seg.end + size > self.config.segment_bytes and seg.record_count:
                seg = self._rotate()
            base = self._next_lsn
            # Strictly increasing per writer run: a timestamp change marks a batch boundary (the mirror's
            # packed messages follow batches, and must split the same way after a restart).
            self._last_ts = ts = max(now_us(), self._last_ts + 1)
            header, data_crc = F.data_frame_header(payload, count, base, ts, producer_id, producer_seq,
                                                   seg.data_crc)
            offset = seg.end
            try:
                written = os.pwritev(seg.fd, (header, payload), offset)
                if written != size:  # legal (a disk filling up): write the rest, which fails with the errno
                    pwrite_all(seg.fd, header + payload, offset, written)
            except OSError as exc:
                raise self._syncer.fail(f"frame write at offset {offset}", seg.path, exc) from exc
            seg.note_written(offset, size, base, count, data_crc, self.config.index_interval_bytes)
            self._next_lsn = end = base + count
            self.records_appended += count
            self.bytes_appended += size
            if producer_id:
                known = producer_id in self._producers
                remember_batches(self._producers, producer_id, (F.Appended(producer_seq, base, count),),
                                 self.config.producer_window)
                if not known and len(self._producers) > self.config.max_producers:
                    self._forget_least_active()
            self._written = (seg.fd, end, seg.path)
            self._syncer.written(end)
        if wait or (wait is None and self.config.fsync == "always"):
            self._syncer.sync_through(end)
        return base

    def skip_to(self, lsn: int) -> None:
        """Hand out no LSN below `lsn`: restore reproduces the gaps of the log it rebuilds (LSNs a torn
        batch burned).  Durable like recovery's skip: an empty frame (count 0) based at `lsn`."""
        check_lsn("lsn", lsn)
        with self._write_lock:
            self._check_open()
            self._syncer.check()
            if lsn <= self._next_lsn:
                if lsn == self._next_lsn:
                    return
                raise ConfigError("lsn", f"skip_to({lsn}): LSNs up to {self._next_lsn - 1} are already handed out")
            seg = self._active
            marker = F.encode_frame(F.KIND_DATA, b"", 0, lsn, now_us())
            if seg.end + len(marker) > self.config.segment_bytes and seg.record_count:
                seg = self._rotate()
            offset = seg.end
            try:
                pwrite_all(seg.fd, marker, offset)
            except OSError as exc:
                raise self._syncer.fail(f"skip marker write at offset {offset}", seg.path, exc) from exc
            seg.note_frame(offset, (marker,), lsn, 0, self.config.index_interval_bytes)
            self._next_lsn = lsn
            self._written = (seg.fd, lsn, seg.path)
            self._syncer.written(lsn)
        self._syncer.sync_through(lsn)

    def producer_batches(self, producer_id: int) -> collections.deque | None:
        """The last `producer_window` batches this producer got into the log (oldest first), or None."""
        return self._producers.get(producer_id)

    def sync(self) -> int:
        """Fsync everything written so far, whatever the policy; returns the committed LSN."""
        self._check_open()
        return self._syncer.sync() - 1

    def commit_written(self) -> None:
        """Under `os`, opened with `fsync_thread=False`: commit everything written so far (see `open`)."""
        self._check_open()
        self._syncer.commit_written()

    def sync_soon(self) -> None:
        """Have the fsync thread make everything written so far durable, without waiting (see fsync.py)."""
        self._check_open()
        self._syncer.sync_soon()

    def wait_committed(self, lsn: int) -> None:
        """Block until `lsn` is durable (an fsync now, shared with concurrent callers)."""
        check_lsn("lsn", lsn, lowest=0)
        self._syncer.sync_through(lsn + 1)

    def _publish_head(self, committed_lsn: int, pid: int, durable_lsn: int, durable: bool = False) -> None:
        seg = self._active
        self._head.publish(Head(committed_lsn, pid, seg.header.base_lsn, seg.end, durable_lsn), durable)

    def _publish_committed(self, end: int) -> None:
        """HEAD first: a commit counts only once readers can see it (so a failed update acks nothing).

        HEAD's durable LSN is written only after the data it names is durable, so it never claims too much;
        recovery treats damage past it as an unsynced tail (repair.classify).  Fsyncing HEAD on every
        commit would double the fsyncs (measured: about half the throughput under `always`), so under
        always/batch it is fsynced at most every HEAD_SYNC_S: on disk it lags the acks by that much."""
        now = time.monotonic()
        durable = self.config.fsync != "os" and now - self._head_synced >= HEAD_SYNC_S
        try:
            self._publish_head(end - 1, self._pid, self._syncer.durable_end - 1, durable=durable)
        except OSError as exc:
            raise self._syncer.fail("HEAD update", self._head.path, exc) from exc
        if durable:
            self._head_synced = now

    def _committed(self, end: int) -> None:
        if self._on_commit_cb is not None:
            self._on_commit_cb(end - 1)

    # -- segments --------------------------------------------------------------------------------------

    def _new_segment(self) -> ActiveSegment:
        seg = create_segment(self.directory, self._next_segment_id, self._next_lsn, self.config.segment_bytes,
                             self.config.preallocate)
        self._next_segment_id += 1
        return seg

    def _rotate(self) -> ActiveSegment:
        """Switch to the next segment (write lock held): header and rename of the spare, no fsync; the
        rotation thread seals the old segment (`_finish_rotation`)."""
        old = self._active
        end = self._next_lsn
        rot = _Rotation(old, end, self._producer_table())
        fd = self._pipeline.take_spare()
        try:
            new = install_spare(self.directory, fd, self._next_segment_id, end)
        except OSError as exc:
            os.close(fd)
            raise self._syncer.fail("rotation", self.directory / SPARE_NAME, exc) from exc
        self._next_segment_id += 1
        # The rotation is pending before the fsync thread can see the new descriptor (_sync_target).
        with self._segments_lock:
            self._rotations.append(rot)
            self._sealed.append(retention.SealedSegment(old.header.base_lsn, old.last_lsn, old.end, now_us(),
                                                        old.path))
        self._active = new
        self._written = (new.fd, end, new.path)
        self._pipeline.submit(lambda: self._finish_rotation(rot))
        return new

    def _prepare_spare(self) -> int:
        """Rotation thread: the next segment's file, created, preallocated and fsynced before it is needed.

        First the active segment's header is made durable (its frames so far with it).  The switch renames
        the spare into place with no fsync, and a power cut may keep that name while losing whatever the
        active segment never had fsynced (under `os`, all of it until its seal): without this, recovery
        could find a segment without a header in the middle of the log, not at its end, and refuse to open.
        The spare is ready only after, so no rename can come first; no new segment can be switched to
        meanwhile, so the active one cannot change under this thread."""
        seg = self._active
        # Under the syncer's lock, failure recorded before it is released: Linux reports a lost write-back
        # once per file, to whichever fsync asks first, so an fsync of this file on the fsync thread at the
        # same moment could return 0 and commit frames whose write-back failed here.
        with self._syncer.lock:
            try:
                sync_data(seg.fd)
            except OSError as exc:
                raise self._syncer.fail("fdatasync", seg.path, exc) from exc
        try:
            return create_spare(self.directory, self.config.segment_bytes, self.config.preallocate)
        except OSError as exc:
            # No room for the next segment shows up here, ahead of time, thanks to preallocation.
            raise self._syncer.fail("rotation", self.directory / SPARE_NAME, exc) from exc

    def _sync_target(self) -> tuple[int, int, object]:
        """What the syncer fsyncs (it holds its lock): the file written last, once every pending rotation
        before it is settled, so a durable end never covers a segment whose frames are not on disk."""
        written = self._written
        for rot in list(self._rotations):
            self._settle(rot)
        return written

    def _settle(self, rot: _Rotation) -> None:
        """Make the old segment's frames and the new segment's name durable (syncer lock held)."""
        if not rot.frames_synced:
            try:
                sync_data(rot.old.fd)
            except OSError as exc:
                raise self._syncer.fail("fdatasync", rot.old.path, exc) from exc
            rot.frames_synced = True
        if not rot.dir_synced:
            try:
                sync_dir(self.directory, "directory fsync after segment rename")
            except OSError as exc:
                raise self._syncer.fail("rotation", self.directory, exc) from exc
            rot.dir_synced = True

    def _finish_rotation(self, rot: _Rotation) -> None:
        """Rotation thread: seal the old segment, then apply retention, while appends go on in the new one.

        A failure stops the log; recovery finishes the seal at the next start (the segment ends exactly
        where the next one begins)."""
        old = rot.old
        with self._syncer.lock:
            self._settle(rot)
        try:
            seal_segment(old, rot.end, rot.producers)
            size = os.fstat(old.fd).st_size
        except OSError as exc:
            raise self._syncer.fail("rotation", old.path, exc) from exc
        with self._syncer.lock:
            self._syncer.mark_durable(rot.end)
            with self._segments_lock:
                self._rotations.remove(rot)
            os.close(old.fd)  # under the lock: a fsync that snapshotted it before the switch has finished
        sealed = retention.SealedSegment(old.header.base_lsn, old.last_lsn, size, now_us(), old.path)
        with self._segments_lock:
            self._sealed = [sealed if s.path == old.path else s for s in self._sealed]
        self._apply_retention(F.SEGMENT_HEADER_SIZE)  # as of the switch, whatever was appended since

    def _forget_least_active(self) -> None:
        """A new producer took the table past `max_producers`: forget the one whose last batch is oldest, as
        the next seal would.  Without this, producers that came and went piled up until the next rotation
        (a large segment of small records: hundreds of thousands, unbounded for the writer's memory)."""
        producers = self._producers
        del producers[min(producers, key=lambda pid: producers[pid][-1].base_lsn if producers[pid] else -1)]

    def _producer_table(self) -> dict[int, list[F.Appended]]:
        """Producer windows for the seal, keeping the `max_producers` most recently active."""
        table = seal_table(self._producers, self.config.max_producers)
        if len(table) < len(self._producers):
            self._producers = {pid: self._producers[pid] for pid in table}
        return table

    def _load_sealed(self) -> list[retention.SealedSegment]:
        out = []
        for base, path in list_segments(self.directory)[:-1]:
            seg = OpenSegment(base, path)
            try:
                seal = seg.seal[0] if seg.seal else None
                out.append(retention.SealedSegment(base, seal.last_lsn if seal else base, seg.size,
                                                   seal.sealed_us if seal else 0, path))
            finally:
                seg.close()
        return out

    def apply_retention(self) -> list[Path]:
        """Delete the sealed segments retention allows (also run after each rotation); returns their paths.

        A failed delete or directory fsync stops the log: the directory may no longer say what the log
        holds, and retrying would only hide that."""
        return self._apply_retention(self._active.end)

    def _apply_retention(self, active_bytes: int) -> list[Path]:
        """Retention with the active segment counted as `active_bytes` long."""
        self._check_open()
        self._syncer.check()
        cfg = self.config
        deleted: list[Path] = []
        if not cfg.max_bytes and not cfg.max_age_s:
            return deleted  # nothing can go: no cursors folder to make or lock
        with self._retention_lock:
            try:
                # From reading the cursors until the deletes are durable, no cursor store lands (cursor.py).
                with for_retention(self.directory, retention.LOCK_WAIT_S) as cursors:
                    if cursors is None:
                        logger.warning("retention skipped this pass: cursor stores held %s/cursors for %.1f s",
                                       self.directory, retention.LOCK_WAIT_S)
                        return deleted
                    # Only segments already sealed: a pending one may still be written by the rotation thread.
                    with self._segments_lock:
                        sealed = self._sealed[:len(self._sealed) - len(self._rotations)]
                    doomed = retention.select(sealed, active_bytes, now_us(), max_bytes=cfg.max_bytes,
                                              max_age_s=cfg.max_age_s, cursors=cursors,
                                              max_cursor_lag_bytes=cfg.max_cursor_lag_bytes)
                    for seg in doomed:
                        unlink_segment(seg.path)
                        with self._segments_lock:  # gone from the directory: gone from the list, whatever follows
                            self._sealed.pop(0)
                        self.segments_deleted += 1
                        deleted.append(seg.path)
                    if deleted:
                        sync_dir(self.directory, "directory fsync after retention delete")
            except OSError as exc:
                raise self._syncer.fail("retention", self.directory, exc) from exc
        return deleted

    # -- reading ---------------------------------------------------------------------------------------

    def read(self, start: int | str = "earliest") -> "Records":
        """Committed records from `start` (an LSN, "earliest" or "latest") up to the committed LSN: an
        iterator that, like a generator, can be closed early (`close()`) to release the segment it reads."""
        return Records(self.read_batches(start))

    def read_batches(self, start: int | str = "earliest") -> Iterator[list[Record]]:
        """The same records as `read`, a list at a time (a frame or more, up to 1,024 records or 1 MiB of
        payload): the cheapest way to replay, with no step per record."""
        reader = LogReader(self.directory, start, bound=lambda: self.committed_lsn,
                           written_end=lambda: (self._active.header.base_lsn, self._active.end),
                           **self.config.read_limits)
        try:
            while batch := reader.read_batch():
                yield batch
        finally:
            reader.close()

    # -- closing ---------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError(f"log {self.directory} is closed")

    def close(self) -> None:
        """Fsync what was written (unless the log stopped), release the directory.  Raises LogStoppedError
        if that last fsync fails (after releasing everything), since the last appends are then not durable."""
        if self._closed:
            return
        try:
            if self._syncer.failed is None:
                self._pipeline.drain()  # every rotation sealed (or the log stopped doing it)
                self._syncer.sync()
        finally:
            spare = self._pipeline.close()
            self._syncer.close()
            with self._write_lock:
                self._closed = True
                try:
                    self._publish_head(self.committed_lsn, 0, self._syncer.durable_end - 1,
                                       durable=self._syncer.failed is None)
                except OSError as exc:  # HEAD is advisory; readers see the PID is gone without it
                    logger.warning("could not mark the log closed in HEAD (%s)", exc)
                fds = [self._head.fd, self._active.fd, *(r.old.fd for r in self._rotations)]
                for fd in fds + ([spare] if spare is not None else []):
                    try:
                        os.close(fd)
                    except OSError as exc:
                        logger.warning("closing the log: %s", exc)
                if spare is not None:
                    try:
                        remove_spare(self.directory)
                    except OSError as exc:  # the next open deletes it
                        logger.warning("closing the log: could not delete the spare segment file: %s", exc)
                self._lock_file.release()

    def __enter__(self) -> "Log":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Records:
    """`Log.read`'s iterator.  A `for` loop steps through each batch in C (`itertools.chain`), with no
    generator step per record; `close()` ends the reading early, as a generator's would."""

    __slots__ = ("_batches", "_held", "_records")

    def __init__(self, batches: Generator[list[Record], None, None]) -> None:
        held: list[list[Record]] = [[]]  # the batch being stepped through, so close() can end it too

        def hold(batch: list[Record]) -> list[Record]:
            held[0] = batch
            return batch

        self._batches = batches
        self._held = held
        self._records = itertools.chain.from_iterable(map(hold, batches))

    def __iter__(self) -> Iterator[Record]:
        return self._records

    def __next__(self) -> Record:
        return next(self._records)

    def close(self) -> None:
        self._held[0].clear()
        self._batches.close()

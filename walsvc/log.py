"""The log: nori-wal's `Wal`, in Python, with LSNs, atomic batches, group commit and retention.

One `Log` owns a directory (an OS lock refuses a second writer).  Every `append_batch` becomes one frame:
encoded outside the lock, written with one pwritev under it, and made durable by the fsync policy
(fsync.py).  Readers in any process read the files directly up to the committed LSN, which the log
publishes in the head file after each commit.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from crc32c import crc32c

from . import frame as F
from . import retention
from .config import LogConfig
from .cursor import load_all as load_cursors
from .errors import InvalidRecordError, LogClosedError, LogStoppedError, RecordTooLargeError
from .fsync import Syncer, sync_data
from .head import Head, HeadWriter
from .lock import DirectoryLock
from .reader import LogReader, _OpenSegment
from .record import Record, encode_many
from .recovery import recover
from .segment import ActiveSegment, create_segment, list_segments, now_us, remove_segment, seal_segment

logger = logging.getLogger("walsvc.log")

HEAD_SYNC_S = 0.1  # under always/batch, HEAD (and the durable LSN in it) is fsynced at most this often


class Log:
    """An open, writable log.  Use `Log.open(directory, **options)`; options are LogConfig fields."""

    def __init__(self, directory: Path, config: LogConfig, on_commit: Callable[[int], None] | None,
                 verify: bool) -> None:
        self.directory = directory
        self.config = config
        self._on_commit_cb = on_commit
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = DirectoryLock(directory)
        try:
            self.recovery, state = recover(directory, config, verify=verify)
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
        # Recovery may have kept frames that were written but never fsynced (a kill -9 under `batch`):
        # make them durable before HEAD calls them committed.
        sync_data(self._active.fd)
        # After the active segment exists: when recovery ended on a sealed segment, that one is sealed too
        # (listing first would take it for the active one and hide it from retention, leaving a hole later).
        self._sealed = self._load_sealed()
        # The last LSN that exists, not next_lsn: LSNs skipped after a torn batch were never committed.
        committed_end = max(self.recovery.last_lsn + 1, self.recovery.first_lsn)
        self._written = (self._active.fd, committed_end)
        self._publish_head(committed_end - 1, self._pid, committed_end - 1, durable=True)
        self._head_synced = time.monotonic()
        self._syncer = Syncer(config.fsync, config.fsync_window_ms, lambda: self._written, self._committed,
                              committed_end)
        self.records_appended = 0
        self.bytes_appended = 0
        self.segments_deleted = 0
        self.retention_errors = 0

    @classmethod
    def open(cls, directory: str | os.PathLike, *, config: LogConfig | None = None,
             on_commit: Callable[[int], None] | None = None, verify: bool = False, **options: Any) -> "Log":
        """Open (creating if needed) and recover the log in `directory`.

        `on_commit(committed_lsn)` is called after each commit, from the thread that made it.  `verify=True`
        also checks every sealed segment's checksum (reads the whole log).
        """
        if config is None:
            config = LogConfig.from_options(options)
        elif options:
            raise TypeError("pass either config= or keyword options, not both")
        return cls(Path(directory), config, on_commit, verify)

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
        return self._sealed[0].base_lsn if self._sealed else self._active.header.base_lsn

    @property
    def fsync_policy(self) -> str:
        return self.config.fsync

    def stats(self) -> dict[str, Any]:
        s = self._syncer
        return {
            "first_lsn": self.first_lsn, "committed_lsn": self.committed_lsn, "next_lsn": self._next_lsn,
            "segments": len(self._sealed) + 1, "bytes": self.total_bytes(), "fsync": self.config.fsync,
            "records_appended": self.records_appended, "bytes_appended": self.bytes_appended,
            "fsyncs": s.latency.count, "fsync_latency": s.latency.summary(),
            "segments_deleted": self.segments_deleted, "retention_errors": self.retention_errors,
            "producers": len(self._producers),
            "stopped": str(s.failed) if s.failed else None,
        }

    def cursors(self) -> dict[str, dict[str, int]]:
        """Each named reader's cursor and how far it lags (records, and bytes to segment granularity)."""
        return {name: {"lsn": lsn, "lag_records": max(0, self.committed_lsn - lsn),
                       "lag_bytes": retention.cursor_lag_bytes(lsn, self._sealed, self._active.end)}
                for name, lsn in load_cursors(self.directory).items()}

    def total_bytes(self) -> int:
        return sum(s.size for s in self._sealed) + self._active.end

    # -- appending -------------------------------------------------------------------------------------

    def append(self, record: Record) -> int:
        """Append one record; returns its LSN."""
        return self.append_batch([record])[0]

    def append_batch(self, records: Iterable[Record]) -> list[int]:
        """Append records as one atomic batch: after a crash either all of them are there or none."""
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
        """
        if len(payload) > self.config.max_batch_bytes:
            raise RecordTooLargeError(f"batch of {len(payload)} bytes exceeds max_batch_bytes "
                                      f"({self.config.max_batch_bytes})")
        payload_crc = crc32c(payload)
        with self._write_lock:
            self._check_open()
            self._syncer.check()
            seg = self._active
            size = F.FRAME_HEADER_SIZE + len(payload)
            if seg.end + size > self.config.segment_bytes and seg.record_count:
                seg = self._rotate()
            base = self._next_lsn
            header = F.encode_frame_header(F.KIND_DATA, len(payload), count, base, now_us(), producer_id,
                                           producer_seq, payload_crc)
            offset = seg.end
            try:
                written = os.pwritev(seg.fd, (header, payload), offset)
                if written != size:
                    raise OSError(f"short write: {written} of {size} bytes")
            except OSError as exc:
                self._syncer.failed = LogStoppedError(f"write to {seg.path.name} at offset {offset} failed "
                                                      f"({exc}); the log accepts no more writes")
                raise self._syncer.failed from exc
            seg.note_frame(offset, (header, payload), base, count, self.config.index_interval_bytes)
            self._next_lsn = end = base + count
            self.records_appended += count
            self.bytes_appended += size
            if producer_id:
                self._remember(producer_id, F.Appended(producer_seq, base, count))
            self._written = (seg.fd, end)
            self._syncer.written(end)
        if wait or (wait is None and self.config.fsync == "always"):
            self._syncer.sync_through(end)
        return base

    def _remember(self, producer_id: int, appended: F.Appended) -> None:
        q = self._producers.get(producer_id)
        if q is None:
            q = self._producers[producer_id] = collections.deque(maxlen=self.config.producer_window)
        q.append(appended)

    def producer_batches(self, producer_id: int) -> collections.deque | None:
        """The last `producer_window` batches this producer got into the log (oldest first), or None."""
        return self._producers.get(producer_id)

    def sync(self) -> int:
        """Fsync everything written so far, whatever the policy; returns the committed LSN."""
        self._check_open()
        return self._syncer.sync() - 1

    def wait_committed(self, lsn: int) -> None:
        """Block until `lsn` is durable (an fsync now, shared with concurrent callers)."""
        self._syncer.sync_through(lsn + 1)

    def _publish_head(self, committed_lsn: int, pid: int, durable_lsn: int, durable: bool = False) -> None:
        seg = self._active
        self._head.publish(Head(committed_lsn, pid, seg.header.base_lsn, seg.end, durable_lsn), durable)

    def _committed(self, end: int) -> None:
        # HEAD's durable LSN is written only after the data it names is durable, so it never claims too
        # much; recovery treats damage past it as an unsynced tail (recovery.classify).  Fsyncing HEAD on
        # every commit would double the fsyncs (measured: about half the throughput under `always`), so
        # under always/batch it is fsynced at most every HEAD_SYNC_S: on disk it lags the acks by that much.
        now = time.monotonic()
        durable = self.config.fsync != "os" and now - self._head_synced >= HEAD_SYNC_S
        self._publish_head(end - 1, self._pid, self._syncer.durable_end - 1, durable=durable)
        if durable:
            self._head_synced = now
        if self._on_commit_cb is not None:
            self._on_commit_cb(end - 1)

    # -- segments --------------------------------------------------------------------------------------

    def _new_segment(self) -> ActiveSegment:
        seg = create_segment(self.directory, self._next_segment_id, self._next_lsn, self.config.segment_bytes,
                             self.config.preallocate)
        self._next_segment_id += 1
        return seg

    def _rotate(self) -> ActiveSegment:
        """Seal the active segment and start the next one (write lock held)."""
        old = self._active
        with self._syncer.lock:
            try:
                seal_segment(old, self._next_lsn, self._producer_table())
                self._sealed.append(retention.SealedSegment(old.header.base_lsn, old.last_lsn,
                                                            os.fstat(old.fd).st_size, now_us(), old.path))
                self._syncer.mark_durable(self._next_lsn)
                self._active = self._new_segment()
            except OSError as exc:
                # A seal that did not reach the disk, or no room for the next segment (ENOSPC shows up
                # here, at creation, thanks to preallocation): stop, never retry an fsync.
                self._syncer.failed = LogStoppedError(
                    f"rotation after {old.path.name} failed ({exc.strerror or exc}); the log accepts no more "
                    "writes: free space if the disk is full, then restart the writer (recovery finishes the seal)")
                raise self._syncer.failed from exc
            self._written = (self._active.fd, self._next_lsn)
            os.close(old.fd)
        try:
            self.apply_retention()
        except OSError as exc:
            self.retention_errors += 1
            logger.warning("retention could not delete a segment (%s); it will try again at the next rotation", exc)
        return self._active

    def _producer_table(self) -> dict[int, list[F.Appended]]:
        """Producer windows for the seal, keeping the `max_producers` most recently active."""
        items = self._producers.items()
        if len(self._producers) > self.config.max_producers:
            keep = sorted(items, key=lambda kv: kv[1][-1].base_lsn)[-self.config.max_producers:]
            self._producers = dict(keep)
            items = self._producers.items()
        return {pid: list(q) for pid, q in items}

    def _load_sealed(self) -> list[retention.SealedSegment]:
        out = []
        for base, path in list_segments(self.directory)[:-1]:
            seg = _OpenSegment(base, path)
            try:
                seal = seg.seal[0] if seg.seal else None
                out.append(retention.SealedSegment(base, seal.last_lsn if seal else base, seg.size,
                                                   seal.sealed_us if seal else 0, path))
            finally:
                seg.close()
        return out

    def apply_retention(self) -> list[Path]:
        """Delete the sealed segments retention allows (also run after each rotation); returns their paths."""
        cfg = self.config
        doomed = retention.select(self._sealed, self._active.end, now_us(), max_bytes=cfg.max_bytes,
                                  max_age_s=cfg.max_age_s, cursors=load_cursors(self.directory),
                                  max_cursor_lag_bytes=cfg.max_cursor_lag_bytes)
        for seg in doomed:
            remove_segment(seg.path)
            self._sealed.pop(0)
            self.segments_deleted += 1
        return [s.path for s in doomed]

    # -- reading ---------------------------------------------------------------------------------------

    def read(self, start: int | str = "earliest") -> Iterator[Record]:
        """Committed records from `start` (an LSN, "earliest" or "latest") up to the committed LSN."""
        reader = LogReader(self.directory, start, bound=lambda: self.committed_lsn,
                           written_end=lambda: (self._active.header.base_lsn, self._active.end),
                           max_record_bytes=self.config.max_record_bytes)
        try:
            yield from reader
        finally:
            reader.close()

    # -- closing ---------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError(f"log {self.directory} is closed")

    def close(self) -> None:
        """Fsync what was written (unless the log stopped), release the directory."""
        if self._closed:
            return
        try:
            if self._syncer.failed is None:
                self._syncer.sync()
        finally:
            self._syncer.close()
            with self._write_lock:
                self._closed = True
                self._publish_head(self.committed_lsn, 0, self._syncer.durable_end - 1,
                                   durable=self._syncer.failed is None)
                self._head.close()
                os.close(self._active.fd)
                self._lock_file.release()

    def __enter__(self) -> "Log":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

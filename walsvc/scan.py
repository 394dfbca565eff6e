"""Reading the log from its files: any process, read-only, no lock, up to a bound (the storage layer).

`scan_segment` is the one walk over a segment's frames that recovery and `walsvc verify` share: it reports
facts (`repair.SegmentScan`), and `repair.plan_segment` decides from them.  It reads through a pread-shaped
function, so it runs over a file or over bytes in memory alike.

`LogReader` walks frames across segments in LSN order and hands out whole batches of records.  It never
returns a record above its bound (the committed LSN), never a partial or unchecked one (each frame's CRC is
checked before its records are decoded), and holds at most one scan chunk plus one frame in memory.  It keeps
its segment's descriptor open, so retention can delete files under it without harm.  No sockets: the
service's tailing `Reader` (walsvc/reader.py) drives it, and so do the embedded `Log`, verify and dump.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Callable, Iterator

from . import frame as F
from . import stopped
from .config import directory_path
from .errors import (ChecksumError, CompressionUnavailableError, ConfigError, CorruptionError, LogClosedError,
                     MissingSegmentError, RecordError, TruncatedError)
from .head import load as load_head
from .record import DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_RECORD_BYTES, Record, decode_payload
from .repair import SegmentScan, Stop, StopKind, Verdict, header_lost, seal_unfinished, verdict
from .segment import (FrameScanner, Read, ScanStop, data_end, find_valid_header, is_zero_from, list_segments,
                      read_header, read_seal, reader_of, segment_name, valid_headers)

OnFrame = Callable[[int, F.FrameHeader, memoryview], None]


def scan_segment(src: int | Read, size: int, expected: int, *, start: int = F.SEGMENT_HEADER_SIZE,
                 on_frame: OnFrame | None = None) -> SegmentScan:
    """Walk the frames of one segment from `start` (whose first LSN is at least `expected`) up to `size`.

    Each intact DATA frame goes to `on_frame(offset, header, frame bytes)` (the bytes are valid only during
    the call).  The walk stops at a SEAL frame, at a frame whose LSN goes backwards, or where the frame
    scanner stops (zeros, a bad header, a frame cut short, a CRC mismatch); the result says which, and what
    lies after the stop.  Bounded memory: one scan chunk plus one frame.
    """
    pread = reader_of(src)
    scanner = FrameScanner(pread, start, size)
    scan = SegmentScan(size, expected, start)
    stop = None
    kind = None
    for off, h, data in scanner:
        if h.base_lsn < expected:
            stop = ScanStop(off, RecordError(f"frame LSN {h.base_lsn} goes backwards (expected >= {expected})",
                                             offset=off, lsn=h.base_lsn), h)
            kind = StopKind.BACKWARDS
            break
        if h.kind == F.KIND_SEAL:
            scan.seal_at = (off, h)
            try:
                scan.seal = F.decode_seal(h, data[F.FRAME_HEADER_SIZE:])
            except RecordError as exc:
                scan.seal_error = exc.detail
            scan.zeros_after_seal = is_zero_from(pread, off + h.size, size)
            break
        if h.base_lsn > expected:
            scan.gaps.append((expected, h.base_lsn))
        if on_frame is not None:
            on_frame(off, h, data)
        scan.frames += 1
        scan.frame_bytes += h.size
        if h.count:
            scan.records += h.count
            if scan.first_lsn is None:
                scan.first_lsn = h.base_lsn
            scan.last_lsn = h.end_lsn - 1
        expected = h.end_lsn
        scan.end = off + h.size
    else:
        stop = scanner.stop
    scan.expected = expected
    scan.stop = stop_facts(pread, size, stop, expected, kind)
    return scan


def stop_facts(src: int | Read, size: int, stop: ScanStop | None, expected: int,
               kind: StopKind | None = None) -> Stop | None:
    """What lies after a scan stop (the next expected LSN being `expected`): the facts `repair` decides on.

    A clean end (zeros from a stop whose header did not decode) costs one zero check; the searches after
    damage run only when there is damage.
    """
    if stop is None:
        return None
    pread = reader_of(src)
    h = stop.header
    if kind is None and h is None:
        kind = StopKind.ZERO if F.is_zero(pread(F.FRAME_HEADER_SIZE, stop.offset)) else StopKind.BAD_HEADER
    elif kind is None:
        kind = StopKind.CRC if isinstance(stop.error, ChecksumError) else StopKind.TORN_FRAME
    extent = stop.offset + h.size if h is not None else None
    zeros = is_zero_from(pread, min(extent, size) if extent is not None else stop.offset, size)
    if h is None and zeros:
        return Stop(stop.offset, kind, stop.error.detail, None, True, False, stop.offset, 0)
    valid_after = False
    if not zeros:
        search_from = extent if extent is not None and extent <= size else stop.offset + 1
        valid_after = find_valid_header(pread, search_from, size, expected) is not None
    damaged_to = min(extent, size) if zeros else size  # with zeros after the frame, nothing lies past it
    named = max((found.end_lsn for _, found in valid_headers(pread, stop.offset, damaged_to, 0)), default=0)
    return Stop(stop.offset, kind, stop.error.detail, h, zeros, valid_after, data_end(pread, stop.offset, damaged_to),
                named)


def examine_stop(src: int | Read, stop: ScanStop | None, size: int, expected: int, is_last: bool,
                 durable_lsn: int | None = None) -> Verdict:
    """The verdict on a scan stop, gathering what lies after it first (for readers that scan on their own)."""
    return verdict(stop_facts(src, size, stop, expected), expected, is_last, durable_lsn)


Bound = Callable[[], "int | None"]  # the committed LSN; None = no writer, read up to where recovery would end
WrittenEnd = Callable[[], "tuple[int, int] | None"]  # (active segment's base LSN, end of its written frames)


class OpenSegment:
    def __init__(self, base_lsn: int, path: Path, written_end: WrittenEnd | None = None) -> None:
        self.base_lsn = base_lsn
        self.path = path
        self._written_end = written_end
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(self.fd).st_size
            read_header(self.fd)
            self.seal = read_seal(self.fd, self.size)
        except RecordError as exc:
            os.close(self.fd)
            raise CorruptionError(f"unreadable segment: {exc.detail}", segment=path.name, offset=0) from None
        except BaseException:
            os.close(self.fd)
            raise
        self.scanner = FrameScanner(self.fd, F.SEGMENT_HEADER_SIZE, self._limit(self._hint()))

    def seek(self, lsn: int) -> None:
        """Start scanning at the indexed frame nearest below `lsn` (sealed segments carry an index)."""
        if self.seal is None:
            return
        index = self.seal[0].index
        i = bisect.bisect_right(index, (lsn, 1 << 64)) - 1
        if i >= 0:
            self.scanner.offset = index[i][1]

    def _hint(self) -> tuple[int, int] | None:
        """The writer's (active segment base LSN, written end) if it can concern this segment, else None."""
        return self._written_end() if self._written_end is not None and self.seal is None else None

    def _limit(self, hint: tuple[int, int] | None) -> int:
        """Where scanning stops: the file's end, or in the active segment the end of what the writer has
        written, so a tailing reader reads new frames, not megabytes of preallocated zeros."""
        if hint is not None and hint[0] == self.base_lsn:
            return min(self.size, max(hint[1], F.SEGMENT_HEADER_SIZE))
        return self.size

    def refresh(self) -> None:
        """Forget buffered bytes and take the new end: the writer may have written more since.  The size is
        read again (an fstat) only when the writer's written end is unknown or lies past the size we have: a
        tailing reader's poll then costs one pread of the new bytes."""
        hint = self._hint()
        if hint is None or hint[0] != self.base_lsn or hint[1] > self.size:
            self.size = os.fstat(self.fd).st_size
        self.scanner.limit = self._limit(hint)
        self.scanner.stop = None
        self.scanner._buf = b""

    def close(self) -> None:
        os.close(self.fd)


def _header_pending(path: Path) -> bool:
    """True while the newest segment has no valid header and holds nothing recovery would keep
    (`repair.header_lost`): after a power cut recovery drops such a file, so a reader treats it as absent."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        head = os.pread(fd, F.SEGMENT_HEADER_SIZE, 0)
        if F.is_zero(head):
            return True
        try:
            F.decode_segment_header(head)
            return False
        except RecordError:
            head_file = load_head(path.parent)
            return header_lost(int(path.name[:20]), is_zero_from(fd, F.SEGMENT_HEADER_SIZE, os.fstat(fd).st_size),
                               head_file.durable_lsn if head_file is not None else None)
    finally:
        os.close(fd)


def _stopped_at(directory: Path) -> int | None:
    """The LSN a log that stopped on an error had committed, or None (walsvc/stopped.py)."""
    stop = stopped.load(directory)
    return None if stop is None else stop.committed_lsn


class LogReader:
    """Records from `start` ("earliest", "latest" or an LSN) onwards, in order, up to `bound()`."""

    # A batch ends after this many records or this much payload (one frame at least).  Small enough that a
    # batch's records stay in the CPU cache while the caller works through them and while they are freed:
    # 4,096 records and 4 MiB replayed 10-20 % slower (docs/PERFORMANCE.md, "Per-record cost, second pass").
    BATCH_RECORDS = 1024
    BATCH_BYTES = 1 << 20

    def __init__(self, directory: str | os.PathLike, start: int | str = "earliest", *, bound: Bound | None = None,
                 written_end: WrittenEnd | None = None, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                 max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> None:
        self.directory = directory_path(directory)
        self._bound = bound or (lambda: None)
        self._written_end = written_end
        self.max_record_bytes = max_record_bytes
        self.max_batch_bytes = max_batch_bytes  # what one batch may decompress to, as its writer allowed
        self._seg: OpenSegment | None = None
        # True while the scan may meet frames below next_lsn: after a seek lands on the indexed frame at or below
        # it.  Once a frame reaches it, every later frame starts at or past the LSN before it (else: damage).
        self._seeking = True
        self._cap: int | None = None  # the last LSN this read may return: the bound, or a stopped log's end
        self._retried = False
        self._batch_bytes = 0
        self._closed = False
        self.next_lsn = resolve_start(self.directory, start, self._bound())

    def _open_segment_for(self, lsn: int) -> bool:
        """Open the segment holding `lsn`; False if there is none yet."""
        segments = list_segments(self.directory)
        if not segments:
            return False
        i = bisect.bisect_right([b for b, _ in segments], lsn) - 1
        if i < 0:
            raise TruncatedError(lsn, segments[0][0])
        if i == len(segments) - 1 and _header_pending(segments[i][1]):
            return False
        self._seg = self._open(lsn, *segments[i])
        self._seg.seek(lsn)
        self._seeking = True
        return True

    def _next_segment(self, next_lsn: int) -> bool:
        """Move past a sealed segment to the one starting at `next_lsn`; False if it is not there yet.

        A seal names the next segment's base LSN exactly, so finding a later one instead means retention
        deleted it before we got there: TruncatedError, never a silent gap.
        """
        segments = list_segments(self.directory)
        for i, (base, path) in enumerate(segments):
            if base >= next_lsn:
                if base > next_lsn:
                    if self._seg.path.exists():
                        # Ours is still listed, and retention deletes oldest first: the next one was not
                        # deleted by retention, it is missing.  (Checked after listing, so no race.)
                        raise MissingSegmentError(
                            f"LSNs {next_lsn}..{base - 1} are missing: segment {segment_name(next_lsn)} is gone, "
                            f"but the one before it ({self._seg.path.name}) is still there",
                            segment=segment_name(next_lsn), offset=0, lsn=next_lsn)
                    raise TruncatedError(next_lsn, base)
                if i == len(segments) - 1 and _header_pending(path):
                    return False
                seg = self._open(next_lsn, base, path)  # before closing ours: a failure must not leave it closed
                self._seg.close()
                self._seg = seg
                return True
        return False

    def _open(self, lsn: int, base: int, path: Path) -> OpenSegment:
        """Open a segment we just listed; if retention deleted it meanwhile, `lsn` is truncated."""
        try:
            return OpenSegment(base, path, self._written_end)
        except FileNotFoundError:
            segments = list_segments(self.directory)
            raise TruncatedError(lsn, segments[0][0] if segments else lsn) from None

    def read_batch(self) -> list[Record]:
        """The committed records available now, from `next_lsn` on (whole frames, up to BATCH_RECORDS
        records or BATCH_BYTES of payload, so memory stays bounded whatever the record size); [] when
        caught up."""
        if self._closed:
            raise LogClosedError("reader is closed")
        bound = self._bound()
        # With no writer, a log that stopped on an error ends at the LSN it had committed (walsvc/stopped.py):
        # what follows was never committed, and the next open cuts it.
        self._cap = bound if bound is not None else _stopped_at(self.directory)
        if self._cap is not None and self.next_lsn > self._cap:
            return []
        if self._seg is None and not self._open_segment_for(self.next_lsn):
            return []
        seg = self._seg
        if bound is not None and seg.seal is None and seg.scanner.offset >= seg.scanner.limit:
            seg.refresh()  # a tailing reader read all it had: the committed records are past what it saw
        out: list[Record] = []
        self._batch_bytes = 0
        while len(out) < self.BATCH_RECORDS and self._batch_bytes < self.BATCH_BYTES:
            try:
                records = self._step(bound)
            except (CorruptionError, TruncatedError):
                if out:  # hand out the good records before the damage; the next call raises again
                    break
                raise
            if records is None:
                break
            out.extend(records)
            if self._cap is not None and self.next_lsn > self._cap:
                break  # all that is committed is read: looking further would only re-read the file's end
        if self._seg is not None and self._cap is not None and self.next_lsn > self._cap:
            # Buffered bytes past the bound were written, not committed: a new writer's recovery may cut them
            # and write others there, and a reader cannot always tell the writer changed (a log reopened in
            # the same process leaves the same PID in HEAD).
            self._seg.scanner.rewind(self._seg.scanner.offset)
        return out

    def _step(self, bound: int | None) -> list[Record] | None:
        """One frame: its wanted records ([] after skipping or changing segment), None when nothing more
        can be read now."""
        seg = self._seg
        whole = seg.scanner.take_data_frame(self.next_lsn, self._cap, self.max_record_bytes,
                                            0 if self._seeking else self.next_lsn)
        if whole is not None:  # the common case in one compiled call; anything else goes the way below
            self._seeking = False
            records, self.next_lsn, payload_len = whole
            self._batch_bytes += payload_len
            self._retried = False
            return records
        for off, h, data in seg.scanner:
            if h.kind == F.KIND_SEAL:
                seg.scanner.offset = off  # stay on the seal until the next segment opens (an error retries)
                if self._next_segment(h.base_lsn):
                    return []
                return None
            if self._cap is not None and h.base_lsn > self._cap:
                seg.scanner.rewind(off)  # what follows is not committed: see the end of read_batch
                return None
            if h.base_lsn < self.next_lsn and not self._seeking:  # a stop, as recovery's scan_segment makes it
                seg.scanner.offset = off
                seg.scanner.stop = ScanStop(off, RecordError(f"frame LSN {h.base_lsn} goes backwards (expected >= "
                                                             f"{self.next_lsn})", offset=off, lsn=h.base_lsn), h)
                break
            if h.end_lsn <= self.next_lsn:
                return []
            try:
                payload_at = seg.scanner.view_pos + F.FRAME_HEADER_SIZE
                records = decode_payload(seg.scanner.view_buf, h.base_lsn, h.count, h.timestamp_us, self.next_lsn,
                                         start=payload_at, end=payload_at + h.payload_len,
                                         max_record_bytes=self.max_record_bytes,
                                         max_batch_bytes=self.max_batch_bytes)
            except CompressionUnavailableError:
                seg.scanner.offset = off
                raise  # not damage: this reader lacks a codec package (the message says which)
            except RecordError as exc:
                seg.scanner.offset = off  # stay on the bad frame: a retry must raise again, not skip it
                raise CorruptionError(f"undecodable batch: {exc.detail}", segment=seg.path.name, offset=off,
                                      lsn=h.base_lsn) from None
            self._seeking = False
            self.next_lsn = h.end_lsn
            self._batch_bytes += h.payload_len
            self._retried = False
            return records
        stop = seg.scanner.stop
        resume = stop.offset if stop is not None else seg.scanner.offset
        if seg.seal is not None and stop is not None:
            raise CorruptionError(stop.error.detail, segment=seg.path.name, offset=stop.offset, lsn=self.next_lsn)
        if bound is None and seg.seal is None:
            if self._moved_on(seg, stop):
                return []
            self._check_offline_stop(seg, stop, resume)
        if bound is None or self.next_lsn > bound or not self._retried:
            # End of what is visible: no writer (read what is valid), or our buffer or size is older than
            # the committed bound (try once more with fresh bytes).
            self._retried = bound is not None and self.next_lsn <= bound
            seg.refresh()
            seg.scanner.offset = resume
            return self._step(bound) if self._retried else None  # at most once: now _retried is set
        if seg.seal is None and self._moved_on(seg, None):
            return []
        raise CorruptionError(f"{stop.error.detail if stop else 'data ends'} below the committed LSN {bound}",
                              segment=seg.path.name, offset=resume, lsn=self.next_lsn)

    def _moved_on(self, seg: OpenSegment, stop: ScanStop | None) -> bool:
        """Move to the next segment if it starts exactly at `next_lsn`: this one then holds nothing more.

        The writer switches segments before its rotation thread seals the old one, so a reader can reach
        the end of a full segment before its seal (and a crash may come in between: recovery finishes the
        seal).  With a writer (`stop` None) every committed record is there, so whatever follows (zeros, a
        seal being written) is not data.  Without one, recovery's rule decides (`repair.seal_unfinished`:
        a damaged seal stays damage).
        """
        if stop is not None and not seal_unfinished(stop_facts(seg.fd, seg.size, stop, self.next_lsn), seg.size):
            return False
        if not any(base == self.next_lsn > seg.base_lsn for base, _ in list_segments(self.directory)):
            return False
        if not self._next_segment(self.next_lsn):
            return False
        self._retried = False
        return True

    def _check_offline_stop(self, seg: OpenSegment, stop: ScanStop | None, resume: int) -> None:
        """With no writer, the log ends where recovery would end it: raise unless this stop is that end.

        Recovery's own rule decides (`repair.verdict`, with HEAD's durable LSN): a clean end or a
        torn tail in the newest segment is the end; anything else is damage, and so is an unsealed segment
        with later segments after it (a damaged or missing seal).
        """
        segments = list_segments(self.directory)
        if len(segments) > 1 and _header_pending(segments[-1][1]):
            segments.pop()  # a segment switch whose header a power cut lost: recovery deletes that file
        newest = segments[-1][0] if segments and seg.path.exists() else seg.base_lsn
        seg.size = os.fstat(seg.fd).st_size
        if read_seal(seg.fd, seg.size) is not None:
            return  # sealed since we opened it (a writer sealed it and exited): the next scan meets the seal
        if stop is None and resume < seg.size:
            # The scan ended at a limit, not at damage, and the file holds more: it grew since, or the limit was
            # the written end HEAD named while this segment was active, and the writer wrote past it before it
            # switched segments and died unsealed.  Read on: the next scan runs to the file's end.
            return
        head = load_head(self.directory)
        verdict = examine_stop(seg.fd, stop, seg.size, self.next_lsn, newest == seg.base_lsn,
                               head.durable_lsn if head is not None else None)
        if verdict == "corrupt":
            detail = stop.error.detail if stop is not None else "segment ends without a seal"
            if newest != seg.base_lsn:
                detail += ", and it is not sealed although later segments exist (a damaged or missing seal)"
            else:
                detail += ", and intact data follows, so this is not the end of the log"
            raise CorruptionError(f"{detail}; with no writer running, this reader stops here rather than skip it",
                                  segment=seg.path.name, offset=resume, lsn=self.next_lsn)

    def __iter__(self) -> Iterator[Record]:
        """Every record available now, then stop (`walsvc.Reader` is the one that waits for more)."""
        while True:
            batch = self.read_batch()
            if not batch:
                return
            yield from batch

    def position(self) -> tuple[int, int] | None:
        """(base LSN of the segment being read, byte offset of the next frame), or None before the first."""
        if self._seg is None:
            return None
        return self._seg.base_lsn, self._seg.scanner.offset

    def reopen(self) -> None:
        """Drop the open segment, its buffered bytes and its seal: the next read opens the files afresh at
        `next_lsn`.  For a new writer: the bytes past the old one's committed LSN may have been cut by its
        recovery (a stopped log, a torn tail) and written over, and a seal cut with them."""
        if self._seg is not None:
            self._seg.close()
            self._seg = None
        self._retried = False

    def close(self) -> None:
        self.reopen()
        self._closed = True

    def __enter__(self) -> "LogReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_start(directory: Path, start: int | str, committed: int | None) -> int:
    """The first LSN to read for `start`: "earliest" (the oldest segment's base), "latest" (after the
    committed LSN, or with no writer after the last valid record) or an LSN still in the log."""
    segments = list_segments(directory)
    first = segments[0][0] if segments else 1
    if start == "earliest":
        return first
    if start == "latest":
        return committed + 1 if committed is not None else end_of_valid_data(directory)
    if isinstance(start, int) and not isinstance(start, bool) and start >= 1:
        if segments and start < first:
            raise TruncatedError(start, first)
        return start
    raise ConfigError("start", f"must be 'earliest', 'latest' or an LSN >= 1, not {start!r}")


def end_of_valid_data(directory: Path) -> int:
    """One past the last valid LSN on disk, from the last segment only (its seal, or a scan of its frames)."""
    segments = list_segments(directory)
    if not segments:
        return 1
    seg = OpenSegment(*segments[-1])
    try:
        if seg.seal is not None:
            return seg.seal[0].next_lsn
        end = seg.base_lsn
        for _, h, _ in seg.scanner:
            end = h.end_lsn
        return end
    finally:
        seg.close()



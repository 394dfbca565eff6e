"""Reading the log from its files: any process, read-only, no lock, up to a bound.

`LogReader` walks frames across segments in LSN order and hands out whole batches of records.  It never
returns a record above its bound (the committed LSN), never a partial or unchecked one (each frame's CRC is
checked before its records are decoded), and holds at most one scan chunk plus one frame in memory.  It keeps
its segment's descriptor open, so retention can delete files under it without harm.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Callable, Iterator

from . import frame as F
from .errors import CorruptionError, LogClosedError, RecordError, TruncatedError
from .record import DEFAULT_MAX_RECORD_BYTES, Record, decode_payload
from .segment import FrameScanner, list_segments, read_header, read_seal

Bound = Callable[[], "int | None"]  # the committed LSN; None = no writer, read all valid data


class _OpenSegment:
    def __init__(self, base_lsn: int, path: Path) -> None:
        self.base_lsn = base_lsn
        self.path = path
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
        self.scanner = FrameScanner(self.fd, F.SEGMENT_HEADER_SIZE, self.size)

    def seek(self, lsn: int) -> None:
        """Start scanning at the indexed frame nearest below `lsn` (sealed segments carry an index)."""
        if self.seal is None:
            return
        index = self.seal[0].index
        i = bisect.bisect_right(index, (lsn, 1 << 64)) - 1
        if i >= 0:
            self.scanner.offset = index[i][1]

    def refresh(self) -> None:
        """Forget buffered bytes and re-read the size: the writer may have written more since."""
        self.size = os.fstat(self.fd).st_size
        self.scanner.limit = self.size
        self.scanner.stop = None
        self.scanner._buf = b""

    def close(self) -> None:
        os.close(self.fd)


class LogReader:
    """Records from `start` ("earliest", "latest" or an LSN) onwards, in order, up to `bound()`."""

    BATCH_RECORDS = 4096

    def __init__(self, directory: str | os.PathLike, start: int | str = "earliest", *, bound: Bound | None = None,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        self.directory = Path(directory)
        self._bound = bound or (lambda: None)
        self.max_record_bytes = max_record_bytes
        self._seg: _OpenSegment | None = None
        self._retried = False
        self._closed = False
        segments = list_segments(self.directory)
        first = segments[0][0] if segments else 1
        if start == "earliest":
            self.next_lsn = first
        elif start == "latest":
            committed = self._bound()
            self.next_lsn = committed + 1 if committed is not None else end_of_valid_data(self.directory)
        elif isinstance(start, int) and not isinstance(start, bool) and start >= 1:
            if segments and start < first:
                raise TruncatedError(start, first)
            self.next_lsn = start
        else:
            raise ValueError(f"start must be 'earliest', 'latest' or an LSN >= 1, not {start!r}")

    def _open_segment_for(self, lsn: int) -> bool:
        """Open the segment holding `lsn`; False if there is none yet."""
        segments = list_segments(self.directory)
        if not segments:
            return False
        i = bisect.bisect_right([b for b, _ in segments], lsn) - 1
        if i < 0:
            raise TruncatedError(lsn, segments[0][0])
        self._seg = _OpenSegment(*segments[i])
        self._seg.seek(lsn)
        return True

    def _next_segment(self, next_lsn: int) -> bool:
        """Move past a sealed segment to the one starting at `next_lsn`; False if it is not there yet."""
        for base, path in list_segments(self.directory):
            if base >= next_lsn:
                self._seg.close()
                self._seg = _OpenSegment(base, path)
                return True
        return False

    def read_batch(self) -> list[Record]:
        """The committed records available now, from `next_lsn` on (up to BATCH_RECORDS, whole frames);
        [] when caught up."""
        if self._closed:
            raise LogClosedError("reader is closed")
        bound = self._bound()
        if bound is not None and self.next_lsn > bound:
            return []
        if self._seg is None and not self._open_segment_for(self.next_lsn):
            return []
        out: list[Record] = []
        while len(out) < self.BATCH_RECORDS:
            records = self._step(bound)
            if records is None:
                break
            out.extend(records)
        return out

    def _step(self, bound: int | None) -> list[Record] | None:
        """One frame: its wanted records ([] after skipping or changing segment), None when nothing more
        can be read now."""
        seg = self._seg
        for off, h, data in seg.scanner:
            if h.kind == F.KIND_SEAL:
                if self._next_segment(h.base_lsn):
                    return []
                seg.scanner.offset = off
                return None
            if bound is not None and h.base_lsn > bound:
                seg.scanner.offset = off
                return None
            if h.end_lsn <= self.next_lsn:
                return []
            try:
                records = decode_payload(bytes(data[F.FRAME_HEADER_SIZE:]), h.base_lsn, h.count, h.timestamp_us,
                                         self.next_lsn, max_record_bytes=self.max_record_bytes)
            except RecordError as exc:
                raise CorruptionError(f"undecodable batch: {exc.detail}", segment=seg.path.name, offset=off,
                                      lsn=h.base_lsn) from None
            self.next_lsn = h.end_lsn
            self._retried = False
            return records
        stop = seg.scanner.stop
        resume = stop.offset if stop is not None else seg.scanner.offset
        if seg.seal is not None and stop is not None:
            raise CorruptionError(stop.error.detail, segment=seg.path.name, offset=stop.offset, lsn=self.next_lsn)
        if bound is None or self.next_lsn > bound or not self._retried:
            # End of what is visible: no writer (read what is valid), or our buffer or size is older than
            # the committed bound (try once more with fresh bytes).
            self._retried = bound is not None and self.next_lsn <= bound
            seg.refresh()
            seg.scanner.offset = resume
            return [] if self._retried else None
        raise CorruptionError(f"{stop.error.detail if stop else 'data ends'} below the committed LSN {bound}",
                              segment=seg.path.name, offset=resume, lsn=self.next_lsn)

    def __iter__(self) -> Iterator[Record]:
        """Every record available now, then stop (`walsvc.Reader` is the one that waits for more)."""
        while True:
            batch = self.read_batch()
            if not batch:
                return
            yield from batch

    def close(self) -> None:
        if self._seg is not None:
            self._seg.close()
            self._seg = None
        self._closed = True

    def __enter__(self) -> "LogReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def end_of_valid_data(directory: Path) -> int:
    """One past the last valid LSN on disk, from the last segment only (its seal, or a scan of its frames)."""
    segments = list_segments(directory)
    if not segments:
        return 1
    seg = _OpenSegment(*segments[-1])
    try:
        if seg.seal is not None:
            return seg.seal[0].next_lsn
        end = seg.base_lsn
        for _, h, _ in seg.scanner:
            end = h.end_lsn
        return end
    finally:
        seg.close()

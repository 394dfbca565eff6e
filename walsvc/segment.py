"""Segment files on disk: naming, creation with preallocation (directly, or as a spare file that a rotation
renames into place), sealing, and scanning their frames.

A segment is named for the first LSN it may hold, zero-padded to 20 digits (`00000000000000000001.wal`),
so names sort in log order and a reader finds the segment of any LSN from a directory listing.  Scanning
reads fixed-size chunks with pread, so memory stays bounded whatever the segment size, and every frame is
checked with one CRC32C call over its whole payload.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from crc32c import crc32c

from . import frame as F
from .access import open_file
from .errors import ChecksumError, IncompleteRecordError, RecordError
from .fsync import preallocate, pwrite_all, sync_data, sync_dir, write_step
from .record import _c

SUFFIX = ".wal"
SCAN_CHUNK = 1 << 20
SPARE_NAME = "next-segment.tmp"  # the spare segment file being prepared; not a segment name, so never listed

# Where scanning reads its bytes: an open file descriptor, or a pread-shaped function (n, offset) -> bytes
# (up to n bytes, fewer at the end), so the same scan runs over a file or over bytes in memory.
Read = Callable[[int, int], bytes]


def reader_of(src: "int | Read") -> Read:
    """The pread-shaped function for a descriptor (os.pread on it) or a function already of that shape."""
    return functools.partial(os.pread, src) if isinstance(src, int) else src


def bytes_reader(buf: bytes | bytearray) -> Read:
    """Read from bytes in memory as from a file of that length (tests and in-memory checks)."""
    return lambda n, offset: bytes(buf[offset:offset + n])


def segment_name(base_lsn: int) -> str:
    return f"{base_lsn:020d}{SUFFIX}"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(base LSN, path) of every segment file, in log order.  Other files are ignored."""
    found = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        if name.endswith(SUFFIX) and len(name) == 20 + len(SUFFIX) and name[:20].isdigit():
            found.append((int(name[:20]), directory / name))
    found.sort()
    return found


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class ActiveSegment:
    """The segment the writer appends to, with the running summary its seal will record."""
    path: Path
    fd: int
    header: F.SegmentHeader
    end: int  # offset where the next frame goes
    last_lsn: int = 0
    record_count: int = 0
    data_crc: int = 0
    index: list[tuple[int, int]] = field(default_factory=list)
    next_index_at: int = 0

    def note_frame(self, offset: int, parts: tuple[bytes | memoryview, ...], base_lsn: int, count: int,
                   index_interval: int) -> None:
        """Account for a frame (given as its byte parts) written at `offset`, or found there by recovery."""
        size, data_crc = 0, self.data_crc
        for part in parts:
            data_crc = crc32c(part, data_crc)
            size += len(part)
        self.note_written(offset, size, base_lsn, count, data_crc, index_interval)

    def note_written(self, offset: int, size: int, base_lsn: int, count: int, data_crc: int,
                     index_interval: int) -> None:
        """Account for a frame of `size` bytes written at `offset`, the data CRC already continued over it
        (frame.data_frame_header: the log's append computes both in one call)."""
        self.data_crc = data_crc
        if offset >= self.next_index_at:
            self.index.append((base_lsn, offset))
            self.next_index_at = offset + index_interval
        self.end = offset + size
        if count:
            self.last_lsn = base_lsn + count - 1
            self.record_count += count


def create_segment(directory: Path, segment_id: int, base_lsn: int, size: int, prealloc: bool) -> ActiveSegment:
    """Create, preallocate and fsync a new segment, then fsync the directory so its name survives a crash."""
    path = directory / segment_name(base_lsn)
    with write_step("segment create", path):
        fd = open_file(path, os.O_RDWR | os.O_EXCL)
    try:
        header = F.SegmentHeader(segment_id, base_lsn, now_us())
        if prealloc:
            with write_step("preallocate", path):
                preallocate(fd, size)
        with write_step("segment header write", path):
            pwrite_all(fd, F.encode_segment_header(header), 0)
        with write_step("fdatasync", path):
            sync_data(fd)
        sync_dir(directory, "directory fsync after segment create")
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass  # the error that got us here is the one to report; recovery handles a leftover file
        raise
    return ActiveSegment(path, fd, header, F.SEGMENT_HEADER_SIZE)


def create_spare(directory: Path, size: int, prealloc: bool) -> int:
    """Create the spare file the next rotation turns into a segment: preallocated and fsynced ahead of time,
    so a rotation only writes a header and renames it (etcd's file_pipeline).  Returns its descriptor."""
    path = directory / SPARE_NAME
    with write_step("spare create", path):
        fd = open_file(path, os.O_RDWR | os.O_EXCL)
    try:
        if prealloc:
            with write_step("preallocate", path):
                preallocate(fd, size)
        with write_step("fdatasync", path):
            sync_data(fd)
    except BaseException:
        os.close(fd)
        remove_spare(directory)
        raise
    return fd


def install_spare(directory: Path, fd: int, segment_id: int, base_lsn: int) -> ActiveSegment:
    """Make the spare the segment starting at `base_lsn`: write its header, rename it into place.

    Neither is fsynced here: the caller makes the header (fdatasync) and the name (directory fsync) durable
    before any record in the segment is acknowledged under `always`/`batch` (docs/FORMAT.md, "Rotation")."""
    path = directory / segment_name(base_lsn)
    header = F.SegmentHeader(segment_id, base_lsn, now_us())
    with write_step("segment header write", path):
        pwrite_all(fd, F.encode_segment_header(header), 0)
    with write_step("segment rename", path):
        os.rename(directory / SPARE_NAME, path)
    return ActiveSegment(path, fd, header, F.SEGMENT_HEADER_SIZE)


def remove_spare(directory: Path) -> None:
    """Delete a spare file if there is one (left by a crash or a failed preparation): it never held a record."""
    try:
        os.unlink(directory / SPARE_NAME)
    except FileNotFoundError:
        pass


def seal_table(producers: dict[int, Iterable[F.Appended]], max_producers: int) -> dict[int, list[F.Appended]]:
    """The producer windows a seal records: those of the `max_producers` most recently active producers."""
    items = [(pid, list(q)) for pid, q in producers.items()]
    if len(items) > max_producers:
        items = sorted(items, key=lambda kv: kv[1][-1].base_lsn)[-max_producers:]
    return dict(items)


def seal_segment(seg: ActiveSegment, next_lsn: int, producers: dict[int, list[F.Appended]]) -> None:
    """Fsync the frames, then append the SEAL frame, cut the preallocated tail, fsync.  The file then ends
    with the seal.

    The first fsync keeps a power cut from persisting the seal but not an unsynced frame before it: recovery
    trusts a seal without rescanning, so such a hole would surface only later, in a reader.
    """
    seal = F.Seal(seg.last_lsn, next_lsn, seg.record_count, seg.data_crc, seg.index, producers)
    data = F.encode_seal(seal, seg.end, now_us())
    with write_step("fdatasync", seg.path):  # the frames first: a seal vouches for what is before it
        sync_data(seg.fd)
    with write_step("seal write", seg.path):
        pwrite_all(seg.fd, data, seg.end)
    with write_step("seal truncate", seg.path):
        os.ftruncate(seg.fd, seg.end + len(data))
    with write_step("fdatasync", seg.path):
        sync_data(seg.fd)


def read_header(fd: "int | Read") -> F.SegmentHeader:
    return F.decode_segment_header(reader_of(fd)(F.SEGMENT_HEADER_SIZE, 0))


def read_seal(fd: "int | Read", size: int) -> tuple[F.Seal, int] | None:
    """The seal and its offset if this file ends with a valid SEAL frame, else None (not sealed)."""
    if size < F.SEGMENT_HEADER_SIZE + F.FRAME_HEADER_SIZE + 8:
        return None
    pread = reader_of(fd)
    trailer = pread(8, size - 8)
    if len(trailer) != 8:
        return None  # the file shrank since `size` was taken (the writer sealed it): not sealed as seen
    offset = F.seal_offset_from_trailer(trailer)
    if not F.SEGMENT_HEADER_SIZE <= offset <= size - F.FRAME_HEADER_SIZE - 8:
        return None
    data = pread(size - offset, offset)
    try:
        h = F.decode_frame_header(data)
        if h.kind != F.KIND_SEAL or h.size != len(data):
            return None
        F.check_payload(h, data, F.FRAME_HEADER_SIZE)
        return F.decode_seal(h, memoryview(data)[F.FRAME_HEADER_SIZE:]), offset
    except RecordError:
        return None


@dataclass
class ScanStop:
    """Where and why a scan stopped before the end of the bytes it was given."""
    offset: int
    error: RecordError
    header: F.FrameHeader | None  # set when the header was valid but the payload was not


class FrameScanner:
    """Walk the frames of one segment file from `offset` up to `limit`, in bounded memory.

    Yields (offset, header, frame bytes as a memoryview).  Stops at the first invalid, incomplete or
    all-zero header, or a bad payload, and leaves the reason in `stop` (None if it reached `limit` exactly).
    The caller decides whether a stop is a clean end, a torn tail or corruption (see recovery.py).
    """

    def __init__(self, fd: "int | Read", offset: int, limit: int, chunk: int = SCAN_CHUNK) -> None:
        self._pread = reader_of(fd)
        self.offset = offset
        self.limit = limit
        self.chunk = chunk
        self.stop: ScanStop | None = None
        self.view_buf, self.view_pos = b"", 0  # bytes and position of the last frame yielded (zero-copy decode)
        self._buf = b""
        self._buf_at = offset

    def _view(self, offset: int, n: int) -> memoryview:
        """n bytes at `offset` (fewer at EOF), from the chunk buffer when possible."""
        rel = offset - self._buf_at
        if rel < 0 or rel + n > len(self._buf):
            want = max(n, self.chunk)
            self._buf = self._pread(min(want, max(self.limit - offset, n)), offset)
            self._buf_at = offset
            rel = 0
        self.view_buf, self.view_pos = self._buf, rel
        return memoryview(self._buf)[rel:rel + n]

    def rewind(self, offset: int) -> None:
        """Scan from `offset` again, reading its bytes afresh from the file (the buffer is forgotten)."""
        self.offset = offset
        self._buf, self._buf_at = b"", offset

    def take_data_frame(self, next_lsn: int, bound: int | None, max_record_bytes: int,
                        min_base: int = 0) -> tuple[list, int, int] | None:
        """The next frame in one compiled call, when it is a DATA frame that lies whole in the chunk buffer (read
        from the file first if the buffer does not reach its header), passes its CRCs, starts at or below
        `bound` and at or above `min_base`, ends past `next_lsn` and decodes: (its records from `next_lsn` on,
        its end LSN, its payload length), the scan moved past it.  None for anything else, the scan where it
        was: iterating decides and names any fault.  A tailing reader takes this step at every poll."""
        if _c is None or self.offset >= self.limit:
            return None
        rel = self.offset - self._buf_at
        if rel < 0 or rel + F.FRAME_HEADER_SIZE > len(self._buf):
            self._view(self.offset, F.FRAME_HEADER_SIZE)
            rel = 0
        got = _c.data_frame(self._buf, rel, self.limit - self._buf_at, next_lsn, -1 if bound is None else bound,
                            max_record_bytes, min_base)
        if got is None:
            return None
        records, size, end_lsn, payload_len = got
        self.offset += size
        return records, end_lsn, payload_len

    def __iter__(self) -> Iterator[tuple[int, F.FrameHeader, memoryview]]:
        while self.offset < self.limit:
            off = self.offset
            head = self._view(off, F.FRAME_HEADER_SIZE)
            try:
                if len(head) < F.FRAME_HEADER_SIZE and F.is_zero(head):
                    raise IncompleteRecordError("zero bytes", offset=off)
                h = F.decode_frame_header(head)
            except RecordError as exc:
                self.stop = ScanStop(off, exc.located(offset=off), None)
                return
            if off + h.size > self.limit:
                self.stop = ScanStop(off, IncompleteRecordError(
                    f"frame of {h.size} bytes runs past the end ({self.limit})", offset=off, lsn=h.base_lsn), h)
                return
            data = self._view(off, h.size)
            if crc32c(data[F.FRAME_HEADER_SIZE:]) != h.payload_crc:
                self.stop = ScanStop(off, ChecksumError("frame payload CRC32C mismatch", offset=off,
                                                        lsn=h.base_lsn), h)
                return
            self.offset = off + h.size
            yield off, h, data


_ZEROS = bytes(SCAN_CHUNK * 8)


def is_zero_from(fd: "int | Read", offset: int, size: int) -> bool:
    """True if the file holds only zero bytes from `offset` to `size` (chunked memcmp, no Python loop)."""
    pread = reader_of(fd)
    while offset < size:
        chunk = pread(min(len(_ZEROS), size - offset), offset)
        if not chunk:
            return True
        if chunk != (_ZEROS if len(chunk) == len(_ZEROS) else bytes(len(chunk))):
            return False
        offset += len(chunk)
    return True


def data_end(fd: "int | Read", offset: int, size: int) -> int:
    """One past the last non-zero byte at or after `offset` (`offset` itself if there is none).

    Scans backwards from `size`: a torn tail's garbage sits just before a long preallocated zero tail.
    """
    pread = reader_of(fd)
    end = size
    while end > offset:
        start = max(offset, end - len(_ZEROS))
        chunk = pread(end - start, start)
        if chunk != (_ZEROS if len(chunk) == len(_ZEROS) else bytes(len(chunk))):
            return start + len(chunk.rstrip(b"\0"))
        end = start
    return offset


def valid_headers(fd: "int | Read", start: int, size: int, min_lsn: int) -> Iterator[tuple[int, F.FrameHeader]]:
    """(offset, header) of every valid frame header at or after `start` with base LSN >= min_lsn, in order,
    in one pass.  The magic number lets bytes.find do the search in C."""
    pread = reader_of(fd)
    overlap = F.FRAME_HEADER_SIZE
    pos = start
    while pos < size:
        n = min(SCAN_CHUNK * 8, size - pos)
        chunk = pread(n + overlap, pos)
        i = chunk.find(F.FRAME_MAGIC)
        while 0 <= i < n:
            try:
                h = F.decode_frame_header(chunk, i) if i + F.FRAME_HEADER_SIZE <= len(chunk) else None
            except RecordError:
                h = None
            if h is not None and h.base_lsn >= min_lsn:
                yield pos + i, h
            i = chunk.find(F.FRAME_MAGIC, i + 1)
        pos += n


def find_valid_header(fd: "int | Read", start: int, size: int, min_lsn: int) -> int | None:
    """Offset of the first valid frame header at or after `start` with base LSN >= min_lsn, else None.

    Recovery uses this to tell a torn tail (nothing valid after the damage) from corruption (valid frames
    follow the damage).
    """
    return next((off for off, _ in valid_headers(fd, start, size, min_lsn)), None)


def truncate_and_reserve(seg_fd: int, offset: int, size: int, prealloc: bool) -> None:
    """Cut the file at `offset` in place (no copying), re-reserve the zeroed tail, fsync."""
    os.ftruncate(seg_fd, offset)
    if prealloc and size > offset:
        preallocate(seg_fd, size)
    sync_data(seg_fd)


def unlink_segment(path: Path) -> None:
    """Delete a segment file; the caller fsyncs the directory once after a run of these."""
    with write_step("retention unlink", path):
        os.unlink(path)

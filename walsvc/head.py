"""The head file: the committed LSN, shared with every reader process through the page cache.

The writer rewrites 52 bytes at offset 0 of `DIR/HEAD` after each commit; readers pread them whenever
they want the bound they may read up to.  No socket is needed to learn it, so a reader that starts
before the writer, misses PUB messages or joins late still finds the truth within one pread.

Recovery reads one more thing from it: the durable LSN, how far the log was fsynced.  It is written only
after the data it names is durable, so it never claims more than really reached the disk, and damage past
it is an unsynced tail, not lost data (repair.classify).  The writer fsyncs HEAD at open, at close and,
under `always` and `batch`, at most every `log.HEAD_SYNC_S` after a commit, so after a power cut the HEAD
on disk lags the acks by about that much at most.

    0  8  magic b"WALSVCHD"
    8  8  committed LSN (0: nothing committed)
    16 8  writer PID (0: no writer; the log was closed cleanly)
    24 8  base LSN of the active segment (names its file)
    32 8  end offset of written frames in the active segment (readers compute their lag in bytes from it)
    40 8  durable LSN: every LSN up to it was fsynced before this HEAD was written (0: none known)
    48 4  CRC32C over bytes 0..48 (a reader that sees a half-written update retries)
"""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path
from typing import NamedTuple

from crc32c import crc32c

from .access import open_file
from .errors import WriteStepError
from .fsync import pwrite_all, sync_data
from .lock import WriterProbe, signalable
from .record import _c

NAME = "HEAD"
MAGIC = b"WALSVCHD"
_LAYOUT = struct.Struct("<8sQQQQQ")
_U32 = struct.Struct("<I")
SIZE = _LAYOUT.size + 4


class Head(NamedTuple):
    """HEAD's fields.  A NamedTuple: a tailing reader decodes one per poll, the writer encodes one per commit."""
    committed_lsn: int
    writer_pid: int
    active_base_lsn: int = 0
    active_end: int = 0
    durable_lsn: int = 0

    # The `lock.WriterProbe` of the directory this HEAD was read from: HeadReader and load() decode into a
    # subclass that sets it (`_of`), so a HEAD costs nothing more to decode; None for one from bytes alone.
    probe = None

    def writer_alive(self) -> bool:
        """Whether the process that last wrote this HEAD still runs and is still that writer: kill -9 leaves its
        PID behind, and another process may get that PID (`lock.WriterProbe`; kill(pid, 0) without a probe)."""
        if self.probe is None:
            return signalable(self.writer_pid)
        return self.probe.running(self.writer_pid)


@functools.lru_cache(maxsize=64)
def _of(directory: Path) -> type[Head]:
    """Head, with `writer_alive` asking `directory`'s LOCK (one class and probe per directory)."""
    return type("Head", (Head,), {"__slots__": (), "probe": WriterProbe(directory)})


def encode(head: Head) -> bytes:
    """HEAD's bytes: the compiled twin's when it was built (the writer rewrites HEAD at every commit)."""
    if _c is not None:
        data = _c.head(*head)
        if data is not None:
            return data
    return encode_py(head)


def encode_py(head: Head) -> bytes:
    body = _LAYOUT.pack(MAGIC, head.committed_lsn, head.writer_pid, head.active_base_lsn, head.active_end,
                        head.durable_lsn)
    return body + _U32.pack(crc32c(body))


def decode(data: bytes, cls: type[Head] = Head) -> Head | None:
    """HEAD's fields as `cls`, or None when `data` is short or damaged (a reader polls it: the compiled twin's
    one call when it was built)."""
    if _c is not None:
        head = _c.decode_head(cls, data)
        if head is not None:
            return head
    return decode_py(data, cls)


def decode_py(data: bytes, cls: type[Head] = Head) -> Head | None:
    if len(data) < SIZE:
        return None
    magic, committed, pid, base, end, durable = _LAYOUT.unpack_from(data)
    if magic != MAGIC or crc32c(data[:_LAYOUT.size]) != _U32.unpack_from(data, _LAYOUT.size)[0]:
        return None
    return cls(committed, pid, base, end, durable)


def load(directory: Path) -> Head | None:
    """The HEAD on disk, or None when it is missing or damaged (one read, no retry: for recovery and
    offline tools, when no writer can be rewriting it)."""
    try:
        with open(directory / NAME, "rb") as f:
            return decode(f.read(SIZE), _of(directory))
    except FileNotFoundError:
        return None


class HeadWriter:
    """The writer's side: one pwrite per commit, and an fdatasync when the HEAD must be durable."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / NAME
        self.fd = open_file(self.path, os.O_RDWR)
        self.shown = 0  # the committed LSN of the last HEAD written whole: readers may have read up to it

    def publish(self, head: Head, durable: bool = False) -> None:
        """Rewrite HEAD; `durable` also fsyncs it (recovery trusts its durable LSN, docs/FORMAT.md)."""
        try:  # not the write_step context manager: this runs at every commit
            data = encode(head)
            written = os.pwrite(self.fd, data, 0)
            if written != SIZE:  # never seen for 52 bytes in place, but a short write is legal: finish it
                pwrite_all(self.fd, data, 0, written)
            self.shown = head.committed_lsn
            if durable:
                sync_data(self.fd)
        except OSError as exc:
            raise WriteStepError("HEAD update", self.path, exc) from exc


class HeadReader:
    """A reader's side: a read-only descriptor, reread on demand (one pread, about a microsecond)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / NAME
        self.fd: int | None = None
        self._cls = _of(directory)

    def read(self) -> Head | None:
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return None
        for _ in range(100):
            head = decode(os.pread(self.fd, SIZE, 0), self._cls)
            if head is not None:
                return head
        return None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

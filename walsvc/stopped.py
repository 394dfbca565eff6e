"""The STOPPED file: how far a log that stopped on an error had committed, for readers and the next open.

A stop leaves bytes in the segment files that no one was ever told are stored: batches written and then
nacked `log_stopped`, and frames whose fsync failed.  Linux may drop the pages of a failed write-back while
the page cache still shows them, and it reports the failure once (PostgreSQL's "fsyncgate"), so a restart
could read those frames, fsync them "successfully" and commit them, leaving a hole before later acks on the
next power cut.  So the log writes this file the moment it stops.  Readers with no writer read no further
than it says, and the next open cuts everything after it (the bytes go to quarantine/, their LSNs are never
handed out again): after a stop the log holds exactly what was committed.

    0  8  magic b"WALSVCST"
    8  8  committed LSN at the stop (0: nothing committed)
    16 4  length N of the reason (UTF-8)
    20 N  the stop reason, for people (`walsvc status`, `walsvc verify`)
    20+N 4  CRC32C over bytes 0..20+N

Written to a temporary name, fsynced and renamed, so a crash leaves the old state or the new one.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import NamedTuple

from crc32c import crc32c

from .access import open_file
from .errors import CorruptionError
from .fsync import pwrite_all, sync_dir

NAME = "STOPPED"
MAGIC = b"WALSVCST"
_LAYOUT = struct.Struct("<8sQI")
_U32 = struct.Struct("<I")
MAX_REASON = 1024  # bytes of the reason kept: the rest is in the writer's log


class Stopped(NamedTuple):
    committed_lsn: int
    reason: str


def encode(stop: Stopped) -> bytes:
    reason = stop.reason.encode("utf-8", "replace")[:MAX_REASON]
    body = _LAYOUT.pack(MAGIC, stop.committed_lsn, len(reason)) + reason
    return body + _U32.pack(crc32c(body))


def decode(data: bytes, path: Path) -> Stopped:
    """The file's fields; CorruptionError when they do not check (it is written whole, then renamed)."""
    if len(data) >= _LAYOUT.size + 4:
        magic, committed, n = _LAYOUT.unpack_from(data)
        end = _LAYOUT.size + n
        if (magic == MAGIC and len(data) == end + 4 and n <= MAX_REASON
                and crc32c(data[:end]) == _U32.unpack_from(data, end)[0]):
            return Stopped(committed, data[_LAYOUT.size:end].decode("utf-8", "replace"))
    raise CorruptionError(f"the stop record {path} is damaged: it says how far the log had committed when it "
                          "stopped, and nothing past that may be read or kept; compare with `walsvc status` and "
                          "HEAD before you delete it")


def load(directory: Path) -> Stopped | None:
    """The stop record of `directory`, or None when the log did not stop (or a restart dealt with it)."""
    path = directory / NAME
    try:
        with open(path, "rb") as f:
            data = f.read(_LAYOUT.size + MAX_REASON + 4 + 1)
    except FileNotFoundError:
        return None
    return decode(data, path)


def write(directory: Path, stop: Stopped) -> None:
    """Record the stop durably (the file, then its name); OSError if the disk will not take it."""
    tmp = directory / f".{NAME}.tmp"
    fd = open_file(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        pwrite_all(fd, encode(stop), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, directory / NAME)
    sync_dir(directory, "directory fsync after recording the stop")


def clear(directory: Path) -> None:
    """Forget the stop once recovery has cut after it (durably: a crash before this cuts again, harmlessly)."""
    os.unlink(directory / NAME)
    sync_dir(directory, "directory fsync after clearing the stop record")

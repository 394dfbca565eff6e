"""Named reader cursors: `DIR/cursors/NAME.cursor`, the last LSN a named reader has processed.

Written with write-to-temp, fsync, rename, fsync-directory, so a cursor is either the old or the new value
after any crash.  Retention reads them so that it never deletes what a named reader still needs (within
`max_cursor_lag_bytes`).

    0 8  last processed LSN
    8 4  CRC32C over bytes 0..8
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from crc32c import crc32c

from .access import make_dir, open_file
from .errors import ConfigError
from .fsync import sync_dir

DIRNAME = "cursors"
SUFFIX = ".cursor"
_LAYOUT = struct.Struct("<QI")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or name.startswith("."):
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


def store(directory: Path, name: str, lsn: int) -> None:
    cdir = directory / DIRNAME
    if not cdir.is_dir():
        make_dir(cdir)
        sync_dir(directory)
    final = cdir / (check_name(name) + SUFFIX)
    tmp = cdir / f".{name}.{os.getpid()}.tmp"
    body = struct.pack("<Q", lsn)
    fd = open_file(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, body + struct.pack("<I", crc32c(body)))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    sync_dir(cdir)


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

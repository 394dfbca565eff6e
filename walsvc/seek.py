"""Positions by what a user knows: the end of the committed log, and the first record at or after a time.

Timestamps live in each batch frame (µs since the epoch, taken by the writer when it appends), so every
record of a batch has its frame's time and they do not decrease along the log (barring a wall clock stepped
back).  `lsn_at_time` finds the segment by its first record, then scans that segment only.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from .config import directory_path
from .errors import ConfigError
from .head import HeadReader
from .recovery import offline_end
from .scan import LogReader
from .segment import list_segments


def committed_end(directory: str | os.PathLike) -> int:
    """The last LSN a reader may see now: the writer's committed LSN, or with no writer where the next open
    would end the log.  CorruptionError when that open would refuse the log: a position "past the end" of
    a damaged log would hide the damage."""
    directory = directory_path(directory)
    head = HeadReader(directory).read()
    if head is not None and head.writer_alive():
        return head.committed_lsn
    end = offline_end(directory)
    if end.damage is not None:
        raise end.damage
    return end.committed_lsn


def _first_timestamp(directory: Path, base: int, bound: int) -> int | None:
    reader = LogReader(directory, base, bound=lambda: bound)
    try:
        batch = reader.read_batch()
        return batch[0].timestamp if batch else None
    finally:
        reader.close()


def lsn_at_time(directory: str | os.PathLike, when: datetime.datetime | int) -> int:
    """The first LSN written at or after `when` (a datetime, naive = local time, or µs since the epoch); one
    past the committed end if none.  `Reader(directory, start=lsn_at_time(directory, when))` seeks by time."""
    if isinstance(when, datetime.datetime):
        when_us = int(when.timestamp() * 1_000_000)
    elif type(when) is int:
        when_us = when
    else:
        raise ConfigError("when", f"must be a datetime or an integer of µs since the epoch, not "
                                  f"{type(when).__name__} {when!r}")
    directory = directory_path(directory)
    bound = committed_end(directory)
    segments = [base for base, _ in list_segments(directory) if base <= bound]
    if not segments:
        return bound + 1
    lo, hi = 0, len(segments) - 1  # the last segment whose first record is before `when_us`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ts = _first_timestamp(directory, segments[mid], bound)
        if ts is not None and ts < when_us:
            lo = mid
        else:
            hi = mid - 1
    reader = LogReader(directory, segments[lo], bound=lambda: bound)
    try:
        while batch := reader.read_batch():
            for r in batch:
                if r.timestamp >= when_us:
                    return r.lsn
    finally:
        reader.close()
    return bound + 1

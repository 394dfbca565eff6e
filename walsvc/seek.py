"""Positions by what a user knows: the end of the committed log, and the first record at or after a time.

Timestamps live in each batch frame (µs since the epoch, taken by the writer when it appends), so every
record of a batch has its frame's time and they do not decrease along the log (barring a wall clock stepped
back).  `lsn_at_time` finds the segment by its first record, then scans that segment only.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from . import frame as F
from . import stopped
from .config import directory_path
from .errors import ConfigError, CorruptionError, Location, RecordError
from .head import HeadReader
from .head import load as load_head
from .recovery import _check_base, _refusal
from .repair import Cut, FinishSeal, Refuse, WriteSeal, header_lost, plan_segment
from .scan import LogReader, scan_segment
from .segment import is_zero_from, list_segments, read_header, read_seal


@dataclass(frozen=True, slots=True)
class OfflineEnd:
    """Where a log with no writer ends, judged by recovery's rules (what the next open would do)."""
    committed_lsn: int  # the last LSN a reader may see: the valid end, or a stopped log's committed LSN
    damage: CorruptionError | None  # what the next open would refuse (readers stop there too), None if none
    torn_tail: str | None  # a torn tail the next open cuts: what a crash leaves, not damage
    stop: stopped.Stopped | None  # the log stopped on an error (the STOPPED file)


def offline_end(directory: Path) -> OfflineEnd:
    """The end of the log as the next open's recovery would find it, without changing a byte.

    Sealed segments are taken from their seals, unsealed ones scanned and planned (`repair.plan_segment`)
    as recovery does, so "damaged" here means exactly what `serve` would refuse and a reader would raise.
    A log that stopped on an error ends at the LSN it had committed: recovery cuts what follows, damage
    included.  The last segment alone (its frames up to the first stop) would call a log ending at a
    corrupt frame healthy.
    """
    try:
        stop = stopped.load(directory)
    except CorruptionError as exc:
        return OfflineEnd(0, exc, None, None)
    keep = stop.committed_lsn if stop is not None else None
    segments = list_segments(directory)
    head = load_head(directory)
    durable = head.durable_lsn if head is not None else None
    if segments and _header_lost(*segments[-1], durable):
        dropped, _ = segments.pop()  # recovery drops it before judging the others
        if not segments:
            return OfflineEnd(dropped - 1, None, None, stop)
    expected = segments[0][0] if segments else 1
    torn = None
    for i, (base, path) in enumerate(segments):
        if keep is not None and expected > keep:
            break  # everything from here on is cut after the stop
        next_base = segments[i + 1][0] if i + 1 < len(segments) else None
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            try:
                header = read_header(fd)
            except RecordError as exc:
                raise CorruptionError(f"bad segment header: {exc.detail}", segment=path.name, offset=0) from None
            _check_base(header, base, expected, i, path)
            sealed = read_seal(fd, size)
            if sealed is not None:
                expected = sealed[0].next_lsn
                continue
            scan = scan_segment(fd, size, expected)
        except CorruptionError as exc:
            return OfflineEnd(expected - 1, exc, None, stop)
        finally:
            os.close(fd)
        plan = plan_segment(scan, is_last=next_base is None, durable_lsn=durable, truncate=False,
                            next_base_lsn=next_base)
        if isinstance(plan.action, (FinishSeal, WriteSeal)):
            expected = plan.action.next_lsn
            continue
        if isinstance(plan.action, Refuse) and (keep is None or scan.expected <= keep):
            return OfflineEnd(scan.expected - 1, _refusal(plan, plan.action, path), None, stop)
        expected = scan.expected
        if isinstance(plan.action, Cut) and (keep is None or expected <= keep):
            torn = Location(path.name, plan.offset).after(plan.detail)
        break  # the newest segment, or a cut that moves every later one to quarantine/
    end = expected - 1
    return OfflineEnd(end if keep is None else min(end, keep), None, torn, stop)


def _header_lost(base: int, path: Path, durable_lsn: int | None) -> bool:
    """Whether the newest segment's header does not decode and it holds nothing durable (`repair.header_lost`):
    recovery deletes it, readers treat it as absent."""
    fd = os.open(path, os.O_RDONLY)
    try:
        read_header(fd)
        return False
    except RecordError:
        return header_lost(base, is_zero_from(fd, F.SEGMENT_HEADER_SIZE, os.fstat(fd).st_size), durable_lsn)
    finally:
        os.close(fd)


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

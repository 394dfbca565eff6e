"""Recovery at open: find where the log ends, cut a torn tail, refuse to hide corruption.

Sealed segments are trusted from their seal frame (header and seal CRCs, LSN continuity) and not rescanned,
so open time is bounded by the active segment, not the size of the log.  An unsealed segment goes through
scan -> plan -> apply: `scan.scan_segment` reports its frames and where and how the valid data stops,
`repair.plan_segment` decides (a clean end, a torn tail to cut, corruption to refuse or, with
`on_corruption = "truncate"`, to cut with every later segment moved to `quarantine/`; see repair.py for
the rules), and the small functions here carry the plan out.  `walsvc verify` reports the same plan, and
`offline_end` makes the same judgement without changing a byte (where a log with no writer ends, for
`walsvc status` and readers' start positions).

The writer renames the next segment into place before its rotation thread seals the old one (rotation.py),
so a crash in between leaves an unsealed segment before the last one whose frames end exactly where the next
segment begins: recovery writes that seal (`repair.WriteSeal`).  A newest segment whose header a power cut
lost, with nothing durable in it, is dropped first (`_drop_headerless_last`, `repair.header_lost`).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from crc32c import crc32c

from . import frame as F
from . import stopped
from .access import make_dir, open_file
from .errors import CorruptionError, Location, MissingSegmentError, RecordError
from .fsync import pwrite_all, sync_data, sync_dir
from .head import Head
from .head import load as load_head
from .repair import Cut, FinishSeal, Lost, Plan, Refuse, Verdict, WriteSeal, header_lost, lost_after, plan_segment
from .scan import scan_segment
from .segment import (SCAN_CHUNK, ActiveSegment, FrameScanner, is_zero_from, list_segments, now_us, read_header,
                      read_seal, seal_segment, seal_table, segment_name, truncate_and_reserve)
from .segment import data_end as segment_data_end
from .config import LogConfig

QUARANTINE = "quarantine"

logger = logging.getLogger(__name__)


@dataclass
class RecoveryInfo:
    """What recovery found and did; `log.recovery` and `walsvc status` show it."""
    segments_scanned: int = 0
    sealed_segments: int = 0
    records_valid: int = 0
    bytes_scanned: int = 0
    bytes_truncated: int = 0
    torn_tail: bool = False
    corruption: str | None = None
    truncated_at: tuple[str, int] | None = None  # (segment file, offset) where bytes were cut
    quarantined: list[str] = field(default_factory=list)
    skipped_lsns: tuple[int, int] | None = None  # [first, end) of a torn batch whose LSNs are never reused
    cut_after_stop: int | None = None  # the log had stopped (STOPPED): everything after this LSN was cut
    # [first, end) of LSNs HEAD called committed that are not on disk (acked under `os` and lost in a crash of
    # the OS, or cut as damage in truncate mode): the writer never hands them out again, or a reader, cursor or
    # mirror that had them would take a new record for the old one
    lost_lsns: tuple[int, int] | None = None
    first_lsn: int = 1
    last_lsn: int = 0
    duration_s: float = 0.0

    def summary(self) -> str:
        parts = [f"{self.segments_scanned} segments ({self.sealed_segments} sealed)",
                 f"{self.records_valid} records", f"LSN {self.first_lsn}..{self.last_lsn}",
                 f"{self.duration_s * 1000:.1f} ms"]
        if self.torn_tail:
            parts.append(f"torn tail of {self.bytes_truncated} bytes cut at {Location(*self.truncated_at)}")
        if self.corruption:
            parts.append(f"CORRUPTION repaired by truncation: {self.corruption}; quarantined {self.quarantined}")
        if self.cut_after_stop is not None:
            parts.append(f"the log had stopped on an error: what was written after LSN {self.cut_after_stop} was "
                         f"never committed and is cut ({self.bytes_truncated} bytes; quarantined "
                         f"{self.quarantined})")
        if self.lost_lsns is not None:
            parts.append(f"LSNs {self.lost_lsns[0]}..{self.lost_lsns[1] - 1} were committed but are not on disk "
                         "(lost in a crash, or cut as damage); they are never handed out again")
        return "recovered " + ", ".join(parts)


@dataclass
class Recovered:
    """What the writer continues from."""
    active: ActiveSegment | None  # None: start a new segment at next_lsn
    next_lsn: int
    next_segment_id: int
    producers: dict[int, collections.deque] = field(default_factory=dict)


def remember_batches(producers: dict[int, collections.deque], pid: int, entries: Iterable[F.Appended],
                     window: int) -> None:
    """Add batches to a producer's deduplication window: its last `window` batches, oldest first (the log
    keeps it on append, recovery rebuilds it from seals and frames)."""
    q = producers.get(pid)
    if q is None:
        q = producers[pid] = collections.deque(maxlen=window)
    q.extend(entries)


def _end_lsn(path: Path) -> int:
    """One past the highest LSN stored in a segment (used for segments moved to quarantine)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        sealed = read_seal(fd, size)
        if sealed:
            return sealed[0].next_lsn
        end = 0
        for _, h, _ in FrameScanner(fd, F.SEGMENT_HEADER_SIZE, size):
            end = max(end, h.end_lsn)
        return end
    except RecordError:
        return 0
    finally:
        os.close(fd)


def verify_sealed(fd: int, seal: F.Seal, seal_offset: int) -> None:
    """Check a sealed segment's data checksum (one CRC pass over its frames, no record decoding)."""
    crc = 0
    pos = F.SEGMENT_HEADER_SIZE
    while pos < seal_offset:
        chunk = os.pread(fd, min(SCAN_CHUNK * 8, seal_offset - pos), pos)
        crc = crc32c(chunk, crc)
        pos += len(chunk)
    if crc != seal.data_crc:
        raise RecordError(f"segment data CRC32C 0x{crc:08x} does not match the seal's 0x{seal.data_crc:08x}")


def recover(directory: Path, cfg: LogConfig, *, verify: bool = False) -> tuple[RecoveryInfo, Recovered]:
    """Open-time recovery of `directory` (which the caller has locked).  `verify` also checks the data
    checksum of every sealed segment (one CRC pass over the whole log)."""
    started = time.perf_counter()
    info = RecoveryInfo()
    segments = list_segments(directory)
    state = Recovered(None, 1, 1)
    if not segments:
        _forget_stop(directory)
        info.duration_s = time.perf_counter() - started
        return info, state
    head = load_head(directory)
    durable_lsn = head.durable_lsn if head is not None else None
    if _drop_headerless_last(directory, segments[-1], durable_lsn, info):
        dropped, _ = segments.pop()
        if not segments:  # the log starts again where that segment would have (retention may have run)
            _forget_stop(directory)
            state.next_lsn = info.first_lsn = dropped
            info.lost_lsns = _check_lost(head, dropped, cfg)
            info.duration_s = time.perf_counter() - started
            return info, state
    segments = _cut_after_stop(directory, segments, cfg, info)
    info.first_lsn = segments[0][0]
    expected = segments[0][0]
    truncate = cfg.on_corruption == "truncate"
    for i, (base, path) in enumerate(segments):
        is_last = i == len(segments) - 1
        fd = os.open(path, os.O_RDWR)
        keep_fd = False
        try:
            info.segments_scanned += 1
            size = os.fstat(fd).st_size
            header = read_checked_header(fd, path, base, expected, i)
            state.next_segment_id = header.segment_id + 1
            sealed = read_seal(fd, size)
            if sealed is not None and verify:
                try:
                    verify_sealed(fd, sealed[0], sealed[1])
                except RecordError as exc:
                    if not truncate:
                        raise CorruptionError(f"{exc.detail}; set on_corruption = \"truncate\" to cut at the "
                                              "damage and quarantine later segments", segment=path.name) from None
                    sealed = None  # scan it frame by frame below: the damaged frame decides where to cut
            if sealed is not None:
                expected = _trust_seal(sealed[0], info, state, cfg)
                continue
            # Unsealed: scan, plan, apply.
            seg = ActiveSegment(path, fd, header, F.SEGMENT_HEADER_SIZE)
            scan = scan_segment(fd, size, expected, on_frame=lambda off, h, data: _note_frame(seg, state, cfg, off,
                                                                                             h, data))
            info.bytes_scanned += scan.frame_bytes
            info.records_valid += scan.records
            if scan.gaps:
                info.skipped_lsns = scan.gaps[-1]
            if seg.record_count:
                info.last_lsn = seg.last_lsn
            later = [p for _, p in segments[i + 1:]]
            next_base = segments[i + 1][0] if later else None
            plan = plan_segment(scan, is_last=is_last, durable_lsn=durable_lsn, truncate=truncate,
                                next_base_lsn=next_base)
            if isinstance(plan.action, Cut) and plan.action.quarantine_later:
                # The later segments go to quarantine/ and their LSNs are never reused: read how far they go
                # (only now, as it may scan them).
                plan = plan_segment(scan, is_last=is_last, durable_lsn=durable_lsn, truncate=truncate,
                                    later_end_lsn=max((_end_lsn(p) for p in later), default=0),
                                    next_base_lsn=next_base)
            action = plan.action
            if isinstance(action, FinishSeal):
                _finish_seal(fd, action)
                info.sealed_segments += 1
                expected = action.next_lsn
                continue
            if isinstance(action, WriteSeal):
                seg.end = action.end
                seal_segment(seg, action.next_lsn, seal_table(state.producers, cfg.max_producers))
                info.sealed_segments += 1
                expected = action.next_lsn
                continue
            if isinstance(action, Refuse):
                raise refusal(plan, action, path)
            if is_last or (isinstance(action, Cut) and action.quarantine_later):
                # The log's data ends here (LSNs a torn batch's surviving header burns are lost too): refuse a
                # loss of fsynced records before cutting a byte.
                info.lost_lsns = _check_lost(head, scan.expected, cfg, path, plan.offset)
            if isinstance(action, Cut):
                expected = _apply_cut(directory, path, seg, scan.expected, plan, action, later, info, cfg)
            else:
                seg.end = action.end
                expected = scan.expected
            state.active = seg
            keep_fd = True
            if isinstance(action, Cut) and action.quarantine_later:
                break
        finally:
            if fd >= 0 and not keep_fd:
                os.close(fd)
    state.next_lsn = expected
    if state.active is None:  # the log ends with a sealed segment: its data ends at the seal's next LSN
        info.lost_lsns = _check_lost(head, expected, cfg)
    info.duration_s = time.perf_counter() - started
    return info, state


def head_lost(head: Head | None, next_lsn: int) -> Lost | None:
    """`repair.lost_after` for a log whose data ends before `next_lsn`, with HEAD's word (None: no HEAD)."""
    return lost_after(next_lsn, head.committed_lsn, head.durable_lsn) if head is not None else None


def _check_lost(head: Head | None, next_lsn: int, cfg: LogConfig, path: Path | None = None,
                offset: int | None = None) -> tuple[int, int] | None:
    """The LSNs HEAD calls committed that the data does not reach, [first, end); refused (unless
    on_corruption = "truncate") when HEAD calls them fsynced too (a lying disk, a file changed by hand).
    `path` and `offset`: where the log's data ends, for the error."""
    lost = head_lost(head, next_lsn)
    if lost is None:
        return None
    if lost.durable and cfg.on_corruption != "truncate":
        raise CorruptionError(f"LSNs {lost.first}..{lost.end - 1} were committed and fsynced (HEAD's durable LSN is "
                              f"{head.durable_lsn}), but the log's data ends before them: the disk lost "
                              "acknowledged writes; `walsvc verify` shows the log, and on_corruption = \"truncate\" "
                              "starts without them (their LSNs are never handed out again)",
                              segment=path.name if path is not None else None, offset=offset, lsn=lost.first)
    return lost.first, lost.end


def _cut_after_stop(directory: Path, segments: list[tuple[int, Path]], cfg: LogConfig,
                    info: RecoveryInfo) -> list[tuple[int, Path]]:
    """The log stopped on an error (walsvc/stopped.py): cut everything written after the LSN it had
    committed, so no batch that was nacked, or whose fsync failed, survives the restart.  The cut bytes and
    the segments after them go to quarantine/, and an empty frame keeps their LSNs from being handed out
    again.  Returns the segments left.  Safe to repeat after a crash: the stop record is cleared last."""
    stop = stopped.load(directory)
    if stop is None:
        return segments
    keep = stop.committed_lsn
    target = max([i for i, (base, _) in enumerate(segments) if base <= keep + 1], default=0)
    base, path = segments[target]
    later = [p for _, p in segments[target + 1:]]
    burned = max((_end_lsn(p) for p in later), default=0)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        cut_at = F.SEGMENT_HEADER_SIZE  # the end of the last frame with a committed LSN
        kept_end = base  # one past the last LSN before cut_at
        for off, h, _ in FrameScanner(fd, F.SEGMENT_HEADER_SIZE, size):
            if h.kind == F.KIND_SEAL:
                continue
            # Committed: a frame holding LSNs up to `keep`, or a skip marker (count 0) to keep + 1 at most
            # (`Log.skip_to` commits through the LSN before its marker).
            if h.base_lsn <= keep or h.end_lsn <= keep + 1:
                cut_at, kept_end = off + h.size, max(kept_end, h.end_lsn)
            else:
                burned = max(burned, h.end_lsn)
        data_end = segment_data_end(fd, cut_at, size)
        if kept_end <= keep:
            # Data the log had committed is not all there (`os`, then a crash of the OS): not a cut for the
            # stop to decide.  Recovery's own rules judge the segment, as without the record.
            logger.warning("%s: the log had stopped at LSN %d, but the data ends before it; recovering as "
                           "after a crash", directory / stopped.NAME, keep)
        elif later or data_end > cut_at:
            info.cut_after_stop = keep
            info.truncated_at = (path.name, cut_at)
            info.bytes_truncated = max(0, data_end - cut_at)
            if data_end > cut_at:
                _save_tail(directory, path, fd, cut_at, data_end, info)
            end = cut_at
            if burned > keep + 1:
                info.skipped_lsns = (keep + 1, burned)
                marker = F.encode_frame(F.KIND_DATA, b"", 0, burned, now_us())
                pwrite_all(fd, marker, cut_at)
                end += len(marker)
            truncate_and_reserve(fd, end, cfg.segment_bytes, cfg.preallocate)
            _quarantine(directory, later, info)
            segments = segments[:target + 1]
    finally:
        os.close(fd)
    stopped.clear(directory)
    return segments


def _forget_stop(directory: Path) -> None:
    """No segment is left to cut after a stop (none was made, or the only one lost its header): the stop
    record must not outlive it, or a later open would cut what the next writer acks."""
    if stopped.load(directory) is not None:
        stopped.clear(directory)


def _drop_headerless_last(directory: Path, last: tuple[int, Path], durable_lsn: int | None,
                          info: RecoveryInfo) -> bool:
    """Delete (or, if it holds any bytes, quarantine) the newest segment when its header is lost and nothing
    in it was durable (`repair.header_lost`); True if it was.  Done first, so the segment before it is
    judged as the last one."""
    base, path = last
    if not header_lost_in(base, path, durable_lsn):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        empty = is_zero_from(fd, F.SEGMENT_HEADER_SIZE, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    if empty:
        os.unlink(path)
        sync_dir(directory)
    else:
        _quarantine(directory, [path], info)
    return True


def header_lost_in(base: int, path: Path, durable_lsn: int | None) -> bool:
    """Whether the newest segment's header does not decode and it holds nothing a crash must keep
    (`repair.header_lost`): recovery deletes or quarantines it, readers and tools treat it as absent."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        read_header(fd)
        return False
    except RecordError:
        return header_lost(base, is_zero_from(fd, F.SEGMENT_HEADER_SIZE, os.fstat(fd).st_size), durable_lsn)
    finally:
        os.close(fd)


def read_checked_header(fd: int, path: Path, base: int, expected: int, i: int) -> F.SegmentHeader:
    """Segment `i`'s header, which must decode and start where the log so far ends (`check_base`)."""
    try:
        header = read_header(fd)
    except RecordError as exc:
        raise CorruptionError(f"bad segment header: {exc.detail}", segment=path.name, offset=0) from None
    check_base(header, base, expected, i, path)
    return header


def check_base(header: F.SegmentHeader, base: int, expected: int, i: int, path: Path) -> None:
    """The segment starts where the log so far ends (its name, its header and the previous seal agree)."""
    if header.base_lsn != base or base < expected:
        raise CorruptionError(f"segment header says base LSN {header.base_lsn}, expected {base} "
                              f"(>= {expected})", segment=path.name, offset=0)
    if i and base != expected:
        # Each seal names the next segment's base exactly and retention deletes only the oldest:
        # a later base means a segment in the middle is missing.
        raise MissingSegmentError(f"LSNs {expected}..{base - 1} are missing: the previous segment ends "
                                  f"before LSN {expected} (segment {segment_name(expected)} is gone)",
                                  segment=path.name, offset=0, lsn=expected)


def _trust_seal(seal: F.Seal, info: RecoveryInfo, state: Recovered, cfg: LogConfig) -> int:
    """Take a sealed segment's summary from its seal; returns the next LSN."""
    info.sealed_segments += 1
    info.records_valid += seal.record_count
    for pid, entries in seal.producers.items():
        remember_batches(state.producers, pid, entries, cfg.producer_window)
    if seal.record_count:
        info.last_lsn = seal.last_lsn
    return seal.next_lsn


def _note_frame(seg: ActiveSegment, state: Recovered, cfg: LogConfig, off: int, h: F.FrameHeader,
                data: memoryview) -> None:
    """An intact frame of the segment being recovered: its checksum, index entry and producer window."""
    seg.note_frame(off, (data,), h.base_lsn, h.count, cfg.index_interval_bytes)
    if h.producer_id:
        remember_batches(state.producers, h.producer_id, (F.Appended(h.producer_seq, h.base_lsn, h.count),),
                         cfg.producer_window)


def _finish_seal(fd: int, action: FinishSeal) -> None:
    """Crashed between writing the seal and cutting the file after it: finish the seal."""
    os.ftruncate(fd, action.end)
    os.fsync(fd)


def refusal(plan: Plan, action: Refuse, path: Path) -> CorruptionError:
    if action.repairable:
        return CorruptionError(f"{action.detail}; valid data follows, so this is not a torn tail (set "
                               "on_corruption = \"truncate\" to cut here and quarantine later segments)",
                               segment=path.name, offset=action.offset, lsn=action.lsn)
    return CorruptionError(action.detail, segment=path.name, offset=action.offset)


def _apply_cut(directory: Path, path: Path, seg: ActiveSegment, expected: int, plan: Plan, action: Cut,
               later: list[Path], info: RecoveryInfo, cfg: LogConfig) -> int:
    """Carry out a cut: save the bytes, quarantine later segments, write the skip marker, truncate.
    Returns the next LSN to hand out."""
    info.truncated_at = (path.name, action.offset)
    info.bytes_truncated = action.data_end - action.offset
    if plan.verdict is Verdict.TORN:
        info.torn_tail = True
    else:
        info.corruption = Location(path.name, action.offset).after(plan.detail)
    if action.save is not None:
        _save_tail(directory, path, seg.fd, action.save[0], action.save[1], info)
    if action.quarantine_later:
        _quarantine(directory, later, info)
    if action.next_lsn > expected:
        info.skipped_lsns = (expected, action.next_lsn)
    return _cut(seg, action.offset, expected, action.next_lsn, cfg)


def _cut(seg: ActiveSegment, offset: int, expected: int, burned: int, cfg: LogConfig) -> int:
    """Cut the segment at `offset`; returns the next LSN to hand out.

    When LSNs up to `burned` were handed out to the data being cut, an empty DATA frame (count 0) with base
    LSN `burned` is written at `offset` first and kept: without it the skip lived only in memory and a
    restart before the next append would hand those LSNs out again.  Recovery and readers jump past it.
    """
    if burned > expected:
        marker = F.encode_frame(F.KIND_DATA, b"", 0, burned, now_us())
        pwrite_all(seg.fd, marker, offset)
        sync_data(seg.fd)  # durable before the cut, so a crash in between cannot lose the skip
        seg.note_frame(offset, (marker,), burned, 0, cfg.index_interval_bytes)
        expected = burned
    else:
        seg.end = offset
    truncate_and_reserve(seg.fd, seg.end, cfg.segment_bytes, cfg.preallocate)
    return expected


def _save_tail(directory: Path, path: Path, fd: int, start: int, size: int, info: RecoveryInfo) -> None:
    """Copy the bytes about to be cut into quarantine/, so a repair never destroys evidence or data."""
    qdir = directory / QUARANTINE
    make_dir(qdir)
    target = qdir / f"{path.name}.from-{start}"
    n = 1
    while target.exists():  # a repair repeated after a crash: keep what the first one saved
        n += 1
        target = qdir / f"{path.name}.from-{start}.{n}"
    with os.fdopen(open_file(target, os.O_WRONLY | os.O_TRUNC), "wb") as out:
        pos = start
        while pos < size:
            chunk = os.pread(fd, min(SCAN_CHUNK * 8, size - pos), pos)
            out.write(chunk)
            pos += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    info.quarantined.append(str(target))
    sync_dir(qdir)


def _quarantine(directory: Path, paths: list[Path], info: RecoveryInfo) -> None:
    if not paths:
        return
    qdir = directory / QUARANTINE
    make_dir(qdir)
    for p in paths:
        target = qdir / p.name
        os.rename(p, target)
        info.quarantined.append(str(target))
    sync_dir(qdir)
    sync_dir(directory)


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
    if segments and header_lost_in(*segments[-1], durable):
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
            read_checked_header(fd, path, base, expected, i)
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
            return OfflineEnd(scan.expected - 1, refusal(plan, plan.action, path), None, stop)
        expected = scan.expected
        if isinstance(plan.action, Cut) and (keep is None or expected <= keep):
            torn = Location(path.name, plan.offset).after(plan.detail)
        break  # the newest segment, or a cut that moves every later one to quarantine/
    end = expected - 1
    return OfflineEnd(end if keep is None else min(end, keep), None, torn, stop)

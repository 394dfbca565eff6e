"""Recovery at open: find where the log ends, cut a torn tail, refuse to hide corruption.

Sealed segments are trusted from their seal frame (header and seal CRCs, LSN continuity) and not rescanned,
so open time is bounded by the active segment, not the size of the log.  The active (last, unsealed)
segment is scanned frame by frame.  Where the scan stops, `classify` decides:

- `end`: nothing but zeros (the preallocated tail) or end of file follows: a clean end, nothing to cut;
- `torn`: the last frame is incomplete or fails its CRC and no valid frame follows: a write cut short by a
  crash; or any damage past the durable LSN that HEAD records (nothing there was fsynced or acked, so a
  power cut may have kept a later write and lost an earlier one).  It is truncated in place (ftruncate),
  bytes beyond the torn frame are kept in `quarantine/`, and LSNs named on disk are never reused;
- `corrupt`: valid data follows the damage, or a sealed segment is damaged: open fails naming the place,
  unless `on_corruption = "truncate"`, which cuts there and moves every later segment to `quarantine/`.

The writer renames the next segment into place before its rotation thread seals the old one (rotation.py),
so a crash in between leaves an unsealed segment before the last one whose frames end exactly where the next
segment begins: recovery finishes that seal (`seal_unfinished`).
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from crc32c import crc32c

from . import frame as F
from .access import make_dir, open_file
from .errors import CorruptionError, MissingSegmentError, RecordError
from .fsync import sync_data, sync_dir
from .head import load as load_head
from .segment import (SCAN_CHUNK, ActiveSegment, FrameScanner, ScanStop, data_end, find_valid_header, is_zero_from,
                      list_segments, now_us, read_header, read_seal, seal_segment, seal_table, segment_name,
                      truncate_and_reserve)
from .config import LogConfig

QUARANTINE = "quarantine"


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
    first_lsn: int = 1
    last_lsn: int = 0
    duration_s: float = 0.0

    def summary(self) -> str:
        parts = [f"{self.segments_scanned} segments ({self.sealed_segments} sealed)",
                 f"{self.records_valid} records", f"LSN {self.first_lsn}..{self.last_lsn}",
                 f"{self.duration_s * 1000:.1f} ms"]
        if self.torn_tail:
            parts.append(f"torn tail of {self.bytes_truncated} bytes cut at {self.truncated_at}")
        if self.corruption:
            parts.append(f"CORRUPTION repaired by truncation: {self.corruption}; quarantined {self.quarantined}")
        return "recovered " + ", ".join(parts)


@dataclass
class Recovered:
    """What the writer continues from."""
    active: ActiveSegment | None  # None: start a new segment at next_lsn
    next_lsn: int
    next_segment_id: int
    producers: dict[int, collections.deque] = field(default_factory=dict)


def classify(stop: ScanStop | None, zeros_after: bool, valid_frame_after: bool, is_last: bool,
             beyond_durable: bool = False) -> str:
    """The recovery decision for a scan that stopped at `stop`: "end", "torn" or "corrupt".

    zeros_after: only zero bytes follow the damaged frame (its declared extent when its header is valid,
    else its start); valid_frame_after: a frame with a valid header lies somewhere after the damage;
    beyond_durable: every LSN the HEAD file calls durable lies before the stop (see `beyond_durable`).
    Nothing past the durable LSN was ever fsynced or acked, and a power cut may leave any mix of such
    writes (a later one kept, an earlier one lost as zeros), so damage there is a torn tail whatever
    follows it.  Damage before it is damage to durable data.
    """
    if stop is None:
        return "end" if is_last else "corrupt"
    if beyond_durable and not is_last:
        # A rotation renames the next segment in before this one's frames are fsynced: a power cut may
        # keep the name and lose the frames.  Later segments then hold only undurable LSNs too.
        return "torn"
    if stop.header is None and zeros_after:
        return "end" if is_last else "corrupt"
    if not is_last:
        return "corrupt"
    if beyond_durable:
        return "torn"
    if valid_frame_after:
        return "corrupt"
    if stop.header is not None and not zeros_after:
        return "corrupt"
    return "torn"


def _drop_headerless_last(directory: Path, last: tuple[int, Path], durable_lsn: int | None,
                          info: RecoveryInfo) -> bool:
    """Delete (or, if it holds any bytes, quarantine) the newest segment when its header is lost
    (`header_lost`); True if it was.  Done first, so the segment before it is judged as the last one."""
    base, path = last
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        try:
            read_header(fd)
            return False
        except RecordError:
            if not header_lost(fd, base, size, durable_lsn):
                return False
        empty = is_zero_from(fd, F.SEGMENT_HEADER_SIZE, size)
    finally:
        os.close(fd)
    if empty:
        os.unlink(path)
        sync_dir(directory)
    else:
        _quarantine(directory, [path], info)
    return True


def header_lost(fd: int, base: int, size: int, durable_lsn: int | None) -> bool:
    """Whether the newest segment, whose header does not decode, holds nothing a crash must keep.

    Either nothing but zeros follows the header (created, its header never reached the disk whole), or
    HEAD says nothing in it was durable: a rotation writes the header without an fsync (the next fsync covers
    it before any record in the segment counts as durable), so a power cut may keep frames and lose the
    header.  Such a file is moved to quarantine/, never silently dropped.
    """
    return is_zero_from(fd, F.SEGMENT_HEADER_SIZE, size) or (durable_lsn is not None and durable_lsn < base)


def beyond_durable(expected: int, durable_lsn: int | None) -> bool:
    """Whether a scan stop whose next expected LSN is `expected` lies past every durable LSN.

    `durable_lsn` comes from HEAD (None when HEAD is missing or damaged: then nothing is known to be
    unsynced, and the stricter rules apply).  The stop is past it when every LSN up to it was read intact.
    """
    return durable_lsn is not None and expected > durable_lsn


def examine_stop(fd: int, stop: ScanStop | None, size: int, expected: int, is_last: bool,
                 durable_lsn: int | None = None) -> str:
    """Gather what `classify` needs about the bytes after a scan stop (I/O), and return its verdict."""
    if stop is None:
        return classify(None, True, False, is_last)
    extent = stop.offset + stop.header.size if stop.header is not None else None
    zeros = is_zero_from(fd, min(extent, size) if extent is not None else stop.offset, size)
    valid_after = False
    if not zeros:
        search_from = extent if extent is not None and extent <= size else stop.offset + 1
        valid_after = find_valid_header(fd, search_from, size, expected) is not None
    return classify(stop, zeros, valid_after, is_last, beyond_durable(expected, durable_lsn))


def _merge_window(producers: dict[int, collections.deque], pid: int, entries: list[F.Appended],
                  window: int) -> None:
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
        info.duration_s = time.perf_counter() - started
        return info, state
    head = load_head(directory)
    durable_lsn = head.durable_lsn if head is not None else None
    if _drop_headerless_last(directory, segments[-1], durable_lsn, info):
        dropped, _ = segments.pop()
        if not segments:  # the log starts again where that segment would have (retention may have run)
            state.next_lsn = info.first_lsn = dropped
            info.duration_s = time.perf_counter() - started
            return info, state
    info.first_lsn = segments[0][0]
    expected = segments[0][0]
    for i, (base, path) in enumerate(segments):
        is_last = i == len(segments) - 1
        fd = os.open(path, os.O_RDWR)
        keep_fd = False
        try:
            info.segments_scanned += 1
            size = os.fstat(fd).st_size
            try:
                header = read_header(fd)
            except RecordError as exc:
                raise CorruptionError(f"bad segment header: {exc.detail}", segment=path.name, offset=0) from None
            if header.base_lsn != base or base < expected:
                raise CorruptionError(f"segment header says base LSN {header.base_lsn}, expected {base} "
                                      f"(>= {expected})", segment=path.name, offset=0)
            if i and base != expected:
                # Each seal names the next segment's base exactly and retention deletes only the oldest:
                # a later base means a segment in the middle is missing.
                raise MissingSegmentError(f"LSNs {expected}..{base - 1} are missing: the previous segment ends "
                                      f"before LSN {expected} (segment {segment_name(expected)} is gone)",
                                      segment=path.name, offset=0, lsn=expected)
            state.next_segment_id = header.segment_id + 1
            sealed = read_seal(fd, size)
            if sealed is not None and verify:
                try:
                    verify_sealed(fd, sealed[0], sealed[1])
                except RecordError as exc:
                    if cfg.on_corruption != "truncate":
                        raise CorruptionError(f"{exc.detail}; set on_corruption = \"truncate\" to cut at the "
                                              "damage and quarantine later segments", segment=path.name) from None
                    sealed = None  # scan it frame by frame below: the damaged frame decides where to cut
            if sealed is not None:
                seal, seal_offset = sealed
                info.sealed_segments += 1
                info.records_valid += seal.record_count
                for pid, entries in seal.producers.items():
                    _merge_window(state.producers, pid, entries, cfg.producer_window)
                expected = seal.next_lsn
                if seal.record_count:
                    info.last_lsn = seal.last_lsn
                continue
            # Unsealed: scan frame by frame.
            seg = ActiveSegment(path, fd, header, F.SEGMENT_HEADER_SIZE)
            scanner = FrameScanner(fd, F.SEGMENT_HEADER_SIZE, size)
            sealed_at = None
            for off, h, data in scanner:
                if h.base_lsn < expected:
                    scanner.stop = ScanStop(off, RecordError(f"frame LSN {h.base_lsn} goes backwards (expected "
                                                             f">= {expected})", offset=off, lsn=h.base_lsn), h)
                    break
                if h.kind == F.KIND_SEAL:
                    sealed_at = (off, h)
                    break
                if h.base_lsn > expected:
                    info.skipped_lsns = (expected, h.base_lsn)
                info.bytes_scanned += h.size
                seg.note_frame(off, (data,), h.base_lsn, h.count, cfg.index_interval_bytes)
                info.records_valid += h.count
                expected = h.end_lsn
                if h.producer_id:
                    _merge_window(state.producers, h.producer_id, [F.Appended(h.producer_seq, h.base_lsn, h.count)],
                                  cfg.producer_window)
            if seg.record_count:
                info.last_lsn = seg.last_lsn
            if sealed_at is not None:
                # Crashed between writing the seal and cutting the file after it: finish the seal.
                off, h = sealed_at
                if not is_zero_from(fd, off + h.size, size):
                    raise CorruptionError("data follows a seal frame", segment=path.name, offset=off + h.size)
                os.ftruncate(fd, off + h.size)
                os.fsync(fd)
                info.sealed_segments += 1
                expected = h.base_lsn
                continue
            stop = scanner.stop
            if not is_last and segments[i + 1][0] == expected and seal_unfinished(fd, stop, size):
                seal_segment(seg, expected, seal_table(state.producers, cfg.max_producers))
                info.sealed_segments += 1
                continue
            verdict = examine_stop(fd, stop, size, expected, is_last, durable_lsn)
            if verdict == "end":
                seg.end = stop.offset if stop is not None else size
                state.active = seg
                keep_fd = True
                continue
            if verdict == "torn":
                info.torn_tail = True
                info.truncated_at = (path.name, stop.offset)
                cut_end = data_end(fd, stop.offset, size)
                info.bytes_truncated = cut_end - stop.offset
                burned = expected
                if stop.header is not None and stop.header.base_lsn == expected and stop.header.count:
                    burned = stop.header.end_lsn
                if cut_end > stop.offset + (stop.header.size if stop.header is not None else 0):
                    # More than one torn frame: an unsynced tail that a power cut left in pieces (zeros,
                    # then frames).  Keep the bytes, and never reuse an LSN any of those frames names.
                    burned = max(burned, _max_end_lsn_after(fd, stop.offset, size))
                    _save_tail(directory, path, fd, stop.offset, cut_end, info)
                later = [p for _, p in segments[i + 1:]]
                if later:
                    # Unsynced frames lost before a next segment whose name reached the disk (a rotation
                    # renames it in before the old frames are fsynced): all of it lies past the durable LSN.
                    burned = max([burned] + [_end_lsn(p) for p in later])
                    _quarantine(directory, later, info)
                if burned > expected:
                    info.skipped_lsns = (expected, burned)
                expected = _cut(seg, stop.offset, expected, burned, cfg)
                state.active = seg
                keep_fd = True
                if later:
                    break
                continue
            where = stop.offset if stop is not None else size
            detail = (stop.error.detail if stop is not None else "segment is not sealed but later segments exist")
            if cfg.on_corruption != "truncate":
                raise CorruptionError(f"{detail}; valid data follows, so this is not a torn tail (set "
                                      "on_corruption = \"truncate\" to cut here and quarantine later segments)",
                                      segment=path.name, offset=where, lsn=expected)
            info.corruption = f"{detail} in {path.name} at offset {where}"
            info.truncated_at = (path.name, where)
            info.bytes_truncated = size - where
            later = [p for _, p in segments[i + 1:]]
            burned = max([_end_lsn(p) for p in later] + [_max_end_lsn_after(fd, where, size), expected])
            _save_tail(directory, path, fd, where, size, info)
            _quarantine(directory, later, info)
            if burned > expected:
                info.skipped_lsns = (expected, burned)
            expected = _cut(seg, where, expected, burned, cfg)
            state.active = seg
            keep_fd = True
            break
        finally:
            if fd >= 0 and not keep_fd:
                os.close(fd)
    state.next_lsn = expected
    info.duration_s = time.perf_counter() - started
    return info, state


def seal_unfinished(fd: int, stop: ScanStop | None, size: int) -> bool:
    """Whether a segment's scan stopped where a seal was still to be written: at the end of the file, at
    zeros (the preallocated tail), or at a seal cut short with only zeros after it (a power cut during the
    seal write: a header's first bytes, or a SEAL frame with the preallocated tail still after it; the file
    is cut right after a finished seal, so a damaged seal in a sealed segment never looks like this).
    The caller has checked that the next segment starts at the LSN the frames end with: nothing is missing."""
    if stop is None:
        return True
    if stop.header is None:  # nothing, or the first bytes of a frame header (a seal's, cut short), then zeros
        return is_zero_from(fd, min(stop.offset + F.FRAME_HEADER_SIZE, size), size)
    extent = stop.offset + stop.header.size
    return stop.header.kind == F.KIND_SEAL and extent < size and is_zero_from(fd, extent, size)


def _cut(seg: ActiveSegment, offset: int, expected: int, burned: int, cfg: LogConfig) -> int:
    """Cut the segment at `offset`; returns the next LSN to hand out.

    When LSNs up to `burned` were handed out to the data being cut, an empty DATA frame (count 0) with base
    LSN `burned` is written at `offset` first and kept: without it the skip lived only in memory and a
    restart before the next append would hand those LSNs out again.  Recovery and readers jump past it.
    """
    if burned > expected:
        marker = F.encode_frame(F.KIND_DATA, b"", 0, burned, now_us())
        os.pwrite(seg.fd, marker, offset)
        sync_data(seg.fd)  # durable before the cut, so a crash in between cannot lose the skip
        seg.note_frame(offset, (marker,), burned, 0, cfg.index_interval_bytes)
        expected = burned
    else:
        seg.end = offset
    truncate_and_reserve(seg.fd, seg.end, cfg.segment_bytes, cfg.preallocate)
    return expected


def _max_end_lsn_after(fd: int, start: int, size: int) -> int:
    """One past the highest LSN of any frame header still valid after `start` (so none is ever reused)."""
    end = 0
    pos = start
    while (found := find_valid_header(fd, pos, size, 0)) is not None:
        end = max(end, F.decode_frame_header(os.pread(fd, F.FRAME_HEADER_SIZE, found)).end_lsn)
        pos = found + 1
    return end


def _save_tail(directory: Path, path: Path, fd: int, start: int, size: int, info: RecoveryInfo) -> None:
    """Copy the bytes about to be cut into quarantine/, so a repair never destroys evidence or data."""
    qdir = directory / QUARANTINE
    make_dir(qdir)
    target = qdir / f"{path.name}.from-{start}"
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

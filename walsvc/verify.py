"""Offline checks: `verify` checks a log directory, `dump` lists its records or frames.

Both are read-only and safe on a live log: they never take the LOCK, never write, rename or delete a file, and
open everything with O_RDONLY.  The committed LSN they respect comes from the HEAD file (see docs/FORMAT.md).

`verify` runs the engine's own scan model: `scan.scan_segment` walks the frames (the walk recovery makes),
`repair.plan_segment` judges where an unsealed segment's valid data ends (the plan recovery carries out),
`segment.read_seal` reads seals and `recovery.verify_sealed` checks a seal's data checksum.  So "torn" and
"corrupt" mean exactly what the next `Log.open` will decide.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import cursor as C
from . import frame as F
from . import head as H
from .config import GiB
from .errors import ConfigError, CorruptionError, Location, MissingSegmentError, RecordError
from .scan import LogReader, OpenSegment, examine_stop, resolve_start, scan_segment, stop_facts
from .record import count_records, decode, record_dict
from .recovery import QUARANTINE, head_lost, header_lost_in, verify_sealed
from .repair import (NOT_SEALED, Cut, Plan, Refuse, SegmentScan, Stop, Verdict, WriteSeal, header_lost, plan_segment,
                     seal_unfinished)
from .segment import (SUFFIX, ScanStop, find_valid_header, is_zero_from, list_segments, read_header, read_seal,
                      segment_name)

# The largest record any config allows: verify and dump check structure, they do not enforce a config.
MAX_RECORD_BYTES = 1 * GiB
MAX_BATCH_BYTES = 2 * GiB  # the largest limits a config allows: verify flags no batch a writer could accept

# On a live log, how often the active segment is rescanned when committed data looks damaged (the first read
# may have raced the writer) before that is reported as a problem.
LIVE_RETRIES = 3


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the log, and where."""
    detail: str
    segment: str | None = None
    offset: int | None = None
    lsn: int | None = None

    def __str__(self) -> str:
        where = Location(self.segment, self.offset, self.lsn)
        return f"{where}: {self.detail}" if where else self.detail

    def as_dict(self) -> dict[str, Any]:
        return {"segment": self.segment, "offset": self.offset, "lsn": self.lsn, "detail": self.detail}


@dataclass
class VerifyReport:
    """What `verify` found.  `ok` is True when `problems` is empty; `notes` are facts that need no action
    (a torn tail that recovery will cut, LSN gaps left by earlier repairs, a write in progress)."""
    directory: str
    issues: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    segments: int = 0
    sealed_segments: int = 0
    frames: int = 0
    records: int = 0
    bytes: int = 0  # bytes of segment files up to the end of their data (preallocated zeros excluded)
    first_lsn: int | None = None  # first and last record found (None: no records)
    last_lsn: int | None = None
    next_lsn: int | None = None  # the LSN the writer would assign next, as far as the files say
    gaps: list[tuple[int, int]] = field(default_factory=list)  # [first, end) LSN ranges no record holds
    tail: str = "none"  # the last segment's end: "end", "torn", "corrupt", or "none" (no segments)
    tail_segment: str | None = None
    tail_offset: int | None = None
    committed_lsn: int | None = None  # from HEAD, when readable
    writer_pid: int | None = None
    live: bool = False  # a writer process was running (HEAD names a live PID)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.issues

    @property
    def problems(self) -> list[str]:
        return [str(p) for p in self.issues]

    def summary(self) -> str:
        lsns = (f"LSN {self.first_lsn}..{self.last_lsn}" if self.first_lsn is not None else "no records")
        text = [f"{self.directory}: {'OK' if self.ok else f'{len(self.issues)} PROBLEM(S)'}.",
                f"{self.segments} segments ({self.sealed_segments} sealed), {self.frames} frames, "
                f"{self.records} records, {lsns}, {self.bytes} bytes, checked in {self.duration_s:.2f} s."]
        if self.committed_lsn is not None:
            text.append(f"HEAD: committed LSN {self.committed_lsn}, "
                        + (f"writer PID {self.writer_pid} running." if self.live else "no writer running."))
        if self.tail != "none":
            text.append(f"Tail of {self.tail_segment}: {self.tail} at offset {self.tail_offset}.")
        if self.gaps:
            text.append("LSN gaps (skipped: no record in the log has them): "
                        + ", ".join(f"{a}..{b - 1}" for a, b in self.gaps[:10])
                        + (f" and {len(self.gaps) - 10} more" if len(self.gaps) > 10 else "") + ".")
        text.extend(f"Problem: {p}." for p in self.problems)
        text.extend(f"Note: {n}." for n in self.notes)
        return " ".join(text)

    def as_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready values."""
        return {
            "directory": self.directory, "ok": self.ok, "problems": self.problems,
            "issues": [p.as_dict() for p in self.issues], "notes": list(self.notes),
            "segments": self.segments, "sealed_segments": self.sealed_segments, "frames": self.frames,
            "records": self.records, "bytes": self.bytes, "first_lsn": self.first_lsn, "last_lsn": self.last_lsn,
            "next_lsn": self.next_lsn, "gaps": [list(g) for g in self.gaps], "tail": self.tail,
            "tail_segment": self.tail_segment, "tail_offset": self.tail_offset,
            "committed_lsn": self.committed_lsn, "writer_pid": self.writer_pid, "live": self.live,
            "duration_s": round(self.duration_s, 6),
        }


# -- verify ----------------------------------------------------------------------------------------------

def _read_head(directory: Path) -> H.Head | None:
    reader = H.HeadReader(directory)
    try:
        return reader.read()
    finally:
        reader.close()


def _read_seal(fd: int) -> tuple[int, tuple[F.Seal, int] | None]:
    """(size, seal) of an open segment.  A writer may seal (and shrink) the file between our fstat and
    read_seal's pread, which then gets fewer than 8 bytes: retry with the new size."""
    for _ in range(LIVE_RETRIES):
        size = os.fstat(fd).st_size
        try:
            return size, read_seal(fd, size)
        except struct.error:
            continue
    size = os.fstat(fd).st_size
    return size, read_seal(fd, size)


@dataclass
class _SegmentResult:
    """What checking one segment found; merged into the report once the check is final."""
    issues: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)
    frames: int = 0
    records: int = 0
    first_lsn: int | None = None
    last_lsn: int | None = None
    next_lsn: int | None = None
    data_end_lsn: int | None = None  # unsealed: one past its valid frames' LSNs, before a cut burns any more
    data_end: int = 0
    sealed: bool = False
    tail: str | None = None
    tail_offset: int | None = None
    retry: bool = False  # live log: the scan may have raced the writer, check again


class _IndexCheck:
    """A seal's sparse index, checked frame by frame: each entry must name a frame start and its first LSN."""

    def __init__(self, res: _SegmentResult, name: str, index: list[tuple[int, int]]) -> None:
        self.res, self.name, self.index, self.pos = res, name, list(index), 0

    def frame(self, off: int, base_lsn: int) -> None:
        index = self.index
        while self.pos < len(index) and index[self.pos][1] < off:
            lsn, ioff = index[self.pos]
            self.res.issues.append(Problem(f"seal index entry (LSN {lsn}, offset {ioff}) does not point at the "
                                           "start of a frame", self.name, ioff, lsn))
            self.pos += 1
        if self.pos < len(index) and index[self.pos][1] == off:
            if index[self.pos][0] != base_lsn:
                self.res.issues.append(Problem(f"seal index entry says LSN {index[self.pos][0]}, the frame there "
                                               f"starts at LSN {base_lsn}", self.name, off, base_lsn))
            self.pos += 1

    def rest(self) -> None:
        """Entries past the last frame reached."""
        for lsn, ioff in self.index[self.pos:]:
            self.res.issues.append(Problem(f"seal index entry (LSN {lsn}, offset {ioff}) does not point at the "
                                           "start of a data frame", self.name, ioff, lsn))


class _Verifier:
    def __init__(self, directory: Path, max_record_bytes: int, max_batch_bytes: int,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.directory = directory
        self.progress = progress
        self.max_record_bytes = max_record_bytes
        self.max_batch_bytes = max_batch_bytes
        self.report = VerifyReport(str(directory))

    def problem(self, detail: str, segment: str | None = None, offset: int | None = None,
                lsn: int | None = None) -> None:
        self.report.issues.append(Problem(detail, segment, offset, lsn))

    def run(self) -> VerifyReport:
        started = time.perf_counter()
        r = self.report
        if not self.directory.is_dir():
            self.problem("not a directory")
            return r
        head = _read_head(self.directory)
        if head is not None:
            r.committed_lsn = head.committed_lsn
            r.writer_pid = head.writer_pid or None
            r.live = head.writer_alive()
        elif (self.directory / H.NAME).exists():
            r.notes.append("HEAD is unreadable (a writer rewrites it when it opens the log)")
        segments = list_segments(self.directory)
        # Recovery drops a newest segment whose header a power cut lost before it judges the others: the one
        # before it is then the newest.
        newest = len(segments) - 1
        if newest > 0 and header_lost_in(*segments[-1], self._durable_lsn()):
            newest -= 1
        expected: int | None = None
        prev_id: int | None = None
        for i, (base, path) in enumerate(segments):
            if self.progress is not None:
                self.progress(i, len(segments))
            is_last = i >= newest
            next_base = None if is_last else segments[i + 1][0]
            res, seg_id = self.check_segment(base, path, next_base, expected, prev_id)
            if seg_id is not None:
                prev_id = seg_id
            r.segments += 1
            r.sealed_segments += res.sealed
            r.issues.extend(res.issues)
            r.notes.extend(res.notes)
            r.gaps.extend(res.gaps)
            r.frames += res.frames
            r.records += res.records
            r.bytes += res.data_end
            if res.first_lsn is not None and r.first_lsn is None:
                r.first_lsn = res.first_lsn
            if res.last_lsn is not None:
                r.last_lsn = res.last_lsn
            expected = res.next_lsn  # None: unknown (damaged header), the next segment is not compared
            data_end = res.data_end_lsn if res.data_end_lsn is not None else expected
            if i == newest and res.tail is not None:
                r.tail, r.tail_segment, r.tail_offset = res.tail, path.name, res.tail_offset
        r.next_lsn = expected if segments else 1
        # Against the end of the valid frames: LSNs a torn batch's surviving header burns were lost too.
        lost = head_lost(head, data_end) if segments and data_end is not None else None
        if lost is not None and not r.live and not lost.durable:
            r.notes.append(f"LSNs {lost.first}..{lost.end - 1} were committed (HEAD) but the log's data ends before "
                           f"them: never fsynced (HEAD's durable LSN is {head.durable_lsn}), a crash lost or tore "
                           "them, as fsync = \"os\" allows; the next start never hands them out again")
        elif lost is not None:
            self.problem(f"HEAD says LSN {head.committed_lsn} is committed"
                         + ("" if r.live else f" and LSN {head.durable_lsn} durable")
                         + f", but the log's valid data ends below LSN {data_end}: committed records are missing")
        self.check_cursors()
        self.check_other_files()
        r.duration_s = time.perf_counter() - started
        return r


    # One segment -------------------------------------------------------------------------------------

    def check_segment(self, base: int, path: Path, next_base: int | None, expected: int | None,
                      prev_id: int | None) -> tuple[_SegmentResult, int | None]:
        """Check one segment; `next_base`: the base LSN of the segment after it (None for the newest)."""
        name = path.name
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            res = _SegmentResult()
            if self.report.live:
                res.notes.append(f"{name} was deleted (by retention) while verify ran")
            else:
                res.issues.append(Problem("segment file vanished while verify ran", name))
            return res, None
        try:
            return self._check_open_segment(fd, base, name, next_base, expected, prev_id)
        except (OSError, RecordError, struct.error) as exc:  # report, never a traceback
            res = _SegmentResult()
            res.issues.append(Problem(f"could not be checked: {exc}", name))
            return res, None
        finally:
            os.close(fd)

    def _check_open_segment(self, fd: int, base: int, name: str, next_base: int | None, expected: int | None,
                            prev_id: int | None) -> tuple[_SegmentResult, int | None]:
        res = _SegmentResult()
        is_last = next_base is None
        size = os.fstat(fd).st_size
        try:
            header = read_header(fd)
        except RecordError as exc:
            if is_last and header_lost(base, is_zero_from(fd, F.SEGMENT_HEADER_SIZE, size), self._durable_lsn()):
                res.notes.append(f"{name} has no whole header and holds nothing durable (being created, or a "
                                 "power cut lost it: the next open deletes it, or moves it to quarantine/)")
                res.next_lsn = expected
                res.tail, res.tail_offset = "end", 0
                return res, None
            res.issues.append(Problem(f"bad segment header: {exc.detail}", name, 0))
            res.next_lsn = None
            return res, None
        if header.base_lsn != base:
            res.issues.append(Problem(f"header says base LSN {header.base_lsn}, but the file name says {base}",
                                      name, 0))
        if prev_id is not None and header.segment_id <= prev_id:
            res.issues.append(Problem(f"segment id {header.segment_id} does not follow the previous segment's "
                                      f"id {prev_id}", name, 0))
        if expected is not None and base < expected:
            res.issues.append(Problem(f"overlaps the previous segment: starts at LSN {base}, previous one ends "
                                      f"at LSN {expected - 1}", name, 0, base))
        elif expected is not None and base > expected:
            res.issues.append(Problem(f"LSNs {expected}..{base - 1} are missing: the previous segment's seal says "
                                      f"the next LSN is {expected}, this segment starts at {base} (a segment file "
                                      "was removed?)", name, 0, expected))
        attempts = LIVE_RETRIES if (is_last and self.report.live) else 1
        for attempt in range(attempts):
            res_try = self._scan_segment(fd, name, header, next_base)
            if not res_try.retry or attempt == attempts - 1:
                break
            time.sleep(0.01 * (attempt + 1))
        res_try.issues[:0] = res.issues
        res_try.notes[:0] = res.notes
        return res_try, header.segment_id

    def _scan_segment(self, fd: int, name: str, header: F.SegmentHeader, next_base: int | None) -> _SegmentResult:
        """The segment's frames through the scan recovery uses (`scan.scan_segment`), each record decoded; a
        sealed segment is read to its seal, past any damage, and its seal checked against the frames."""
        res = _SegmentResult()
        size, sealed = _read_seal(fd)
        index = _IndexCheck(res, name, sealed[0].index if sealed else [])

        def on_frame(off: int, h: F.FrameHeader, data: memoryview) -> None:
            index.frame(off, h.base_lsn)
            self._check_records(res, name, off, h, data)

        offset, expected = F.SEGMENT_HEADER_SIZE, header.base_lsn
        seg_records = 0
        seg_last = 0
        while True:
            scan = scan_segment(fd, size, expected, start=offset, on_frame=on_frame)
            res.frames += scan.frames
            res.gaps.extend(scan.gaps)
            seg_records += scan.records
            if scan.last_lsn is not None:
                seg_last = scan.last_lsn
                res.first_lsn = scan.first_lsn if res.first_lsn is None else res.first_lsn
                res.last_lsn = seg_last
            expected = scan.expected
            stop = scan.stop
            if scan.seal_at is not None:
                index.frame(scan.seal_at[0], scan.seal_at[1].base_lsn)
            if scan.seal_at is not None or stop is None or sealed is None:
                break  # an unsealed segment's end is planned below, as recovery plans it
            # Sealed segment damaged before its seal: report, then carry on after the damage.
            res.issues.append(Problem(stop.detail, name, stop.offset, stop.header.base_lsn if stop.header
                                      else expected))
            if stop.header is not None and stop.header.kind == F.KIND_DATA and stop.header.base_lsn >= expected:
                seg_records += stop.header.count  # unreadable, but the seal still counts them
                seg_last = stop.header.end_lsn - 1 if stop.header.count else seg_last
            resumed = self._resume_after(fd, stop, sealed[1])
            if resumed is None:
                break
            offset, expected = resumed[0], max(expected, resumed[1])
        if sealed is not None:
            seal, seal_off = sealed
            res.sealed = True
            res.data_end = size
            if scan.seal_at is None or scan.seal_at[0] != seal_off:
                res.issues.append(Problem("the scan did not reach the seal frame the file's last 8 bytes point at",
                                          name, seal_off))
            index.rest()
            self._check_seal(res, fd, name, seal, seal_off, seg_records, seg_last, expected)
            res.next_lsn = seal.next_lsn
            res.tail, res.tail_offset = "end", size
            return res
        plan = self._plan(scan, next_base)
        if scan.seal_at is not None:
            # A seal frame the trailer does not point at: the writer sealed this segment while we read it, or
            # crashed between writing the seal and cutting the file after it (recovery finishes that).
            off, h = scan.seal_at
            res.sealed = True
            res.data_end = off + h.size
            if isinstance(plan.action, Refuse):
                res.issues.append(Problem(plan.detail, name, plan.offset))
            elif not self.report.live:
                res.notes.append(f"{name} ends with a seal that was not cut after (the next open finishes it)")
            if scan.seal is None:
                res.issues.append(Problem(f"seal frame does not decode: {scan.seal_error}", name, off, h.base_lsn))
            else:
                self._check_seal(res, fd, name, scan.seal, off, seg_records, seg_last, expected)
            res.next_lsn = h.base_lsn
            res.tail, res.tail_offset = "end", res.data_end
            return res
        self._report_tail(res, name, scan, plan, next_base)
        return res

    def _resume_after(self, fd: int, stop: Stop, limit: int) -> tuple[int, int] | None:
        """(offset, next expected LSN) where scanning can go on after damage inside a sealed segment: after the
        damaged frame when its header is valid, else at the next valid frame header (at or before `limit`)."""
        if stop.header is not None and stop.offset + stop.header.size <= limit:
            return stop.offset + stop.header.size, stop.header.end_lsn
        found = find_valid_header(fd, stop.offset + 1, limit + 1, 0)
        if found is None or found > limit:
            return None
        return found, F.decode_frame_header(os.pread(fd, F.FRAME_HEADER_SIZE, found)).base_lsn

    def _check_records(self, res: _SegmentResult, name: str, off: int, h: F.FrameHeader, data: memoryview) -> None:
        """Every record of a DATA frame decodes (with its own CRC and any decompression); the count matches."""
        payload = bytes(data[F.FRAME_HEADER_SIZE:])
        try:  # the fast path: structure, CRCs and decompression in one walk, one value in memory at a time
            n = count_records(payload, 0, len(payload), max_record_bytes=self.max_record_bytes,
                              max_batch_bytes=self.max_batch_bytes)
            if n == h.count:
                res.records += n
                return
        except RecordError:
            pass
        # Something is wrong: walk record by record to say which one.
        pos = 0
        n = 0
        end = len(payload)
        while pos < end:
            try:
                _, pos = decode(payload, pos, end, max_record_bytes=self.max_record_bytes)
            except RecordError as exc:
                inner = exc.offset if exc.offset is not None else pos
                res.issues.append(Problem(f"record {n} of the batch does not decode: {exc.detail}", name,
                                          off + F.FRAME_HEADER_SIZE + inner, h.base_lsn + n))
                return
            n += 1
        if n != h.count:
            res.issues.append(Problem(f"frame header says {h.count} records, its payload holds {n}", name, off,
                                      h.base_lsn))
        res.records += min(n, h.count)

    def _check_seal(self, res: _SegmentResult, fd: int, name: str, seal: F.Seal, seal_off: int,
                    seg_records: int, seg_last: int, expected: int) -> None:
        if seal.record_count != seg_records:
            res.issues.append(Problem(f"seal counts {seal.record_count} records, the frames hold {seg_records}",
                                      name, seal_off))
        if seal.record_count and seal.last_lsn != seg_last:
            res.issues.append(Problem(f"seal says the last LSN is {seal.last_lsn}, the frames end at {seg_last}",
                                      name, seal_off, seal.last_lsn))
        if seal.next_lsn < expected:
            res.issues.append(Problem(f"seal says the next LSN is {seal.next_lsn}, below the frames' end "
                                      f"{expected}", name, seal_off, seal.next_lsn))
        elif seal.next_lsn > expected:
            res.gaps.append((expected, seal.next_lsn))
        if any(a[0] >= b[0] or a[1] >= b[1] for a, b in zip(seal.index, seal.index[1:])):
            res.issues.append(Problem("seal index is not in ascending order", name, seal_off))
        try:
            verify_sealed(fd, seal, seal_off)
        except RecordError as exc:
            res.issues.append(Problem(exc.detail, name, F.SEGMENT_HEADER_SIZE))

    def _durable_lsn(self) -> int | None:
        """HEAD's durable LSN when no writer runs (None while one does: its tail is a write in progress)."""
        if self.report.live:
            return None
        head = _read_head(self.directory)
        return head.durable_lsn if head is not None else None

    def _plan(self, scan: SegmentScan, next_base: int | None) -> Plan:
        """What the next open would do with this unsealed segment: the plan recovery carries out."""
        return plan_segment(scan, is_last=next_base is None, durable_lsn=self._durable_lsn(), truncate=False,
                            next_base_lsn=next_base)

    def _report_tail(self, res: _SegmentResult, name: str, scan: SegmentScan, plan: Plan,
                     next_base: int | None) -> None:
        """The end of an unsealed segment, as the plan judges it: nothing, a note, or a problem."""
        where = plan.offset
        expected = scan.expected
        is_last = next_base is None
        res.next_lsn = res.data_end_lsn = expected
        res.data_end = where
        res.tail, res.tail_offset = plan.verdict.value, where
        if isinstance(plan.action, WriteSeal) or (self.report.live and next_base == expected):
            # The writer switches segments before its rotation thread seals the old one (recovery writes a
            # seal a crash kept from being written): every LSN is here, only the seal is still to come (being
            # written, if the writer runs).
            res.tail = "end"
            res.notes.append(f"{name} is not sealed yet (seal still to be written); the next segment starts "
                             "right after its last LSN")
            return
        if plan.verdict is Verdict.END:
            return
        live = self.report.live and is_last
        committed = self.report.committed_lsn
        if live:
            head = _read_head(self.directory)
            committed = head.committed_lsn if head is not None else committed
            if committed is None or expected > committed:
                # The writer is running: what follows the committed LSN is a write in progress, not damage.
                res.tail = "end"
                res.notes.append(f"{name}: a write in progress at offset {where} (above the committed LSN "
                                 f"{committed}) was not checked")
                return
            res.retry = True  # our bytes may predate the writer's: the caller scans again
        if isinstance(plan.action, Cut):
            burned = ""
            if plan.action.next_lsn > expected:
                burned = f"; its LSNs {expected}..{plan.action.next_lsn - 1} will never be reused"
                res.next_lsn = plan.action.next_lsn
            detail = f"torn tail: {plan.detail}; recovery cuts it at offset {where}{burned}"
            if live and committed is not None and committed >= expected:
                res.issues.append(Problem(f"{detail}, but HEAD says LSN {committed} was committed", name, where,
                                          expected))
            else:  # with no writer, HEAD's committed LSN is judged once, against the log's end (run)
                res.notes.append(f"{name} offset {where}: {detail}")
            return
        detail = plan.detail
        if detail != NOT_SEALED:
            detail += "; valid data follows, so this is corruption, not a torn tail"
        res.issues.append(Problem(detail, name, where, expected))

    # Around the segments -------------------------------------------------------------------------------

    def check_cursors(self) -> None:
        cdir = self.directory / C.DIRNAME
        try:
            names = sorted(os.listdir(cdir))
        except (FileNotFoundError, NotADirectoryError):
            return
        r = self.report
        for fname in names:
            if fname.startswith("."):
                if fname.endswith(".tmp"):
                    r.notes.append(f"{C.DIRNAME}/{fname} is a leftover temporary file of an interrupted cursor "
                                   "write")
                continue
            if fname.endswith(C.LOCK_SUFFIX):  # NAME.lock: the lock of a cursor in use, or once used (FORMAT.md)
                continue
            if not fname.endswith(C.SUFFIX):
                r.notes.append(f"{C.DIRNAME}/{fname} is not a cursor file (ignored)")
                continue
            cname = fname[:-len(C.SUFFIX)]
            try:
                lsn = C.load(self.directory, cname)
            except ConfigError:
                self.problem(f"cursor file name {fname!r} is not a valid reader name (retention cannot load it)",
                             f"{C.DIRNAME}/{fname}")
                continue
            if lsn is None:
                self.problem("cursor file is damaged (wrong size or CRC32C)", f"{C.DIRNAME}/{fname}")
            elif r.next_lsn is not None and lsn >= r.next_lsn and not r.live:
                self.problem(f"cursor {cname!r} is at LSN {lsn}, beyond the log's last LSN {r.next_lsn - 1}",
                             f"{C.DIRNAME}/{fname}", lsn=lsn)
            elif r.first_lsn is not None and lsn < r.first_lsn - 1:
                r.notes.append(f"cursor {cname!r} is at LSN {lsn}: retention already deleted LSNs up to "
                               f"{r.first_lsn - 1} it had not processed")

    def check_other_files(self) -> None:
        qdir = self.directory / QUARANTINE
        if qdir.is_dir():
            held = sorted(os.listdir(qdir))
            if held:
                self.report.notes.append(f"{QUARANTINE}/ holds {len(held)} file(s) cut or moved by a truncate-mode "
                                         f"repair: {', '.join(held[:5])}" + (" ..." if len(held) > 5 else ""))
        for fname in sorted(os.listdir(self.directory)):
            if fname.endswith(SUFFIX) and not (fname[:20].isdigit() and segment_name(int(fname[:20])) == fname):
                self.report.notes.append(f"{fname} is not named like a segment (20 digits + {SUFFIX}); ignored")


def verify(directory: str | os.PathLike, *, max_record_bytes: int = MAX_RECORD_BYTES,
           max_batch_bytes: int = MAX_BATCH_BYTES,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check every segment of the log in `directory`, read-only (safe while a writer runs).

    Checks: segment headers; every frame's header and payload CRC; every record decodes (its own CRC and
    decompression, within `max_record_bytes` per record and `max_batch_bytes` per batch, both defaulting to the
    largest a config allows) and the frame's count matches; LSN continuity across frames and segments; every seal (data
    CRC, record count, last LSN, index entries point at frames with those LSNs); the last segment's tail,
    classified as recovery would ("end", "torn" or "corrupt"); HEAD against the data; cursor files.
    `progress(segments done, segments)` is called before each segment.
    """
    return _Verifier(Path(directory), max_record_bytes, max_batch_bytes, progress).run()


# -- dump ------------------------------------------------------------------------------------------------

def _bound(directory: Path) -> int | None:
    """The committed LSN if a writer is running (what readers may see), else None: all valid data."""
    head = _read_head(directory)
    if head is not None and head.writer_alive():
        return head.committed_lsn
    return None


def _frame_dict(segment: str, off: int, h: F.FrameHeader, data: memoryview) -> dict[str, Any]:
    out: dict[str, Any] = {
        "segment": segment, "offset": off, "kind": "seal" if h.kind == F.KIND_SEAL else "data",
        "base_lsn": h.base_lsn, "count": h.count, "timestamp": h.timestamp_us,
        "producer_id": h.producer_id, "producer_seq": h.producer_seq,
        "header_bytes": F.FRAME_HEADER_SIZE, "payload_bytes": h.payload_len, "frame_bytes": h.size,
        "payload_crc": f"{h.payload_crc:08x}",
    }
    if h.kind == F.KIND_SEAL:
        try:
            seal = F.decode_seal(h, data[F.FRAME_HEADER_SIZE:])
        except RecordError as exc:
            raise CorruptionError(exc.detail, segment=segment, offset=off, lsn=h.base_lsn) from None
        out.update(last_lsn=seal.last_lsn, next_lsn=seal.next_lsn, record_count=seal.record_count,
                   data_crc=f"{seal.data_crc:08x}", index_entries=len(seal.index),
                   producers=len(seal.producers))
    return out


def _dump_frames(directory: Path, start: int | str, bound: int | None) -> Iterator[dict[str, Any]]:
    first = resolve_start(directory, start, bound)
    segments = list_segments(directory)
    next_base = None  # the base LSN the previous segment's seal names
    for i, (base, path) in enumerate(segments):
        if i + 1 < len(segments) and segments[i + 1][0] <= first:
            continue  # every LSN of this segment is below `first`
        if next_base is not None and base != next_base:
            raise MissingSegmentError(f"LSNs {next_base}..{base - 1} are missing: segment "
                                      f"{segment_name(next_base)} is gone", segment=segment_name(next_base),
                                      offset=0, lsn=next_base)
        try:
            seg = OpenSegment(base, path)
        except FileNotFoundError:
            continue  # deleted by retention since the listing
        try:
            seg.seek(first)
            expected = base  # the seek lands on a frame at or past the segment's base; then each frame's end
            for off, h, data in seg.scanner:
                if h.kind == F.KIND_DATA and bound is not None and h.base_lsn > bound:
                    return
                if h.kind == F.KIND_DATA and h.base_lsn < expected:  # a stop, as recovery's scan makes it
                    seg.scanner.stop = ScanStop(off, RecordError(f"frame LSN {h.base_lsn} goes backwards (expected "
                                                                 f">= {expected})", offset=off, lsn=h.base_lsn), h)
                    seg.scanner.offset = seg.scanner.limit = off  # the scan ends here, with that stop
                    continue
                if h.kind == F.KIND_SEAL:
                    next_base = h.base_lsn
                else:
                    expected = h.end_lsn
                if h.kind == F.KIND_DATA and h.end_lsn <= first:
                    continue
                yield _frame_dict(path.name, off, h, data)
                if h.kind == F.KIND_SEAL:
                    break
            else:
                stop = seg.scanner.stop
                if (seg.seal is None and i + 1 < len(segments) and segments[i + 1][0] == expected
                        and seal_unfinished(stop_facts(seg.fd, seg.size, stop, expected), seg.size)):
                    next_base = expected  # not sealed yet (or a crash cut the seal short): nothing is missing
                    continue
                if stop is not None and (seg.seal is not None or i + 1 < len(segments)):
                    raise CorruptionError(stop.error.detail, segment=path.name, offset=stop.offset)
                if i + 1 < len(segments):
                    raise CorruptionError("segment ends without a seal, but later segments exist",
                                          segment=path.name, offset=seg.scanner.offset)
                if bound is None:
                    _check_end(directory, seg, stop, expected)
                return  # the end of valid data in the last segment
        finally:
            seg.close()


def _check_end(directory: Path, seg: OpenSegment, stop: ScanStop | None, expected: int) -> None:
    """With no writer, the newest segment's scan stop must be where recovery would end the log."""
    if stop is None:
        return
    head = _read_head(directory)
    if examine_stop(seg.fd, stop, seg.size, expected, True, head.durable_lsn if head else None) == "corrupt":
        raise CorruptionError(f"{stop.error.detail}; intact data follows, so this is not the end of the log",
                              segment=seg.path.name, offset=stop.offset)


def dump(directory: str | os.PathLike, start: int | str = "earliest", *,
         frames: bool = False) -> Iterator[dict[str, Any]]:
    """Records (or, with `frames=True`, frames) from `start` ("earliest", "latest" or an LSN), as JSON-ready dicts.

    Record dicts: lsn, timestamp (µs), tombstone, ttl_ms, compression, version, and key/value as UTF-8 text
    (`key`, `value`) or base64 (`key_b64`, `value_b64`).  Frame dicts: segment, offset, kind ("data" or
    "seal"), base_lsn, count, timestamp, producer_id, producer_seq, header/payload/frame sizes, payload_crc;
    seal frames add last_lsn, next_lsn, record_count, data_crc, index_entries, producers.

    Read-only and safe on a live log: while a writer runs, nothing above the committed LSN in HEAD (read once,
    at the start) is shown; with no writer, everything up to the end of valid data.  Damage that is not the
    end of the log raises CorruptionError, as for any reader.
    """
    directory = Path(directory)
    bound = _bound(directory)
    if frames:
        yield from _dump_frames(directory, start, bound)
        return
    reader = LogReader(directory, start, bound=lambda: bound, max_record_bytes=MAX_RECORD_BYTES)
    try:
        for r in reader:
            yield record_dict(r)
    finally:
        reader.close()


__all__ = ["Problem", "VerifyReport", "dump", "verify"]

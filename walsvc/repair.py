"""What a segment scan found, and what to do about it: the verdict and the repair plan (pure decisions).

`scan.scan_segment` walks a segment's bytes and reports facts (`SegmentScan`: the intact frames, a seal
frame met on the way, and a `Stop`: where and how the valid data stops and what lies after it).
`plan_segment` turns those facts, HEAD's durable LSN, whether this is the newest segment and the
`on_corruption` policy into a `Plan`: a `Verdict` ("end", "torn", "corrupt") and one action (keep
appending at, finish the seal, write a seal a rotation did not get to, cut with a skip marker and quarantined
bytes, or refuse).  Recovery carries
the plan out; `walsvc verify` reports it; a reader with no writer ends where it says.  So "torn" and
"corrupt" mean one thing everywhere.  No I/O here: the tests build segment bytes in memory.

The rules (`classify`):
- `end`: nothing but zeros (the preallocated tail) or end of file follows: a clean end, nothing to cut;
- `torn`: the last frame is incomplete or fails its CRC and no valid frame follows: a write cut short by a
  crash; or any damage past the durable LSN that HEAD records (nothing there was fsynced or acked, so a
  power cut may have kept a later write and lost an earlier one).  It is cut, bytes beyond the torn frame
  are kept in `quarantine/`, and LSNs named on disk are never reused;
- `corrupt`: valid data follows the damage, or a segment that is not the newest has no seal: refused,
  unless `on_corruption = "truncate"`, which cuts there and moves every later segment to `quarantine/`.

The writer renames the next segment into place before its rotation thread seals the old one (rotation.py)
and before the old one's last frames are fsynced.  So a segment that is not the newest may lack its seal
(`seal_unfinished`: its frames end exactly where the next segment begins, the seal is still to be written:
`WriteSeal`), or, past the durable LSN, end in a torn tail (cut; every later segment holds only undurable
LSNs and is quarantined, its LSNs never reused).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from . import frame as F


class Verdict(str, enum.Enum):
    """The end of a segment's valid data, as recovery, verify and offline readers all judge it."""
    END = "end"
    TORN = "torn"
    CORRUPT = "corrupt"


class StopKind(str, enum.Enum):
    """How the valid frames stopped (a fact; the verdict also weighs what follows)."""
    ZERO = "zero"  # zero bytes where the next frame header would be (the preallocated tail, or a lost write)
    BAD_HEADER = "bad header"  # bytes that are not a valid frame header
    TORN_FRAME = "torn frame"  # a valid header whose frame runs past the end of the bytes
    CRC = "crc mismatch"  # a valid header whose payload fails its CRC32C
    BACKWARDS = "lsn backwards"  # a valid frame whose base LSN is below the previous frame's end


@dataclass(frozen=True, slots=True)
class Stop:
    """Where the valid frames of a segment stop, why, and what lies after: every fact the verdict needs."""
    offset: int
    kind: StopKind
    detail: str
    header: F.FrameHeader | None  # the stopping frame's header when it decoded (torn, CRC, backwards)
    zeros_after: bool  # only zeros follow (after the frame's declared extent when its header decoded)
    valid_frame_after: bool  # a valid frame header with an LSN >= the expected one lies after the damage
    data_end: int  # one past the last non-zero byte at or after `offset` (`offset` if none)
    max_end_lsn_after: int  # one past the highest LSN any valid frame header at or after `offset` names


@dataclass
class SegmentScan:
    """The facts `scan.scan_segment` reports for one segment."""
    size: int  # bytes scanned up to (the file size)
    expected: int  # the LSN after the last intact frame (the scan's starting LSN if none)
    end: int  # one past the last intact frame
    frames: int = 0  # intact DATA frames
    records: int = 0
    frame_bytes: int = 0
    first_lsn: int | None = None  # first and last record of the intact frames
    last_lsn: int | None = None
    gaps: list[tuple[int, int]] = field(default_factory=list)  # [first, end) LSNs between frames
    seal_at: tuple[int, F.FrameHeader] | None = None  # a SEAL frame met by the scan (its offset, header)
    seal: F.Seal | None = None  # its payload, when it decodes
    seal_error: str | None = None  # why it does not
    zeros_after_seal: bool = True
    stop: Stop | None = None  # None: the frames reached `size` exactly, or the scan met a seal


@dataclass(frozen=True, slots=True)
class Keep:
    """The segment stays the active one; the next frame goes at `end`."""
    end: int


@dataclass(frozen=True, slots=True)
class FinishSeal:
    """A crash came between writing the seal and cutting the file after it: cut at `end`."""
    end: int
    next_lsn: int


@dataclass(frozen=True, slots=True)
class WriteSeal:
    """A crash came between a rotation's switch to the next segment and the seal of this one: every LSN is
    here (the next segment starts at `next_lsn`), only the seal is missing.  Cut at `end` and seal."""
    end: int
    next_lsn: int


@dataclass(frozen=True, slots=True)
class Cut:
    """Cut the segment at `offset` (the bytes up to `data_end` are what is lost; zeros follow).  LSNs up
    to `next_lsn` were named on disk: when it is above the scan's expected LSN a skip marker (an empty DATA
    frame with base LSN `next_lsn`) is written at the cut, so they are never reused.  `save` bytes are
    copied to quarantine/ first; `quarantine_later` moves every later segment there."""
    offset: int
    data_end: int
    next_lsn: int
    save: tuple[int, int] | None
    quarantine_later: bool


@dataclass(frozen=True, slots=True)
class Refuse:
    """Damage to durable data: open fails naming the place (and verify reports it).  `repairable`: the
    `on_corruption = "truncate"` policy would cut here instead."""
    detail: str
    offset: int
    lsn: int | None
    repairable: bool


@dataclass(frozen=True, slots=True)
class Plan:
    verdict: Verdict
    action: Keep | FinishSeal | WriteSeal | Cut | Refuse
    offset: int  # where the valid data stops
    detail: str  # what stopped it ("" at a clean end)


NOT_SEALED = "segment is not sealed but later segments exist"


def classify(stop: Stop | None, zeros_after: bool, valid_frame_after: bool, is_last: bool,
             beyond_durable: bool = False) -> Verdict:
    """The verdict for a scan that stopped at `stop` (None: the bytes ended exactly after a frame).

    zeros_after: only zero bytes follow the damaged frame (its declared extent when its header is valid,
    else its start); valid_frame_after: a frame with a valid header lies somewhere after the damage;
    beyond_durable: every LSN the HEAD file calls durable lies before the stop (see `beyond_durable`).
    Nothing past the durable LSN was ever fsynced or acked, and a power cut may leave any mix of such
    writes (a later one kept, an earlier one lost as zeros), so damage there is a torn tail whatever
    follows it.  Damage before it is damage to durable data.
    """
    if stop is None:
        return Verdict.END if is_last else Verdict.CORRUPT
    if beyond_durable and not is_last:
        # A rotation renames the next segment in before this one's frames are fsynced: a power cut may
        # keep the name and lose the frames.  Later segments then hold only undurable LSNs too.
        return Verdict.TORN
    if stop.header is None and zeros_after:
        return Verdict.END if is_last else Verdict.CORRUPT
    if not is_last:
        return Verdict.CORRUPT
    if beyond_durable:
        return Verdict.TORN
    if valid_frame_after:
        return Verdict.CORRUPT
    if stop.header is not None and not zeros_after:
        return Verdict.CORRUPT
    return Verdict.TORN


def beyond_durable(expected: int, durable_lsn: int | None) -> bool:
    """Whether a scan stop whose next expected LSN is `expected` lies past every durable LSN.

    `durable_lsn` comes from HEAD (None when HEAD is missing or damaged: then nothing is known to be
    unsynced, and the stricter rules apply).  The stop is past it when every LSN up to it was read intact.
    """
    return durable_lsn is not None and expected > durable_lsn


def verdict(stop: Stop | None, expected: int, is_last: bool, durable_lsn: int | None) -> Verdict:
    """The verdict for the facts of a scan stop."""
    if stop is None:
        return classify(None, True, False, is_last)
    return classify(stop, stop.zeros_after, stop.valid_frame_after, is_last, beyond_durable(expected, durable_lsn))


@dataclass(frozen=True, slots=True)
class Lost:
    """LSNs [first, end) that HEAD calls committed, past where the log's data ends."""
    first: int
    end: int
    durable: bool  # HEAD calls some of them fsynced too: a disk that honours fsync never loses those


def lost_after(next_lsn: int, committed_lsn: int | None, durable_lsn: int | None) -> Lost | None:
    """What a log whose data ends before `next_lsn` lost of what HEAD says (None: nothing).

    Under `os` a commit is a write to the page cache, which a crash of the OS can take: readers, cursors and
    mirrors may know those LSNs, so they are never handed out again.  Under `always` and `batch` HEAD also
    calls them durable, and losing them is damage, not a crash.  HEAD is not fsynced with every commit, so
    this is what the HEAD that reached the disk knew.
    """
    if committed_lsn is None or committed_lsn < next_lsn:
        return None
    return Lost(next_lsn, committed_lsn + 1, durable_lsn is not None and durable_lsn >= next_lsn)


def header_lost(base_lsn: int, zeros_after_header: bool, durable_lsn: int | None) -> bool:
    """Whether the newest segment, whose header does not decode, holds nothing a crash must keep (recovery
    then deletes it, or quarantines it if it holds any bytes; readers treat it as absent).

    Either nothing but zeros follows the header (created, its header never reached the disk whole), or
    HEAD says nothing in it was durable: a rotation writes the header without an fsync (the next fsync covers
    it before any record in the segment counts as durable), so a power cut may keep frames and lose the
    header.
    """
    return zeros_after_header or (durable_lsn is not None and durable_lsn < base_lsn)


def seal_unfinished(stop: Stop | None, size: int) -> bool:
    """Whether a segment's scan stopped where a seal was still to be written: at the end of the file, at
    zeros (the preallocated tail), or at a seal cut short.  A seal is cut short by a power cut during its
    write (a header's first bytes, or a SEAL frame with the preallocated tail still after it), or by a write
    that extended the file and stopped early (a full disk; or a power cut): then the file ends inside the
    SEAL frame.  The file is cut right after a finished seal, so a damaged seal in a sealed segment never
    looks like this.  The caller checks that the next segment starts at the LSN the frames end with:
    nothing is missing."""
    if stop is None:
        return True
    if stop.header is None:  # nothing, or the first bytes of a frame header (a seal's, cut short), then zeros
        return stop.data_end <= stop.offset + F.FRAME_HEADER_SIZE
    if stop.header.kind != F.KIND_SEAL:
        return False
    end = stop.offset + stop.header.size
    return end > size or (end < size and stop.zeros_after)


def plan_segment(scan: SegmentScan, *, is_last: bool, durable_lsn: int | None, truncate: bool,
                 later_end_lsn: int = 0, next_base_lsn: int | None = None) -> Plan:
    """What to do with an unsealed segment, from its scan.

    `truncate`: `on_corruption = "truncate"`; `later_end_lsn`: one past the highest LSN the later segments
    hold (they are quarantined by a truncate-mode repair or behind a torn tail, and their LSNs are never
    reused); `next_base_lsn`: the base LSN of the segment after this one (None for the newest).
    """
    expected = scan.expected
    if scan.seal_at is not None:
        off, h = scan.seal_at
        if not scan.zeros_after_seal:
            return Plan(Verdict.CORRUPT, Refuse("data follows a seal frame", off + h.size, None, False), off + h.size,
                        "data follows a seal frame")
        return Plan(Verdict.END, FinishSeal(off + h.size, h.base_lsn), off + h.size, "")
    stop = scan.stop
    where = stop.offset if stop is not None else scan.size
    if not is_last and next_base_lsn == expected and seal_unfinished(stop, scan.size):
        return Plan(Verdict.END, WriteSeal(scan.end, expected), scan.end, "")
    found = verdict(stop, expected, is_last, durable_lsn)
    if found is Verdict.END:
        return Plan(found, Keep(where), where, "")
    if found is Verdict.TORN:
        assert stop is not None  # a torn tail is always a stop
        next_lsn = expected
        if stop.header is not None and stop.header.base_lsn == expected and stop.header.count:
            next_lsn = stop.header.end_lsn
        save = None
        if stop.data_end > stop.offset + (stop.header.size if stop.header is not None else 0):
            # More than one torn frame: an unsynced tail that a power cut left in pieces (zeros, then
            # frames).  Keep the bytes, and never reuse an LSN any of those frames names.
            next_lsn = max(next_lsn, stop.max_end_lsn_after)
            save = (stop.offset, stop.data_end)
        if not is_last:
            # Unsynced frames lost before a next segment whose name reached the disk (a rotation renames it
            # in before the old frames are fsynced): every later LSN lies past the durable one too.
            next_lsn = max(next_lsn, later_end_lsn)
        return Plan(found, Cut(stop.offset, stop.data_end, next_lsn, save, not is_last), where, stop.detail)
    clean = stop is None or (stop.header is None and stop.zeros_after)  # the data ends well, but no seal
    detail = NOT_SEALED if clean else stop.detail
    if not truncate:
        return Plan(found, Refuse(detail, where, expected, True), where, detail)
    next_lsn = max(later_end_lsn, stop.max_end_lsn_after if stop is not None else 0, expected)
    return Plan(found, Cut(where, scan.size, next_lsn, (where, scan.size), True), where, detail)

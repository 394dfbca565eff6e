"""The scan model from bytes in memory, as LevelDB's log_test: build a segment with the frame and record
encoders, damage it, and assert what `scan.scan_segment` reports and what `repair.plan_segment` decides.
Then the same images on disk: `Log.open` carries the plan out and `walsvc verify` reports the same verdict."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import key_for, rewind_head, value_for
from walsvc import Log, LogReader, Record
from walsvc import frame as F
from walsvc import head as H
from walsvc.errors import CorruptionError
from walsvc.record import decode_payload, encode_many
from walsvc.repair import (NOT_SEALED, Cut, FinishSeal, Keep, Refuse, SegmentScan, StopKind, Verdict, WriteSeal,
                           header_lost, lost_after, plan_segment)
from walsvc.scan import scan_segment
from walsvc.segment import bytes_reader, segment_name, valid_headers
from walsvc.verify import verify

HEADER = F.SEGMENT_HEADER_SIZE
TAIL = 512  # preallocated zeros after the frames


def _records(base: int, n: int) -> list[Record]:
    return [Record.put(key_for(lsn), value_for(lsn, 7 + lsn % 13)) for lsn in range(base, base + n)]


def _frames(sizes: list[int], base: int = 1) -> list[bytes]:
    """One DATA frame per entry of `sizes` (its record count), LSNs from `base` on."""
    out = []
    for n in sizes:
        out.append(F.encode_frame(F.KIND_DATA, encode_many(_records(base, n)), n, base, 1_000 + base))
        base += n
    return out


def _segment(frames: list[bytes], tail: int = TAIL, base: int = 1) -> bytearray:
    return bytearray(F.encode_segment_header(F.SegmentHeader(1, base, 0)) + b"".join(frames) + bytes(tail))


def _offsets(frames: list[bytes]) -> list[int]:
    out, pos = [], HEADER
    for f in frames:
        out.append(pos)
        pos += len(f)
    return out


def _scan(image: bytes | bytearray, expected: int = 1, records: list[Record] | None = None) -> SegmentScan:
    """Scan bytes in memory; decode each intact frame's records into `records` when given."""
    image = bytes(image)

    def collect(off: int, h: F.FrameHeader, data: memoryview) -> None:
        if records is not None:
            records.extend(decode_payload(bytes(data), h.base_lsn, h.count, h.timestamp_us,
                                          start=F.FRAME_HEADER_SIZE))

    return scan_segment(bytes_reader(image), len(image), expected, on_frame=collect)


def _plan(image: bytes | bytearray, *, durable: int | None = None, is_last: bool = True, truncate: bool = False,
          later_end_lsn: int = 0, next_base: int | None = None):
    return plan_segment(_scan(image), is_last=is_last, durable_lsn=durable, truncate=truncate,
                        later_end_lsn=later_end_lsn, next_base_lsn=next_base)


def _seal(frames: list[bytes], next_lsn: int) -> bytes:
    end = HEADER + sum(len(f) for f in frames)
    last = next_lsn - 1
    return F.encode_seal(F.Seal(last, next_lsn, last, 0, [(1, HEADER)]), end, 5)


# -- facts ----------------------------------------------------------------------------------------------

def test_scan_reports_frames_lsns_and_a_clean_end():
    frames = _frames([2, 1, 3])
    got: list[Record] = []
    scan = _scan(_segment(frames), records=got)
    assert (scan.frames, scan.records, scan.first_lsn, scan.last_lsn, scan.expected) == (3, 6, 1, 6, 7)
    assert scan.end == HEADER + sum(map(len, frames)) and scan.frame_bytes == sum(map(len, frames))
    assert scan.stop.kind is StopKind.ZERO and scan.stop.offset == scan.end and scan.stop.zeros_after
    assert [r.lsn for r in got] == list(range(1, 7)) and got == _records(1, 6)
    assert scan.gaps == [] and scan.seal_at is None


def test_scan_reports_gaps_and_backwards_lsns():
    frames = _frames([2]) + _frames([1], base=10) + _frames([1], base=5)
    scan = _scan(_segment(frames))
    assert scan.gaps == [(3, 10)] and scan.expected == 11
    assert scan.stop.kind is StopKind.BACKWARDS and scan.stop.offset == _offsets(frames)[2]
    assert scan.stop.header.base_lsn == 5


def test_scan_reports_the_seal_it_meets():
    frames = _frames([2, 2])
    scan = _scan(_segment(frames + [_seal(frames, 5)]))
    off, h = scan.seal_at
    assert off == HEADER + sum(map(len, frames)) and h.kind == F.KIND_SEAL and h.base_lsn == 5
    assert scan.seal.next_lsn == 5 and scan.seal.index == [(1, HEADER)] and scan.zeros_after_seal
    assert scan.stop is None and scan.expected == 5


# -- verdicts and plans, one row per kind of damage -----------------------------------------------------

FRAMES = _frames([2, 1, 3, 1])
OFFS = _offsets(FRAMES)
END = HEADER + sum(map(len, FRAMES))


def _image(damage: str) -> bytearray:
    img = _segment(FRAMES)
    if damage == "none":
        pass
    elif damage == "no tail":
        del img[END:]
    elif damage == "last payload cut, zeros after":  # a write cut short inside the last frame's payload
        img[OFFS[3] + F.FRAME_HEADER_SIZE + 5:END] = bytes(END - OFFS[3] - F.FRAME_HEADER_SIZE - 5)
    elif damage == "last frame cut at EOF":
        del img[END - 5:]
    elif damage == "last header cut":
        img[OFFS[3] + 17:END] = bytes(END - OFFS[3] - 17)  # byte 16 is the low byte of its base LSN
    elif damage == "bit flip in frame 1":  # intact frames follow
        img[OFFS[1] + F.FRAME_HEADER_SIZE + 2] ^= 0x10
    elif damage == "bit flip in last frame":  # nothing follows
        img[OFFS[3] + F.FRAME_HEADER_SIZE + 2] ^= 0x10
    elif damage == "garbage in the tail":
        img[END + 100] = 0x55
    elif damage == "frame 2 lost, 3 kept":  # a power cut kept a later unsynced write, lost an earlier one
        img[OFFS[2]:OFFS[3]] = bytes(OFFS[3] - OFFS[2])
    else:
        raise AssertionError(damage)
    return img


# damage, durable LSN, verdict, action (with the scan's own numbers)
ROWS = [
    ("none", None, Verdict.END, Keep(END)),
    ("none", 0, Verdict.END, Keep(END)),
    ("no tail", None, Verdict.END, Keep(END)),
    ("last payload cut, zeros after", None, Verdict.TORN, Cut(OFFS[3], OFFS[3] + F.FRAME_HEADER_SIZE + 5, 8, None,
                                                                   False)),
    ("last frame cut at EOF", None, Verdict.TORN, Cut(OFFS[3], END - 5, 8, None, False)),
    ("last header cut", None, Verdict.TORN, Cut(OFFS[3], OFFS[3] + 17, 7, (OFFS[3], OFFS[3] + 17), False)),
    ("bit flip in frame 1", None, Verdict.CORRUPT, Refuse("frame payload CRC32C mismatch", OFFS[1], 3, True)),
    ("bit flip in frame 1", 2, Verdict.TORN, Cut(OFFS[1], END, 8, (OFFS[1], END), False)),  # past durable
    ("bit flip in frame 1", 3, Verdict.CORRUPT, Refuse("frame payload CRC32C mismatch", OFFS[1], 3, True)),
    ("bit flip in last frame", None, Verdict.TORN, Cut(OFFS[3], END, 8, None, False)),
    ("garbage in the tail", None, Verdict.TORN, Cut(END, END + 101, 8, (END, END + 101), False)),
    ("frame 2 lost, 3 kept", None, Verdict.CORRUPT, Refuse("bad frame magic b'\\x00\\x00\\x00\\x00'", OFFS[2], 4,
                                                          True)),
    ("frame 2 lost, 3 kept", 3, Verdict.TORN, Cut(OFFS[2], END, 8, (OFFS[2], END), False)),
]


@pytest.mark.parametrize("damage,durable,verdict,action", ROWS, ids=[f"{r[0]}, durable {r[1]}" for r in ROWS])
def test_plan_table(damage, durable, verdict, action):
    plan = _plan(_image(damage), durable=durable)
    assert plan.verdict is verdict
    assert plan.action == action
    assert plan.offset == (action.end if isinstance(action, Keep) else action.offset)


def test_corruption_in_truncate_mode_cuts_and_quarantines_later_segments():
    img = _image("bit flip in frame 1")
    plan = _plan(img, truncate=True, later_end_lsn=20)
    assert plan.verdict is Verdict.CORRUPT
    assert plan.action == Cut(OFFS[1], len(img), 20, (OFFS[1], len(img)), True)
    # Without later segments the LSNs the frames after the damage name are never reused either.
    assert _plan(img, truncate=True).action.next_lsn == 8


def test_unsealed_segment_before_the_newest_is_corrupt_even_when_clean():
    plan = _plan(_image("none"), is_last=False)
    assert plan.verdict is Verdict.CORRUPT and plan.action == Refuse(NOT_SEALED, END, 8, True)
    plan = _plan(_image("no tail"), is_last=False, truncate=True, later_end_lsn=30)
    assert plan.action == Cut(END, END, 30, (END, END), True)


def test_seal_met_by_the_scan_is_finished_or_refused():
    seal = _seal(FRAMES, 8)
    img = _segment(FRAMES + [seal])
    assert _plan(img) == _plan(img, durable=0)
    plan = _plan(img)
    assert plan.verdict is Verdict.END and plan.action == FinishSeal(END + len(seal), 8)
    img[END + len(seal) + 10] = 1
    plan = _plan(img, truncate=True)
    assert plan.verdict is Verdict.CORRUPT
    assert plan.action == Refuse("data follows a seal frame", END + len(seal), None, False)


def test_empty_segment_and_unwritten_header():
    plan = _plan(_segment([]))
    assert plan.verdict is Verdict.END and plan.action == Keep(HEADER)



@pytest.mark.parametrize("zeros_after,durable,lost", [
    (True, None, True),  # created, its header never reached the disk whole
    (True, 50, True),
    (False, None, False),  # frames and nothing known about durability: refused
    (False, 9, True),  # a rotation's unsynced header lost, nothing in the segment durable
    (False, 10, False),  # LSN 10 durable: the segment held durable data
])
def test_header_lost_table(zeros_after, durable, lost):
    assert header_lost(10, zeros_after, durable) is lost


# -- a rotation cut short: the old segment is unsealed, the next one already in place --------------------

def _seal_cut(keep: int) -> bytearray:
    """FRAMES, then the first `keep` bytes of their seal, then the preallocated zeros."""
    img = _segment(FRAMES)
    seal = _seal(FRAMES, 8)
    img[END:END + keep] = seal[:keep]
    return img


def _seal_flipped(tail: int) -> bytearray:
    """FRAMES and their seal with a payload bit flipped, then `tail` zero bytes."""
    seal = bytearray(_seal(FRAMES, 8))
    seal[F.FRAME_HEADER_SIZE + 3] ^= 0x01
    return _segment(FRAMES + [bytes(seal)], tail=tail)


@pytest.mark.parametrize("image", [
    _image("none"), _image("no tail"), _seal_cut(20), _seal_cut(F.FRAME_HEADER_SIZE - 1), _seal_cut(80),
    _seal_flipped(64),
], ids=["zeros", "end of file", "seal header cut", "seal header cut at its last byte", "seal payload cut",
        "seal damaged, zeros after"])
def test_seal_still_to_be_written_when_the_next_segment_starts_right_after(image):
    plan = _plan(image, is_last=False, next_base=8)
    assert plan.verdict is Verdict.END and plan.action == WriteSeal(END, 8) and plan.offset == END
    # The same bytes when the next segment does not start at LSN 8: a hole, never sealed over.
    assert _plan(image, is_last=False, next_base=9).verdict is Verdict.CORRUPT
    assert _plan(image, is_last=False).verdict is Verdict.CORRUPT


@pytest.mark.parametrize("image", [_seal_flipped(0), _image("bit flip in last frame"), _image("garbage in the tail")],
                         ids=["damaged seal at the end of the file", "damaged data frame", "bytes past a header"])
def test_damage_before_the_next_segment_is_not_a_seal_still_to_be_written(image):
    plan = _plan(image, is_last=False, next_base=8)
    assert plan.verdict is Verdict.CORRUPT and isinstance(plan.action, Refuse)


def test_torn_tail_past_durable_before_the_newest_quarantines_later_segments():
    """A rotation renames the next segment in before the old one's frames are fsynced: past the durable LSN
    a segment that is not the newest may end torn; later segments hold only undurable LSNs, never reused."""
    plan = _plan(_image("bit flip in frame 1"), durable=2, is_last=False, next_base=8, later_end_lsn=30)
    assert plan.verdict is Verdict.TORN and plan.action == Cut(OFFS[1], END, 30, (OFFS[1], END), True)
    plan = _plan(_image("last frame cut at EOF"), durable=6, is_last=False, next_base=8, later_end_lsn=12)
    assert plan.verdict is Verdict.TORN and plan.action == Cut(OFFS[3], END - 5, 12, None, True)
    # Inside the durable part it stays corruption.
    assert _plan(_image("bit flip in frame 1"), durable=3, is_last=False, next_base=8).verdict is Verdict.CORRUPT


# -- properties -----------------------------------------------------------------------------------------

BATCHES = st.lists(st.integers(1, 4), min_size=1, max_size=6)


def _damaged(data: st.DataObject, frames: list[bytes]) -> bytearray:
    img = _segment(frames)
    end = HEADER + sum(map(len, frames))
    how = data.draw(st.sampled_from(["truncate", "flip", "zero"]), label="damage")
    if how == "truncate":
        del img[data.draw(st.integers(HEADER, len(img)), label="cut at"):]
    elif how == "flip":
        at = data.draw(st.integers(HEADER, end + 64), label="flip at")
        img[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    else:
        a = data.draw(st.integers(HEADER, end), label="zero from")
        b = data.draw(st.integers(a, end), label="zero to")
        img[a:b] = bytes(b - a)
    return img


@settings(max_examples=300, deadline=None)
@given(sizes=BATCHES, data=st.data())
def test_property_kept_prefix_decodes_to_a_prefix_of_the_records(sizes, data):
    frames = _frames(sizes)
    originals = _records(1, sum(sizes))
    img = _damaged(data, frames)
    durable = data.draw(st.one_of(st.none(), st.integers(0, len(originals))), label="durable LSN")
    scan = _scan(img)
    plan = plan_segment(scan, is_last=True, durable_lsn=durable, truncate=True)
    assert isinstance(plan.action, (Keep, Cut))
    kept_end = plan.action.end if isinstance(plan.action, Keep) else plan.action.offset
    assert kept_end == scan.end  # the plan keeps exactly the intact frames the scan read
    kept: list[Record] = []
    rescan = _scan(img[:kept_end], records=kept)
    assert rescan.stop is None and rescan.seal_at is None  # whole frames, nothing else
    assert kept == originals[:len(kept)] and [r.lsn for r in kept] == list(range(1, len(kept) + 1))
    if isinstance(plan.action, Cut):
        # No LSN that a valid frame header in the cut bytes names is ever handed out again.
        named = [h.end_lsn for _, h in valid_headers(bytes_reader(bytes(img)), kept_end, len(img), scan.expected)]
        assert plan.action.next_lsn >= max(named, default=scan.expected) >= scan.expected


@settings(max_examples=300, deadline=None)
@given(sizes=BATCHES, data=st.data())
def test_property_torn_or_corrupt_is_decided_by_the_durable_position(sizes, data):
    """Damage past HEAD's durable LSN is never corruption; a damaged durable frame with an intact frame
    after it always is."""
    frames = _frames(sizes)
    offs = _offsets(frames)
    bases = [1 + sum(sizes[:i]) for i in range(len(sizes))]
    victim = data.draw(st.integers(0, len(frames) - 1), label="victim frame")
    img = _segment(frames)
    at = offs[victim] + data.draw(st.integers(0, len(frames[victim]) - 1), label="byte")
    img[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    durable = data.draw(st.integers(0, sum(sizes)), label="durable LSN")
    plan = _plan(img, durable=durable)
    assert plan.offset == offs[victim]  # the scan stops at the damaged frame
    if bases[victim] > durable:
        assert plan.verdict is Verdict.TORN
    elif victim < len(frames) - 1:
        assert plan.verdict is Verdict.CORRUPT and isinstance(plan.action, Refuse)
    # Without HEAD the strict rules apply: an intact frame after the damage makes it corruption.
    if victim < len(frames) - 1:
        assert _plan(img).verdict is Verdict.CORRUPT


# -- the same plan on disk: recovery carries it out, verify reports it ----------------------------------

def _write_log(directory: Path, sizes: list[int]) -> Path:
    with Log.open(directory, segment_bytes=1 << 20, fsync="os", preallocate=False) as log:
        for n in sizes:
            log.append_batch(_records(log.next_lsn, n))
    return directory / segment_name(1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 3), min_size=2, max_size=4), data=st.data())
def test_recovery_and_verify_follow_the_same_plan(tmp_path_factory, sizes, data):
    directory = tmp_path_factory.mktemp("wal")
    path = _write_log(directory, sizes)
    pristine = path.read_bytes()
    frames = []
    pos = HEADER
    while pos < len(pristine):
        h = F.decode_frame_header(pristine, pos)
        frames.append(pristine[pos:pos + h.size])
        pos += h.size
    img = bytearray(pristine)
    victim = data.draw(st.integers(0, len(frames) - 1), label="victim frame")
    at = HEADER + sum(map(len, frames[:victim])) + data.draw(st.integers(0, len(frames[victim]) - 1), label="byte")
    img[at] ^= 0x04
    path.write_bytes(bytes(img))
    # The HEAD a crash left: it may name any commit up to the last (then the damage is to fsynced records).
    rewind_head(directory, data.draw(st.integers(0, sum(sizes)), label="HEAD's committed LSN"))
    head = H.load(directory)
    plan = _plan(img, durable=head.durable_lsn if head is not None else None)
    report = verify(directory)
    assert report.tail == plan.verdict.value and report.tail_offset == plan.offset
    if isinstance(plan.action, Refuse):
        with pytest.raises(CorruptionError) as exc:
            Log.open(directory, preallocate=False)
        assert exc.value.offset == plan.action.offset
        return
    lost = lost_after(_scan(img).expected, head.committed_lsn, head.durable_lsn)  # where the valid frames end
    if lost is not None and lost.durable:  # the log was closed: a cut would lose fsynced, acked records
        assert not report.ok
        with pytest.raises(CorruptionError, match="were committed and fsynced"):
            Log.open(directory, preallocate=False)
        assert path.read_bytes() == bytes(img)
        return
    with Log.open(directory, preallocate=False) as log:
        assert log.recovery.torn_tail == (plan.verdict is Verdict.TORN)
        assert log.next_lsn == max(plan.action.next_lsn, _scan(img).expected)
    assert os.path.getsize(path) == plan.action.offset + (0 if plan.action.next_lsn == _scan(img).expected
                                                          else F.FRAME_HEADER_SIZE)
    with LogReader(directory) as r:
        assert [x.lsn for x in r] == list(range(1, _scan(img).records + 1))


def _two_segments(directory: Path) -> tuple[Path, Path, int, int]:
    """A log of two segments whose first one's seal is then cut off, as if a crash came between the
    rotation's switch and the seal: (first, second, the second's base LSN, the first's last frame offset)."""
    with Log.open(directory, segment_bytes=1 << 20, fsync="os", preallocate=False) as log:
        while len(list(directory.glob("*.wal"))) < 2:
            log.append_batch([Record.put(key_for(lsn), value_for(lsn, 4000)) for lsn in range(log.next_lsn,
                                                                                            log.next_lsn + 20)])
        log.append_batch(_records(log.next_lsn, 3))
    first, second = sorted(directory.glob("*.wal"))
    data = first.read_bytes()
    pos, last = HEADER, HEADER
    while pos < len(data):
        h = F.decode_frame_header(data, pos)
        if h.kind == F.KIND_SEAL:
            break
        last = pos
        pos += h.size
    os.truncate(first, pos)  # the seal is not written yet
    return first, second, int(second.name[:20]), last


def _set_durable(directory: Path, durable: int) -> None:
    head = H.load(directory)
    (directory / H.NAME).write_bytes(H.encode(H.Head(durable, 0, head.active_base_lsn, head.active_end, durable)))


def test_power_cut_after_a_switch_torn_old_tail_quarantines_the_new_segment(tmp_path):
    """The old segment's last frames were not fsynced when the next segment's name reached the disk: past
    the durable LSN the old one ends torn, so recovery cuts it, moves the new one to quarantine/ and never
    hands out its LSNs again; verify reports the same torn tail."""
    directory = tmp_path / "wal"
    first, second, next_base, last = _two_segments(directory)
    with open(first, "r+b") as f:  # the last frame of the old segment lost its payload
        f.seek(last + F.FRAME_HEADER_SIZE + 3)
        f.write(b"\xff\xfe")
    lost_from = F.decode_frame_header(first.read_bytes(), last).base_lsn
    _set_durable(directory, lost_from - 1)
    end_of_second = _scan(second.read_bytes(), next_base).expected
    report = verify(directory)
    assert report.ok, report.problems
    assert any(first.name in n and "torn tail" in n for n in report.notes), report.notes
    with Log.open(directory, segment_bytes=1 << 20, fsync="os", preallocate=False) as log:
        assert log.recovery.torn_tail and str(directory / "quarantine" / second.name) in log.recovery.quarantined
        assert log.next_lsn >= end_of_second > lost_from
        assert [r.lsn for r in log.read()] == list(range(1, lost_from))
        assert log.append(Record.put(b"k", b"v")) == log.next_lsn - 1 >= end_of_second


def test_power_cut_after_a_switch_lost_header_quarantines_the_new_segment(tmp_path):
    """The new segment's header (written without an fsync) lost, its frames kept, nothing in it durable:
    recovery moves it to quarantine/ and appends on in the old segment; readers and verify see the old one
    as the newest (nothing is missing, nothing is corrupt)."""
    directory = tmp_path / "wal"
    first, second, next_base, _ = _two_segments(directory)
    with open(second, "r+b") as f:
        f.write(bytes(HEADER))
    _set_durable(directory, next_base - 1)
    with LogReader(directory) as r:
        assert [x.lsn for x in r] == list(range(1, next_base))
    report = verify(directory)  # judged as recovery judges it: the old segment is the newest, its end the end
    assert report.ok, report.problems
    assert (report.tail, report.tail_segment) == ("end", first.name)
    assert not any("seal still to be written" in n for n in report.notes), report.notes
    with Log.open(directory, segment_bytes=1 << 20, fsync="os", preallocate=False) as log:
        assert str(directory / "quarantine" / second.name) in log.recovery.quarantined
        assert log.next_lsn == next_base and log.recovery.sealed_segments == 0
        assert [r.lsn for r in log.read()] == list(range(1, next_base))

"""Damage seen by readers with no writer, and the durable LSN that tells an unsynced tail from lost data.

Readers: a reader that reaches damage, a hole or a missing segment raises (never a silent end), and
`walsvc tail` / `walsvc dump` exit non-zero naming the place; a torn tail is the end of the log for them as
it is for recovery.  Recovery: damage past HEAD's durable LSN is an unsynced tail that a power cut left in
pieces (zeros, then frames): it is cut and quarantined; damage before it still refuses the open.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from conftest import MiB, check_records, fill, flip_bit, frame_offsets, key_for, python_env, segment_paths, value_for
from helpers import run_cli
from walsvc import Log, LogReader, Reader, Record
from walsvc import frame as F
from walsvc import head as H
from walsvc.errors import ChecksumError, CorruptionError, MissingSegmentError
from walsvc.record import encode as encode_record
from walsvc.recovery import QUARANTINE
from walsvc.repair import classify
from walsvc.scan import examine_stop
from walsvc.segment import FrameScanner, ScanStop
from walsvc.verify import verify


def _drain(directory: Path, start: int | str = "earliest") -> list[Record]:
    with LogReader(directory, start) as reader:
        return list(reader)


def _sealed_log(directory: Path, segments: int = 3) -> list[int]:
    """A closed log of at least `segments` segments (1 MiB each), 1 KiB records one per batch."""
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        lsns: list[int] = []
        while len(log._sealed) < segments - 1:
            lsns += fill(log, 200, size=1000, per_batch=1)
    return lsns


def _cli_fails_naming(directory: Path, name: str) -> None:
    for args in (("tail", "--dir", str(directory), "--from", "earliest"), ("dump", "--dir", str(directory)),
                 ("dump", "--dir", str(directory), "--frames")):
        result = run_cli(*args)
        assert result.returncode == 1, (args, result.returncode, result.stderr)
        assert "corruption" in result.stderr and name in result.stderr, (args, result.stderr)


# -- readers with no writer --------------------------------------------------------------------------------

def test_damaged_seal_stops_offline_readers_with_an_error(tmp_path):
    directory = tmp_path / "wal"
    lsns = _sealed_log(directory)
    first = segment_paths(directory)[0]
    seal_off, _ = frame_offsets(first)[-1]
    flip_bit(first, seal_off + F.FRAME_HEADER_SIZE + 3)  # inside the seal's payload: the segment reads unsealed
    with pytest.raises(CorruptionError) as info:
        _drain(directory)
    assert info.value.segment == first.name and info.value.offset == seal_off
    assert f"LSN {lsns[0] + sum(1 for _ in frame_offsets(first)) - 1}" in str(info.value)
    with Reader(directory) as reader:
        assert reader.offline
        with pytest.raises(CorruptionError):
            while reader.poll(0.5):
                pass
    _cli_fails_naming(directory, first.name)


def test_cut_off_seal_and_last_frame_is_damage_not_the_end(tmp_path):
    directory = tmp_path / "wal"
    _sealed_log(directory)
    first = segment_paths(directory)[0]
    last_off, _ = frame_offsets(first)[-2]
    os.truncate(first, last_off)  # the seal and the last frame gone, later segments still there: a hole
    with pytest.raises(CorruptionError, match="later segments"):
        _drain(directory)
    _cli_fails_naming(directory, first.name)


@pytest.mark.parametrize("cut", ["no seal", "seal cut short"])
def test_missing_seal_before_the_next_segment_is_a_rotation_cut_short(tmp_path, cut):
    """The writer renames the next segment in before its rotation thread seals the old one: a crash in
    between leaves every frame of the old one, no seal, and the next segment starting right after its last
    LSN.  Or the seal's write extended the file and stopped early (a full disk, or a crash), so the file
    ends inside the SEAL frame.  Readers read on; recovery writes the seal."""
    directory = tmp_path / "wal"
    lsns = _sealed_log(directory)
    first = segment_paths(directory)[0]
    seal_off, _ = frame_offsets(first)[-1]
    os.truncate(first, seal_off if cut == "no seal" else seal_off + F.FRAME_HEADER_SIZE + 10)
    assert [r.lsn for r in _drain(directory)] == list(range(1, lsns[-1] + 1))
    report = verify(directory)  # the verdict recovery's plan gives: a seal still to be written, not corruption
    assert report.ok, report.problems
    assert any(first.name in n and "seal still to be written" in n for n in report.notes), report.notes
    frames = run_cli("dump", "--dir", str(directory), "--frames")
    assert frames.returncode == 0, frames.stderr
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        assert log.recovery.sealed_segments == len(segment_paths(directory)) - 1
        assert [r.lsn for r in log.read()] == list(range(1, lsns[-1] + 1))
    off, h = frame_offsets(first)[-1]
    assert h.kind == F.KIND_SEAL and off == seal_off


@pytest.mark.parametrize("where", ["payload", "header"])
def test_damage_mid_active_segment_stops_offline_readers(tmp_path, where):
    directory = tmp_path / "wal"
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        lsns = fill(log, 20, per_batch=1)
    (path,) = segment_paths(directory)
    off, h = frame_offsets(path)[7]
    flip_bit(path, off + (F.FRAME_HEADER_SIZE + 40 if where == "payload" else 20))
    with LogReader(directory) as reader:
        got = reader.read_batch()  # the records before the damage come first
        assert [r.lsn for r in got] == lsns[:7]
        with pytest.raises(CorruptionError) as info:
            reader.read_batch()
        with pytest.raises(CorruptionError):  # and again: it never steps past the damage
            reader.read_batch()
    assert info.value.segment == path.name and info.value.offset == off and info.value.lsn == h.base_lsn
    _cli_fails_naming(directory, path.name)


def test_a_frame_whose_lsn_goes_backwards_stops_readers(tmp_path):
    """Frame 8's header names LSN 13 instead of 8, with valid CRCs (a gap, which readers accept); frame 9 then
    starts at LSN 9, below the next LSN 14: damage, as recovery and verify call it.  An offline reader hands
    out LSNs 1-7 and 13, then raises there.  Before, it skipped frame 9's records as if seeking, read LSN 10
    on and exited 0, while the next open refused the log."""
    directory = tmp_path / "wal"
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        fill(log, 20, per_batch=1)
    (path,) = segment_paths(directory)
    frames = frame_offsets(path)
    off, h = frames[7]
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(F.encode_frame_header(h.kind, h.payload_len, h.count, h.base_lsn + 5, h.timestamp_us,
                                      h.producer_id, h.producer_seq, h.payload_crc))
    with LogReader(directory) as reader:
        assert [r.lsn for r in reader.read_batch()] == [1, 2, 3, 4, 5, 6, 7, 13]
        with pytest.raises(CorruptionError, match="goes backwards") as info:
            reader.read_batch()
    assert (info.value.segment, info.value.offset) == (path.name, frames[8][0])
    _cli_fails_naming(directory, path.name)
    with pytest.raises(CorruptionError, match="goes backwards"):
        Log.open(directory, segment_bytes=MiB, fsync="os")


def test_missing_middle_segment_is_a_hole_not_retention(tmp_path):
    directory = tmp_path / "wal"
    _sealed_log(directory, 4)
    paths = segment_paths(directory)
    paths[1].unlink()
    with pytest.raises(MissingSegmentError) as info:
        _drain(directory)
    assert info.value.segment == paths[1].name and info.value.lsn == int(paths[1].name[:20])
    assert paths[0].name in str(info.value)
    for args in (("tail", "--dir", str(directory)), ("dump", "--dir", str(directory), "--frames")):
        result = run_cli(*args)
        assert result.returncode == 1 and paths[1].name in result.stderr, (args, result.stderr)


def test_torn_tail_is_the_end_for_offline_readers(tmp_path):
    directory = tmp_path / "wal"
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        lsns = fill(log, 10, per_batch=1)
    (path,) = segment_paths(directory)
    off, h = frame_offsets(path)[-1]
    flip_bit(path, off + F.FRAME_HEADER_SIZE + 5)  # the last batch fails its CRC, zeros after: torn
    got = _drain(directory)
    assert [r.lsn for r in got] == lsns[:-1]
    check_records(got)
    result = run_cli("tail", "--dir", str(directory))
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 9, result.stderr


# -- the durable LSN in HEAD --------------------------------------------------------------------------------

def test_head_records_the_durable_lsn(tmp_path):
    directory = tmp_path / "wal"
    with Log.open(directory, segment_bytes=MiB, fsync="always") as log:
        fill(log, 5)
        head = H.load(directory)
        assert head.durable_lsn == head.committed_lsn == 5
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        fill(log, 5)
        head = H.load(directory)
        assert head.committed_lsn == 10 and head.durable_lsn == 5  # os: written is not durable
    assert H.load(directory).durable_lsn == 10  # close fsyncs


_UNSYNCED = """
import os, sys
from walsvc import Log, Record
log = Log.open(sys.argv[1], segment_bytes=1 << 20, fsync="os")
for i in range(int(sys.argv[2])):
    base = log.next_lsn
    log.append_batch([Record.put(b"k%d" % base, b"v" * 100)])
os._exit(0)  # a crash: nothing after the open was fsynced
"""


def _durable_then_unsynced(directory: Path, durable: int,
                           unsynced: int) -> tuple[Path, list[tuple[int, F.FrameHeader]]]:
    with Log.open(directory, segment_bytes=MiB, fsync="always") as log:
        for _ in range(durable):
            log.append(Record.put(b"k%d" % log.next_lsn, b"v" * 100))
    subprocess.run([sys.executable, "-c", _UNSYNCED, str(directory), str(unsynced)], env=python_env(), check=True,
                   timeout=60)
    (path,) = segment_paths(directory)
    return path, frame_offsets(path)


def _zero(path: Path, offset: int, n: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(n))


def test_power_cut_gap_past_the_durable_lsn_is_a_torn_tail(tmp_path):
    """A power cut kept a later write and lost an earlier one: zeros, then intact frames, all past the
    durable LSN.  Recovery cuts at the gap, keeps the cut bytes in quarantine/, never reuses their LSNs."""
    directory = tmp_path / "wal"
    path, frames = _durable_then_unsynced(directory, 5, 5)
    assert H.load(directory).durable_lsn == 5 and len(frames) == 10
    off, h = frames[6]  # LSN 7: unsynced, lost; LSNs 8..10 kept by the file system
    _zero(path, off, h.size)
    with Log.open(directory, segment_bytes=MiB) as log:
        info = log.recovery
        assert info.torn_tail and info.corruption is None and info.truncated_at == (path.name, off)
        assert [r.lsn for r in log.read()] == list(range(1, 7))
        assert log.append(Record.put(b"x", b"y")) == 11  # LSNs 7..10 were on disk: never reused
    saved = directory / QUARANTINE / f"{path.name}.from-{off}"
    assert str(saved) in info.quarantined and saved.read_bytes()[h.size:h.size + 4] == F.FRAME_MAGIC


def test_gap_inside_the_durable_part_still_refuses(tmp_path):
    directory = tmp_path / "wal"
    path, frames = _durable_then_unsynced(directory, 5, 5)
    off, h = frames[2]  # LSN 3 was fsynced (and acked under always): losing it is damage
    _zero(path, off, h.size)
    pristine = path.read_bytes()
    with pytest.raises(CorruptionError) as info:
        Log.open(directory, segment_bytes=MiB)
    assert info.value.offset == off and info.value.lsn == 3
    assert path.read_bytes() == pristine
    with pytest.raises(CorruptionError):  # readers agree
        _drain(directory)


def test_damaged_head_falls_back_to_the_strict_rule(tmp_path):
    """Without a readable HEAD nothing is known to be unsynced: zeros then frames is refused, not cut."""
    directory = tmp_path / "wal"
    path, frames = _durable_then_unsynced(directory, 5, 5)
    off, h = frames[6]
    _zero(path, off, h.size)
    flip_bit(directory / H.NAME, 9)
    with pytest.raises(CorruptionError):
        Log.open(directory, segment_bytes=MiB)
    # A damaged HEAD on an intact log is harmless: readers act as if no writer ran, the writer rewrites it.
    directory2 = tmp_path / "wal2"
    with Log.open(directory2, segment_bytes=MiB) as log:
        lsns = fill(log, 5)
    flip_bit(directory2 / H.NAME, 9)
    assert [r.lsn for r in _drain(directory2)] == lsns
    with Log.open(directory2, segment_bytes=MiB) as log:
        assert log.recovery.corruption is None and not log.recovery.torn_tail
        assert H.load(directory2) is not None


# -- the planner, from bytes in memory ----------------------------------------------------------------------

def _memfile(data: bytes) -> int:
    fd = os.memfd_create("segment")
    os.write(fd, data)
    return fd


def _segment(frames: list[bytes], tail: int = 4096) -> bytes:
    return F.encode_segment_header(F.SegmentHeader(1, 1, 0)) + b"".join(frames) + bytes(tail)


def _frames(n: int) -> list[bytes]:
    out = []
    for lsn in range(1, n + 1):
        payload = encode_record(Record.put(key_for(lsn), value_for(lsn, 30)))
        out.append(F.encode_frame(F.KIND_DATA, payload, 1, lsn, 1))
    return out


def _verdict(data: bytes, durable_lsn: int | None) -> tuple[str, int]:
    fd = _memfile(data)
    try:
        size = len(data)
        scanner = FrameScanner(fd, F.SEGMENT_HEADER_SIZE, size)
        expected = 1
        for _, h, _ in scanner:
            expected = h.end_lsn
        return examine_stop(fd, scanner.stop, size, expected, True, durable_lsn), expected
    finally:
        os.close(fd)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 8), data=st.data())
def test_planner_unsynced_tail_in_pieces_is_torn_and_durable_damage_is_not(n, data):
    frames = _frames(n)
    durable = data.draw(st.integers(0, n), label="durable LSN")
    # A power cut: the durable frames are intact; of the later ones, any subset was lost (zeros), and the
    # last kept one may be torn short.
    kept = [data.draw(st.booleans(), label=f"keep {i + 1}") for i in range(durable, n)]
    image = bytearray(_segment(frames))
    pos = F.SEGMENT_HEADER_SIZE
    offsets = []
    for f in frames:
        offsets.append(pos)
        pos += len(f)
    for i, keep in zip(range(durable, n), kept):
        if not keep:
            image[offsets[i]:offsets[i] + len(frames[i])] = bytes(len(frames[i]))
    torn = durable < n and kept[-1] and data.draw(st.booleans(), label="tear the last frame")
    if torn:
        last = offsets[-1]
        cut = data.draw(st.integers(1, len(frames[-1]) - 1), label="cut")
        image[last + cut:last + len(frames[-1])] = bytes(len(frames[-1]) - cut)
    verdict, end = _verdict(bytes(image), durable)
    assert verdict in ("end", "torn"), (verdict, durable, kept)
    assert end > durable  # every durable record is read before the stop
    # The same image with nothing known about durability: zeros followed by an intact frame is refused.
    lost_then_kept = any(not a and b for a, b in zip(kept, kept[1:])) and not torn
    if lost_then_kept:
        assert _verdict(bytes(image), None)[0] == "corrupt"
    # Damage inside the durable part (a frame before the durable LSN zeroed, intact frames after) refuses.
    if durable >= 2:
        victim = data.draw(st.integers(0, durable - 2), label="victim")
        damaged = bytearray(_segment(frames))
        damaged[offsets[victim]:offsets[victim] + len(frames[victim])] = bytes(len(frames[victim]))
        assert _verdict(bytes(damaged), durable)[0] == "corrupt"


def test_classify_table():
    stop_header = F.decode_frame_header(_frames(1)[0])
    bad = ScanStop(100, ChecksumError("x"), stop_header)
    garbage = ScanStop(100, ChecksumError("x"), None)
    assert classify(bad, False, True, True) == "corrupt"
    assert classify(bad, False, True, True, beyond_durable=True) == "torn"
    assert classify(garbage, False, True, True, beyond_durable=True) == "torn"
    assert classify(garbage, True, False, True, beyond_durable=True) == "end"
    assert classify(bad, False, True, False) == "corrupt"  # not the newest segment
    # ... unless past the durable LSN: a rotation's next segment may reach the disk before this one's frames
    assert classify(bad, False, True, False, beyond_durable=True) == "torn"
    assert classify(None, True, False, False, beyond_durable=True) == "corrupt"


def test_torn_header_of_a_new_segment_is_dropped_not_refused(tmp_path):
    """A power cut between writing a new segment's header and the fsync after it can leave part of the
    header; no frame is written before that fsync, so the file holds nothing: readers skip it, recovery
    deletes it."""
    directory = tmp_path / "wal"
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        while not log._sealed:
            fill(log, 50, size=1000)
        sealed_end = log._active.header.base_lsn
    newest = segment_paths(directory)[-1]
    header = F.encode_segment_header(F.SegmentHeader(2, sealed_end, 1))
    newest.write_bytes(header[:40] + bytes(MiB - 40))  # torn at byte 40, preallocated zeros after
    # HEAD as the writer left it just after the rotation (before any record went into the new segment).
    (directory / H.NAME).write_bytes(H.encode(H.Head(sealed_end - 1, 0, sealed_end, 64, sealed_end - 1)))
    assert [r.lsn for r in _drain(directory)] == list(range(1, sealed_end))
    result = run_cli("verify", "--dir", str(directory))
    assert result.returncode == 0, result.stdout + result.stderr
    with Log.open(directory, segment_bytes=MiB) as log:
        assert log.recovery.corruption is None and log.next_lsn == sealed_end
        assert log.append(Record.put(b"k", b"v")) == sealed_end

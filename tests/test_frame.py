"""Segment header, batch frame and seal codecs, and the FrameScanner over real files."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings, strategies as st

from walsvc import frame as F
from walsvc import record as R
from walsvc.errors import ChecksumError, IncompleteRecordError, InvalidRecordError
from walsvc.record import Record
from walsvc.segment import FrameScanner, find_valid_header, is_zero_from, read_seal, segment_name

pytestmark = pytest.mark.usefixtures("codec")  # every test on the pure-Python codecs and their compiled twins

U64 = st.integers(0, (1 << 64) - 1)
U32 = st.integers(0, (1 << 32) - 1)


def test_segment_header_round_trip_and_checks():
    h = F.SegmentHeader(7, 12345, 1_700_000_000_000_000)
    data = F.encode_segment_header(h)
    assert len(data) == F.SEGMENT_HEADER_SIZE == 64
    assert data[:8] == F.SEGMENT_MAGIC
    assert F.decode_segment_header(data) == h
    for i in range(8, 64):
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises((ChecksumError, InvalidRecordError)):
            F.decode_segment_header(bytes(bad))
    with pytest.raises(InvalidRecordError):
        F.decode_segment_header(b"X" + data[1:])
    with pytest.raises(IncompleteRecordError):
        F.decode_segment_header(data[:63])
    with pytest.raises(InvalidRecordError):
        F.decode_segment_header(bytes(64))


def test_segment_names_sort_in_log_order():
    lsns = [1, 9, 10, 99, 100, 12345, 10**12, 2**63]
    names = [segment_name(n) for n in lsns]
    assert sorted(names) == names
    assert all(len(n) == 24 for n in names)
    assert segment_name(1) == "00000000000000000001.wal"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.builds(Record.put, st.binary(max_size=50), st.binary(max_size=200)), max_size=30),
       st.integers(1, 1 << 62), U64, U64, U64)
def test_batch_frame_round_trip(recs, base, ts, pid, pseq):
    payload = R.encode_many(recs)
    frame = F.encode_frame(F.KIND_DATA, payload, len(recs), base, ts, pid, pseq)
    h = F.decode_frame_header(frame)
    assert (h.kind, h.payload_len, h.count, h.base_lsn, h.timestamp_us, h.producer_id, h.producer_seq) == \
        (F.KIND_DATA, len(payload), len(recs), base, ts, pid, pseq)
    assert h.size == len(frame) and h.end_lsn == base + len(recs)
    F.check_payload(h, frame, F.FRAME_HEADER_SIZE)
    out = R.decode_payload(frame[F.FRAME_HEADER_SIZE:], h.base_lsn, h.count, h.timestamp_us)
    assert [(r.key, r.value, r.lsn) for r in out] == [(r.key, r.value, base + i) for i, r in enumerate(recs)]
    # At a non-zero position inside a larger buffer too.
    pad = b"\0" * 13
    assert F.decode_frame_header(pad + frame, len(pad)) == h


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.data())
def test_frame_damage_detected(payload, data):
    frame = F.encode_frame(F.KIND_DATA, payload, 1, 5, 6)
    i = data.draw(st.integers(0, len(frame) - 1))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(frame)
    bad[i] ^= 1 << bit
    with pytest.raises((ChecksumError, InvalidRecordError)):
        h = F.decode_frame_header(bytes(bad))
        F.check_payload(h, bytes(bad), F.FRAME_HEADER_SIZE)
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(IncompleteRecordError):
        h = F.decode_frame_header(frame[:cut])
        F.check_payload(h, frame[:cut], F.FRAME_HEADER_SIZE)


def test_frame_header_rejects_unknown_kind_and_flags():
    import struct
    from crc32c import crc32c
    for kind, flags in ((3, 0), (0, 0), (1, 1)):
        head = F.FRAME.pack(F.FRAME_MAGIC, kind, flags, 0, 0, 0, 1, 0, 0, 0, crc32c(b""), 0)[:-4]
        head += struct.pack("<I", crc32c(head))
        with pytest.raises(InvalidRecordError) as info:
            F.decode_frame_header(head)
        assert "kind" in str(info.value)


windows = st.lists(st.builds(F.Appended, U64, U64, U32), max_size=4)


@settings(max_examples=150, deadline=None)
@given(U64, st.integers(1, 1 << 62), U64, U32, st.lists(st.tuples(U64, U64), max_size=20),
       st.dictionaries(st.integers(1, (1 << 64) - 1), windows, max_size=5), st.integers(64, 1 << 40), U64)
def test_seal_round_trip(last, next_lsn, count, crc, index, producers, offset, ts):
    seal = F.Seal(last, next_lsn, count, crc, sorted(index), producers)
    frame = F.encode_seal(seal, offset, ts)
    h = F.decode_frame_header(frame)
    assert h.kind == F.KIND_SEAL and h.count == 0 and h.base_lsn == next_lsn
    F.check_payload(h, frame, F.FRAME_HEADER_SIZE)
    back = F.decode_seal(h, frame[F.FRAME_HEADER_SIZE:])
    assert (back.last_lsn, back.next_lsn, back.record_count, back.data_crc) == (last, next_lsn, count, crc)
    assert [tuple(e) for e in back.index] == sorted(index)
    assert back.producers == producers
    assert back.sealed_us == ts
    assert F.seal_offset_from_trailer(frame[-8:]) == offset
    with pytest.raises(InvalidRecordError):
        F.decode_seal(h, frame[F.FRAME_HEADER_SIZE:-1])
    with pytest.raises(InvalidRecordError):  # bytes left over after the last field: not a seal this writer made
        F.decode_seal(h, frame[F.FRAME_HEADER_SIZE:] + bytes(8))


# -- the scanner over real files ---------------------------------------------------------------------------

def _write_segment(path, frames, tail_zeros=0):
    with open(path, "wb") as f:
        f.write(F.encode_segment_header(F.SegmentHeader(1, 1, 0)))
        for fr in frames:
            f.write(fr)
        f.write(b"\0" * tail_zeros)


def _frames(n, size=300):
    out = []
    lsn = 1
    for i in range(n):
        recs = [Record.put(f"k{lsn + j}".encode(), bytes([i % 256]) * size) for j in range(3)]
        out.append(F.encode_frame(F.KIND_DATA, R.encode_many(recs), 3, lsn, 1000 + i))
        lsn += 3
    return out


@pytest.mark.parametrize("chunk", [64, 100, 1000, 1 << 20])
def test_scanner_walks_frames_and_stops_at_zero_tail(tmp_path, chunk):
    frames = _frames(10)
    path = tmp_path / "seg.wal"
    _write_segment(path, frames, tail_zeros=5000)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        sc = FrameScanner(fd, F.SEGMENT_HEADER_SIZE, size, chunk=chunk)
        seen = [(off, h.base_lsn, bytes(data)) for off, h, data in sc]
        assert [s[2] for s in seen] == frames
        assert [s[1] for s in seen] == [1 + 3 * i for i in range(10)]
        assert sc.stop is not None and sc.stop.header is None
        assert sc.stop.offset == F.SEGMENT_HEADER_SIZE + sum(map(len, frames))
        assert is_zero_from(fd, sc.stop.offset, size)
        # Bounded memory: never more than one chunk or one frame buffered.
        assert len(sc._buf) <= max(chunk, max(map(len, frames)))
    finally:
        os.close(fd)


def test_scanner_stops_at_damage_with_header_kept(tmp_path):
    frames = _frames(5)
    path = tmp_path / "seg.wal"
    _write_segment(path, frames)
    third = F.SEGMENT_HEADER_SIZE + len(frames[0]) + len(frames[1])
    with open(path, "r+b") as f:
        f.seek(third + F.FRAME_HEADER_SIZE + 10)
        f.write(b"\xff")
    fd = os.open(path, os.O_RDONLY)
    try:
        sc = FrameScanner(fd, F.SEGMENT_HEADER_SIZE, os.fstat(fd).st_size)
        assert len(list(sc)) == 2
        assert sc.stop.offset == third
        assert isinstance(sc.stop.error, ChecksumError)
        assert sc.stop.header is not None and sc.stop.header.base_lsn == 7
        assert f"offset {third}" in str(sc.stop.error)
        # The frames after the damage are still findable (recovery uses this to call it corruption).
        assert find_valid_header(fd, third + 1, os.fstat(fd).st_size, 0) == third + len(frames[2])
        assert find_valid_header(fd, third + 1, os.fstat(fd).st_size, 1000) is None
    finally:
        os.close(fd)


@pytest.mark.parametrize("short", [1, 5])
def test_scanner_reports_frame_running_past_limit(tmp_path, short):
    frames = _frames(3)
    path = tmp_path / "seg.wal"
    _write_segment(path, frames)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - short)
    fd = os.open(path, os.O_RDONLY)
    try:
        sc = FrameScanner(fd, F.SEGMENT_HEADER_SIZE, size - short)
        assert len(list(sc)) == 2
        assert isinstance(sc.stop.error, IncompleteRecordError) and sc.stop.header.base_lsn == 7
    finally:
        os.close(fd)


def test_a_seal_is_found_only_at_the_very_end_of_its_file(tmp_path):
    """A sealed segment ends with its seal frame, whose last 8 bytes point back at it: bytes after it (here
    a copy of that pointer) mean the file is not as its writer left it, so it is not taken as sealed."""
    frames = _frames(2)
    offset = F.SEGMENT_HEADER_SIZE + sum(map(len, frames))
    seal = F.encode_seal(F.Seal(6, 7, 6, 0), offset, 2000)
    path = tmp_path / "seg.wal"
    _write_segment(path, frames + [seal])
    fd = os.open(path, os.O_RDONLY)
    try:
        found = read_seal(fd, path.stat().st_size)
        assert found is not None and found[1] == offset and found[0].next_lsn == 7
        with open(path, "ab") as f:
            f.write(seal[-8:])
        assert read_seal(fd, path.stat().st_size) is None
    finally:
        os.close(fd)


def test_is_zero():
    assert F.is_zero(b"") and F.is_zero(bytes(100)) and not F.is_zero(bytes(99) + b"\1")

"""The compiled twins of the per-batch codecs against their references: frame headers, HEAD, the writer's
check of an APPEND, and a reader's step over a whole DATA frame (walsvc/_record_c.c).

Each twin gives the reference's answer or declines (None), and the public function then runs the
reference, which names any error.  These tests feed the public function (twin first) and the reference the
same valid, damaged and random bytes and the same in- and out-of-range integers, and compare what they
return or raise.
"""

from __future__ import annotations

import collections
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from walsvc import frame as F, head as H, ingest, protocol as P, record as R
from walsvc.frame import Appended
from walsvc.ingest import IngestSession, Store
from walsvc.record import Record

C = R._c
pytestmark = pytest.mark.skipif(C is None and not os.environ.get("CI"),
                                reason="the compiled codec is not built here (no C compiler?)")
U64 = (1 << 64) - 1


def _outcome(fn, *args):
    """("ok", value, its type) or ("error", exception class, message): comparable across implementations."""
    try:
        value = fn(*args)
        return ("ok", value, type(value))
    except Exception as exc:  # the reference's own errors, whatever they are, must be the public function's
        return ("error", type(exc), str(exc))


def _flip(data: bytes, draw) -> bytes:
    """`data`, or a copy with one bit flipped, cut short, or with bytes overwritten."""
    how = draw(st.sampled_from(["none", "flip", "cut", "overwrite"]))
    if how == "none" or not data:
        return data
    i = draw(st.integers(0, len(data) - 1))
    if how == "flip":
        return data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
    if how == "cut":
        return data[:i]
    junk = draw(st.binary(min_size=1, max_size=8))
    return data[:i] + junk + data[i + len(junk):]


def _uint(bits: int):
    """Integers in range, at its edges, and just outside it (the reference raises there; the twin declines)."""
    top = (1 << bits) - 1
    return st.one_of(st.integers(0, top), st.sampled_from([0, top, top + 1, -1, 1 << 70]))


FRAME_FIELDS = [_uint(8), _uint(32), _uint(32), _uint(64), _uint(64), _uint(64), _uint(64), _uint(32)]


@settings(max_examples=500, deadline=None)
@given(st.tuples(*FRAME_FIELDS))
def test_frame_header_encoding_agrees(fields):
    assert _outcome(F.encode_frame_header, *fields) == _outcome(F.encode_frame_header_py, *fields)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.builds(bytearray, st.binary(max_size=8))),
       st.tuples(_uint(32), _uint(64), _uint(64), _uint(64), _uint(64), _uint(32)))
def test_the_data_frame_header_and_running_crc_agree(payload, fields):
    """The log's per-batch step: the DATA frame header and the segment's data CRC continued over the frame
    (a bytearray payload, which the twin declines, too)."""
    assert (_outcome(F.data_frame_header, payload, *fields)
            == _outcome(F.data_frame_header_py, payload, *fields))


def test_the_running_crc_is_the_crc_of_the_frames_end_to_end() -> None:
    """What the seal stores: the data CRC after two frames is the CRC of both frames' bytes."""
    h1, crc = F.data_frame_header(b"one", 1, 10, 5, 0, 0, 0)
    h2, crc = F.data_frame_header(b"two!", 1, 11, 6, 7, 8, crc)
    assert crc == R.crc32c(h1 + b"one" + h2 + b"two!")
    assert h2 == F.encode_frame_header_py(F.KIND_DATA, 4, 1, 11, 6, 7, 8, R.crc32c(b"two!"))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([F.KIND_DATA, F.KIND_SEAL, 0, 3]), st.tuples(*[st.integers(0, (1 << b) - 1) for b in
                                                                      (32, 32, 64, 64, 64, 64, 32)]),
       st.binary(max_size=20), st.data())
def test_frame_header_decoding_agrees_on_valid_damaged_and_shifted_headers(kind, fields, prefix, data):
    buf = prefix + _flip(F.encode_frame_header_py(kind, *fields), data.draw) + data.draw(st.binary(max_size=8))
    pos = data.draw(st.sampled_from([len(prefix), 0, len(buf)]))
    assert _outcome(F.decode_frame_header, buf, pos) == _outcome(F.decode_frame_header_py, buf, pos)
    view = memoryview(buf)
    assert _outcome(F.decode_frame_header, view, pos) == _outcome(F.decode_frame_header_py, view, pos)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_frame_header_decoding_agrees_on_random_bytes(data):
    assert _outcome(F.decode_frame_header, data) == _outcome(F.decode_frame_header_py, data)


def test_a_valid_frame_header_decodes_to_the_named_tuple() -> None:
    header = F.encode_frame_header(F.KIND_DATA, 100, 3, 77, 123, U64, 5, 0xDEADBEEF)
    h = F.decode_frame_header(header)
    assert type(h) is F.FrameHeader and h == F.FrameHeader(F.KIND_DATA, 100, 3, 77, 123, U64, 5, 0xDEADBEEF)
    assert h.size == F.FRAME_HEADER_SIZE + 100 and h.end_lsn == 80


@settings(max_examples=500, deadline=None)
@given(st.tuples(*[_uint(64)] * 5))
def test_head_encoding_agrees(fields):
    head = H.Head(*fields)
    assert _outcome(H.encode, head) == _outcome(H.encode_py, head)


@settings(max_examples=500, deadline=None)
@given(st.tuples(*[st.integers(0, U64)] * 5), st.data())
def test_head_decoding_agrees_on_valid_and_damaged_heads(fields, data):
    raw = _flip(H.encode_py(H.Head(*fields)), data.draw) + data.draw(st.binary(max_size=4))
    fast, slow = _outcome(H.decode, raw), _outcome(H.decode_py, raw)
    assert fast == slow
    if raw[:H.SIZE] == H.encode_py(H.Head(*fields)):
        assert fast == ("ok", H.Head(*fields), H.Head)
    else:  # damaged or cut short: no HEAD at all (agreeing alone would pass a reference that lost its CRC check)
        assert fast == ("ok", None, type(None))


# -- the writer's APPEND check ---------------------------------------------------------------------------

records = st.builds(Record, key=st.binary(max_size=40), value=st.binary(max_size=200), tombstone=st.booleans(),
                    ttl_ms=st.none() | st.integers(0, U64), compression=st.sampled_from([None, None, None, "zstd"]))


def _decide(session: IngestSession, msg: bytes, windows) -> object:
    decision = session.decide(msg, windows)
    return (type(decision).__name__, tuple(decision) if isinstance(decision, tuple) else decision)


def _decide_both(session: IngestSession, msg: bytes, windows) -> tuple[object, object]:
    fast = _decide(session, msg, windows)
    saved, ingest._c = ingest._c, None
    try:
        slow = _decide(session, msg, windows)
    finally:
        ingest._c = saved
    return fast, slow


def _window(last_seq: int | None):
    if last_seq is None:
        return lambda pid: None
    q = collections.deque([Appended(s, 1000 + s, 1) for s in range(max(1, last_seq - 3), last_seq + 1)], maxlen=4)
    return lambda pid: q


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, min_size=0, max_size=6), st.data())
def test_the_append_check_agrees_with_the_reference_decision(recs, data):
    draw = data.draw
    payload = R.encode_many(recs)
    pid = draw(st.sampled_from([0, 1, U64, 0x1234]))
    seq = draw(st.sampled_from([0, 1, 2, 7, U64]))
    count = draw(st.sampled_from([len(recs), len(recs) + 1, max(0, len(recs) - 1), 0]))
    header = P.APPEND.pack(draw(st.sampled_from([P.APPEND_MAGIC, b"WX"])), draw(st.sampled_from([1, 1, 2])),
                           draw(st.sampled_from([1, 1, 0])), pid, seq, count, draw(st.sampled_from([0, 0, 1])))
    msg = _flip(header + payload, draw) if draw(st.booleans()) else header + payload
    session = IngestSession(max_batch_bytes=draw(st.sampled_from([64, 4096, 1 << 20])),
                            max_record_bytes=draw(st.sampled_from([32, 1024, 1 << 20])))
    windows = _window(draw(st.sampled_from([None, seq - 1, seq, seq + 3, seq - 5])))
    fast, slow = _decide_both(session, msg, windows)
    assert fast == slow


def test_the_append_check_takes_the_common_case_and_declines_compressed_values() -> None:
    plain = R.encode_many([Record.put(b"k", b"v" * 50), Record.put(b"", b"x")])
    msg = P.encode_append(9, 1, 2, plain)
    assert C.check_append(msg, 1 << 20, 1 << 20) == (9, 1, plain, 2)
    squeezed = R.encode_many([Record.put(b"k", b"v" * 500, compression="zstd")])
    assert C.check_append(P.encode_append(9, 1, 1, squeezed), 1 << 20, 1 << 20) is None
    decision = IngestSession(max_batch_bytes=1 << 20, max_record_bytes=1 << 20).decide(
        P.encode_append(9, 1, 1, squeezed), lambda pid: None)
    assert decision == Store(9, 1, squeezed, 1)
    assert C.check_append(struct.pack("<2sBBQQII", b"WS", 1, 1, 9, 1, 1, 0), 1 << 20, 1 << 20) is None  # no record


@settings(max_examples=500, deadline=None)
@given(st.integers(0, U64), st.sampled_from([P.ACK, P.DUPLICATE, P.NACK, P.READY, 7]), st.integers(0, U64),
       st.integers(0, U64), st.integers(0, (1 << 32) - 1), st.sampled_from(["", "", "malformed: x", "é"]),
       st.data())
def test_reply_decoding_agrees_on_valid_damaged_and_foreign_replies(pid, status, seq, base, count, detail, data):
    raw = _flip(P.encode_reply(P.Reply(pid, status, seq, base, count, detail)), data.draw)
    fast, slow = _outcome(P.decode_reply, raw), _outcome(P.decode_reply_py, raw)
    assert fast == slow
    if fast[0] == "ok":
        assert type(fast[1].detail) is str


def test_an_ack_decodes_to_the_named_tuple() -> None:
    reply = P.decode_reply(P.encode_ack(5, 7, 100, 3))
    assert type(reply) is P.Reply and reply == P.Reply(5, P.ACK, 7, 100, 3, "")
    assert C.decode_reply(P.Reply, P.encode_ack(5, 7, 100, 3)[:-1]) is None


# -- a tailing reader's whole-frame step (segment.FrameScanner.take_data_frame) ------------------------------

def _data_frame_reference(buf: bytes, pos: int, end: int, next_lsn: int, bound: int, max_record_bytes: int):
    """What the Python scan takes for a plain DATA frame at buf[pos:end] (scan.LogReader._step): its records
    from next_lsn on, size, end LSN and payload length; None where the step does anything else."""
    try:
        h = F.decode_frame_header_py(buf[:end], pos)
    except R.RecordError:
        return None
    if (h.kind != F.KIND_DATA or pos + h.size > end or (bound >= 0 and h.base_lsn > bound)
            or h.end_lsn <= next_lsn):
        return None
    start = pos + F.FRAME_HEADER_SIZE
    if R.crc32c(buf[start:start + h.payload_len]) != h.payload_crc:
        return None
    try:
        records = R.decode_payload_py(buf, h.base_lsn, h.count, h.timestamp_us, next_lsn, start=start,
                                      end=start + h.payload_len, max_record_bytes=max_record_bytes)
    except R.RecordError:
        return None
    return records, h.size, h.end_lsn, h.payload_len


RECORDS = st.lists(st.one_of(
    st.builds(Record.put, st.binary(max_size=12), st.binary(max_size=40)),
    st.builds(lambda k, v, t: Record.put(k, v, ttl_ms=t), st.binary(max_size=8), st.binary(max_size=8),
              st.integers(1, 1 << 40)),
    st.builds(Record.delete, st.binary(min_size=1, max_size=8)),
    st.builds(lambda v: Record.put(b"z", v, compression="zstd"), st.binary(max_size=64))), min_size=1, max_size=6)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(RECORDS, st.sampled_from([F.KIND_DATA, F.KIND_SEAL]), st.integers(1, 1 << 40), st.binary(max_size=16),
       st.data())
def test_the_whole_frame_step_agrees_with_the_python_scan(records, kind, base, prefix, data):
    payload = b"".join(R.encode(r) for r in records)
    frame = F.encode_frame(kind, payload, len(records), base, data.draw(st.integers(0, U64)))
    buf = prefix + _flip(frame, data.draw) + data.draw(st.binary(max_size=64))
    pos = data.draw(st.sampled_from([len(prefix), 0, len(prefix) + 1, len(buf)]))
    end = data.draw(st.sampled_from([len(buf), len(prefix) + len(frame), len(prefix) + len(frame) - 1,
                                     len(buf) + 100]))
    next_lsn = data.draw(st.sampled_from([1, base, base + 1, base + len(records) - 1, base + len(records)]))
    bound = data.draw(st.sampled_from([-1, base - 1, base, base + 10]))
    limit = data.draw(st.sampled_from([R.DEFAULT_MAX_RECORD_BYTES, 20]))
    want = _data_frame_reference(buf, pos, min(end, len(buf)), next_lsn, bound, limit)
    got = C.data_frame(buf, pos, end, next_lsn, bound, limit)
    if got is None:
        # The twin declines only what the reference does not take, a frame holding a compressed value, or one
        # with a record over the limit (which the reference's inlined path for small records lets through).
        assert want is None or any(r.compression or len(r.key) + len(r.value) > limit for r in records), want
    else:
        assert got == want
        assert all(type(r) is R._ReadRecord for r in got[0])


def test_the_whole_frame_step_reads_what_the_scan_reads(tmp_path) -> None:
    """A log of several segments read by a LogReader through the compiled step and through the Python scan
    alone gives the same records, the ones written; the step takes every plain frame, and the frames it
    declines (a compressed value, a seal) are read the Python way."""
    import dataclasses

    from walsvc import segment
    from walsvc.config import LogConfig
    from walsvc.log import Log
    from walsvc.scan import LogReader

    log = Log.open(tmp_path, config=dataclasses.replace(LogConfig(), fsync="os", segment_bytes=1 << 20))
    written = []
    for i in range(200):
        batch = [Record.put(b"k%d" % i, os.urandom(i % 50 * 200)) for _ in range(1 + i % 3)]
        if i % 20 == 0:
            batch.append(Record.put(b"z", b"v" * 100, compression="zstd"))
        written += batch
        log.append_batch(batch)
    bound = log.committed_lsn
    log.close()
    assert len(list(tmp_path.glob("*.wal"))) >= 2, list(tmp_path.iterdir())  # a seal to cross

    def read_all(twin) -> tuple[list, int]:
        original, taken = segment.FrameScanner.take_data_frame, [0]

        def counted(self, *args):
            got = original(self, *args)
            taken[0] += got is not None
            return got

        segment._c, segment.FrameScanner.take_data_frame = twin, counted
        try:
            reader = LogReader(tmp_path, "earliest", bound=lambda: bound)
            out = []
            while batch := reader.read_batch():
                out += batch
            reader.close()
            return out, taken[0]
        finally:
            segment._c, segment.FrameScanner.take_data_frame = C, original

    compiled, steps = read_all(C)
    python, none = read_all(None)
    assert compiled == python
    assert [(r.key, r.value, r.lsn) for r in compiled] == [(w.key, w.value, i + 1) for i, w in enumerate(written)]
    assert none == 0 and steps == 190  # the 200 frames but the 10 holding a zstd value

"""The nori-wal v1 record codec: golden vectors, every rejection with its own class, compression, properties."""

from __future__ import annotations

import sys

import pytest
import zstandard
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings, strategies as st

from walsvc import record as R
from walsvc.errors import (ChecksumError, CompressionUnavailableError, DecompressionError, IncompleteRecordError,
                           InvalidRecordError, RecordError, RecordTooLargeError, VarintOverflowError)
from walsvc.record import Record

try:
    import lz4.block  # noqa: F401  (optional: the 'lz4' extra)
    CODECS = [None, "zstd", "lz4"]
except ImportError:
    CODECS = [None, "zstd"]
needs_lz4 = pytest.mark.skipif("lz4" not in CODECS, reason="the optional lz4 package is not installed")

pytestmark = pytest.mark.usefixtures("codec")  # every test on both codecs: pure Python and compiled

ERRORS = {"checksum": ChecksumError, "incomplete": IncompleteRecordError, "invalid": InvalidRecordError}
U64 = (1 << 64) - 1


def _with_crc(body: bytes) -> bytes:
    return body + crc32c(body).to_bytes(4, "little")


def _vector_record(v: dict) -> Record:
    return Record(bytes.fromhex(v["key_hex"]), bytes.fromhex(v["value_hex"]), tombstone=v["tombstone"],
                  ttl_ms=v["ttl_ms"], compression=None if v["compression"] == "none" else v["compression"])


# -- golden vectors ---------------------------------------------------------------------------------------

def test_vectors_file_is_complete(vectors):
    assert len(vectors["valid"]) >= 5 and len(vectors["invalid"]) >= 4
    assert {v["error"] for v in vectors["invalid"]} >= {"checksum", "incomplete", "invalid", "checksum-or-end"}


def test_vector_encode_gives_exact_bytes(vectors):
    for v in vectors["valid"]:
        expected = bytes.fromhex(v["encoded_hex"])
        assert R.encode(_vector_record(v)) == expected, v["name"]
        if not v["tombstone"] and v["ttl_ms"] is None and v["compression"] == "none":
            assert R.encode_put(bytes.fromhex(v["key_hex"]), bytes.fromhex(v["value_hex"])) == expected
        assert R.encode_many([_vector_record(v)] * 2) == expected * 2, v["name"]


def test_vector_decode_gives_fields(vectors):
    for v in vectors["valid"]:
        data = bytes.fromhex(v["encoded_hex"])
        rec, end = R.decode(data)
        assert end == len(data), v["name"]
        assert rec.key == bytes.fromhex(v["key_hex"]), v["name"]
        assert rec.value == bytes.fromhex(v["value_hex"]), v["name"]
        assert rec.tombstone is v["tombstone"], v["name"]
        assert rec.ttl_ms == v["ttl_ms"], v["name"]
        assert rec.compression == (None if v["compression"] == "none" else v["compression"])
        assert rec.version is None
        assert R.count_records(data, 0, len(data)) == 1


def test_vector_invalid_cases_raise_their_class(vectors):
    for v in vectors["invalid"]:
        data = bytes.fromhex(v["encoded_hex"])
        if v["error"] == "checksum-or-end":
            # All-zero bytes (a preallocated tail) must never decode as a record.
            with pytest.raises(ChecksumError):
                R.decode(data)
            continue
        cls = ERRORS[v["error"]]
        with pytest.raises(cls) as info:
            R.decode(data)
        assert type(info.value) is cls, (v["name"], info.value)  # not a subclass standing in for it
        with pytest.raises(cls):
            R.count_records(data, 0, len(data))


def test_all_zero_record_is_checksum_error_at_any_length():
    for n in range(7, 40):
        with pytest.raises(ChecksumError):
            R.decode(b"\0" * n)
    for n in range(1, 7):
        with pytest.raises(IncompleteRecordError):
            R.decode(b"\0" * n)


# -- rejections ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bit", [0x20, 0x40, 0x80])
def test_unknown_flag_bits_rejected_with_offset(bit):
    good = R.encode(Record.put(b"k", b"v"))
    bad = _with_crc(bytes((1, 1, bit)) + b"kv")
    buf = good + bad
    with pytest.raises(InvalidRecordError) as info:
        list(R.iter_decode(buf))
    assert type(info.value) is InvalidRecordError
    assert info.value.offset == len(good)
    assert f"offset {len(good)}" in str(info.value)
    assert f"0x{bit:02x}" in str(info.value)
    with pytest.raises(InvalidRecordError):
        R.count_records(buf, 0, len(buf))


@pytest.mark.parametrize("varint", [
    b"\x80\x00",                     # zero in two bytes
    b"\xff\x80\x00",                 # 127 padded with a zero continuation
    b"\x80" * 10 + b"\x01",          # eleven bytes
    b"\xff" * 9 + b"\x02",           # ten bytes but above 2**64-1
])
def test_overlong_varints_rejected(varint):
    with pytest.raises(VarintOverflowError) as info:
        R.decode_varint(varint, 0, len(varint))
    assert info.value.offset == 0
    # As a key length inside a record, at a non-zero offset: the message names where the record is.
    prefix = R.encode(Record.put(b"a", b"b"))
    buf = prefix + varint + b"\x00\x00" + b"\0" * 20
    with pytest.raises(VarintOverflowError) as info:
        list(R.iter_decode(buf))
    assert f"offset {len(prefix)}" in str(info.value)
    # TTL varints go through the same check.
    ttl_rec = _with_crc(b"\x01\x01\x02" + varint + b"kv")
    with pytest.raises(VarintOverflowError):
        R.decode(ttl_rec)


def test_varint_round_trip_edges():
    for n in [0, 1, 127, 128, 255, 16383, 16384, (1 << 32) - 1, 1 << 35, (1 << 63), U64]:
        enc = R.encode_varint(n)
        assert R.decode_varint(enc, 0, len(enc)) == (n, len(enc))
    assert len(R.encode_varint(U64)) == 10
    with pytest.raises(IncompleteRecordError):
        R.decode_varint(b"\x80\x80", 0, 2)


def test_length_above_max_record_bytes_rejected():
    rec = R.encode(Record.put(b"key", b"x" * 2000))
    assert R.decode(rec, max_record_bytes=2003)[0].value == b"x" * 2000
    with pytest.raises(RecordTooLargeError) as info:
        R.decode(rec, max_record_bytes=2002)
    assert "2002" in str(info.value)
    assert info.value.offset == 0 and "offset 0" in str(info.value)
    # A header claiming a huge length is rejected before anything is read or allocated.
    huge = R.encode_varint(0) + R.encode_varint(R.DEFAULT_MAX_RECORD_BYTES + 1) + b"\x00"
    pad = R.encode(Record.put(b"", b""))
    with pytest.raises(RecordTooLargeError) as info:
        R.decode(pad + huge + b"\0" * 8, len(pad))
    assert info.value.offset == len(pad) and f"offset {len(pad)}" in str(info.value)
    with pytest.raises(RecordTooLargeError):
        R.encode(Record.put(b"k" * 600, b"v" * 600), max_record_bytes=1024)
    with pytest.raises(RecordTooLargeError):
        R.count_records(rec, 0, len(rec), max_record_bytes=1024)


def test_error_classes_are_distinct():
    assert issubclass(VarintOverflowError, InvalidRecordError)
    assert issubclass(RecordTooLargeError, InvalidRecordError)
    assert not issubclass(ChecksumError, InvalidRecordError)
    assert not issubclass(IncompleteRecordError, InvalidRecordError)
    for cls in (ChecksumError, IncompleteRecordError, InvalidRecordError, DecompressionError):
        assert issubclass(cls, RecordError)


def test_checksum_error_on_any_flipped_bit():
    data = R.encode(Record.put(b"user:1", b"alice", ttl_ms=5))
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(RecordError):
                R.decode(bytes(bad))


# -- compression -----------------------------------------------------------------------------------------

def test_zstd_without_content_size_decodes():
    value = b"hello world " * 500
    for packed in (zstandard.ZstdCompressor(write_content_size=False).compress(value),
                   _stream_compress(value)):
        assert zstandard.get_frame_parameters(packed).content_size == zstandard.CONTENTSIZE_UNKNOWN
        data = _with_crc(b"\x01" + R.encode_varint(len(packed)) + bytes((2 << 2,)) + b"k" + packed)
        rec, end = R.decode(data)
        assert end == len(data)
        assert rec.value == value and rec.compression == "zstd"


def _stream_compress(value: bytes) -> bytes:
    c = zstandard.ZstdCompressor().compressobj()
    return c.compress(value) + c.flush()


def test_zstd_large_value_decodes_completely():
    """A value larger than zstd's internal block/output buffer must come back whole, not cut short."""
    value = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4
    data = R.encode(Record.put(b"k", value, compression="zstd"))
    assert len(data) < len(value)
    assert R.decode(data)[0].value == value


def test_zstd_decompressed_size_limit():
    value = b"\0" * 5000
    data = R.encode(Record.put(b"k", value, compression="zstd"))
    assert len(data) < 200
    with pytest.raises(RecordTooLargeError) as info:
        R.decode(data, max_record_bytes=4096)
    assert "offset 0" in str(info.value)


def test_zstd_garbage_is_decompression_error():
    data = _with_crc(b"\x01\x05" + bytes((2 << 2,)) + b"k" + b"\x01\x02\x03\x04\x05")
    with pytest.raises(DecompressionError):
        R.decode(data)


@pytest.mark.parametrize("codec", ["zstd", pytest.param("lz4", marks=needs_lz4)])
def test_compression_that_does_not_shrink_is_skipped(codec):
    incompressible = bytes(range(7, 40))  # short and without repeats: any codec output is longer
    data = R.encode(Record.put(b"k", incompressible, compression=codec))
    assert data[2] & R.FLAG_COMPRESSION_MASK == 0  # flag clear
    assert data == R.encode(Record.put(b"k", incompressible))
    rec = R.decode(data)[0]
    assert rec.value == incompressible and rec.compression is None
    shrinks = R.encode(Record.put(b"k", b"a" * 1000, compression=codec))
    assert (shrinks[_flags_pos(shrinks)] & R.FLAG_COMPRESSION_MASK) >> 2 == R.COMPRESSION_CODES[codec]
    assert R.decode(shrinks)[0].value == b"a" * 1000


def test_lz4_round_trip_when_installed():
    pytest.importorskip("lz4.block")
    value = b"lz4 value " * 300
    data = R.encode(Record.put(b"key", value, compression="lz4"))
    rec = R.decode(data)[0]
    assert rec.value == value and rec.compression == "lz4"
    import lz4.block
    # The stored value is varint(uncompressed size) + a raw LZ4 block (nori-wal layout).
    _, pos = R.decode_varint(data, 1, len(data))  # vlen
    stored = data[pos + 1 + 3:-4]
    size, p = R.decode_varint(stored, 0, len(stored))
    assert size == len(value)
    assert lz4.block.decompress(stored[p:], uncompressed_size=size) == value


def _handmade_lz4_record() -> bytes:
    """An LZ4 record built by hand (no lz4 package needed): varint(size) + a literal-only LZ4 block."""
    stored = R.encode_varint(5) + b"\x50hello"  # token: 5 literals, no match
    return _with_crc(b"\x01" + R.encode_varint(len(stored)) + bytes((1 << 2,)) + b"k" + stored)


def test_lz4_handmade_block_decodes_when_installed():
    pytest.importorskip("lz4.block")
    rec = R.decode(_handmade_lz4_record())[0]
    assert (rec.key, rec.value, rec.compression) == (b"k", b"hello", "lz4")


def _assert_lz4_unavailable(data: bytes, prefix: bytes) -> None:
    with pytest.raises(CompressionUnavailableError) as info:
        list(R.iter_decode(prefix + data))
    assert "pip install" in str(info.value) and "lz4" in str(info.value)
    assert f"offset {len(prefix)}" in str(info.value)
    with pytest.raises(CompressionUnavailableError):
        R.encode(Record.put(b"key", b"x" * 500, compression="lz4"))
    # Uncompressed and zstd records still decode without lz4.
    assert R.decode(prefix)[0].value == b"b"
    assert R.decode(R.encode(Record.put(b"k", b"z" * 300, compression="zstd")))[0].value == b"z" * 300


@pytest.mark.skipif("lz4" in CODECS, reason="lz4 is installed (the test below simulates its absence)")
def test_lz4_really_unavailable_raises_compression_unavailable():
    _assert_lz4_unavailable(_handmade_lz4_record(), R.encode(Record.put(b"a", b"b")))


def test_lz4_unavailable_raises_compression_unavailable(monkeypatch):
    prefix = R.encode(Record.put(b"a", b"b"))
    monkeypatch.setitem(sys.modules, "lz4", None)  # import lz4 now fails, installed or not
    monkeypatch.setitem(sys.modules, "lz4.block", None)
    _assert_lz4_unavailable(_handmade_lz4_record(), prefix)


def test_put_rejects_bad_arguments():
    with pytest.raises(InvalidRecordError):
        Record.put(b"k", b"v", compression="snappy")
    with pytest.raises(InvalidRecordError):
        Record.put(b"k", b"v", ttl_ms=-1)
    with pytest.raises(InvalidRecordError):
        Record.put(b"k", 5)  # type: ignore[arg-type]
    assert Record.put("ключ", "值").key == "ключ".encode()
    with pytest.raises(InvalidRecordError, match="ttl_ms"):
        Record.put(b"k", b"v", ttl_ms=True)  # a bool is no TTL (it was stored as 1 ms)


@pytest.mark.parametrize("field,value", [("ttl_ms", 2 ** 70), ("ttl_ms", -5), ("ttl_ms", 1.5), ("ttl_ms", True),
                                         ("version", (1,)), ("version", (1, -1)), ("version", [1, 2]),
                                         ("version", (1, 2 ** 64))])
def test_a_record_built_directly_with_a_field_the_format_cannot_hold_is_refused(field, value):
    """`Record(...)` skips `Record.put`'s checks: encode refuses what v1 cannot hold, by name.  Before, a TTL
    of 2**70 went out and the writer refused the whole batch (every other caller's records in it too), and
    the others raised ValueError or IndexError."""
    with pytest.raises(InvalidRecordError, match=field):
        R.encode(Record(b"k", b"v", **{field: value}))
    with pytest.raises(InvalidRecordError, match=field):
        R.encode_many([Record(b"ok", b"v"), Record(b"k", b"v", **{field: value})])


# -- properties ------------------------------------------------------------------------------------------

records = st.builds(
    Record,
    key=st.binary(max_size=300),
    value=st.one_of(st.binary(max_size=300), st.binary(max_size=8).map(lambda b: b * 200)),
    tombstone=st.booleans(),
    ttl_ms=st.none() | st.integers(0, U64),
    compression=st.sampled_from(CODECS),
    version=st.none() | st.tuples(st.integers(0, U64), st.integers(0, U64)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_record_round_trip(rec):
    data = R.encode(rec)
    out, end = R.decode(data)
    assert end == len(data)
    assert (out.key, out.value, out.tombstone, out.ttl_ms, out.version) == \
        (rec.key, rec.value, rec.tombstone, rec.ttl_ms, rec.version)
    code = (data[_flags_pos(data)] & R.FLAG_COMPRESSION_MASK) >> 2
    assert out.compression == R.COMPRESSION_NAMES[code]
    if code:  # compressed only when that made it smaller
        assert rec.compression == R.COMPRESSION_NAMES[code]
    assert R.count_records(data, 0, len(data)) == 1
    # Decoding without the CRC check gives the same record.
    assert R.decode(data, verify_crc=False)[0] == out


def _flags_pos(data: bytes) -> int:
    _, p = R.decode_varint(data, 0, len(data))
    _, p = R.decode_varint(data, p, len(data))
    return p


@settings(max_examples=150, deadline=None)
@given(st.lists(records, max_size=20), st.integers(1, 1 << 40), st.integers(0, 1 << 50))
def test_batch_payload_round_trip(recs, base, ts):
    payload = R.encode_many(recs)
    assert R.count_records(payload, 0, len(payload)) == len(recs)
    out = R.decode_payload(payload, base, len(recs), ts)
    assert [r.lsn for r in out] == list(range(base, base + len(recs)))
    assert all(r.timestamp == ts for r in out)
    assert [(r.key, r.value, r.tombstone, r.ttl_ms, r.version) for r in out] == \
        [(r.key, r.value, r.tombstone, r.ttl_ms, r.version) for r in recs]
    if recs:
        skip = len(recs) // 2
        tail = R.decode_payload(payload, base, len(recs), ts, base + skip)
        assert [r.lsn for r in tail] == list(range(base + skip, base + len(recs)))
        with pytest.raises(InvalidRecordError):
            R.decode_payload(payload, base, len(recs) + 1, ts)


@settings(max_examples=200, deadline=None)
@given(st.lists(records, min_size=1, max_size=5), st.data())
def test_payload_cut_inside_a_record_is_rejected(recs, data):
    """A payload cut short anywhere inside its last record never yields that record."""
    payload = R.encode_many(recs)
    last_start = len(R.encode_many(recs[:-1]))
    cut = data.draw(st.integers(last_start + 1, len(payload) - 1))
    assert R.count_records(payload, 0, last_start) == len(recs) - 1
    with pytest.raises((IncompleteRecordError, ChecksumError)) as info:
        R.count_records(payload, 0, cut)
    assert last_start <= info.value.offset <= cut  # the record, or the varint inside it
    with pytest.raises(RecordError):
        list(R.iter_decode(payload, 0, cut))


def _outcome(fn):
    try:
        return fn()
    except R.RecordError as exc:
        return type(exc)


@settings(max_examples=400, deadline=None)
@given(st.lists(records, max_size=3), st.data())
def test_one_header_parser_decode_and_validation_agree(recs, data):
    """decode (record by record) and the writer's check (count_records_py) share `parse_header`: on any
    payload, one damaged byte or none, they accept the same records or reject with the same error class."""
    payload = bytearray(R.encode_many(recs))
    if payload and data.draw(st.booleans(), label="damage"):
        at = data.draw(st.integers(0, len(payload) - 1), label="at")
        payload[at] = data.draw(st.integers(0, 255), label="byte")
    payload = bytes(payload)
    walked = _outcome(lambda: R.count_records_py(payload, 0, len(payload)))
    decoded = _outcome(lambda: len(list(R.iter_decode(payload))))
    assert walked == decoded
    if isinstance(walked, int):
        assert R.decode_payload_py(payload, 1, walked, 0) == list(R.iter_decode(payload))

"""Every decoder, fed any bytes, returns a value or raises a documented walsvc error (a WalError subclass):
never IndexError, struct.error, ValueError, RecursionError, MemoryError or a zstd/lz4 exception.

Inputs are random bytes and, more usefully, valid encodings (records of every kind, compressed ones included;
frames; seals; wire messages) with bits flipped, bytes overwritten, cut short or extended.  The budget is
FUZZ_EXAMPLES examples per test (docs/GUARANTEES.md records it); scripts can raise it with
WALSVC_FUZZ_EXAMPLES.
"""

from __future__ import annotations

import os
import struct

import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from walsvc import frame as F
from walsvc import protocol as P
from walsvc import record as R
from walsvc.errors import WalError
from walsvc.record import Record

FUZZ_EXAMPLES = int(os.environ.get("WALSVC_FUZZ_EXAMPLES", "400"))
fuzz = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SMALL_LIMIT = 4096  # small limits so that bombs and long claims are reached often


def _codecs() -> list[str | None]:
    try:
        import lz4.block  # noqa: F401
        return [None, "zstd", "lz4"]
    except ImportError:
        return [None, "zstd"]


records = st.builds(
    Record,
    key=st.binary(max_size=40),
    value=st.one_of(st.binary(max_size=60), st.binary(min_size=1, max_size=6).map(lambda b: b * 300)),
    tombstone=st.booleans(),
    ttl_ms=st.none() | st.integers(0, 2**64 - 1),
    compression=st.sampled_from(_codecs()),
    version=st.none() | st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
)


def _zstd_values() -> st.SearchStrategy[bytes]:
    """Raw zstd frames (with and without a content size) as record values, so that mutation hits them."""
    def frame(value: bytes, with_size: bool) -> bytes:
        return zstandard.ZstdCompressor(write_content_size=with_size, write_checksum=not with_size).compress(value)
    return st.builds(frame, st.binary(max_size=300).map(lambda b: b * 3), st.booleans())


def _raw_compressed(value: bytes, code: int) -> bytes:
    body = b"\x01" + R.encode_varint(len(value)) + bytes((code << 2,)) + b"k" + value
    return body + struct.pack("<I", R.crc32c(body))


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding, then a few flips, overwrites, cuts or extensions."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "byte", "cut", "extend", "insert"]))
        if op == "extend" or not data:
            data += draw(st.binary(min_size=1, max_size=16))
        elif op == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[draw(st.integers(0, len(data) - 1))] = draw(st.sampled_from([0, 0x7F, 0x80, 0xFF]))
        elif op == "cut":
            del data[draw(st.integers(0, len(data) - 1)):]
        else:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _fix_crcs(data: bytes) -> bytes:
    """Re-seal the last record's CRC so that mutations reach the decompressor instead of the CRC check."""
    return data[:-4] + struct.pack("<I", R.crc32c(data[:-4])) if len(data) > 4 else data


record_bytes = st.one_of(
    st.binary(max_size=200),
    mutated(st.lists(records, min_size=1, max_size=4).map(R.encode_many)),
    mutated(st.builds(_raw_compressed, _zstd_values(), st.just(2))).map(_fix_crcs),
    mutated(st.builds(lambda r: R.encode(r), records)).map(_fix_crcs),
)


def _documented(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except WalError:
        return None


@fuzz
@given(record_bytes, st.integers(0, 8), st.sampled_from([SMALL_LIMIT, R.DEFAULT_MAX_RECORD_BYTES]))
def test_record_decoders_raise_only_walsvc_errors(data, count, limit):
    _documented(R.decode, data, max_record_bytes=limit)
    _documented(R.decode, data, max_record_bytes=limit, verify_crc=False)
    _documented(lambda: list(R.iter_decode(data, max_record_bytes=limit)))
    _documented(R.count_records, data, 0, len(data), max_record_bytes=limit, max_batch_bytes=2 * limit)
    _documented(R.decode_payload, data, 1, count, 0, max_record_bytes=limit, max_batch_bytes=2 * limit)
    _documented(R.decode_varint, data, 0, len(data))


@fuzz
@given(record_bytes)
def test_count_records_and_decode_payload_agree(data):
    """What ingest accepts, a reader decodes: the same records, none lost, none invented."""
    n = _documented(R.count_records, data, 0, len(data))
    if n is not None:
        out = R.decode_payload(data, 1, n, 0)
        assert len(out) == n
        assert [r.key for r in out] == [r.key for r in R.iter_decode(data)]


def _frames() -> st.SearchStrategy[bytes]:
    data = st.builds(lambda recs, base: F.encode_frame(F.KIND_DATA, R.encode_many(recs), len(recs), base, 7),
                     st.lists(records, max_size=3), st.integers(1, 2**40))
    seal = st.builds(lambda idx, base: F.encode_seal(F.Seal(base, base + 1, len(idx), 0, idx,
                                                            {5: [F.Appended(1, base, 1)]}), 4096, 9),
                     st.lists(st.tuples(st.integers(1, 2**40), st.integers(64, 2**40)), max_size=4),
                     st.integers(1, 2**40))
    return st.one_of(st.binary(max_size=120), mutated(data), mutated(seal))


@fuzz
@given(_frames())
def test_frame_decoders_raise_only_walsvc_errors(data):
    h = _documented(F.decode_frame_header, data)
    if h is not None:
        _documented(F.check_payload, h, data, F.FRAME_HEADER_SIZE)
        payload = data[F.FRAME_HEADER_SIZE:F.FRAME_HEADER_SIZE + h.payload_len]
        if h.kind == F.KIND_SEAL:
            _documented(F.decode_seal, h, payload)
        else:
            _documented(R.decode_payload, payload, h.base_lsn, h.count, h.timestamp_us)
    # A seal payload is parsed only after its CRC matched, but must still fail cleanly on any bytes.
    fake = F.FrameHeader(F.KIND_SEAL, len(data), 0, 1, 0, 0, 0, 0)
    _documented(F.decode_seal, fake, data)
    _documented(F.decode_segment_header, data[:F.SEGMENT_HEADER_SIZE])


wire = st.one_of(
    st.binary(max_size=80),
    mutated(st.builds(P.encode_append, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                      st.integers(0, 2**32 - 1), st.binary(max_size=40))),
    mutated(st.builds(P.encode_commit, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))),
    mutated(st.builds(lambda pid, seq, d: P.encode_reply(P.Reply(pid, P.NACK, seq, 0, 0, d)),
                      st.integers(1, 2**64 - 1), st.integers(1, 2**64 - 1), st.text(max_size=20))),
)


@fuzz
@given(wire)
def test_wire_decoders_raise_only_walsvc_errors(msg):
    a = _documented(P.decode_append, msg)
    if a is not None:
        assert a.producer_id and a.seq and a.count
    _documented(P.decode_commit, msg)
    r = _documented(P.decode_reply, msg)
    if r is not None:
        assert isinstance(r.code, str)
    ident = P.peek_producer(msg)
    assert ident is None or ident[0] != 0


json_text = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                   max_size=3), max_leaves=20)
control_msgs = st.one_of(
    st.binary(max_size=100),
    mutated(st.builds(lambda op, extra: P.encode_request(op, extra=extra),
                      st.sampled_from(["ping", "status", "committed", "x"]), json_text)),
    st.builds(lambda n, open_, close: open_ * n + close * n, st.integers(0, 40000),
              st.sampled_from([b"[", b"{\"a\":", b"[{\"a\":"]), st.sampled_from([b"]", b"}", b"", b"}]"])),
    st.builds(lambda n: b'{"op": "' + b"[" * n + b'", "version": 1}', st.integers(0, 1000)),
    st.builds(lambda n: b"1" * n, st.integers(4000, 70000)),
)


@fuzz
@given(control_msgs)
def test_control_decoder_raises_only_walsvc_errors(msg):
    req = _documented(P.decode_json, msg)
    if req is not None:
        assert isinstance(req, dict) and req.get("version", 1) == 1


@given(st.integers(P.MAX_CONTROL_DEPTH + 1, 200_000))
@settings(max_examples=20, deadline=None)
def test_deep_nesting_is_refused_before_the_parser_recurses(depth):
    """json.loads would raise RecursionError (or exhaust the C stack) on these."""
    for msg in (b"[" * depth, b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        try:
            P.decode_json(msg)
            raise AssertionError("accepted")
        except WalError as exc:
            assert exc.code in (P.MALFORMED, P.TOO_LARGE)

"""The compiled record codec against its pure-Python reference: one behaviour on every input.

Each twin (walsvc._record_c) either gives the reference's answer or declines (None) so the reference
decides; these tests feed both the same bytes, valid, damaged and random, and compare what the public
functions return or raise.  tests/test_record.py runs its whole suite on each codec as well.
"""

from __future__ import annotations

import os
import random

import pytest
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings, strategies as st

from walsvc import record as R
from walsvc.errors import RecordError
from walsvc.record import Record

U64 = (1 << 64) - 1
C = R._c
pytestmark = pytest.mark.skipif(C is None and not os.environ.get("CI"),
                                reason="the compiled record codec is not built here (no C compiler?)")


def test_ci_builds_the_compiled_codec() -> None:
    assert C is not None, "the compiled record codec must be built where a compiler exists (CI has one)"
    assert R.implementation().startswith("C (")


def _outcome(fn, *args, **kwargs):
    """What a call gives: ("ok", value) or ("error", class, offset), comparable across codecs."""
    try:
        return ("ok", fn(*args, **kwargs))
    except RecordError as exc:
        return ("error", type(exc).__name__, exc.offset, exc.lsn)


def _both(fn, *args, **kwargs):
    """The public function's outcome with the compiled twin in use, then with the reference alone."""
    fast = _outcome(fn, *args, **kwargs)
    saved, R._c = R._c, None
    try:
        slow = _outcome(fn, *args, **kwargs)
    finally:
        R._c = saved
    return fast, slow


def _fields(records: list[Record]) -> list[tuple]:
    return [(r.key, r.value, r.tombstone, r.ttl_ms, r.compression, r.version, r.lsn, r.timestamp)
            for r in records]


records = st.builds(
    Record,
    key=st.binary(max_size=200),
    value=st.one_of(st.binary(max_size=300), st.binary(max_size=4).map(lambda b: b * 100)),
    tombstone=st.booleans(),
    ttl_ms=st.none() | st.integers(0, U64),
    compression=st.sampled_from([None, None, "zstd"]),
    version=st.none() | st.tuples(st.integers(0, U64), st.integers(0, U64)),
)


def _damage(payload: bytes, data: st.DataObject) -> bytes:
    """The payload, or a copy with a flipped bit, a cut, garbage appended, or bytes overwritten."""
    how = data.draw(st.sampled_from(["none", "flip", "cut", "append", "overwrite"]))
    if how == "none" or not payload:
        return payload
    if how == "flip":
        i = data.draw(st.integers(0, len(payload) - 1))
        return payload[:i] + bytes([payload[i] ^ (1 << data.draw(st.integers(0, 7)))]) + payload[i + 1:]
    if how == "cut":
        return payload[:data.draw(st.integers(0, len(payload) - 1))]
    if how == "append":
        return payload + data.draw(st.binary(min_size=1, max_size=20))
    i = data.draw(st.integers(0, len(payload) - 1))
    junk = data.draw(st.binary(min_size=1, max_size=12))
    return payload[:i] + junk + payload[i + len(junk):]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, max_size=12), st.data(), st.sampled_from([1024, R.DEFAULT_MAX_RECORD_BYTES]))
def test_count_records_agrees_on_valid_and_damaged_batches(recs, data, limit):
    payload = _damage(R.encode_many(recs), data)
    fast, slow = _both(R.count_records, payload, 0, len(payload), max_record_bytes=limit)
    assert fast == slow


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([1024, R.DEFAULT_MAX_RECORD_BYTES]))
def test_count_records_agrees_on_random_bytes(data, limit):
    fast, slow = _both(R.count_records, data, 0, len(data), max_record_bytes=limit)
    assert fast == slow


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, max_size=12), st.data(), st.integers(0, 1 << 40), st.integers(0, 1 << 50))
def test_decode_payload_agrees(recs, data, base, ts):
    payload = _damage(R.encode_many(recs), data)
    count = data.draw(st.sampled_from([len(recs), len(recs) + 1]))
    wanted = base + data.draw(st.integers(0, max(0, len(recs))))
    prefix = data.draw(st.binary(max_size=3))
    buf = prefix + payload + b"\0\0"
    fast, slow = _both(R.decode_payload, buf, base, count, ts, wanted, start=len(prefix),
                       end=len(prefix) + len(payload))
    if fast[0] == "ok" and slow[0] == "ok":
        assert _fields(fast[1]) == _fields(slow[1])
    else:
        assert fast == slow


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=300)), max_size=20))
def test_encode_puts_gives_the_reference_bytes(items):
    expected = b"".join(R.encode_put_py(k, v) for k, v in items)
    assert R.encode_puts(items) == expected
    assert b"".join(R.encode_put(k, v) for k, v in items) == expected
    assert R.count_records(expected, 0, len(expected)) == len(items)


def test_encode_puts_leaves_the_unusual_to_the_reference() -> None:
    items = [("text", "is utf-8"), (b"k", bytearray(b"v")), (b"big", b"x" * 2000)]
    assert C.encode_puts(items, 1024) is None
    with pytest.raises(RecordError):
        R.encode_puts(items, 1024)
    assert R.encode_puts(items[:2]) == R.encode_put_py(b"text", b"is utf-8") + R.encode_put_py(b"k", b"v")


@given(st.binary(max_size=2000), st.integers(0, 0xFFFFFFFF))
def test_crc32c_matches_the_crc32c_package(data, start):
    assert C.crc32c(data, start) == crc32c(data, start)


@settings(max_examples=60, deadline=None)
@given(st.integers(3 * 8192 - 9, 7 * 8192 + 9), st.integers(0, 0xFFFFFFFF), st.integers(0, 1 << 32))
def test_crc32c_of_long_buffers_matches_the_crc32c_package(size, start, seed):
    """Buffers of three 8 KiB streams and more: the compiled CRC runs the streams side by side and joins
    them (a wrong join, or a block boundary off by one, shows here)."""
    data = random.Random(seed).randbytes(size)
    assert C.crc32c(data, start) == crc32c(data, start)


def test_vectors_agree(vectors) -> None:
    for case in vectors["valid"]:
        data = bytes.fromhex(case["encoded_hex"])
        assert _both(R.count_records, data, 0, len(data)) == (("ok", 1), ("ok", 1))
    for case in vectors["invalid"]:
        data = bytes.fromhex(case["encoded_hex"])
        fast, slow = _both(R.count_records, data, 0, len(data))
        assert fast == slow and fast[0] == "error", case


def test_decoded_records_are_ordinary_records() -> None:
    import copy
    import pickle
    payload = R.encode_puts([(b"k1", b"v1"), (b"k2", b"v2")])
    out = R.decode_payload(payload, 7, 2, 99)
    assert isinstance(out[0], Record) and out[0] == Record(b"k1", b"v1") and out[1].lsn == 8
    out[0].value = b"changed"  # a plain mutable Record, like the reference gives
    assert out[0].value == b"changed"
    assert repr(out[1]) == "Record(key=b'k2', value=b'v2', lsn=8, timestamp=99)"
    for twin in (copy.copy(out[1]), pickle.loads(pickle.dumps(out[1]))):
        assert twin == out[1] and (twin.lsn, twin.timestamp) == (8, 99)
    with pytest.raises(AttributeError):
        out[1].color = "red"  # no new attributes, as on Record


def test_decoded_records_rejoin_the_cycle_collector_when_changed() -> None:
    """The compiled decoder leaves records out of the cycle collector (they hold only atomic values); once
    a field is set they are tracked again, so a cycle made through a record is still collected."""
    import gc
    import weakref
    payload = R.encode_puts([(b"k", b"v")] * 3)
    out = R.decode_payload(payload, 1, 3, 0)
    assert not any(gc.is_tracked(r) for r in out)
    out[0].lsn = 5
    assert gc.is_tracked(out[0]) and not gc.is_tracked(out[1])

    class Holder:
        pass

    holder = Holder()
    holder.record = out[2]
    out[2].value = holder  # record -> holder -> record
    watch = weakref.ref(holder)
    del holder, out
    gc.collect()
    assert watch() is None, "a cycle through a decoded record was not collected"


def test_version_and_status_name_the_codec(tmp_path) -> None:
    from helpers import run_cli
    assert f"(record codec: {R.implementation()})" in run_cli("--version").stdout
    from walsvc import Log
    with Log.open(tmp_path / "wal") as log:
        assert log.stats()["codec"] == R.implementation()

"""IngestSession (walsvc/ingest.py) alone: the writer's store / duplicate / refuse decision for made-up
messages and dedup windows (docs/PROTOCOL.md, "Sequence rules"), no log, no sockets."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, strategies as st

from walsvc import protocol as P
from walsvc.frame import Appended
from walsvc.ingest import Duplicate, IngestSession, Refuse, Store
from walsvc.record import encode_put

pytestmark = pytest.mark.usefixtures("codec")  # every test on the pure-Python codecs and their compiled twins

PID = 0xC0FFEE
GOOD = encode_put(b"k", b"v")
SESSION = IngestSession(max_batch_bytes=4096, max_record_bytes=1024)
WINDOW = collections.deque([Appended(4, 10, 2), Appended(5, 12, 1), Appended(6, 13, 3)], maxlen=3)


def windows(pid: int):
    return WINDOW if pid == PID else None


@pytest.mark.parametrize("msg, expected", [
    # an unknown producer starts at whatever sequence it sends
    (P.encode_append(PID + 1, 9, 1, GOOD), Store),
    # the next sequence: stored
    (P.encode_append(PID, 7, 2, GOOD + GOOD), Store),
    # a resend inside the window: the LSNs it got the first time
    (P.encode_append(PID, 5, 1, GOOD), Duplicate(PID, 5, 12, 1)),
    (P.encode_append(PID, 6, 3, b"anything: not even checked"), Duplicate(PID, 6, 13, 3)),
    # older than the window: stored, LSNs unknown
    (P.encode_append(PID, 2, 1, GOOD), Duplicate(PID, 2, 0, 0)),
    # a gap
    (P.encode_append(PID, 9, 1, GOOD), Refuse(P.OUT_OF_SEQUENCE, "expected sequence 7, got 9")),
    # bad headers, records and sizes
    (b"WS", P.MALFORMED),
    (P.encode_append(PID, 7, 2, GOOD), Refuse(P.MALFORMED, "header says 2 records, payload holds 1")),
    (P.encode_append(PID, 7, 1, GOOD + GOOD), Refuse(P.MALFORMED, "header says 1 records, payload holds 2")),
    (P.encode_append(PID, 7, 1, GOOD[:-1] + bytes([GOOD[-1] ^ 1])), P.MALFORMED),  # CRC
    (P.encode_append(PID, 7, 1, encode_put(b"k", b"v" * 2000)), P.TOO_LARGE),       # record
    (P.encode_append(PID, 7, 1, b"x" * 5000), P.TOO_LARGE),                          # batch
    (b"WS\x02" + P.encode_append(PID, 7, 1, GOOD)[3:], P.UNKNOWN_VERSION),
])
def test_decisions(msg, expected):
    d = SESSION.decide(msg, windows)
    if expected is Store:
        a = P.decode_append(msg)
        assert d == Store(a.producer_id, a.seq, bytes(a.payload), a.count)
    elif isinstance(expected, str):
        assert isinstance(d, Refuse) and d.code == expected and d.detail
    else:
        assert d == expected


def test_duplicate_replies():
    assert Duplicate(PID, 5, 12, 2).reply() == P.Reply(PID, P.DUPLICATE, 5, 12, 2)
    assert Duplicate(PID, 5, 12, 2).last_lsn == 13
    assert Duplicate(PID, 2, 0, 0).reply().detail == "older than the dedup window"


@given(st.binary(max_size=80))
def test_any_bytes_get_a_decision_and_only_valid_batches_are_stored(msg):
    d = SESSION.decide(msg, windows)
    assert isinstance(d, (Store, Duplicate, Refuse))
    if isinstance(d, Store):
        assert d.count == P.decode_append(msg).count >= 1

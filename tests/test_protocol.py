"""The wire codecs alone (walsvc/protocol.py), no sockets: the byte layouts of docs/PROTOCOL.md and every
rejection, each with its nack code."""

from __future__ import annotations

import json
import struct
import time
from typing import Any

import pytest
from hypothesis import given, strategies as st

from walsvc import protocol as P
from walsvc.errors import ProtocolError

U64 = st.integers(1, 2**64 - 1)


@given(U64, U64, st.integers(1, 2**32 - 1), st.binary(max_size=200))
def test_append_round_trip_and_layout(pid, seq, count, payload):
    msg = P.encode_append(pid, seq, count, payload)
    assert msg[:4] == b"WS\x01\x01" and struct.unpack_from("<QQII", msg, 4) == (pid, seq, count, 0)
    a = P.decode_append(msg)
    assert (a.producer_id, a.seq, a.count, bytes(a.payload)) == (pid, seq, count, payload)
    assert P.peek_producer(msg) == (pid, seq)


@pytest.mark.parametrize("msg, code", [
    (b"WS\x01", P.MALFORMED),                                                      # shorter than the header
    (b"XX" + P.encode_append(1, 1, 1, b"")[2:], P.MALFORMED),                       # bad magic
    (b"WS\x02" + P.encode_append(1, 1, 1, b"")[3:], P.UNKNOWN_VERSION),
    (b"WS\x01\x07" + P.encode_append(1, 1, 1, b"")[4:], P.MALFORMED),               # unknown type
    (P.APPEND.pack(b"WS", 1, 1, 1, 1, 1, 9), P.MALFORMED),                          # flags set
    (P.encode_append(0, 1, 1, b""), P.MALFORMED),                                   # producer id 0
    (P.encode_append(1, 0, 1, b""), P.MALFORMED),                                   # sequence 0
    (P.encode_append(1, 1, 0, b""), P.MALFORMED),                                   # no records
])
def test_bad_append_messages_get_their_nack_code(msg, code):
    with pytest.raises(ProtocolError) as info:
        P.decode_append(msg)
    assert info.value.code == code and str(info.value).startswith(code + ":")


def test_peek_finds_a_sender_only_in_a_header_with_the_magic():
    assert P.peek_producer(P.encode_append(7, 3, 0, b"")) == (7, 3)  # undecodable, still answerable
    assert P.peek_producer(b"garbage" * 10) is None
    assert P.peek_producer(P.encode_append(0, 3, 1, b"")) is None


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_commit_round_trip(committed, first):
    msg = P.encode_commit(committed, first)
    assert msg[:1] == P.TOPIC_COMMIT and len(msg) == 18
    assert P.decode_commit(msg) == (committed, first)


def test_bad_commit_and_reply_messages():
    with pytest.raises(ProtocolError):
        P.decode_commit(b"C\x01" + bytes(15))
    with pytest.raises(ProtocolError) as info:
        P.decode_commit(b"C\x02" + bytes(16))
    assert info.value.code == P.UNKNOWN_VERSION
    with pytest.raises(ProtocolError):
        P.decode_reply(b"R" + bytes(10))


@given(U64, st.sampled_from([P.ACK, P.DUPLICATE, P.NACK]), U64, st.integers(0, 2**64 - 1),
       st.integers(0, 2**32 - 1), st.text(max_size=50))
def test_reply_round_trip_and_topic(pid, status, seq, base, count, detail):
    reply = P.Reply(pid, status, seq, base, count, detail)
    msg = P.encode_reply(reply)
    assert msg.startswith(P.reply_topic(pid)) and msg[9] == P.VERSION
    assert P.decode_reply(msg) == reply


@given(U64, U64, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_encode_ack_is_encode_reply_of_an_ack(pid, seq, base, count):
    msg = P.encode_ack(pid, seq, base, count)
    assert msg == P.encode_reply(P.Reply(pid, P.ACK, seq, base, count))
    assert P.decode_reply(msg) == P.Reply(pid, P.ACK, seq, base, count, "")


def test_nack_code_is_the_text_before_the_colon():
    assert P.Reply(1, P.NACK, 5, 0, 0, "out_of_sequence: expected sequence 4, got 5").code == P.OUT_OF_SEQUENCE


def test_control_messages_are_json_objects():
    assert P.decode_json(P.encode_request("status")) == {"op": "status", "version": 1}
    for bad in (b"not json", b"[1, 2]", b"\xff\xfe"):
        with pytest.raises(ProtocolError) as info:
            P.decode_json(bad)
        assert info.value.code == P.MALFORMED


def test_control_limits_are_checked_before_the_parser():
    limit = P.MAX_CONTROL_DEPTH
    assert P.decode_json(b'{"a": ' + b"[" * (limit - 1) + b"]" * (limit - 1) + b"}")["a"] is not None
    deep = b'{"a": ' + b"[" * limit + b"]" * limit + b"}"
    with pytest.raises(ProtocolError) as info:
        P.decode_json(deep)
    assert info.value.code == P.MALFORMED and f"nests {limit + 1} levels" in str(info.value)
    # Brackets inside strings (escaped quotes too) are not nesting.
    assert P.json_depth(b'{"op": "[[[\\"[[[", "x": [1]}') == 2
    assert P.decode_json(b'{"op": "' + b"{" * 1000 + b'"}') == {"op": "{" * 1000}
    with pytest.raises(ProtocolError) as info:
        P.decode_json(b" " * (P.MAX_CONTROL_BYTES + 1))
    assert info.value.code == P.TOO_LARGE
    assert P.decode_json(b" " * (P.MAX_CONTROL_BYTES - 2) + b"{}") == {}
    with pytest.raises(ProtocolError) as info:
        P.decode_json(P.encode_request("ping").replace(b'"version": 1', b'"version": 2'))
    assert info.value.code == P.UNKNOWN_VERSION
    assert P.decode_json(b'{"op": "ping"}') == {"op": "ping"}  # version may be left out


@pytest.mark.parametrize("version", [b"true", b"1.0", b'"1"', b"null", b"[1]"])
def test_control_version_must_be_the_integer_1(version):
    with pytest.raises(ProtocolError) as info:
        P.decode_json(b'{"op": "ping", "version": ' + version + b"}")
    assert info.value.code == P.UNKNOWN_VERSION


_FULL = P.MAX_CONTROL_BYTES


@pytest.mark.parametrize("msg", [
    b'"' + b'\\"' * (_FULL // 2 - 1),               # an unterminated string of escaped quotes: 24 s before
    b'"\\' * (_FULL // 2),                          # quote, backslash, quote, ...
    b'"' + b'\\\\"' * (_FULL // 3 - 1),              # escaped backslashes then a quote: strings end and start
    b'"' + b"\\" * (_FULL - 1),                      # one unterminated string of backslashes
    b'"' * _FULL,
    b'"' + b"[" * (_FULL - 1),                       # brackets inside an unterminated string
    b"[" + b'"\\"[' * (_FULL // 4 - 1),              # nesting hidden in strings with escaped quotes
    b"[" * _FULL,
], ids=["escaped-quotes", "quote-backslash", "backslash-runs", "backslashes", "quotes", "unterminated",
        "brackets-in-strings", "brackets"])
def test_json_depth_is_linear_on_adversarial_requests(msg):
    """It runs in the writer's loop before every control request is parsed, so it must never backtrack."""
    assert len(msg) <= _FULL
    start = time.perf_counter()
    P.json_depth(msg)
    assert time.perf_counter() - start < 0.5
    with pytest.raises(ProtocolError):
        P.decode_json(msg)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


_TEXT = st.text(st.sampled_from('ab"\\[]{}/\x00\u00e9\u2028\U0001f600'), max_size=8)
_JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | _TEXT,
                            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
                            max_leaves=30)


@given(_JSON_VALUES, st.booleans())
def test_json_depth_is_the_nesting_of_valid_json(value, ascii_only):
    assert P.json_depth(json.dumps(value, ensure_ascii=ascii_only).encode()) == _depth(value)


@pytest.mark.parametrize("msg, expected", [
    (b"\x01" + P.reply_topic(0x1234), 0x1234),   # a producer's reply subscription
    (b"\x00" + P.reply_topic(0x1234), None),     # its unsubscription
    (b"\x01C", None),                            # a reader's commit subscription
    (b"\x01R", None),                            # every reply: no single producer to answer
    (b"\x01" + P.reply_topic(0x1234) + b"x", None),
    (b"\x01" + P.reply_topic(0), None),
])
def test_which_subscriptions_get_a_ready(msg, expected):
    assert P.subscribed_producer(msg) == expected


def test_ready_is_a_reply_with_sequence_0_on_the_producers_topic():
    msg = P.encode_ready(0x1234)
    assert msg.startswith(P.reply_topic(0x1234))
    assert P.decode_reply(msg) == P.Reply(0x1234, P.READY, 0, 0, 0)
    log_id = "0c16c404-53b7-4ca5-9a29-b58014f2848b"
    assert P.decode_reply(P.encode_ready(0x1234, log_id)) == P.Reply(0x1234, P.READY, 0, 0, 0, log_id)

"""The wire protocol between producers, the writer and readers (docs/PROTOCOL.md), as pure codecs.

Every message is a single ZeroMQ frame (multipart is far slower), little-endian:

- ingest (producer PUSH -> writer PULL): APPEND = header + v1 records end to end, so the writer copies the
  payload into a log frame without re-encoding it;
- publish (writer XPUB -> SUB): COMMIT (topic b"C") carries the committed LSN; REPLY (topic b"R" + producer
  id) carries an ack, a duplicate-ack or a nack for one batch, so each producer subscribes to its own, or
  READY: the writer has applied that subscription, so no reply on it can be dropped from then on (PUB drops
  whatever it publishes before a subscription arrives: the slow joiner);
- control (REQ -> writer REP): JSON requests and replies, at most MAX_CONTROL_BYTES long and nested at most
  MAX_CONTROL_DEPTH deep, both checked before the JSON parser runs (it recurses once per level).
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any, NamedTuple

from .errors import ProtocolError
from .record import _c

VERSION = 1
APPEND_MAGIC = b"WS"
TYPE_APPEND = 1
APPEND = struct.Struct("<2sBBQQII")  # magic, version, type, producer id, sequence, count, flags
APPEND_HEADER_SIZE = APPEND.size  # 28

TOPIC_COMMIT = b"C"
TOPIC_REPLY = b"R"
COMMIT = struct.Struct("<1sBQQ")  # topic, version, committed LSN, first LSN
REPLY = struct.Struct("<1sQBBQQI")  # topic, producer id, version, status, sequence, base LSN, count

ACK = 0  # written and committed: LSNs base .. base+count-1
DUPLICATE = 1  # already in the log (a resend): the LSNs it got the first time
NACK = 2  # refused: the detail says why; the batch is not in the log
READY = 3  # the writer has this subscription: replies on it reach the subscriber from now on (sequence 0)

# Nack codes (the text before ": " in a nack's detail).
MALFORMED = "malformed"
TOO_LARGE = "too_large"
UNKNOWN_VERSION = "unknown_version"
OUT_OF_SEQUENCE = "out_of_sequence"
LOG_STOPPED = "log_stopped"
# Refused for good: the batch is not in the log and resending it cannot help.  (log_stopped is neither
# this nor retryable: the batch may or may not be in the log; see docs/PROTOCOL.md.)
PERMANENT_NACKS = frozenset({MALFORMED, TOO_LARGE, UNKNOWN_VERSION})

MAX_CONTROL_BYTES = 64 * 1024
MAX_CONTROL_DEPTH = 16
# The control socket's ZeroMQ MAXMSGSIZE: above MAX_CONTROL_BYTES, so that a request somewhat too long is
# answered `too_large`; ZeroMQ drops anything longer unread (and disconnects its sender).
CONTROL_SOCKET_MAX_BYTES = 4 * MAX_CONTROL_BYTES


class Append(NamedTuple):
    """A decoded APPEND (a NamedTuple, not a frozen dataclass: made for every batch, and half the cost)."""
    producer_id: int
    seq: int
    count: int
    payload: memoryview


def encode_append(producer_id: int, seq: int, count: int, payload: bytes) -> bytes:
    return APPEND.pack(APPEND_MAGIC, VERSION, TYPE_APPEND, producer_id, seq, count, 0) + payload


def decode_append(msg: bytes | memoryview) -> Append:
    """Parse an ingest message; the records themselves are checked by the writer (record.count_records)."""
    if len(msg) < APPEND_HEADER_SIZE:
        raise ProtocolError(MALFORMED, f"message of {len(msg)} bytes is shorter than the "
                                       f"{APPEND_HEADER_SIZE}-byte header")
    magic, version, mtype, pid, seq, count, flags = APPEND.unpack_from(msg)
    if magic != APPEND_MAGIC:
        raise ProtocolError(MALFORMED, f"bad magic {bytes(magic)!r} (expected {APPEND_MAGIC!r})")
    if version != VERSION:
        raise ProtocolError(UNKNOWN_VERSION, f"protocol version {version}; this writer speaks {VERSION}")
    if mtype != TYPE_APPEND or flags:
        raise ProtocolError(MALFORMED, f"unknown message type {mtype} or flags {flags}")
    if pid == 0 or seq == 0:
        raise ProtocolError(MALFORMED, "producer id and sequence must be non-zero")
    if count == 0:
        raise ProtocolError(MALFORMED, "a batch must hold at least one record")
    return Append(pid, seq, count, memoryview(msg)[APPEND_HEADER_SIZE:])


def peek_producer(msg: bytes) -> tuple[int, int] | None:
    """(producer id, sequence) of a message too broken to decode, if its header is there to reply to."""
    if len(msg) >= APPEND_HEADER_SIZE and msg[:2] == APPEND_MAGIC:
        _, _, _, pid, seq, _, _ = APPEND.unpack_from(msg)
        if pid:
            return pid, seq
    return None


def encode_commit(committed_lsn: int, first_lsn: int) -> bytes:
    return COMMIT.pack(TOPIC_COMMIT, VERSION, committed_lsn, first_lsn)


def decode_commit(msg: bytes) -> tuple[int, int]:
    """(committed LSN, first LSN)."""
    if len(msg) != COMMIT.size or msg[:1] != TOPIC_COMMIT:
        raise ProtocolError(MALFORMED, "not a commit message")
    _, version, committed, first = COMMIT.unpack(msg)
    if version != VERSION:
        raise ProtocolError(UNKNOWN_VERSION, f"commit message version {version}")
    return committed, first


def reply_topic(producer_id: int) -> bytes:
    """The SUB prefix a producer subscribes to for its replies."""
    return TOPIC_REPLY + struct.pack("<Q", producer_id)


def subscribed_producer(msg: bytes) -> int | None:
    """The producer id of an XPUB subscription message (b"\\x01" + reply topic), else None: unsubscriptions,
    other topics and odd lengths need no READY."""
    if len(msg) == 10 and msg[:2] == b"\x01" + TOPIC_REPLY:
        return struct.unpack_from("<Q", msg, 2)[0] or None
    return None


def encode_ready(producer_id: int, log_id: str = "") -> bytes:
    """READY for `producer_id`; its detail names the writer's log (so a producer tells a new log at the same
    place from a restart of the old one)."""
    return encode_reply(Reply(producer_id, READY, 0, 0, 0, log_id))


class Reply(NamedTuple):
    """A decoded REPLY (a NamedTuple, as Append: a producer decodes one per batch)."""
    producer_id: int
    status: int
    seq: int
    base_lsn: int
    count: int
    detail: str = ""

    @property
    def code(self) -> str:
        return self.detail.split(":", 1)[0]


def encode_reply(r: Reply) -> bytes:
    return REPLY.pack(TOPIC_REPLY, r.producer_id, VERSION, r.status, r.seq, r.base_lsn, r.count) + \
        r.detail.encode()


def encode_ack(producer_id: int, seq: int, base_lsn: int, count: int) -> bytes:
    """encode_reply(Reply(producer_id, ACK, seq, base_lsn, count)) without the Reply: the writer's every ack."""
    return REPLY.pack(TOPIC_REPLY, producer_id, VERSION, ACK, seq, base_lsn, count)


def decode_reply(msg: bytes) -> Reply:
    """A REPLY: the compiled twin's one call for one without detail (every ack a producer takes), else the
    reference's."""
    if _c is not None:
        reply = _c.decode_reply(Reply, msg)
        if reply is not None:
            return reply
    return decode_reply_py(msg)


def decode_reply_py(msg: bytes) -> Reply:
    if len(msg) < REPLY.size or msg[:1] != TOPIC_REPLY:
        raise ProtocolError(MALFORMED, "not a reply message")
    _, pid, version, status, seq, base, count = REPLY.unpack_from(msg)
    if version != VERSION:
        raise ProtocolError(UNKNOWN_VERSION, f"reply version {version}")
    detail = "" if len(msg) == REPLY.size else bytes(msg[REPLY.size:]).decode(errors="replace")
    return Reply(pid, status, seq, base, count, detail)


def encode_request(op: str, **args: Any) -> bytes:
    return json.dumps({"op": op, "version": VERSION, **args}).encode()


# A string, or an unterminated one running to the end of the message (the parser stops there too). Possessive
# quantifiers and the end alternative make every quote outside a string start exactly one match that never
# fails: a pattern that can fail restarts at each later quote, quadratic in escaped quotes (b'"' + b'\\"' * n).
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.S)
_JSON_BRACKETS = re.compile(rb"[\[{\]}]")


def json_depth(msg: bytes) -> int:
    """How deep arrays and objects nest in `msg`, brackets inside strings excluded (linear, no recursion), so
    that a request too deep for the recursive JSON parser is refused before it runs."""
    depth = deepest = 0
    for bracket in _JSON_BRACKETS.findall(_JSON_STRING.sub(b'""', msg)):
        if bracket in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return deepest


def decode_json(msg: bytes) -> dict[str, Any]:
    """A control request: a JSON object within the size and nesting limits, of this protocol version."""
    if len(msg) > MAX_CONTROL_BYTES:
        raise ProtocolError(TOO_LARGE, f"control request of {len(msg)} bytes exceeds the {MAX_CONTROL_BYTES}-byte "
                                       "limit")
    msg = bytes(msg)
    depth = json_depth(msg)
    if depth > MAX_CONTROL_DEPTH:
        raise ProtocolError(MALFORMED, f"control request nests {depth} levels deep; the limit is "
                                       f"{MAX_CONTROL_DEPTH}")
    try:
        value = json.loads(msg)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(MALFORMED, f"control message is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(MALFORMED, "control message must be a JSON object")
    version = value.get("version", VERSION)
    if type(version) is not int or version != VERSION:  # true and 1.0 equal 1 in Python, not in the protocol
        raise ProtocolError(UNKNOWN_VERSION, f"control request version {version!r:.40}; this writer speaks "
                                             f"{VERSION}")
    return value

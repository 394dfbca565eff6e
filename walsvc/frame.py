"""Segment header, batch frames and seal frames: the byte layouts of docs/FORMAT.md, pure codecs.

A segment file is a 64-byte header followed by frames.  Every append_batch becomes one DATA frame: a 56-byte
header (with its own CRC, so a damaged payload never hides where the next frame starts) and a payload of v1
records laid end to end.  The last frame of a finished segment is a SEAL frame holding the segment's
summary (last LSN, checksum of all its frames, sparse LSN index, producer table), and the file ends with
it.  Everything here is little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from crc32c import crc32c

from .errors import ChecksumError, IncompleteRecordError, InvalidRecordError
from .record import _c

SEGMENT_MAGIC = b"WALSVCSG"
FORMAT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<8sHHIQQQ20sI")  # magic, version, flags, header len, id, base LSN, created µs, reserved, crc
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size  # 64

FRAME_MAGIC = b"\x8bWF\x01"
FRAME = struct.Struct("<4sBBHIIQQQQII")  # magic, kind, flags, reserved, payload len, count, base LSN, ts µs,
#                                          producer id, producer seq, payload crc, header crc
FRAME_HEADER_SIZE = FRAME.size  # 56
KIND_DATA = 1
KIND_SEAL = 2

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SEAL_HEAD = struct.Struct("<QQIII")  # last LSN, record count, data crc, index entries, producer entries
_INDEX_ENTRY = struct.Struct("<QQ")  # LSN, offset of the frame holding it
_PRODUCER_HEAD = struct.Struct("<QI")  # producer id, window entries
_WINDOW_ENTRY = struct.Struct("<QQI")  # sequence, base LSN, count


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    segment_id: int
    base_lsn: int
    created_us: int


def encode_segment_header(h: SegmentHeader) -> bytes:
    body = SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, 0, SEGMENT_HEADER_SIZE, h.segment_id, h.base_lsn,
                               h.created_us, b"\0" * 20, 0)[:-4]
    return body + _U32.pack(crc32c(body))


def decode_segment_header(buf: bytes) -> SegmentHeader:
    if len(buf) < SEGMENT_HEADER_SIZE:
        raise IncompleteRecordError(f"segment header needs {SEGMENT_HEADER_SIZE} bytes, file has {len(buf)}",
                                    offset=0)
    magic, version, flags, size, seg_id, base, created, _, crc = SEGMENT_HEADER.unpack_from(buf)
    if magic != SEGMENT_MAGIC:
        raise InvalidRecordError(f"not a walsvc segment (magic {magic!r})", offset=0)
    if crc32c(buf[:SEGMENT_HEADER_SIZE - 4]) != crc:
        raise ChecksumError("segment header CRC32C mismatch", offset=0)
    if version != FORMAT_VERSION or flags or size != SEGMENT_HEADER_SIZE:
        raise InvalidRecordError(f"unsupported segment format version {version} (flags {flags}, header {size})",
                                 offset=0)
    return SegmentHeader(seg_id, base, created)


class FrameHeader(NamedTuple):
    """A frame's header fields.  A NamedTuple: every scan decodes one per frame, and a tailing reader one
    per poll (a frozen dataclass costs several times as much to build)."""
    kind: int
    payload_len: int
    count: int
    base_lsn: int
    timestamp_us: int
    producer_id: int
    producer_seq: int
    payload_crc: int

    @property
    def size(self) -> int:
        return FRAME_HEADER_SIZE + self.payload_len

    @property
    def end_lsn(self) -> int:
        """One past the last LSN in this frame."""
        return self.base_lsn + self.count


def encode_frame_header(kind: int, payload_len: int, count: int, base_lsn: int, timestamp_us: int,
                        producer_id: int, producer_seq: int, payload_crc: int) -> bytes:
    """A frame header: the compiled twin's when it was built (one call, where the reference makes five: the
    writer makes one per batch), else the reference's."""
    if _c is not None:
        header = _c.frame_header(kind, payload_len, count, base_lsn, timestamp_us, producer_id, producer_seq,
                                 payload_crc)
        if header is not None:
            return header
    return encode_frame_header_py(kind, payload_len, count, base_lsn, timestamp_us, producer_id, producer_seq,
                                  payload_crc)


def encode_frame_header_py(kind: int, payload_len: int, count: int, base_lsn: int, timestamp_us: int,
                           producer_id: int, producer_seq: int, payload_crc: int) -> bytes:
    head = FRAME.pack(FRAME_MAGIC, kind, 0, 0, payload_len, count, base_lsn, timestamp_us, producer_id,
                      producer_seq, payload_crc, 0)[:-4]
    return head + _U32.pack(crc32c(head))


def data_frame_header(payload: bytes, count: int, base_lsn: int, timestamp_us: int, producer_id: int,
                      producer_seq: int, data_crc: int) -> tuple[bytes, int]:
    """The header of the DATA frame carrying `payload`, and the segment's running data CRC (the seal's)
    continued over that frame: what the log computes for every batch it writes, in one call of the compiled
    twin when it was built."""
    if _c is not None:
        done = _c.data_frame_header(payload, count, base_lsn, timestamp_us, producer_id, producer_seq, data_crc)
        if done is not None:
            return done
    return data_frame_header_py(payload, count, base_lsn, timestamp_us, producer_id, producer_seq, data_crc)


def data_frame_header_py(payload: bytes, count: int, base_lsn: int, timestamp_us: int, producer_id: int,
                         producer_seq: int, data_crc: int) -> tuple[bytes, int]:
    header = encode_frame_header_py(KIND_DATA, len(payload), count, base_lsn, timestamp_us, producer_id,
                                    producer_seq, crc32c(payload))
    return header, crc32c(payload, crc32c(header, data_crc))


def encode_frame(kind: int, payload: bytes, count: int, base_lsn: int, timestamp_us: int,
                 producer_id: int = 0, producer_seq: int = 0) -> bytes:
    return encode_frame_header(kind, len(payload), count, base_lsn, timestamp_us, producer_id, producer_seq,
                               crc32c(payload)) + payload


def decode_frame_header(buf: bytes | memoryview, pos: int = 0) -> FrameHeader:
    """Parse and check the frame header at `pos` (not the payload: see `check_payload`).  The compiled twin
    decodes a valid one in one call (every scan decodes one per frame); the reference names what is wrong."""
    if _c is not None:
        h = _c.decode_frame_header(FrameHeader, buf, pos)
        if h is not None:
            return h
    return decode_frame_header_py(buf, pos)


def decode_frame_header_py(buf: bytes | memoryview, pos: int = 0) -> FrameHeader:
    if len(buf) - pos < FRAME_HEADER_SIZE:
        raise IncompleteRecordError("bytes end inside a frame header", offset=pos)
    magic, kind, flags, reserved, plen, count, base, ts, pid, pseq, pcrc, hcrc = FRAME.unpack_from(buf, pos)
    if magic != FRAME_MAGIC:
        raise InvalidRecordError(f"bad frame magic {bytes(magic)!r}", offset=pos)
    if crc32c(buf[pos:pos + FRAME_HEADER_SIZE - 4]) != hcrc:
        raise ChecksumError("frame header CRC32C mismatch", offset=pos)
    if kind not in (KIND_DATA, KIND_SEAL) or flags or reserved:
        raise InvalidRecordError(f"unknown frame kind {kind} or flags {flags}/{reserved}", offset=pos)
    return FrameHeader(kind, plen, count, base, ts, pid, pseq, pcrc)


def check_payload(h: FrameHeader, buf: bytes | memoryview, payload_pos: int) -> None:
    """Raise unless buf holds the whole payload of `h` at `payload_pos` with a matching CRC."""
    end = payload_pos + h.payload_len
    if end > len(buf):
        raise IncompleteRecordError(f"frame payload needs {h.payload_len} bytes, only {len(buf) - payload_pos} "
                                    "remain", offset=payload_pos - FRAME_HEADER_SIZE, lsn=h.base_lsn)
    if crc32c(buf[payload_pos:end]) != h.payload_crc:
        raise ChecksumError("frame payload CRC32C mismatch", offset=payload_pos - FRAME_HEADER_SIZE,
                            lsn=h.base_lsn)


class Appended(NamedTuple):
    """One batch a producer got into the log: what deduplication needs to answer a resend.  A NamedTuple:
    the writer makes one per batch (a frozen dataclass's __init__ costs several times as much)."""
    seq: int
    base_lsn: int
    count: int


@dataclass(slots=True)
class Seal:
    """The summary a SEAL frame stores for its segment."""
    last_lsn: int
    next_lsn: int
    record_count: int
    data_crc: int
    index: list[tuple[int, int]] = field(default_factory=list)  # (LSN, frame offset), ascending
    producers: dict[int, list[Appended]] = field(default_factory=dict)  # newest batches last
    sealed_us: int = 0  # when the seal was written: every record in the segment is older


def encode_seal(seal: Seal, seal_offset: int, timestamp_us: int) -> bytes:
    """The SEAL frame; its payload ends with `seal_offset` so a reader finds it from the file's last 8 bytes."""
    parts = [_SEAL_HEAD.pack(seal.last_lsn, seal.record_count, seal.data_crc, len(seal.index),
                             len(seal.producers))]
    parts.extend(_INDEX_ENTRY.pack(lsn, off) for lsn, off in seal.index)
    for pid, window in seal.producers.items():
        parts.append(_PRODUCER_HEAD.pack(pid, len(window)))
        parts.extend(_WINDOW_ENTRY.pack(a.seq, a.base_lsn, a.count) for a in window)
    parts.append(_U64.pack(seal_offset))
    return encode_frame(KIND_SEAL, b"".join(parts), 0, seal.next_lsn, timestamp_us)


def decode_seal(h: FrameHeader, payload: bytes | memoryview) -> Seal:
    """Parse a SEAL payload whose CRC was already checked."""
    try:
        last, records, dcrc, n_index, n_prod = _SEAL_HEAD.unpack_from(payload, 0)
        pos = _SEAL_HEAD.size
        index = [_INDEX_ENTRY.unpack_from(payload, pos + i * _INDEX_ENTRY.size) for i in range(n_index)]
        pos += n_index * _INDEX_ENTRY.size
        producers = {}
        for _ in range(n_prod):
            pid, n = _PRODUCER_HEAD.unpack_from(payload, pos)
            pos += _PRODUCER_HEAD.size
            producers[pid] = [Appended(*_WINDOW_ENTRY.unpack_from(payload, pos + i * _WINDOW_ENTRY.size))
                              for i in range(n)]
            pos += n * _WINDOW_ENTRY.size
        if pos + 8 != len(payload):
            raise struct.error("length mismatch")
    except struct.error:
        raise InvalidRecordError("malformed seal frame payload", lsn=h.base_lsn) from None
    return Seal(last, h.base_lsn, records, dcrc, index, producers, h.timestamp_us)


def seal_offset_from_trailer(trailer: bytes) -> int:
    """The seal frame's offset, from the last 8 bytes of a sealed segment file."""
    return _U64.unpack(trailer)[0]


def is_zero(buf: bytes | memoryview) -> bool:
    """True if every byte is zero (a C-level count, no Python loop)."""
    return bytes(buf).count(0) == len(buf)

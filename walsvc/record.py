"""The record: nori-wal record v1, byte for byte (see docs/FORMAT.md, "Records").

    varint klen | varint vlen | u8 flags | [varint ttl_ms] | [varint term, varint index] | key | value | u32le crc32c

The CRC covers every byte before it.  Flags: bit 0 tombstone, bit 1 TTL present, bits 2-3 compression
(0 none, 1 LZ4, 2 zstd), bit 4 version present; bits 5-7 must be zero.  This module is pure: bytes in,
bytes out, no files.  What walsvc adds (LSN, timestamp, producer) lives in the batch frame, not here.

The hot loops (count_records, decode_payload, encode_put, encode_puts, and a producer's PutBuffer) have a
compiled twin in walsvc/_record_c.c, used when it was built; the functions here are the reference and the
fallback.  (So do frame headers, HEAD and the writer's APPEND check, which import `_c` from here.)  A twin
hands back None for anything but the common, valid case, and the Python code then decides, so there is one
implementation of every error.  WALSVC_PURE_PYTHON=1 in the environment turns the twin off.
"""

from __future__ import annotations

import base64
import os
import struct
import threading
from typing import Any, Iterator

from crc32c import crc32c

from .errors import (ChecksumError, CompressionUnavailableError, DecompressionError, IncompleteRecordError,
                     InvalidRecordError, RecordError, RecordTooLargeError, VarintOverflowError)

# What a reader accepts by default: the writer's default record limit is 1 MiB, but it was 16 MiB before, and a
# reader must read every log it may meet (a writer raising max_record_bytes past this needs readers told).
DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024
# A batch, with every value decompressed, is at most this long (the log's `max_batch_bytes`): a few bytes of
# zstd can claim gigabytes, and a reader materializes a whole batch at once.
DEFAULT_MAX_BATCH_BYTES = 32 * 1024 * 1024
# Bytes a record adds around its key and value: two length varints, flags, TTL and version varints, CRC (55 at
# most).  A batch of max_batch_bytes must hold one record of max_record_bytes and this.
MAX_RECORD_OVERHEAD = 64

FLAG_TOMBSTONE = 0x01
FLAG_TTL = 0x02
FLAG_COMPRESSION_MASK = 0x0C
FLAG_VERSION = 0x10
KNOWN_FLAGS = 0x1F

COMPRESSION_CODES = {None: 0, "lz4": 1, "zstd": 2}
COMPRESSION_NAMES = {0: None, 1: "lz4", 2: "zstd"}
ZSTD_LEVEL = 3

_U32 = struct.Struct("<I")
# CRC32C over a record's bytes *including* its little-endian CRC is this constant when the CRC matches:
# one C call checks a record without unpacking the stored value.
CRC_RESIDUE = 0x48674BC7
_MAX_U64 = (1 << 64) - 1

try:
    if os.environ.get("WALSVC_PURE_PYTHON"):
        raise ImportError("WALSVC_PURE_PYTHON is set")
    from . import _record_c as _c
except ImportError:
    _c = None


class Record:
    """One log record.  `lsn` and `timestamp` (µs since the epoch) are set on records read from a log."""

    __slots__ = ("key", "value", "tombstone", "ttl_ms", "compression", "version", "lsn", "timestamp")

    def __init__(self, key: bytes, value: bytes = b"", tombstone: bool = False, ttl_ms: int | None = None,
                 compression: str | None = None, version: tuple[int, int] | None = None,
                 lsn: int = 0, timestamp: int = 0) -> None:
        self.key = key
        self.value = value
        self.tombstone = tombstone
        self.ttl_ms = ttl_ms
        self.compression = compression
        self.version = version
        self.lsn = lsn
        self.timestamp = timestamp

    @classmethod
    def put(cls, key: bytes | str, value: bytes | str, *, ttl_ms: int | None = None,
            compression: str | None = None) -> "Record":
        """A put; str arguments are UTF-8 encoded.  `compression` is "zstd", "lz4" or None."""
        if compression not in COMPRESSION_CODES:
            raise InvalidRecordError(f"unknown compression {compression!r}; use 'zstd', 'lz4' or None")
        if ttl_ms is not None and not (type(ttl_ms) is int and 0 <= ttl_ms <= _MAX_U64):
            raise InvalidRecordError(f"ttl_ms must be an integer from 0 to 2**64-1, not {ttl_ms!r:.60}")
        return cls(_as_bytes(key), _as_bytes(value), False, ttl_ms, compression)

    @classmethod
    def delete(cls, key: bytes | str) -> "Record":
        """A tombstone: the key was deleted."""
        return cls(_as_bytes(key), b"", tombstone=True)

    def expires_at_us(self) -> int | None:
        """Absolute expiry (µs since the epoch) from the write timestamp and the TTL, or None."""
        if self.ttl_ms is None:
            return None
        return self.timestamp + self.ttl_ms * 1000

    def _fields(self) -> tuple:
        return (self.key, self.value, self.tombstone, self.ttl_ms, self.compression, self.version)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)!r}" for name in ("tombstone", "ttl_ms", "compression",
                                                                        "version", "lsn", "timestamp")
                        if getattr(self, name))
        return f"Record(key={self.key!r}, value={self.value!r}{extra})"


class _ReadRecord(Record):
    """A Record as the compiled decoder builds it (a Record to every caller: isinstance, ==, repr).

    The decoder leaves it out of the cycle collector, as CPython leaves out a tuple of atomic values: it
    holds only bytes, ints, None and a tuple of ints, so it cannot be part of a cycle.  Setting a field puts
    it back first, so whatever a caller stores in it is collected as usual.  Why: a replay's records, kept
    for a batch, age through the collector's generations and set off full collections again and again;
    that was more than half of a replay's time (docs/PERFORMANCE.md, "Per-record cost, second pass").
    """

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        _c_gc_track(self)
        object.__setattr__(self, name, value)


if _c is not None:
    _c.bind_record(_ReadRecord)
    _c_gc_track = _c.gc_track


def implementation() -> str:
    """Which record codec runs: "C (sse4.2 CRC32C)" or "pure Python" (status and --version show it)."""
    return f"C ({_c.CRC32C} CRC32C)" if _c is not None else "pure Python"


def _as_bytes(value: bytes | str) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidRecordError(f"keys and values must be bytes or str, not {type(value).__name__}")


def encode_varint(n: int) -> bytes:
    """Unsigned LEB128."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode the varint at `pos`; returns (value, position after it).  Rejects over-long and >64-bit forms."""
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise IncompleteRecordError("bytes end inside a varint", offset=start)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            if (b == 0 and pos - start > 1) or result > _MAX_U64:
                raise VarintOverflowError("varint is over-long or exceeds 64 bits", offset=start)
            return result, pos
        shift += 7
        if shift >= 70:
            raise VarintOverflowError("varint longer than 10 bytes", offset=start)


def _compress(code: int, value: bytes) -> bytes:
    if code == 2:
        import zstandard
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(value)
    lz4_block = _lz4()
    return encode_varint(len(value)) + lz4_block.compress(value, store_size=False)


def _lz4():
    try:
        import lz4.block
    except ImportError:
        raise CompressionUnavailableError("record uses LZ4 compression (code 1) but the 'lz4' package is not "
                                          "installed; run: pip install 'walsvc[lz4]'") from None
    return lz4.block


def codecs() -> tuple[str, ...]:
    """The compressions this process can decode: zstd always, LZ4 when its package is installed.  The writer
    advertises them in ENDPOINTS, so a producer refuses a value the writer could not check."""
    try:
        _lz4()
    except CompressionUnavailableError:
        return ("zstd",)
    return ("zstd", "lz4")


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_MAX_WINDOW = 16 * 1024 * 1024  # a frame without a content size may ask for no larger a window
_ZSTD_BLOCK_MAX = 128 * 1024
_zstd_local = threading.local()  # a ZstdDecompressor costs ~20 us to make and must not be shared by threads


def _zstd_decompressor():
    d = getattr(_zstd_local, "d", None)
    if d is None:
        import zstandard
        d = _zstd_local.d = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    return d


def _zstd_walk(stored: bytes, pos: int, checksum: bool, window: int) -> int:
    """An upper bound of the output of the zstd frame whose blocks start at `pos`, from its block headers.

    Proves the frame is complete and ends exactly at the end of `stored` without inflating anything.
    """
    end = len(stored)
    most = 0
    block_max = min(window, _ZSTD_BLOCK_MAX)
    while True:
        if pos + 3 > end:
            raise DecompressionError("zstd frame is cut short inside a block header")
        header = stored[pos] | stored[pos + 1] << 8 | stored[pos + 2] << 16
        kind = (header >> 1) & 3
        size = header >> 3
        pos += 3
        if kind == 3:
            raise DecompressionError("zstd frame has a block of the reserved type 3")
        pos += 1 if kind == 1 else size
        most += block_max if kind == 2 else size
        if header & 1:
            break
    pos += 4 if checksum else 0
    if pos != end:
        raise DecompressionError(f"zstd frame is cut short ({pos - end} bytes missing)" if pos > end else
                                 f"zstd value has {end - pos} bytes after its frame")
    return most


def _unzstd(stored: bytes, limit: int) -> bytes:
    """One complete zstd frame, nothing after it, inflating to at most `limit` bytes (checked first)."""
    import zstandard
    if stored[:4] != ZSTD_MAGIC:
        raise DecompressionError("zstd value does not start with a zstd frame magic number")
    try:
        params = zstandard.get_frame_parameters(stored)
        if params.dict_id:
            raise DecompressionError(f"zstd frame needs dictionary {params.dict_id}; walsvc uses none")
        size = params.content_size
        known = size != zstandard.CONTENTSIZE_UNKNOWN
        if known and size > limit:
            raise RecordTooLargeError(f"zstd value declares {size} bytes decompressed, above its limit of {limit}")
        # The block headers prove the frame whole, with nothing after it, before anything is inflated.
        most = _zstd_walk(stored, zstandard.frame_header_size(stored), params.has_checksum, params.window_size)
        if known and size:  # zstd itself checks the output length against the declared size
            return _zstd_decompressor().decompress(stored, allow_extra_data=False)
        if not known and most <= limit:
            return _zstd_decompressor().decompress(stored, max_output_size=max(most, 1))
        # No content size (streaming encoders) and room for more than the limit: inflate under a hard cap.  Also
        # a declared size of 0, for which decompress() returns b"" without decoding (or checksumming) the blocks;
        # the streaming decoder decodes them and refuses any output beyond the declared size.
        with _zstd_decompressor().stream_reader(stored) as reader:
            out = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"zstd value does not decompress: {exc}") from None
    if len(out) > limit:
        raise RecordTooLargeError(f"zstd value decompresses to more than its limit of {limit} bytes")
    return out


def _unlz4(stored: bytes, limit: int) -> bytes:
    """varint(size) + one raw LZ4 block that inflates to exactly `size` <= `limit` bytes."""
    lz4_block = _lz4()
    try:
        size, pos = decode_varint(stored, 0, len(stored))
    except RecordError:
        raise DecompressionError("LZ4 value's length prefix is cut short or over-long") from None
    if size > limit:
        raise RecordTooLargeError(f"LZ4 value declares {size} bytes decompressed, above its limit of {limit}")
    try:
        out = lz4_block.decompress(stored[pos:], uncompressed_size=size)
    except Exception as exc:  # lz4 raises LZ4BlockError, a plain Exception subclass
        raise DecompressionError(f"LZ4 value does not decompress: {exc}") from None
    if len(out) != size:
        raise DecompressionError(f"LZ4 value decompressed to {len(out)} bytes, its prefix says {size}")
    return out


def _decompress(code: int, stored: bytes, limit: int) -> bytes:
    """The value `stored` under compression `code`, never more than `limit` bytes and never inflated past
    it (docs/FORMAT.md, "Value encodings"): DecompressionError or RecordTooLargeError otherwise."""
    return _unzstd(stored, limit) if code == 2 else _unlz4(stored, limit)


def encode(record: Record, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> bytes:
    """The v1 bytes of `record`.  Compression is skipped (flag cleared) when it does not shrink the value."""
    key = record.key
    value = record.value
    if type(key) is not bytes or type(value) is not bytes:
        raise _not_bytes(record)
    if len(key) + len(value) > max_record_bytes:
        raise RecordTooLargeError(f"record of {len(key) + len(value)} bytes exceeds the {max_record_bytes}-byte "
                                  "maximum record size")
    if not (record.tombstone or record.compression or record.ttl_ms is not None or record.version):
        return encode_put(key, value)
    flags = 0
    if record.tombstone:
        flags |= FLAG_TOMBSTONE
    code = COMPRESSION_CODES.get(record.compression, -1)
    if code < 0:
        raise InvalidRecordError(f"unknown compression {record.compression!r}")
    if code and value:
        packed = _compress(code, value)
        if len(packed) < len(value):
            value = packed
            flags |= code << 2
    head = encode_varint(len(key)) + encode_varint(len(value))
    tail = b""
    ttl, version = record.ttl_ms, record.version
    if ttl is not None:
        # A Record built directly is checked here, before any byte goes out: a value the format cannot hold
        # would make the writer refuse the whole batch, other callers' records in it included.
        if not (type(ttl) is int and 0 <= ttl <= _MAX_U64):
            raise InvalidRecordError(f"ttl_ms must be an integer from 0 to 2**64-1, not {ttl!r:.60}")
        flags |= FLAG_TTL
        tail = encode_varint(ttl)
    if version is not None:
        if not (type(version) is tuple and len(version) == 2
                and all(type(v) is int and 0 <= v <= _MAX_U64 for v in version)):
            raise InvalidRecordError(f"version must be a (term, index) pair of integers from 0 to 2**64-1, "
                                     f"not {version!r:.60}")
        flags |= FLAG_VERSION
        tail += encode_varint(version[0]) + encode_varint(version[1])
    body = b"".join((head, bytes((flags,)), tail, key, value))
    return body + _U32.pack(crc32c(body))


_SHORT_HEADERS: list[bytes | None] = [None] * (128 * 128)  # (klen, vlen, flags=0) for lengths < 128, made on use


def encode_put(key: bytes, value: bytes) -> bytes:
    """Fast path for the common record: a plain put, no TTL, no compression (same bytes as `encode`)."""
    if _c is not None:
        return _c.encode_put(key, value)
    return encode_put_py(key, value)


def encode_put_py(key: bytes, value: bytes) -> bytes:
    """encode_put in Python: the reference for the compiled twin."""
    kl = len(key)
    vl = len(value)
    if kl < 0x80 and vl < 0x80:
        head = _SHORT_HEADERS[kl * 128 + vl]
        if head is None:
            head = _SHORT_HEADERS[kl * 128 + vl] = bytes((kl, vl, 0))
        body = head + key + value
        return body + _U32.pack(crc32c(body))
    # Longer records: one CRC call per part and a single join, instead of copying the record twice.
    head = encode_varint(kl) + encode_varint(vl) + b"\0"
    return b"".join((head, key, value, _U32.pack(crc32c(value, crc32c(key, crc32c(head))))))


def parse_header(buf: bytes | memoryview, pos: int, end: int,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> tuple[int, int, int, int | None,
                                                                             tuple[int, int] | None, int]:
    """The header of the record at `pos`: (key length, value length, flags, ttl_ms, version, key position).

    The one header parser: `decode`, the writer's check (`count_records`) and the reader's batch decoder
    (`decode_payload`) all use it.  It checks that the header ends before `end`, that key and value fit in
    `max_record_bytes`, and that the flags are known and name a compression code that exists; errors are
    located at `pos`.  The two batch loops recognize one form without calling it: the plain put whose
    lengths are single bytes and whose flags are zero (bytes < 0x80, < 0x80, 0), whose lengths are those
    bytes, which is what this parser returns for it too.
    """
    start = pos
    try:
        kl = buf[pos]
        if kl < 0x80:
            pos += 1
        else:
            kl, pos = decode_varint(buf, pos, end)
        vl = buf[pos]
        if vl < 0x80:
            pos += 1
        else:
            vl, pos = decode_varint(buf, pos, end)
        flags = buf[pos]
        if pos >= end:  # the header ran past `end` into bytes that are not ours: report this record
            raise IndexError
    except IndexError:
        raise IncompleteRecordError("bytes end inside a record header", offset=start) from None
    pos += 1
    if kl + vl > max_record_bytes:
        raise RecordTooLargeError(f"record claims {kl}+{vl} bytes, above the {max_record_bytes}-byte maximum",
                                  offset=start)
    if flags & ~KNOWN_FLAGS:
        raise InvalidRecordError(f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:02x}", offset=start)
    if flags & FLAG_COMPRESSION_MASK == FLAG_COMPRESSION_MASK:
        raise InvalidRecordError("invalid compression code 3", offset=start)
    ttl = None
    version = None
    if flags & (FLAG_TTL | FLAG_VERSION):
        if flags & FLAG_TTL:
            ttl, pos = decode_varint(buf, pos, end)
        if flags & FLAG_VERSION:
            term, pos = decode_varint(buf, pos, end)
            index, pos = decode_varint(buf, pos, end)
            version = (term, index)
    return kl, vl, flags, ttl, version, pos


def decode(buf: bytes | memoryview, pos: int = 0, end: int | None = None, *,
           max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, verify_crc: bool = True,
           max_inflate: int | None = None) -> tuple[Record, int]:
    """Decode the record at `pos`; returns (record, position after it).

    `verify_crc=False` skips the per-record CRC: readers use it inside a batch frame whose CRC already
    covered these bytes (one C call per frame instead of one per record).  A compressed value may grow by at
    most `max_inflate` bytes when decompressed (what is left of its batch's budget), besides fitting with its
    key in `max_record_bytes`.
    """
    if end is None:
        end = len(buf)
    start = pos
    kl, vl, flags, ttl, version, pos = parse_header(buf, pos, end, max_record_bytes)
    code = (flags & FLAG_COMPRESSION_MASK) >> 2
    kend = pos + kl
    vend = kend + vl
    if vend + 4 > end:
        raise IncompleteRecordError(f"record needs {vend + 4 - start} bytes, only {end - start} remain",
                                    offset=start)
    if verify_crc and crc32c(buf[start:vend + 4]) != CRC_RESIDUE:
        stored = _U32.unpack_from(buf, vend)[0]
        raise ChecksumError(f"record CRC32C mismatch (stored 0x{stored:08x})", offset=start)
    value = bytes(buf[kend:vend])
    if code:
        limit = max_record_bytes - kl
        if max_inflate is not None:
            limit = min(limit, vl + max_inflate)
        try:
            value = _decompress(code, value, limit)
        except (DecompressionError, RecordTooLargeError, CompressionUnavailableError) as exc:
            raise exc.located(offset=start) from None
    return Record(bytes(buf[pos:kend]), value, bool(flags & FLAG_TOMBSTONE), ttl, COMPRESSION_NAMES[code],
                  version), vend + 4


def iter_decode(buf: bytes | memoryview, pos: int = 0, end: int | None = None, *,
                max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, verify_crc: bool = True) -> Iterator[Record]:
    """Decode records laid end to end in buf[pos:end]; the last one must end exactly at `end`."""
    if end is None:
        end = len(buf)
    while pos < end:
        record, pos = decode(buf, pos, end, max_record_bytes=max_record_bytes, verify_crc=verify_crc)
        yield record


def encode_puts(items: list[tuple[bytes, bytes]], max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> bytes:
    """Plain puts of (key, value) pairs laid end to end: the payload of `Producer.put_many` in one call."""
    if _c is not None:
        payload = _c.encode_puts(items, max_record_bytes)
        if payload is not None:
            return payload
    return b"".join(encode_put_py(k, v) if type(k) is bytes and type(v) is bytes and len(k) + len(v) <= max_record_bytes
                    else encode(Record.put(k, v), max_record_bytes) for k, v in items)


class PutBufferPy:
    """A producer's open batch: plain puts encoded into one growing buffer, with a handle per record
    (`handle_type(owner, index)`: the batch's owner and the record's place in it).

    The reference for the compiled twin (`_record_c.PutBuffer`), which makes `put` atomic under the GIL so
    a producer needs no lock per record, and fills the handle's `_batch` and `_index` slots without calling
    the class; this one is not atomic (`atomic` False), so its caller holds a lock around every call.  `put`
    returns None where the caller must decide (not exact bytes, over max_record_bytes, no open batch, no
    room below `limit`).
    """

    atomic = False

    def __init__(self, handle_type: type, max_record_bytes: int) -> None:
        self._handle_type = handle_type
        self._max_record_bytes = max_record_bytes
        self._parts: list[bytes] = []
        self._owner: Any = None
        self.size = 0
        self.count = 0
        self.limit = 0

    @property
    def is_open(self) -> bool:
        return self._owner is not None

    def put(self, key: bytes, value: bytes) -> Any:
        """Append a plain put; its handle, or None."""
        if (type(key) is not bytes or type(value) is not bytes or self._owner is None
                or len(key) + len(value) > self._max_record_bytes):
            return None
        data = encode_put_py(key, value)
        size = self.size + len(data)
        if size >= self.limit:
            return None
        self._parts.append(data)
        self.size = size
        self.count += 1
        return self._handle_type(self._owner, self.count - 1)

    def open(self, owner: Any, limit: int) -> None:
        """Start a batch for `owner`; `put` takes a record while size + its bytes < limit."""
        if self._owner is not None:
            raise ValueError("a batch is already open")
        self._owner = owner
        self.size = self.count = 0
        self.limit = limit

    def add(self, data: bytes, count: int) -> int:
        """Append `count` records already encoded end to end in `data`; the first one's index."""
        if self._owner is None:
            raise ValueError("no batch is open")
        self._parts.append(bytes(data))
        self.size += len(data)
        first = self.count
        self.count += count
        return first

    def take(self) -> tuple[bytes, int]:
        """Close the batch: (payload, count)."""
        if self._owner is None:
            raise ValueError("no batch is open")
        out = (b"".join(self._parts), self.count)
        self._parts = []
        self._owner = None
        self.size = self.count = 0
        return out

    def handles(self, owner: Any, first: int, n: int) -> list[Any]:
        """Handles for `n` records of `owner` from index `first`."""
        make = self._handle_type
        return [make(owner, first + i) for i in range(n)]


def put_buffer(handle_type: type, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Any:
    """A producer's open-batch buffer: the compiled one when built (atomic puts), else PutBufferPy."""
    if _c is not None:
        return _c.PutBuffer(handle_type, max_record_bytes)
    return PutBufferPy(handle_type, max_record_bytes)


def encode_many(records: list[Record], max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> bytes:
    """The v1 bytes of several records laid end to end (a batch payload)."""
    parts = []
    try:
        for r in records:
            if (r.compression is None and r.ttl_ms is None and not r.tombstone and r.version is None
                    and len(r.key) + len(r.value) <= max_record_bytes):
                parts.append(encode_put(r.key, r.value))
            else:
                parts.append(encode(r, max_record_bytes))
    except TypeError:
        raise _not_bytes(records[len(parts)]) from None
    return b"".join(parts)


def _not_bytes(record: Record) -> InvalidRecordError:
    """A Record built directly (not by `Record.put`/`delete`, which check and convert) with a field of the
    wrong type."""
    if type(record.key) is bytes and type(record.value) is bytes:
        return InvalidRecordError(f"a field of {record!r} has the wrong type; Record.put and Record.delete check them")
    return InvalidRecordError(f"a record's key and value must be bytes, not {type(record.key).__name__} and "
                              f"{type(record.value).__name__} (Record.put and Record.delete also take str)")


def count_records(buf: bytes | memoryview, pos: int, end: int, *,
                  max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                  max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> int:
    """Walk the records in buf[pos:end] without building them, checking structure, each CRC, and that each
    compressed value decompresses (docs/FORMAT.md, "Value encodings") within the batch's budget.

    The writer runs this on every batch a producer sends, so garbage never reaches the log.
    """
    if _c is not None:
        walked = _c.count_records(buf, pos, end, max_record_bytes)
        if walked is not None:
            n, compressed = walked
            spare = max_batch_bytes - (end - pos)
            for record_at, key_at, value_at, value_end, code in compressed or ():
                spare = _check_compressed(code, bytes(buf[value_at:value_end]), value_at - key_at, spare,
                                          max_record_bytes, record_at)
            return n
    return count_records_py(buf, pos, end, max_record_bytes=max_record_bytes, max_batch_bytes=max_batch_bytes)


def _check_compressed(code: int, stored: bytes, key_len: int, spare: int, max_record_bytes: int,
                      offset: int) -> int:
    """A compressed value must decompress, or every reader would fail at this record later, and within what
    the batch may still add (`spare`, returned less what this value added)."""
    try:
        return spare - (len(_decompress(code, stored, min(max_record_bytes - key_len, len(stored) + spare)))
                        - len(stored))
    except RecordError as exc:
        raise type(exc)(exc.detail, offset=offset) from None


def count_records_py(buf: bytes | memoryview, pos: int, end: int, *,
                     max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                     max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> int:
    """count_records in Python: the reference for the compiled twin.  Plain records with one-byte lengths
    (the common case) take an inlined path."""
    n = 0
    start = pos
    code = 0
    spare = max_batch_bytes - (end - pos)  # what decompression may still add to the batch
    view = memoryview(buf)
    while pos < end:
        record_start = pos
        if pos + 3 <= end and buf[pos] < 0x80 and buf[pos + 1] < 0x80 and buf[pos + 2] == 0:
            vend = pos + 3 + buf[pos] + buf[pos + 1]
        else:
            try:
                kl, vl, flags, _, _, pos = parse_header(buf, pos, end, max_record_bytes)
            except RecordError as exc:
                raise type(exc)(exc.detail, offset=record_start - start) from None
            vend = pos + kl + vl
            code = (flags & FLAG_COMPRESSION_MASK) >> 2
        if vend + 4 > end:
            raise IncompleteRecordError("record runs past the end of the batch", offset=record_start - start)
        pos = vend + 4
        # Slicing bytes copies; a memoryview slice does not, but costs more to make: pick by size.
        if crc32c(buf[record_start:pos] if pos - record_start <= 512 else view[record_start:pos]) != CRC_RESIDUE:
            raise ChecksumError("record CRC32C mismatch", offset=record_start - start)
        if code:
            spare = _check_compressed(code, bytes(buf[vend - vl:vend]), kl, spare, max_record_bytes,
                                      record_start - start)
            code = 0
        n += 1
    return n


def decode_payload(buf: bytes, base_lsn: int, count: int, timestamp: int, first_wanted: int = 0, *,
                   start: int = 0, end: int | None = None, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                   max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> list[Record]:
    """The `count` records in buf[start:end], a batch frame payload whose CRC was checked, numbered from
    `base_lsn`; those below `first_wanted` are skipped.  The batch may decompress to at most
    `max_batch_bytes` (RecordTooLargeError), as the writer checked."""
    if _c is not None:
        records = _c.decode_payload(buf, base_lsn, count, timestamp, first_wanted, start,
                                    len(buf) if end is None else end, max_record_bytes)
        if records is not None:
            return records
    return decode_payload_py(buf, base_lsn, count, timestamp, first_wanted, start=start, end=end,
                             max_record_bytes=max_record_bytes, max_batch_bytes=max_batch_bytes)


def decode_payload_py(buf: bytes, base_lsn: int, count: int, timestamp: int, first_wanted: int = 0, *,
                      start: int = 0, end: int | None = None, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                      max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> list[Record]:
    """decode_payload in Python: the reference for the compiled twin.  Plain small records take an inlined
    path."""
    out = []
    append = out.append
    pos = start
    end = len(buf) if end is None else end
    spare = max_batch_bytes - (end - start)
    lsn = base_lsn
    while pos < end:
        kl = buf[pos]
        if kl < 0x80 and pos + 2 < end and buf[pos + 1] < 0x80 and buf[pos + 2] == 0:
            kend = pos + 3 + kl
            vend = kend + buf[pos + 1]
            if vend + 4 > end:
                raise IncompleteRecordError("record runs past the end of its batch", offset=pos, lsn=lsn)
            if lsn >= first_wanted:
                append(Record(buf[pos + 3:kend], buf[kend:vend], False, None, None, None, lsn, timestamp))
            pos = vend + 4
        else:
            record_start = pos
            try:
                record, pos = decode(buf, pos, end, max_record_bytes=max_record_bytes, verify_crc=False,
                                     max_inflate=spare)
            except RecordError as exc:
                raise exc.located(lsn=lsn) from None
            if record.compression is not None:
                spare -= len(record.key) + len(record.value) - (pos - record_start)
            if lsn >= first_wanted:
                record.lsn = lsn
                record.timestamp = timestamp
                append(record)
        lsn += 1
    if lsn - base_lsn != count:
        raise InvalidRecordError(f"batch holds {lsn - base_lsn} records, its header says {count}", lsn=base_lsn)
    return out


def _text(data: bytes, name: str, out: dict[str, Any]) -> None:
    """UTF-8 text under `name`, other bytes base64 under `name_b64` (JSON-ready, as `walsvc tail --json`)."""
    try:
        out[name] = data.decode("utf-8")
    except UnicodeDecodeError:
        out[name + "_b64"] = base64.b64encode(data).decode()


def record_dict(r: Record) -> dict[str, Any]:
    """A record as `walsvc tail --json` and `walsvc dump` print it (docs/PROTOCOL.md, "Records as JSON lines")."""
    out: dict[str, Any] = {"lsn": r.lsn, "timestamp": r.timestamp, "tombstone": r.tombstone, "ttl_ms": r.ttl_ms,
                           "compression": r.compression, "version": list(r.version) if r.version else None}
    _text(r.key, "key", out)
    _text(r.value, "value", out)
    return out

"""Every exception walsvc raises, in one place.

Each message says what went wrong and where (file, offset, LSN, config key, flag), so an operator can act on
it without reading code.  Codec errors carry the location as attributes too, so callers can add it later:
a record decoder knows the offset inside a payload; the segment scanner knows the file and the LSN.
"""

from __future__ import annotations


class WalError(Exception):
    """Base class of every walsvc error."""


def _where(segment: str | None, offset: int | None, lsn: int | None) -> str:
    parts = []
    if segment is not None:
        parts.append(f"segment {segment}")
    if offset is not None:
        parts.append(f"offset {offset}")
    if lsn is not None:
        parts.append(f"LSN {lsn}")
    return f" ({', '.join(parts)})" if parts else ""


class RecordError(WalError):
    """A record (or frame) could not be decoded.  `segment`, `offset` and `lsn` say where, when known."""

    def __init__(self, detail: str, *, segment: str | None = None, offset: int | None = None,
                 lsn: int | None = None) -> None:
        self.detail = detail
        self.segment = segment
        self.offset = offset
        self.lsn = lsn
        super().__init__(detail + _where(segment, offset, lsn))

    def located(self, *, segment: str | None = None, offset: int | None = None,
                lsn: int | None = None) -> "RecordError":
        """A copy of this error with the outer location filled in (the inner offset is added to `offset`)."""
        if offset is not None and self.offset is not None:
            offset += self.offset
        return type(self)(self.detail, segment=segment or self.segment,
                          offset=self.offset if offset is None else offset,
                          lsn=self.lsn if lsn is None else lsn)


class IncompleteRecordError(RecordError):
    """The bytes end before the record does: a torn write, or a buffer cut short."""


class ChecksumError(RecordError):
    """A CRC32C did not match: the bytes changed after they were written."""


class InvalidRecordError(RecordError):
    """Structurally impossible: unknown flag bits, an unknown compression code, a bad magic number."""


class VarintOverflowError(InvalidRecordError):
    """A varint longer than 10 bytes or above 2**64-1, or not in its shortest form."""


class RecordTooLargeError(InvalidRecordError):
    """A key, value or batch is longer than the configured maximum."""


class DecompressionError(RecordError):
    """The stored value passed its CRC but does not decompress."""


class CompressionUnavailableError(RecordError):
    """The record uses a codec whose Python package is not installed (LZ4 needs `pip install lz4`)."""


class CorruptionError(WalError):
    """Damaged data somewhere other than a torn tail; never silently dropped.

    Raised by recovery (unless `on_corruption = "truncate"`), by readers and by `walsvc verify`.
    """

    def __init__(self, detail: str, *, segment: str | None = None, offset: int | None = None,
                 lsn: int | None = None) -> None:
        self.detail = detail
        self.segment = segment
        self.offset = offset
        self.lsn = lsn
        super().__init__("corruption: " + detail + _where(segment, offset, lsn))


class MissingSegmentError(CorruptionError):
    """A segment in the middle of the log is gone: a hole in the LSNs that retention cannot have made
    (it deletes only the oldest segments), so it is never read past silently."""


class LogLockedError(WalError):
    """Another process owns the log directory."""

    def __init__(self, directory: str, pid: int | None) -> None:
        self.directory = directory
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"log {directory} is already open for writing by {holder}; "
                         "only one writer may own a log directory")


class LogStoppedError(WalError):
    """The log refuses writes because an fsync or write failed; a restart (with recovery) is required."""


class LogClosedError(WalError):
    """The log (or reader, producer) was closed."""


class TruncatedError(WalError):
    """A read asked for LSNs that retention already deleted."""

    def __init__(self, requested: int, oldest: int) -> None:
        self.requested = requested
        self.oldest = oldest
        super().__init__(f"LSN {requested} was truncated by retention; oldest is {oldest}")


class ConfigError(WalError):
    """A configuration key or command-line flag has a bad name, type or value."""

    def __init__(self, key: str, detail: str) -> None:
        self.key = key
        self.detail = detail
        super().__init__(f"{key}: {detail}")


class ProtocolError(WalError):
    """A wire message is malformed, too large, or of an unknown version.  `code` is the nack reason code."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


class NackError(WalError):
    """The writer refused a batch; `code` is the reason code from the nack (see docs/PROTOCOL.md)."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"writer refused the batch ({code}): {detail}")


class BackpressureError(WalError):
    """The producer's buffer stayed full for longer than its timeout: the writer is behind or gone."""


class ServiceUnavailableError(WalError):
    """No writer answers for this log directory."""

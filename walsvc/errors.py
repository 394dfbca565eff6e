"""Every exception walsvc raises, in one place.

Each message says what went wrong and where (file, offset, LSN, config key, flag), so an operator can act on
it without reading code.  A place in the log is a `Location` and reads one way everywhere ("segment
00000000000000000001.wal, offset 4096, LSN 17").  Codec errors carry the location as attributes too, so
callers can add it later: a record decoder knows the offset inside a payload; the segment scanner knows the
file and the LSN.  Every class derives from `WalError`; where a standard class says the same thing it is a
second base (`ConfigError` is a ValueError, `AckTimeoutError` a TimeoutError), so generic handlers still work.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass as _dataclass
from os import PathLike as _PathLike


class WalError(Exception):
    """Base class of every walsvc error."""


@_dataclass(frozen=True, slots=True)
class Location:
    """A place in the log: a segment file, a byte offset (in the segment, or in a payload when no segment is
    known) and an LSN, any of them unknown.  `str()` gives the one form every message uses."""
    segment: str | None = None
    offset: int | None = None
    lsn: int | None = None

    def __str__(self) -> str:
        parts = []
        if self.segment is not None:
            parts.append(f"segment {self.segment}")
        if self.offset is not None:
            parts.append(f"offset {self.offset}")
        if self.lsn is not None:
            parts.append(f"LSN {self.lsn}")
        return ", ".join(parts)

    def __bool__(self) -> bool:
        return not (self.segment is None and self.offset is None and self.lsn is None)

    def after(self, detail: str) -> str:
        """`detail`, then this place in parentheses (if any is known): how an error message names it."""
        return f"{detail} ({self})" if self else detail


class _Located(WalError):
    """An error about bytes at a place: `segment`, `offset` and `lsn` say where, when known, and the message
    ends with that place (`Location`); `PREFIX` starts it."""

    PREFIX = ""

    def __init__(self, detail: str, *, segment: str | None = None, offset: int | None = None,
                 lsn: int | None = None) -> None:
        self.detail = detail
        self.segment = segment
        self.offset = offset
        self.lsn = lsn
        super().__init__(self.PREFIX + self.location.after(detail))

    @property
    def location(self) -> Location:
        return Location(self.segment, self.offset, self.lsn)


class RecordError(_Located):
    """A record (or frame) could not be decoded.  `segment`, `offset` and `lsn` say where, when known."""

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


class CorruptionError(_Located):
    """Damaged data somewhere other than a torn tail; never silently dropped.

    Raised by recovery (unless `on_corruption = "truncate"`), by readers and by `walsvc verify`.
    """

    PREFIX = "corruption: "


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


class WriteStepError(WalError, OSError):
    """An OSError from one named step of the write path (`operation` on `filename`), so a stop reason can say
    what failed where: a bare "[Errno 5] Input/output error" from an fd-based call names no file."""

    def __init__(self, operation: str, path: str | _PathLike | None, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), None if path is None else str(path))
        self.operation = operation

    def __str__(self) -> str:
        return f"{self.operation} failed: {super().__str__()}"


class LogStoppedError(WalError):
    """The log refuses writes for good because a write, fsync, HEAD update, rotation or retention delete
    failed (fail-stop: a failed fsync may have dropped dirty pages, so nothing is retried).  `operation`,
    `path` and `errno` say what failed where; a restart runs recovery, which checks what reached the disk.

    A producer builds one from a `log_stopped` nack (`from_nack`): then only `detail`, the writer's text, is set.
    """

    def __init__(self, operation: str, path: str | None, errno: int | None, detail: str, *,
                 message: str | None = None) -> None:
        self.operation = operation
        self.path = path
        self.errno = errno
        self.detail = detail
        where = f" on {path}" if path else ""
        code = f" ({_errno.errorcode.get(errno, errno)})" if errno is not None else ""
        super().__init__(message or f"log stopped: {operation} failed{where}{code}: {detail}; the log accepts "
                                    "no more writes: fix the cause (free space, replace the disk), then restart "
                                    "the writer so recovery checks what reached the disk")

    @classmethod
    def from_exception(cls, operation: str, path: str | _PathLike | None, exc: BaseException) -> "LogStoppedError":
        """The stop reason for `exc` in `operation`; a WriteStepError names the step inside it that failed
        and its file (the detail then says during which operation)."""
        during = ""
        if isinstance(exc, WriteStepError):
            if exc.operation != operation:
                during = f" (during {operation})"
            operation, path = exc.operation, exc.filename
        if isinstance(exc, OSError):
            detail = exc.strerror or str(exc)
            err = exc.errno
        else:
            detail, err = f"{type(exc).__name__}: {exc}", None
        return cls(operation, None if path is None else str(path), err, detail + during)

    @classmethod
    def from_nack(cls, detail: str) -> "LogStoppedError":
        """A producer's view of the writer's stop: the nack's text, which names the operation and file."""
        return cls("writer", None, None, detail,
                   message=f"writer refused the batch ({detail}); it may or may not be in the log after the "
                           "writer restarts")

    def as_dict(self) -> dict[str, object]:
        """For status: what failed, where, and the errno (number and name)."""
        return {"operation": self.operation, "path": self.path, "errno": self.errno,
                "errno_name": _errno.errorcode.get(self.errno) if self.errno is not None else None,
                "detail": self.detail, "message": str(self)}


class LogClosedError(WalError):
    """The log (or reader, producer) was closed."""


class TruncatedError(WalError):
    """A read asked for LSNs that retention already deleted."""

    def __init__(self, requested: int, oldest: int) -> None:
        self.requested = requested
        self.oldest = oldest
        super().__init__(f"LSN {requested} was truncated by retention; oldest is {oldest}")


class _AboutOne(WalError):
    """An error about one named thing (a key, a reason code, a group): `SUBJECT` names the attribute that
    holds it, `detail` says what is wrong, and `FORMAT` joins the two into the message."""

    SUBJECT = "subject"
    FORMAT = "{0}: {1}"

    def __init__(self, subject: str, detail: str) -> None:
        setattr(self, self.SUBJECT, subject)
        self.detail = detail
        super().__init__(self.FORMAT.format(subject, detail))


class ConfigError(_AboutOne, ValueError):
    """A configuration key, an argument or a command-line flag has a bad name, type or value.  `key` names it:
    `log.segment_bytes`, `producer.linger_ms`, `start`, `--dir`."""

    SUBJECT = "key"
    key: str


class ProtocolError(_AboutOne):
    """A wire message is malformed, too large, or of an unknown version.  `code` is the nack reason code."""

    SUBJECT = "code"
    code: str


class NackError(_AboutOne):
    """The writer refused a batch; `code` is the reason code from the nack (see docs/PROTOCOL.md)."""

    SUBJECT = "code"
    FORMAT = "writer refused the batch ({0}): {1}"
    code: str


class BackpressureError(WalError, TimeoutError):
    """The producer's buffer stayed full for longer than its timeout: the writer is behind or gone."""


class LogIdError(WalError):
    """The log's id file (`log-id`) is unreadable or does not hold a UUID."""


class MirrorError(WalError):
    """The mirror cannot (or must not) run: a stale cursor, a stream that does not fit, a log id mismatch."""


class SinkUnavailableError(WalError):
    """The mirror's sink did not acknowledge a publish (no quorum, a node down, a timeout); it retries."""


class ServiceUnavailableError(WalError):
    """No writer answers for this log directory."""


class AckTimeoutError(WalError, TimeoutError):
    """A record's ack did not come within the time the caller gave; the message says whether a writer runs."""


class ProducerIdError(WalError):
    """The writer's record of a producer id does not match the batches this producer sent under it: another
    producer uses the same id, or the writer serves another log (or forgot the id).  The batch may or may not
    be in the log; the message says which case the producer saw."""


class NoriFormatError(WalError):
    """A directory cannot be read as a nori-wal log: it is missing, or two segment files claim one id."""


class NoriDamageError(CorruptionError):
    """A nori-wal segment holds damaged bytes, or a record walsvc cannot store, before its end.

    `length` is how many bytes the damage spans (to the next record that can be found, or to the end of the
    segment); `walsvc import-nori --skip-damaged` skips them and reports each skip.
    """

    def __init__(self, detail: str, *, segment: str, offset: int, length: int) -> None:
        self.length = length
        super().__init__(detail, segment=segment, offset=offset)


class NoriImportRefusedError(WalError):
    """`import-nori` will not run: the source was already imported, or an interrupted import cannot resume."""


class GroupError(_AboutOne):
    """A consumer group refused a request: a bad argument, or a lease that is no longer the consumer's."""

    SUBJECT = "group"
    FORMAT = "consumer group {0!r}: {1}"
    group: str


class UnsafePermissionsError(WalError):
    """The log directory (or a file in it) is open to other accounts, or the directory is another account's;
    the writer will not use it as it is."""

    def __init__(self, directory: str, problems: list[str], fix: str, what: str = "is open to other users") -> None:
        self.directory = directory
        self.problems = problems
        named = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
        super().__init__(f"log directory {directory} {what}: {named}; {fix}")


class CursorBusyError(WalError):
    """Another live reader holds this named cursor (a named cursor has one reader at a time)."""

    def __init__(self, directory: str, name: str, pid: int | None, by_writer: bool = False) -> None:
        self.name = name
        self.pid = pid
        self.by_writer = by_writer
        if by_writer:  # a consumer group's position: the writer holds it for as long as it runs
            super().__init__(f"cursor {name!r} in {directory} is in use by process {pid}, the log's writer: it is "
                             f"consumer group {name!r}'s position, which the writer holds while it runs; stop the "
                             "writer (SIGTERM stores the group's position) to reset or delete it, then start it "
                             "again (or use another name)")
            return
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"cursor {name!r} in {directory} is in use by {holder}; a named cursor has one reader "
                         "at a time (use another name, or stop that reader)")


class CursorError(WalError):
    """A cursor operation that would lose or invent progress: moving backwards, or past the committed end."""

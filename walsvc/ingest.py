"""The writer's decision for one APPEND, with no I/O: store it, answer it as a duplicate, or refuse it.

Pure so that every case (docs/PROTOCOL.md, "Sequence rules") is tested with made-up batches and windows;
the writer (walsvc/writer.py) carries the decision out against the log and its sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

from . import protocol as P
from .errors import ProtocolError, RecordError, RecordTooLargeError
from .frame import Appended
from .record import _c, count_records


class Store(NamedTuple):
    """New and valid: append `payload` (`count` records) under (producer id, sequence).  A NamedTuple, as
    P.Append: one is made for every batch."""
    producer_id: int
    seq: int
    payload: bytes
    count: int


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Already in the log: answer with the LSNs it got the first time, once `last_lsn` is committed.
    base_lsn = count = 0 means older than the window ("stored, LSNs unknown"), to answer at once."""
    producer_id: int
    seq: int
    base_lsn: int
    count: int

    @property
    def last_lsn(self) -> int:
        return self.base_lsn + self.count - 1

    def reply(self) -> P.Reply:
        detail = "" if self.count else "older than the dedup window"
        return P.Reply(self.producer_id, P.DUPLICATE, self.seq, self.base_lsn, self.count, detail)


@dataclass(frozen=True, slots=True)
class Refuse:
    """Not stored: nack with `code` (when the sender can be named) and count it."""
    code: str
    detail: str


Decision = Store | Duplicate | Refuse


class IngestSession:
    """The writer's validation and deduplication rules for APPEND messages, given the log's limits."""

    def __init__(self, *, max_batch_bytes: int, max_record_bytes: int) -> None:
        self.max_batch_bytes = max_batch_bytes
        self.max_record_bytes = max_record_bytes

    def decide(self, msg: bytes, windows: Callable[[int], Sequence[Appended] | None]) -> Decision:
        """`windows(producer id)`: that producer's last stored batches, oldest first, or None if unknown
        (Log.producer_batches).

        The common case, a valid APPEND that is its producer's next, takes one call of the compiled twin
        (`_record_c.check_append`: the header's and the records' checks below, in C); the twin declines
        anything else, and the checks below decide it and name the refusal."""
        if _c is not None:
            fast = _c.check_append(msg, self.max_record_bytes, self.max_batch_bytes)
            if fast is not None:
                window = windows(fast[0])
                if not window or fast[1] == window[-1].seq + 1:
                    return Store(*fast)
        try:
            a = P.decode_append(msg)
        except ProtocolError as exc:
            return Refuse(exc.code, exc.detail)
        window = windows(a.producer_id)
        if len(a.payload) > self.max_batch_bytes:
            return Refuse(P.TOO_LARGE, f"batch of {len(a.payload)} bytes exceeds max_batch_bytes "
                                       f"({self.max_batch_bytes})")
        if window:
            last = window[-1]
            if a.seq <= last.seq:
                for b in window:
                    if b.seq == a.seq:
                        return Duplicate(a.producer_id, a.seq, b.base_lsn, b.count)
                return Duplicate(a.producer_id, a.seq, 0, 0)
            if a.seq != last.seq + 1:
                return Refuse(P.OUT_OF_SEQUENCE, f"expected sequence {last.seq + 1}, got {a.seq}")
        payload = bytes(a.payload)
        try:
            n = count_records(payload, 0, len(payload), max_record_bytes=self.max_record_bytes,
                              max_batch_bytes=self.max_batch_bytes)
        except RecordError as exc:
            code = P.TOO_LARGE if isinstance(exc, RecordTooLargeError) else P.MALFORMED
            return Refuse(code, f"record at payload offset {exc.offset}: {exc.detail}")
        if n != a.count:
            return Refuse(P.MALFORMED, f"header says {a.count} records, payload holds {n}")
        return Store(a.producer_id, a.seq, payload, n)

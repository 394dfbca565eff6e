"""A producer's protocol state with no I/O (h11 style): sequence numbers, resends, lost replies, nacks and
renumbering in one place, so every case can be tested with made-up replies and a made-up clock.

The shell (walsvc/producer.py) feeds it batches (`submit`), replies (`receive`) and clock ticks (`tick`),
asks it what may go out (`next_send`, then `sent` once the socket took it) and carries out what `receive`
returns: resolve or fail a batch's future, or subscribe under a new producer id.  Each submitted batch is
resolved or failed exactly once.

Why the rules are what they are (docs/PROTOCOL.md, "Producer sessions"):
- Nothing goes out until the writer's READY for our reply topic: PUB drops replies published before it
  applied the subscription.  Each later READY means the path was re-made (a writer restart, a reconnect):
  every unacked batch goes out again at once, since its reply may have been published to nobody, one in
  flight until the writer stores one (it may be a new log's writer, which does not know this id).
- "Stored, LSNs unknown" (a DUPLICATE with count 0) for a batch still unacked fails it: unacked batches are
  inside the writer's window, so the writer lost track of this id (a new log at the same place).
- One batch in flight until the writer stored one of ours: a writer that does not know a producer starts it
  at whatever sequence arrives, so a lost batch 1 followed by batch 2 would leave 1 answered "stored" unstored.
- A refusal for good (malformed, too_large, unknown_version) does not consume the sequence number: later
  batches move down by one and go out again (the writer refused them as out of sequence).
- log_stopped for sequence N: batch N may or may not be in the log (a failed fsync), so neither reusing nor
  skipping N is safe under this producer id.  N and every later batch fail with LogStoppedError (the writer
  stored none after N); new batches go out under a fresh producer id, numbered on from N so that a sequence
  number still names one batch in this session.  Earlier batches keep their id: their acks may be on the way.
- A DUPLICATE for a batch sent once (or a reply whose count is not the batch's) answers a copy this
  producer never sent: another producer uses the id.  That batch and every later one fail with
  ProducerIdError and new batches go out under a fresh id, as after log_stopped.
"""

from __future__ import annotations

import collections
import secrets
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from . import protocol as P
from .errors import LogStoppedError, NackError, ProducerIdError

SEQ_OFFSET = 12  # where the sequence sits in an APPEND header (docs/PROTOCOL.md)


class Outgoing:
    """One batch as the session tracks it; `token` is the shell's own object, handed back in actions."""

    __slots__ = ("token", "message", "count", "producer_id", "seq", "sent_at", "sends")

    def __init__(self, token: Any, message: bytes, count: int, producer_id: int, seq: int) -> None:
        self.token = token
        self.producer_id = producer_id
        self.message = message
        self.count = count
        self.seq = seq
        self.sent_at = 0.0
        self.sends = 0

    def renumber(self, seq: int) -> None:
        """A new sequence number: the copies sent under the old one say nothing about this one."""
        self.seq = seq
        self.sends = 0
        self.message = self.message[:SEQ_OFFSET] + seq.to_bytes(8, "little") + self.message[SEQ_OFFSET + 8:]


class Resolve(NamedTuple):
    """The batch is in the log: its first record got `base_lsn`.  A NamedTuple: one is made for every batch."""
    token: Any
    base_lsn: int


@dataclass(frozen=True, slots=True)
class Fail:
    """The batch will never be acked; its records fail with `error`."""
    token: Any
    error: BaseException


@dataclass(frozen=True, slots=True)
class Subscribe:
    """New batches go out under `producer_id`: subscribe to its reply topic too (earlier batches keep theirs)."""
    producer_id: int


@dataclass(frozen=True)
class LogChanged:
    """The writer's READY names another log than the one before: a new log at the same place.  Acks from now
    on carry its LSNs; a batch unacked before may be in the old log, the new one, or neither."""
    old: str
    new: str


Action = Resolve | Fail | Subscribe | LogChanged


def _random_id() -> int:
    return secrets.randbits(64) | 1


class ProducerSession:
    def __init__(self, producer_id: int, *, ack_timeout: float = 5.0, max_in_flight: int = 16,
                 new_producer_id: Callable[[], int] = _random_id, where: str = "the writer") -> None:
        self.producer_id = producer_id
        self.ack_timeout = ack_timeout
        self.max_in_flight = max_in_flight
        self._new_id = new_producer_id
        self._where = where
        self.ready_seen = False  # the writer confirmed the reply subscription of producer_id (READY)
        self.log_id: str | None = None  # the log the last READY named (None: none yet, or a writer older than that)
        self._ready_wait: float | None = None  # since when a batch waits for READY
        self.stored_any = False  # the writer has stored a batch under producer_id
        self._next_seq = 1
        self._ready: collections.deque[Outgoing] = collections.deque()  # to send, in sequence order
        self._in_flight: collections.OrderedDict[int, Outgoing] = collections.OrderedDict()  # seq -> batch
        self._resent_from = (0, float("-inf"))
        self._stale_nacks: dict[int, int] = {}  # seq -> refusals still due for copies of a failed batch
        self.resends = 0

    # -- the shell's calls -------------------------------------------------------------------------------

    def submit(self, token: Any, payload: bytes, count: int) -> Outgoing:
        """Queue a closed batch under the next sequence number."""
        out = Outgoing(token, P.encode_append(self.producer_id, self._next_seq, count, payload), count,
                       self.producer_id, self._next_seq)
        self._next_seq += 1
        self._ready.append(out)
        return out

    def next_send(self) -> Outgoing | None:
        """The batch that may go out now, if any (call `sent` once the socket took it)."""
        if (self._ready and self.ready_seen
                and len(self._in_flight) < (self.max_in_flight if self.stored_any else 1)):
            return self._ready[0]
        return None

    def sent(self, out: Outgoing, now: float) -> None:
        self._ready.popleft()
        out.sent_at = now
        out.sends += 1
        self._in_flight[out.seq] = out

    def tick(self, now: float) -> None:
        """Resend from the oldest unacked batch once it waited ack_timeout (the last resort: replies that
        cannot arrive any more are caught earlier by READY and by later replies).  A writer that sent no
        READY within ack_timeout of the first batch waiting for it predates READY: send without it."""
        if not self.ready_seen and self._ready:
            if self._ready_wait is None:
                self._ready_wait = now
            elif now - self._ready_wait >= self.ack_timeout:
                self.ready_seen = True
        if self._in_flight:
            oldest = next(iter(self._in_flight.values()))
            if now - oldest.sent_at >= self.ack_timeout:
                self._go_back(oldest.seq, now, None)

    def deadline(self) -> float | None:
        """When `tick` has something to do."""
        times = []
        if self._in_flight:
            times.append(next(iter(self._in_flight.values())).sent_at + self.ack_timeout)
        if not self.ready_seen and self._ready:
            times.append(0.0 if self._ready_wait is None else self._ready_wait + self.ack_timeout)  # 0: start it
        return min(times, default=None)

    def receive(self, reply: P.Reply, now: float) -> list[Action]:
        if reply.status == P.READY:
            if reply.producer_id != self.producer_id:
                return []
            self._path_ready(now)
            old, self.log_id = self.log_id, reply.detail or self.log_id
            return [LogChanged(old, self.log_id)] if old is not None and old != self.log_id else []
        if reply.status in (P.ACK, P.DUPLICATE):
            return self._stored(reply)
        if reply.status != P.NACK:
            return []  # a status this version does not know
        code = reply.code
        if code == P.OUT_OF_SEQUENCE:
            expected = _expected_seq(reply.detail)
            if expected is not None:
                self._go_back(expected, now, reply.producer_id)
            return []
        if code == P.LOG_STOPPED:
            return self._log_stopped(reply)
        if code in P.PERMANENT_NACKS:
            return self._refused(reply)
        return []  # an unknown code: the ack timeout resends

    def fail_all(self, error: BaseException) -> list[Action]:
        """Give up on every unacked batch (the producer is closing)."""
        failed = [Fail(b.token, error) for b in self._unacked()]
        self._ready.clear()
        self._in_flight.clear()
        return failed

    def tokens(self) -> list[Any]:
        """Every unacked batch's token, oldest first."""
        return [b.token for b in self._unacked()]

    def __len__(self) -> int:
        return len(self._ready) + len(self._in_flight)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- rules -------------------------------------------------------------------------------------------

    def _unacked(self) -> list[Outgoing]:
        return sorted([*self._in_flight.values(), *self._ready], key=lambda b: b.seq)

    def _path_ready(self, now: float) -> None:
        first = not self.ready_seen
        self.ready_seen = True
        if not first:
            # The path was re-made, perhaps to a writer that does not know this id (a new log at the same
            # place): one batch in flight again until it stores one, as for a new id.
            self.stored_any = False
            if self._in_flight:
                self._go_back(min(self._in_flight), now, None, force=True)

    def _go_back(self, from_seq: int, now: float, producer_id: int | None, *, force: bool = False) -> None:
        """Go-back-N: every in-flight batch from `from_seq` on (of `producer_id`, or any) goes out again, in
        order, before new ones."""
        last_from, last_at = self._resent_from
        if not force and last_from == from_seq and now - last_at < self.ack_timeout / 4:
            return  # the same gap was answered a moment ago (every later batch's nack names it too)
        again = sorted((b for s, b in self._in_flight.items()
                        if s >= from_seq and producer_id in (None, b.producer_id)), key=lambda b: b.seq)
        if not again:
            return
        self._resent_from = (from_seq, now)
        for b in again:
            del self._in_flight[b.seq]
        self._ready.extendleft(reversed(again))
        self.resends += len(again)

    def _take(self, reply: P.Reply) -> Outgoing | None:
        """The batch `reply` is about, removed from the queues: only one sent under that id and number."""
        batch = self._in_flight.get(reply.seq)
        if batch is not None:
            if batch.producer_id != reply.producer_id:
                return None
            del self._in_flight[reply.seq]
            return batch
        batch = next((b for b in self._ready if b.seq == reply.seq and b.sends
                      and b.producer_id == reply.producer_id), None)
        if batch is not None:
            self._ready.remove(batch)
        return batch

    def _stored(self, reply: P.Reply) -> list[Action]:
        if reply.producer_id == self.producer_id:
            self.stored_any = True
        batch = self._take(reply)
        if batch is None:
            return []  # a late reply to a batch already resolved (a resend's duplicate)
        # The writer answers one producer's stored batches in the order it got them, so an older batch still
        # waiting, sent before this one, had its reply lost: resend it now, while it is inside the writer's
        # dedup window (later, the answer would be "stored, LSNs unknown").
        if self._in_flight and min(self._in_flight) < reply.seq:  # else nothing older is waiting (kept cheap:
            # replies come in order, so at every ack in a pipeline the batch answered was the oldest one)
            lost = sorted((b for s, b in self._in_flight.items() if s < reply.seq and b.sent_at <= batch.sent_at
                           and b.producer_id == batch.producer_id), key=lambda b: b.seq)
            for b in lost:
                del self._in_flight[b.seq]
            self._ready.extendleft(reversed(lost))
            self.resends += len(lost)
        if (reply.status == P.DUPLICATE and batch.sends == 1) or (reply.count and reply.count != batch.count):
            # The writer holds (id, sequence) from a copy this producer never sent: another producer uses the id.
            return self._abandon_id(reply.producer_id, reply.seq, [batch], ProducerIdError(
                f"{self._where} already holds batch {reply.seq} of producer id {reply.producer_id:016x}, which "
                "this producer sent once: another producer uses that id (each Producer needs an id of its own, "
                "never reused), or the writer serves another log; these records may or may not be in the log, "
                "and records appended from now on go out under a new producer id"))
        if not reply.count:
            # "Stored, LSNs unknown": older than the writer's window.  A batch still unacked is inside it (at most
            # max_in_flight are unacked, within producer_window) unless the writer lost track of this id: it
            # serves another log, which started the id at a later batch that reached it first.
            return [Fail(batch.token, ProducerIdError(
                f"{self._where} has no record of batch {reply.seq} of producer id {reply.producer_id:016x} but "
                "holds later ones (it serves another log, or forgot the id): these records may or may not be in "
                "the log"))]
        return [Resolve(batch.token, reply.base_lsn)]

    def _refused(self, reply: P.Reply) -> list[Action]:
        """Refused for good: fail the batch; the writer did not use its sequence number, so later ones move
        down by one and go out again (the writer refused them as out of sequence)."""
        seq, pid = reply.seq, reply.producer_id
        if self._stale_nacks.get(seq):
            self._stale_nacks[seq] -= 1  # another copy of a batch already failed, not the one now at `seq`
            return []
        batch = self._take(reply)
        if batch is None:
            return []
        if batch.sends > 1:
            self._stale_nacks[seq] = batch.sends - 1
        later = [b for b in self._in_flight.values() if b.seq > seq and b.producer_id == pid]
        for b in later:
            del self._in_flight[b.seq]
        queue = sorted([*self._ready, *later], key=lambda b: b.seq)
        for b in queue:
            if b.seq > seq and b.producer_id == pid:
                b.renumber(b.seq - 1)
        self._ready = collections.deque(queue)
        if pid == self.producer_id:
            self._next_seq -= 1
        return [Fail(batch.token, NackError(reply.code, reply.detail.split(": ", 1)[-1]))]

    def _log_stopped(self, reply: P.Reply) -> list[Action]:
        detail = reply.detail.split(": ", 1)[-1]
        error = LogStoppedError("writer", None, None, detail, message=(
            f"{self._where} stopped its log ({detail}); these records may or may not be in the log: a restarted "
            "writer recovers what was written, and records appended from now on go out under a new producer id"))
        return self._abandon_id(reply.producer_id, reply.seq, [], error)

    def _abandon_id(self, pid: int, seq: int, taken: list[Outgoing], error: BaseException) -> list[Action]:
        """`taken` and every unacked batch of `pid` from `seq` on fail with `error`; if `pid` is the current
        id, new batches go out under a fresh one (see the module docstring, log_stopped)."""
        doomed = taken + [b for b in self._unacked() if b.producer_id == pid and b.seq >= seq]
        if not doomed:
            return []  # a stale nack: nothing of that id at or after that number
        self._ready = collections.deque(b for b in self._ready if not (b.producer_id == pid and b.seq >= seq))
        for b in doomed:
            self._in_flight.pop(b.seq, None)
        actions: list[Action] = [Fail(b.token, error) for b in doomed]
        if pid == self.producer_id:
            self.producer_id = self._new_id()
            self._next_seq = seq  # every batch left is numbered below it
            self._stale_nacks = {k: v for k, v in self._stale_nacks.items() if k < seq}
            self.ready_seen = False
            self._ready_wait = None
            self.stored_any = False
            actions.append(Subscribe(self.producer_id))
        return actions


def _expected_seq(detail: str) -> int | None:
    """N from "out_of_sequence: expected sequence N, got M"."""
    try:
        return int(detail.rsplit("expected sequence ", 1)[1].split(",")[0])
    except (IndexError, ValueError):
        return None

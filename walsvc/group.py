"""Consumer groups: which consumer processes which LSN range, decided in one place with no I/O.

A group shares the work of reading the log among its consumers, as a Redis Streams consumer group or a
Kafka consumer group does.  The writer holds one `Group` per group name and answers its consumers' claims
and acks over the control socket; this module only decides:

- `claim` hands a consumer a lease on an LSN range: first any range whose lease expired or was released
  (a redelivery), else the next range after everything handed out so far, up to the committed LSN.
- `ack` ends a lease: its records are processed.  The group's position is the lowest LSN not yet acked;
  the writer stores position - 1 as the group's cursor, so retention and lag treat a group like a named
  reader.
- A lease not acked within `lease_ms` of its claim expires and its range goes to the next consumer that
  claims; a consumer that leaves gives its ranges back at once.  So a record is delivered again only when
  a consumer died, left or stalled past `lease_ms` while holding it (at-least-once; GUARANTEES.md).

Times are monotonic milliseconds passed in by the caller, which keeps every decision testable with made-up
clocks.
"""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass
from typing import Callable

from .errors import GroupError, WalError

DEFAULT_LEASE_MS = 30_000


@dataclass
class Lease:
    """A consumer's claim on the records first..end-1, until `deadline_ms` unless acked."""

    id: int
    consumer: str
    first: int
    end: int
    deadline_ms: float
    redelivery: bool = False


class Group:
    """One consumer group's state: leases out, ranges to hand out again, and the position below both."""

    def __init__(self, name: str, position: int, lease_ms: float, first_lease_id: int = 1) -> None:
        if lease_ms <= 0:
            raise GroupError(name, f"lease_ms must be positive, not {lease_ms}")
        self.name = name
        self.lease_ms = lease_ms
        self.next_new = position  # first LSN never handed out in this incarnation
        self.leases: dict[int, Lease] = {}
        self._returned: list[tuple[int, int]] = []  # heap of (first, end) to hand out again, lowest first
        self._next_id = first_lease_id
        self.consumers: dict[str, float] = {}  # consumer -> last seen (ms)
        self.redeliveries = 0

    @property
    def position(self) -> int:
        """The lowest LSN not acked: everything below it is processed."""
        candidates = [self.next_new]
        candidates.extend(lease.first for lease in self.leases.values())
        if self._returned:
            candidates.append(self._returned[0][0])
        return min(candidates)

    def claim(self, consumer: str, committed_lsn: int, max_records: int, now_ms: float) -> Lease | None:
        """A lease for `consumer`, or None when every committed record is leased or acked."""
        if max_records < 1:
            raise GroupError(self.name, f"max_records must be at least 1, not {max_records}")
        self.expire(now_ms)
        self.consumers[consumer] = now_ms
        if self._returned:
            first, end = heapq.heappop(self._returned)
            if end - first > max_records:  # hand out what was asked, keep the rest for the next claim
                heapq.heappush(self._returned, (first + max_records, end))
                end = first + max_records
            self.redeliveries += end - first
            return self._lease(consumer, first, end, now_ms, redelivery=True)
        end = min(committed_lsn + 1, self.next_new + max_records)
        if end <= self.next_new:
            return None
        first, self.next_new = self.next_new, end
        return self._lease(consumer, first, end, now_ms, redelivery=False)

    def _lease(self, consumer: str, first: int, end: int, now_ms: float, redelivery: bool) -> Lease:
        lease = Lease(self._next_id, consumer, first, end, now_ms + self.lease_ms, redelivery)
        self._next_id += 1
        self.leases[lease.id] = lease
        return lease

    def ack(self, consumer: str, lease_id: int, now_ms: float) -> Lease:
        """End a lease of `consumer`'s: its records are processed.  A lease that expired (and may be
        someone else's now) cannot be acked: the caller learns its records may be delivered again."""
        self.expire(now_ms)
        self.consumers[consumer] = now_ms
        lease = self.leases.get(lease_id)
        if lease is None or lease.consumer != consumer:
            raise GroupError(self.name, f"lease {lease_id} is not held by consumer {consumer!r} (it expired "
                                        f"after {self.lease_ms:g} ms or was never granted); its records may "
                                        "be delivered again")
        del self.leases[lease_id]
        return lease

    def renew(self, consumer: str, now_ms: float) -> int:
        """Push back the deadline of every lease `consumer` holds (a heartbeat); returns how many."""
        self.expire(now_ms)
        self.consumers[consumer] = now_ms
        held = [lease for lease in self.leases.values() if lease.consumer == consumer]
        for lease in held:
            lease.deadline_ms = now_ms + self.lease_ms
        return len(held)

    def leave(self, consumer: str) -> int:
        """`consumer` is gone: its leases go back for others to claim at once; returns how many records."""
        self.consumers.pop(consumer, None)
        return sum(self._give_back(lease) for lease in
                   [lease for lease in self.leases.values() if lease.consumer == consumer])

    def expire(self, now_ms: float) -> int:
        """Give back every lease past its deadline; returns how many records went back."""
        returned = sum(self._give_back(lease) for lease in
                       [lease for lease in self.leases.values() if lease.deadline_ms <= now_ms])
        for consumer, seen in list(self.consumers.items()):
            if seen + self.lease_ms <= now_ms and not any(l.consumer == consumer for l in self.leases.values()):
                del self.consumers[consumer]
        return returned

    def _give_back(self, lease: Lease) -> int:
        del self.leases[lease.id]
        heapq.heappush(self._returned, (lease.first, lease.end))
        return lease.end - lease.first

    def describe(self, committed_lsn: int) -> dict[str, object]:
        """The group as status shows it: position, lag, consumers and what each holds."""
        held: dict[str, int] = collections.Counter()
        for lease in self.leases.values():
            held[lease.consumer] += lease.end - lease.first
        return {"position": self.position, "lag_records": max(0, committed_lsn + 1 - self.position),
                "consumers": {c: {"leased_records": held.get(c, 0)} for c in sorted(self.consumers)},
                "leases": len(self.leases), "to_redeliver": sum(e - f for f, e in self._returned),
                "redelivered_records": self.redeliveries}


GROUP_OPS = ("group_claim", "group_ack", "group_renew", "group_leave")
MAX_CLAIM = 100_000  # records in one lease at most: a lease is work one consumer does before it acks
MAX_GROUPS = 256  # groups one writer serves: each holds its cursor lock's file open while the writer runs


def _field(req: dict, key: str, kind: type, group: str) -> object:
    value = req.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise GroupError(group, f"request field {key!r} must be a {kind.__name__}, not {value!r}")
    return value


class GroupTable:
    """Every consumer group a writer serves, answering the group_* control requests (docs/PROTOCOL.md).

    No I/O: the caller passes the log's positions and a lookup of stored cursors in, stores the positions
    `take_moved` hands out (the group's cursor is position - 1, like a named reader's), and takes the name's
    cursor lock in `claim_name` when a group starts (so no named reader can use the name meanwhile).  A new
    group's starting position is handed out to be stored like a moved one: before, nothing stored it until
    an ack moved it, so a writer restart started the group anew ("latest" later than before) and retention
    kept none of its records.
    """

    def __init__(self, check_name: Callable[[str], str], claim_name: Callable[[str], None],
                 first_lease_id: int = 1) -> None:
        """`first_lease_id`: where this writer's lease ids start.  The writer passes its start time in
        microseconds, above every id an earlier run can have handed out (one per claim, far fewer than one
        per microsecond), so an ack sent before a restart never names a lease of this run."""
        self.groups: dict[str, Group] = {}
        self._first_lease_id = first_lease_id
        self._check_name = check_name
        self._claim_name = claim_name
        self._moved: dict[str, int] = {}

    def request(self, req: dict, *, committed_lsn: int, first_lsn: int, now_ms: float,
                stored: Callable[[str], int | None]) -> dict[str, object]:
        """The reply to one group request; a GroupError for a bad one (the caller answers with it)."""
        name = req.get("group")
        if not isinstance(name, str):
            raise GroupError(str(name), "request field 'group' must be a string")
        try:
            self._check_name(name)
        except WalError as exc:
            raise GroupError(name, str(exc)) from None
        consumer = _field(req, "consumer", str, name)
        if not 1 <= len(consumer) <= 200:
            raise GroupError(name, "consumer names are 1-200 characters")
        op = req["op"]
        max_records = _field(req, "max_records", int, name) if op == "group_claim" else 0
        if op == "group_claim" and max_records < 1:
            raise GroupError(name, f"max_records must be at least 1, not {max_records}")
        group = self.groups.get(name)
        if group is None:
            # Every field is checked before the group exists: a refused claim leaves nothing behind (no
            # group, no settings taken from it, no cursor lock held on the name).
            if op != "group_claim":
                raise GroupError(name, "no such group on this writer (a claim creates it; a writer restart "
                                       "forgets leases, so claim again)")
            lease_ms = req.get("lease_ms", DEFAULT_LEASE_MS)
            if not isinstance(lease_ms, (int, float)) or isinstance(lease_ms, bool) or not 1 <= lease_ms <= 86_400_000:
                raise GroupError(name, f"lease_ms must be a number of milliseconds from 1 to 86400000, not {lease_ms!r}")
            if len(self.groups) >= MAX_GROUPS:
                raise GroupError(name, f"this writer already serves {MAX_GROUPS} groups, the most it holds (each "
                                       "keeps its cursor lock open); a writer restart forgets them")
            last = stored(name)
            if last is not None and last + 1 < first_lsn:
                raise GroupError(name, f"its stored cursor is at LSN {last}, but retention deleted the log up to LSN "
                                       f"{first_lsn - 1} (it lagged past max_cursor_lag_bytes): move it on "
                                       f"purpose with `walsvc cursors reset {name} --to earliest`")
            position = last + 1 if last is not None else self._start(req, name, committed_lsn, first_lsn)
            try:
                self._claim_name(name)
            except WalError as exc:
                raise GroupError(name, str(exc)) from None
            group = self.groups[name] = Group(name, position, lease_ms, self._first_lease_id)
            if last is None:
                self._moved[name] = position
        before = group.position
        if op == "group_claim":
            lease = group.claim(consumer, committed_lsn, min(max_records, MAX_CLAIM), now_ms)
            reply: dict[str, object] = {"ok": True, "lease": None if lease is None else
                                        {"id": lease.id, "first": lease.first, "end": lease.end,
                                         "redelivery": lease.redelivery, "lease_ms": group.lease_ms}}
        elif op == "group_ack":
            group.ack(consumer, _field(req, "lease", int, name), now_ms)
            reply = {"ok": True}
        elif op == "group_renew":
            reply = {"ok": True, "leases": group.renew(consumer, now_ms)}
        else:
            reply = {"ok": True, "returned_records": group.leave(consumer)}
        if group.position != before:
            self._moved[name] = group.position
        reply["position"] = group.position
        reply["committed_lsn"] = committed_lsn
        return reply

    @staticmethod
    def _start(req: dict, name: str, committed_lsn: int, first_lsn: int) -> int:
        """Where a new group (no stored cursor) starts: where its first claim says.  An LSN retention deleted
        is refused, as a reader's start is (TruncatedError): starting later would skip records silently."""
        start = req.get("start", "earliest")
        if start == "earliest":
            return first_lsn
        if start == "latest":
            return committed_lsn + 1
        if isinstance(start, int) and not isinstance(start, bool) and first_lsn <= start <= committed_lsn + 1:
            return start
        if isinstance(start, int) and not isinstance(start, bool) and 1 <= start < first_lsn:
            raise GroupError(name, f"start LSN {start} was deleted by retention; the oldest is LSN {first_lsn} "
                                   "(start 'earliest' begins there)")
        if isinstance(start, int) and not isinstance(start, bool) and start > committed_lsn + 1:
            raise GroupError(name, f"start LSN {start} is past the end of the log (committed up to LSN "
                                   f"{committed_lsn}); start 'latest' waits for new records")
        raise GroupError(name, f"start must be 'earliest', 'latest' or an LSN >= 1, not {start!r:.60}")

    def take_moved(self) -> dict[str, int]:
        """Groups whose position moved since the last call, with the new position (to store)."""
        moved, self._moved = self._moved, {}
        return moved

    def describe(self, committed_lsn: int) -> dict[str, object]:
        return {name: group.describe(committed_lsn) for name, group in sorted(self.groups.items())}

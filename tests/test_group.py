"""Consumer group decisions, from made-up clocks and claims: no writer, no sockets, no files."""

from __future__ import annotations

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from walsvc.errors import GroupError
from walsvc.group import MAX_GROUPS, Group, GroupTable


def test_claims_hand_out_consecutive_ranges_up_to_the_committed_lsn() -> None:
    g = Group("billing", position=10, lease_ms=1000)
    a = g.claim("a", committed_lsn=30, max_records=8, now_ms=0)
    b = g.claim("b", committed_lsn=30, max_records=8, now_ms=0)
    c = g.claim("a", committed_lsn=30, max_records=8, now_ms=0)
    assert [(x.first, x.end) for x in (a, b, c)] == [(10, 18), (18, 26), (26, 31)]
    assert g.claim("b", committed_lsn=30, max_records=8, now_ms=0) is None
    assert g.position == 10
    g.ack("b", b.id, now_ms=1)
    assert g.position == 10  # a still holds 10..17
    g.ack("a", a.id, now_ms=1)
    assert g.position == 26
    g.ack("a", c.id, now_ms=1)
    assert g.position == 31
    assert g.describe(30)["lag_records"] == 0


def test_an_expired_lease_goes_to_the_next_claimant_and_cannot_be_acked_late() -> None:
    g = Group("g", position=1, lease_ms=100)
    a = g.claim("a", 50, 20, now_ms=0)
    b = g.claim("b", 50, 20, now_ms=50)
    again = g.claim("c", 50, 5, now_ms=100)  # a's lease ran out at 100
    assert (again.first, again.end, again.redelivery) == (1, 6, True)
    rest = g.claim("c", 50, 100, now_ms=101)
    assert (rest.first, rest.end, rest.redelivery) == (6, 21, True)
    with pytest.raises(GroupError, match="lease 1 is not held by consumer 'a'"):
        g.ack("a", a.id, now_ms=102)
    g.ack("b", b.id, now_ms=102)
    assert g.position == 1
    g.ack("c", again.id, 103)
    g.ack("c", rest.id, 103)
    assert g.position == 41 and g.redeliveries == 20


def test_renew_keeps_a_slow_consumers_lease_and_leave_gives_it_back_at_once() -> None:
    g = Group("g", position=0, lease_ms=100)
    a = g.claim("a", 9, 10, now_ms=0)
    assert g.renew("a", now_ms=90) == 1
    assert g.claim("b", 9, 10, now_ms=150) is None  # renewed until 190
    assert g.leave("a") == 10
    b = g.claim("b", 9, 10, now_ms=151)
    assert (b.first, b.end, b.redelivery) == (0, 10, True)
    with pytest.raises(GroupError):
        g.ack("a", a.id, now_ms=152)


def test_a_lease_can_only_be_acked_by_its_holder_and_bad_arguments_are_refused() -> None:
    g = Group("g", position=0, lease_ms=100)
    a = g.claim("a", 9, 10, now_ms=0)
    with pytest.raises(GroupError, match="not held by consumer 'b'"):
        g.ack("b", a.id, now_ms=1)
    with pytest.raises(GroupError, match="max_records"):
        g.claim("a", 9, 0, now_ms=1)
    with pytest.raises(GroupError, match="lease_ms"):
        Group("g", 0, 0)


def _table() -> tuple[GroupTable, list[str]]:
    claimed: list[str] = []
    return GroupTable(lambda name: name, claimed.append), claimed


def _claim(table: GroupTable, group: str, **fields: object) -> dict[str, object]:
    req = {"op": "group_claim", "group": group, "consumer": "c1", "max_records": 10, **fields}
    return table.request(req, committed_lsn=100, first_lsn=1, now_ms=0, stored=lambda name: None)


def test_a_refused_claim_leaves_no_group_behind() -> None:
    """Every field of a first claim is checked before its group exists: before, a claim refused for a bad
    max_records created the group with that claim's start and lease, and took the name's cursor lock."""
    table, claimed = _table()
    with pytest.raises(GroupError, match="max_records"):
        _claim(table, "billing", max_records="ten", start="latest", lease_ms=5)
    with pytest.raises(GroupError, match="past the end of the log"):
        _claim(table, "billing", start=2 ** 80)
    for bad in (0, -1):  # of the right type but out of range: this too created the group
        with pytest.raises(GroupError, match="max_records must be at least 1"):
            _claim(table, "billing", max_records=bad, start="latest", lease_ms=5)
    assert table.groups == {} and claimed == []
    reply = _claim(table, "billing", start="earliest")
    assert reply["lease"]["first"] == 1 and reply["lease"]["lease_ms"] == 30_000 and claimed == ["billing"]
    assert type(reply["lease"]["lease_ms"]) is int  # as given, or the default (it was 30000.0)


def test_a_writer_serves_at_most_max_groups() -> None:
    """Each group holds its cursor lock's file open: a flood of names would run the writer out of file
    descriptors (libzmq aborts the process on EMFILE), so the table refuses past MAX_GROUPS."""
    table, claimed = _table()
    for i in range(MAX_GROUPS):
        _claim(table, f"g{i}")
    with pytest.raises(GroupError, match=f"already serves {MAX_GROUPS} groups"):
        _claim(table, "one-more")
    assert len(claimed) == MAX_GROUPS
    assert _claim(table, "g0")["ok"]  # the groups it has go on


class GroupMachine(RuleBasedStateMachine):
    """Any interleaving of claims, acks, renewals, departures, clock steps and commits: every committed
    LSN is handed out, no LSN is leased to two consumers at once, and the position never passes an LSN
    that was not acked."""

    def __init__(self) -> None:
        super().__init__()
        self.group = Group("g", position=1, lease_ms=50)
        self.now = 0.0
        self.committed = 0
        self.acked: set[int] = set()
        self.held: dict[int, tuple[str, int, int]] = {}  # lease id -> (consumer, first, end), as the consumer believes
        self.last_position = 1

    @rule(n=st.integers(0, 30))
    def commit(self, n: int) -> None:
        self.committed += n

    @rule(ms=st.sampled_from([1, 10, 49, 50, 120]))
    def tick(self, ms: int) -> None:
        self.now += ms

    @rule(consumer=st.sampled_from("abc"), n=st.integers(1, 12))
    def claim(self, consumer: str, n: int) -> None:
        lease = self.group.claim(consumer, self.committed, n, self.now)
        if lease is None:
            return
        assert lease.end - lease.first <= n and lease.end <= self.committed + 1
        for other in self.group.leases.values():
            if other.id != lease.id:
                assert other.end <= lease.first or lease.end <= other.first, "two live leases overlap"
        self.held[lease.id] = (consumer, lease.first, lease.end)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.held)))
        consumer, first, end = self.held.pop(lease_id)
        try:
            self.group.ack(consumer, lease_id, self.now)
        except GroupError:
            assert lease_id not in self.group.leases or self.group.leases[lease_id].consumer != consumer
            return
        self.acked.update(range(first, end))

    @rule(consumer=st.sampled_from("abc"))
    def renew(self, consumer: str) -> None:
        self.group.renew(consumer, self.now)

    @rule(consumer=st.sampled_from("abc"))
    def leave(self, consumer: str) -> None:
        self.group.leave(consumer)

    @invariant()
    def position_only_passes_acked_lsns(self) -> None:
        position = self.group.position
        assert position >= self.last_position, "the position moved backwards"
        assert all(lsn in self.acked for lsn in range(self.last_position, position))
        self.last_position = position

    @invariant()
    def every_committed_lsn_is_accounted_for(self) -> None:
        """Each LSN below next_new is acked, leased, or waiting to be handed out again."""
        g = self.group
        leased = {lsn for l in g.leases.values() for lsn in range(l.first, l.end)}
        returned = {lsn for f, e in g._returned for lsn in range(f, e)}
        assert not leased & returned
        for lsn in range(g.position, g.next_new):
            assert lsn in self.acked or lsn in leased or lsn in returned


TestGroupMachine = GroupMachine.TestCase
TestGroupMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_a_new_group_hands_its_start_to_be_stored_and_never_starts_in_deleted_records() -> None:
    """A new group's start is handed out to be stored (`take_moved`) at once: before, only a moved position
    was, so a restart started the group anew; a group resuming after its stored cursor has nothing new to
    store.  A start below the oldest LSN is refused, as a reader's is; so is a stored cursor retention
    deleted past (before, both started later and skipped records silently)."""
    table, _ = _table()
    stored = {"resumed": 41, "behind": 3}

    def claim(group: str, **fields: object) -> dict[str, object]:
        req = {"op": "group_claim", "group": group, "consumer": "c1", "max_records": 10, **fields}
        return table.request(req, committed_lsn=100, first_lsn=20, now_ms=0, stored=stored.get)

    assert claim("new", start="latest")["position"] == 101
    assert claim("resumed", start="latest")["position"] == 42
    assert table.take_moved() == {"new": 101}
    with pytest.raises(GroupError, match="deleted by retention; the oldest is LSN 20"):
        claim("early", start=5)
    with pytest.raises(GroupError, match="retention deleted the log up to LSN 19"):
        claim("behind")
    assert claim("edge", start=20)["lease"]["first"] == 20

"""ProducerSession (walsvc/producer_session.py) alone: made-up replies and a made-up clock, no sockets.

Tables of the cases one by one, every combination of fates for two batches' replies against a model writer
built on the real IngestSession, and a hypothesis state machine: whatever the network drops or reorders,
every batch is resolved or failed exactly once, a resolved batch's LSNs hold its own records, and nothing
is stored twice.
"""

from __future__ import annotations

import collections
import itertools

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from walsvc import protocol as P
from walsvc.errors import LogStoppedError, NackError, ProducerIdError
from walsvc.frame import Appended
from walsvc.ingest import Duplicate, IngestSession, Refuse, Store
from walsvc.producer_session import Fail, LogChanged, ProducerSession, Resolve, Subscribe
from walsvc.record import encode_put

PID, NEW_PID = 0xA1, 0xB2
TIMEOUT = 5.0


def make(max_in_flight: int = 16) -> ProducerSession:
    ids = itertools.count(NEW_PID, 2)
    return ProducerSession(PID, ack_timeout=TIMEOUT, max_in_flight=max_in_flight, new_producer_id=lambda: next(ids))


def ready(pid: int = PID) -> P.Reply:
    return P.Reply(pid, P.READY, 0, 0, 0)


def ack(seq: int, base: int, count: int = 1, status: int = P.ACK, pid: int = PID) -> P.Reply:
    return P.Reply(pid, status, seq, base, count)


def nack(seq: int, code: str, detail: str = "why", pid: int = PID) -> P.Reply:
    return P.Reply(pid, P.NACK, seq, 0, 0, f"{code}: {detail}")


def send_all(s: ProducerSession, now: float = 0.0) -> list[int]:
    """Send whatever may go out; the sequence numbers sent."""
    sent = []
    while (out := s.next_send()) is not None:
        s.sent(out, now)
        sent.append(out.seq)
    return sent


def fresh(n: int, max_in_flight: int = 16) -> ProducerSession:
    """READY seen, a first batch acked (so the pipeline is open), batches 2..n+1 queued, none sent."""
    s = make(max_in_flight)
    s.receive(ready(), 0.0)
    s.submit("b0", encode_put(b"k0", b"v"), 1)
    assert send_all(s) == [1]
    assert s.receive(ack(1, 1), 0.0) == [Resolve("b0", 1)]
    for i in range(1, n + 1):
        s.submit(f"b{i}", encode_put(b"k%d" % i, b"v"), 1)
    return s


# -- one case at a time ------------------------------------------------------------------------------------

def test_nothing_goes_out_before_ready_then_one_until_the_first_ack():
    s = make()
    for i in range(3):
        s.submit(i, b"p", 1)
    assert s.next_send() is None
    s.receive(ready(NEW_PID), 0.0)  # someone else's READY
    assert s.next_send() is None
    s.receive(ready(), 0.0)
    assert send_all(s) == [1]
    assert s.receive(ack(1, 10), 0.0) == [Resolve(0, 10)]
    assert send_all(s) == [2, 3]


def test_a_ready_naming_another_log_is_reported_and_the_unacked_batch_resent():
    """READY names the writer's log.  A later READY naming another one (a new log at the same place) is
    reported as LogChanged, once, and the batch in flight goes out again as after any reconnect; a READY
    without a log id (a writer older than that) changes nothing."""
    s = make()
    s.submit("b0", b"p", 1)
    assert s.receive(P.Reply(PID, P.READY, 0, 0, 0, "log-a"), 0.0) == [] and s.log_id == "log-a"
    assert send_all(s) == [1]
    assert s.receive(P.Reply(PID, P.READY, 0, 0, 0, "log-a"), 1.0) == []  # a restart of the same log
    assert send_all(s) == [1]
    assert s.receive(ready(), 2.0) == [] and s.log_id == "log-a"
    assert send_all(s) == [1]
    assert s.receive(P.Reply(PID, P.READY, 0, 0, 0, "log-b"), 3.0) == [LogChanged("log-a", "log-b")]
    assert s.log_id == "log-b" and send_all(s) == [1]
    assert s.receive(ack(1, 1), 3.0) == [Resolve("b0", 1)]
    assert s.receive(P.Reply(NEW_PID, P.READY, 0, 0, 0, "log-c"), 4.0) == [] and s.log_id == "log-b"


def test_without_ready_for_an_ack_timeout_it_sends_anyway():
    """A writer older than READY never sends one: after ack_timeout the session stops waiting."""
    s = make()
    s.submit("b", b"p", 1)
    assert s.deadline() == 0.0  # tick at once, to start the wait
    s.tick(10.0)
    assert s.deadline() == 10.0 + TIMEOUT and s.next_send() is None
    s.tick(10.0 + TIMEOUT)
    assert send_all(s) == [1]
    s.receive(ready(), 20.0)  # a READY after all: the path is (re)made, so resend
    assert send_all(s) == [1]


def test_max_in_flight_bounds_the_pipeline():
    s = fresh(5, max_in_flight=2)
    assert send_all(s) == [2, 3]
    s.receive(ack(2, 2), 0.0)
    assert send_all(s) == [4]


@pytest.mark.parametrize("reply, result", [
    (ack(2, 7, 1), 7),
    (ack(2, 7, 1, P.DUPLICATE), 7),
])
def test_ack_and_duplicates_resolve(reply, result):
    s = fresh(1)
    send_all(s)
    s.tick(TIMEOUT)
    send_all(s, TIMEOUT)  # sent twice: a DUPLICATE is the answer to one of its own copies
    assert s.receive(reply, 0.0) == [Resolve("b1", result)]
    assert len(s) == 0
    assert s.receive(reply, 0.0) == []  # a second (late) answer to the same batch changes nothing


def test_a_reply_to_a_later_batch_resends_an_earlier_one_at_once():
    s = fresh(2)
    assert send_all(s, 1.0) == [2, 3]
    assert s.receive(ack(3, 30), 1.0) == [Resolve("b2", 30)]  # 2's reply was lost
    assert send_all(s, 1.1) == [2] and s.resends == 1
    assert s.receive(ack(2, 29, 1, P.DUPLICATE), 1.2) == [Resolve("b1", 29)]


def test_reordered_replies_resolve_each_batch_once():
    s = fresh(2)
    send_all(s)
    assert s.receive(ack(3, 30), 0.0) == [Resolve("b2", 30)]
    assert s.receive(ack(2, 29), 0.0) == [Resolve("b1", 29)]  # not lost after all: resolved from the queue
    assert send_all(s) == [] and len(s) == 0
    assert s.receive(ack(2, 29, 1, P.DUPLICATE), 0.0) == []


def test_out_of_sequence_goes_back_once_per_gap():
    s = fresh(3)
    send_all(s, 0.0)
    assert s.receive(nack(3, P.OUT_OF_SEQUENCE, "expected sequence 2, got 3"), 0.1) == []
    assert send_all(s, 0.1) == [2, 3, 4]
    s.receive(nack(4, P.OUT_OF_SEQUENCE, "expected sequence 2, got 4"), 0.2)  # the same gap again
    assert send_all(s, 0.2) == []
    s.receive(nack(3, P.OUT_OF_SEQUENCE, "garbled"), 0.3)  # no sequence to go back to: ignored
    assert send_all(s, 0.3) == []


def test_ack_timeout_resends_from_the_oldest():
    s = fresh(2)
    send_all(s, 0.0)
    assert s.deadline() == TIMEOUT
    s.tick(TIMEOUT - 0.01)
    assert send_all(s) == []
    s.tick(TIMEOUT)
    assert send_all(s, TIMEOUT) == [2, 3]


def test_a_later_ready_resends_everything_unacked_one_until_the_writer_stores_one():
    """The path was re-made, maybe to a writer that does not know this id (another log): as for a new id, one
    batch goes out until the writer stored one, then the rest, in sequence order."""
    s = fresh(3)
    send_all(s, 0.0)
    s.receive(ready(), 0.5)  # the writer restarted (or the reply socket reconnected)
    assert send_all(s, 0.5) == [2]
    s.receive(ready(), 0.6)  # and again at once: no go-back debounce for READY
    assert send_all(s, 0.6) == [2]
    assert s.receive(ack(2, 5, 1, P.DUPLICATE), 0.7) == [Resolve("b1", 5)]
    assert send_all(s, 0.7) == [3, 4]


def test_stored_lsns_unknown_for_an_unacked_batch_fails_it():
    """A count-0 DUPLICATE ("stored, older than the window") cannot be about a batch still unacked (those stay
    within the window): the writer lost track of this id, e.g. a fresh log at the same place whose writer
    started the id at a later batch.  Before, the batch resolved as stored (None), in neither log."""
    s = fresh(2)
    assert send_all(s, 0.0) == [2, 3]
    s.receive(ready(), 1.0)
    assert send_all(s, 1.0) == [2]
    [failed] = s.receive(ack(2, 0, 0, P.DUPLICATE), 1.0)
    assert isinstance(failed, Fail) and failed.token == "b1" and isinstance(failed.error, ProducerIdError)
    assert "may or may not be in the log" in str(failed.error)
    assert send_all(s, 1.0) == [3]
    assert s.receive(ack(3, 1, 1, P.DUPLICATE), 1.0) == [Resolve("b2", 1)]


def test_a_new_log_behind_a_reconnect_fails_what_it_does_not_hold():
    """The writer is replaced by a fresh log while batches are in flight: the old one took 2..4 and died
    unanswered; 5 reached the new writer first (queued before its READY), so it started the id there.  2..4
    fail (maybe in the old log, not in this one); 5 resolves with the new log's LSN.  Before, 2..4 resolved
    as stored with unknown LSNs."""
    h = Harness.after_a_first_ack([(f"b{i}", True) for i in range(3)])
    h.to_writer.clear()  # the old writer died with them
    h.w = ModelWriter()  # a new log at the same place
    h.submit("b3")
    h.send()
    h.writer_step()
    h.to_producer.append(ready())  # the new writer applied the subscription
    h.settle()
    assert {n: type(o.error) for n, o in h.outcomes.items() if isinstance(o, Fail)} == dict.fromkeys(
        ["b0", "b1", "b2"], ProducerIdError)
    assert h.outcomes["b3"] == Resolve("b3", 1) and h.w.log == [h.payloads["b3"]]


@pytest.mark.parametrize("code", sorted(P.PERMANENT_NACKS))
def test_a_permanent_nack_fails_the_batch_and_renumbers_the_later_ones(code):
    s = fresh(3)
    send_all(s)
    actions = s.receive(nack(2, code), 0.0)
    assert len(actions) == 1 and actions[0].token == "b1"
    assert isinstance(actions[0].error, NackError) and actions[0].error.code == code
    # 3 and 4 were refused as out of sequence: they go out again as 2 and 3, their messages rewritten.
    out = s.next_send()
    assert out.token == "b2" and P.decode_append(out.message).seq == 2
    assert send_all(s) == [2, 3]
    assert s.submit("b4", b"p", 1).seq == 4
    assert s.receive(ack(2, 50), 0.0) == [Resolve("b2", 50)]


def test_lost_reply_and_permanent_nack_in_one_read_keep_the_resend():
    """The old producer's bug: the resend queued for a lost reply was dropped by the renumbering, so that
    batch's future never resolved and flush() did not wait for it."""
    s = fresh(3)
    send_all(s)
    assert s.receive(ack(3, 30), 0.0) == [Resolve("b2", 30)]  # 2's ack was lost: 2 goes back in the queue
    failed = s.receive(nack(4, P.MALFORMED), 0.0)
    assert [a.token for a in failed] == ["b3"]
    assert s.tokens() == ["b1"]
    assert send_all(s) == [2]
    assert s.receive(ack(2, 29, 1, P.DUPLICATE), 0.0) == [Resolve("b1", 29)]
    assert len(s) == 0


def test_refusals_of_a_failed_batchs_other_copies_do_not_fail_its_successor():
    s = fresh(2)
    send_all(s, 0.0)
    s.tick(TIMEOUT)
    assert send_all(s, TIMEOUT) == [2, 3]  # batch 2 went out twice
    assert [a.token for a in s.receive(nack(2, P.MALFORMED), TIMEOUT)] == ["b1"]
    assert send_all(s, TIMEOUT) == [2]  # b2, renumbered
    assert s.receive(nack(2, P.MALFORMED), TIMEOUT) == []  # the second copy of b1's refusal
    assert s.receive(ack(2, 40), TIMEOUT) == [Resolve("b2", 40)]


def test_log_stopped_fails_that_batch_and_later_ones_and_moves_to_a_new_producer_id():
    s = fresh(4, max_in_flight=3)
    assert send_all(s) == [2, 3, 4]
    actions = s.receive(nack(3, P.LOG_STOPPED, "fsync failed: EIO"), 0.0)
    assert [a.token for a in actions if isinstance(a, Fail)] == ["b2", "b3", "b4"]
    assert all(isinstance(a.error, LogStoppedError) and "EIO" in str(a.error) for a in actions[:3])
    assert actions[-1] == Subscribe(NEW_PID)
    assert s.tokens() == ["b1"]  # sent before: its ack may still come, under the old id
    assert s.receive(nack(4, P.LOG_STOPPED), 0.0) == []  # the rest, for the old id: nothing left there
    out = s.submit("b5", encode_put(b"k", b"v"), 1)
    assert (out.seq, P.decode_append(out.message).producer_id) == (3, NEW_PID)  # numbered on, new id
    assert s.next_send() is None  # not before READY on the new id
    assert s.receive(ack(2, 9), 0.0) == [Resolve("b1", 9)]
    s.receive(ready(NEW_PID), 0.0)
    assert send_all(s) == [3]
    assert s.receive(ack(3, 7, pid=PID), 0.0) == []  # same number, old id: not about b5
    assert s.receive(ack(3, 10, pid=NEW_PID), 0.0) == [Resolve("b5", 10)]


@pytest.mark.parametrize("reply", [
    ack(2, 7, 1, P.DUPLICATE),  # another producer's batch 2 under this id
    ack(2, 0, 0, P.DUPLICATE),  # the same, older than the writer's window
    ack(2, 7, 3),  # an ACK for a batch of 3 records: not this one
], ids=["duplicate", "duplicate, LSNs unknown", "count differs"])
def test_an_id_another_producer_uses_fails_and_moves_to_a_new_id(reply):
    """A DUPLICATE for a batch sent only once (or a reply whose count is not the batch's) answers a copy this
    producer never sent: another producer uses the id (e.g. `Producer(producer_id=42)` again after the first
    closed).  That batch and every later one fail with ProducerIdError, and new ones go out under a fresh id,
    numbered on.  Before, it resolved with the other producer's LSNs and the record was never stored."""
    s = fresh(2)
    assert send_all(s) == [2, 3]
    actions = s.receive(reply, 0.0)
    assert [a.token for a in actions if isinstance(a, Fail)] == ["b1", "b2"]
    assert all(isinstance(a.error, ProducerIdError) and "another producer uses that id" in str(a.error)
               for a in actions[:2])
    assert actions[2:] == [Subscribe(NEW_PID)] and len(s) == 0
    out = s.submit("b3", encode_put(b"k", b"v"), 1)
    assert (out.seq, out.producer_id) == (2, NEW_PID)
    s.receive(ready(NEW_PID), 0.0)
    assert send_all(s) == [2]
    assert s.receive(ack(3, 8, 1, P.DUPLICATE), 0.0) == []  # the rest, for the old id: nothing left there
    assert s.receive(ack(2, 9, pid=NEW_PID), 0.0) == [Resolve("b3", 9)]


def test_a_stale_log_stopped_changes_nothing():
    s = fresh(1)
    send_all(s)
    assert s.receive(nack(5, P.LOG_STOPPED), 0.0) == [] and s.producer_id == PID


@pytest.mark.parametrize("reply", [nack(2, "no_such_code"), P.Reply(PID, 9, 2, 0, 0)])
def test_unknown_codes_and_statuses_change_nothing(reply):
    s = fresh(1)
    send_all(s)
    assert s.receive(reply, 0.0) == [] and s.tokens() == ["b1"]


def test_fail_all_fails_each_batch_once():
    s = fresh(3, max_in_flight=1)
    send_all(s)
    assert [a.token for a in s.fail_all(RuntimeError("closed"))] == ["b1", "b2", "b3"]
    assert s.fail_all(RuntimeError("closed")) == [] and len(s) == 0


# -- a model writer: the real IngestSession over an in-memory log --------------------------------------------

class ModelWriter:
    def __init__(self) -> None:
        self.ingest = IngestSession(max_batch_bytes=1 << 20, max_record_bytes=1 << 16)
        self.windows: dict[int, collections.deque[Appended]] = {}
        self.log: list[bytes] = []  # one entry per record, at LSN = index + 1
        self.stopped = False
        self.stop_at: int | None = None  # stop the log once it holds this many records

    def handle(self, msg: bytes) -> P.Reply | None:
        d = self.ingest.decide(msg, self.windows.get)
        ident = P.peek_producer(msg)
        if isinstance(d, Refuse):
            return P.Reply(ident[0], P.NACK, ident[1], 0, 0, f"{d.code}: {d.detail}") if ident else None
        if isinstance(d, Duplicate):
            return d.reply()
        assert isinstance(d, Store)
        if self.stop_at is not None and len(self.log) >= self.stop_at:
            self.stopped, self.stop_at = True, None
        if self.stopped:
            return P.Reply(ident[0], P.NACK, ident[1], 0, 0, "log_stopped: fsync failed")
        base = len(self.log) + 1
        self.log.append(d.payload)  # a batch of one record in these tests
        self.windows.setdefault(d.producer_id, collections.deque(maxlen=128)).append(
            Appended(d.seq, base, d.count))
        return P.Reply(d.producer_id, P.ACK, d.seq, base, d.count)


class Harness:
    """A session, a model writer, and a network between them in which the test decides every fate."""

    def __init__(self) -> None:
        self.s = make()
        self.w = ModelWriter()
        self.now = 0.0
        self.payloads: dict[str, bytes] = {}
        self.outcomes: dict[str, object] = {}
        self.to_writer: collections.deque[bytes] = collections.deque()  # PUSH keeps order; it may drop
        self.to_producer: list[P.Reply] = [ready()]

    @classmethod
    def after_a_first_ack(cls, batches: list[tuple[str, bool]]) -> "Harness":
        """A session whose first batch was acked, then `batches` (name, good) submitted and sent."""
        h = cls()
        h.deliver(0)
        h.submit("first")
        h.send()
        h.writer_step()
        h.deliver(0)
        for name, good in batches:
            h.submit(name, good=good)
        h.send()
        return h

    def submit(self, name: str, good: bool = True) -> None:
        payload = encode_put(name.encode(), b"v") if good else b"\xff" * 8
        self.payloads[name] = payload
        self.s.submit(name, payload, 1)

    def send(self) -> None:
        while (out := self.s.next_send()) is not None:
            self.s.sent(out, self.now)
            self.to_writer.append(out.message)

    def writer_step(self) -> None:
        reply = self.w.handle(self.to_writer.popleft())
        if reply is not None:
            self.to_producer.append(reply)

    def deliver(self, index: int) -> None:
        for action in self.s.receive(self.to_producer.pop(index), self.now):
            if isinstance(action, Subscribe):
                self.to_producer.append(ready(action.producer_id))  # the writer confirms the new topic
                continue
            assert action.token not in self.outcomes, f"{action.token} finished twice"
            self.outcomes[action.token] = action

    def settle(self, rounds: int = 400) -> None:
        """A faithful network from now on: everything arrives, in order, and the clock runs.  The writer
        applies the subscription at last, and says READY (it cannot be lost while the connection holds)."""
        self.w.stopped = False
        if not self.s.ready_seen:
            self.to_producer.append(ready(self.s.producer_id))
        for _ in range(rounds):
            self.send()
            while self.to_writer:
                self.writer_step()
            while self.to_producer:
                self.deliver(0)
            if len(self.s) == 0:
                return
            self.now += TIMEOUT
            self.s.tick(self.now)
        raise AssertionError(f"never settled: {self.s.tokens()} unacked")

    def check(self) -> None:
        """Every batch finished exactly once; a resolved one is in the log at its LSN; nothing stored twice."""
        assert set(self.outcomes) == set(self.payloads)
        assert len(self.w.log) == len(set(self.w.log)), "a batch was stored twice"
        for name, outcome in self.outcomes.items():
            good = self.payloads[name] != b"\xff" * 8
            if isinstance(outcome, Resolve):
                assert good
                if outcome.base_lsn is not None:
                    assert self.w.log[outcome.base_lsn - 1] == self.payloads[name]
            elif isinstance(outcome.error, NackError):
                assert not good and outcome.error.code == P.MALFORMED
            else:
                assert isinstance(outcome.error, LogStoppedError)
        resolved = {self.payloads[n] for n, o in self.outcomes.items() if isinstance(o, Resolve)}
        assert resolved <= set(self.w.log), "an acked batch is not in the log"


FATES = ("ack", "lost", "bad")  # the batch's reply arrives / is dropped / the batch is refused for good


@pytest.mark.parametrize("fates", list(itertools.product(FATES, repeat=3)))
@pytest.mark.parametrize("order", ["in order", "reversed"])
@pytest.mark.parametrize("resend", [False, True], ids=["once", "sent twice"])
def test_every_combination_of_reply_fates(fates, order, resend):
    """Three batches in flight after a first ack; each one's reply is delivered, lost or a refusal, in order
    or reversed, with every batch sent once or twice (duplicates); then the network is faithful."""
    h = Harness.after_a_first_ack([(f"b{i}", fate != "bad") for i, fate in enumerate(fates)])
    if resend:
        h.now += TIMEOUT
        h.s.tick(h.now)
        h.send()
    while h.to_writer:
        h.writer_step()
    replies = h.to_producer
    lost = {h.payloads[f"b{i}"] for i, f in enumerate(fates) if f == "lost"}
    keep = [r for r in replies if not (r.status in (P.ACK, P.DUPLICATE) and r.count
                                       and h.w.log[r.base_lsn - 1] in lost)]
    h.to_producer = keep[::-1] if order == "reversed" else keep
    while h.to_producer:
        h.deliver(0)
    h.settle()
    h.check()


# -- property: any interleaving ------------------------------------------------------------------------------

class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness()
        self.n = 0

    @initialize(stop_at=st.none() | st.integers(0, 3))
    def the_log_may_stop(self, stop_at: int | None) -> None:
        self.h.w.stop_at = stop_at

    @rule(good=st.booleans())
    def submit(self, good: bool) -> None:
        self.n += 1
        self.h.submit(f"r{self.n}", good)

    @rule()
    def send(self) -> None:
        self.h.send()

    @rule(n=st.integers(1, 4))
    def a_healthy_round(self, n: int) -> None:
        """Some records go through a faithful network: what gets the log to its stop."""
        for _ in range(n):
            self.submit(True)
        self.h.send()
        self.writer_takes_all()
        self.all_replies_in_order()

    @precondition(lambda self: self.h.to_writer)
    @rule(drop=st.booleans())
    def writer_takes_one(self, drop: bool) -> None:
        if drop:
            self.h.to_writer.popleft()  # PUSH dropped it
        else:
            self.h.writer_step()

    @precondition(lambda self: self.h.to_producer)
    @rule(data=st.data(), lose=st.booleans())
    def a_reply(self, data: st.DataObject, lose: bool) -> None:
        index = data.draw(st.integers(0, len(self.h.to_producer) - 1))  # any one: replies reorder
        if lose:
            self.h.to_producer.pop(index)
        else:
            self.h.deliver(index)

    @rule(dt=st.sampled_from([0.001, TIMEOUT / 2, TIMEOUT]))
    def clock(self, dt: float) -> None:
        self.h.now += dt
        self.h.s.tick(self.h.now)

    @rule()
    def reconnect(self) -> None:
        self.h.to_producer.append(ready(self.h.s.producer_id))

    @rule()
    def writer_takes_all(self) -> None:
        while self.h.to_writer:
            self.h.writer_step()

    @rule()
    def all_replies_in_order(self) -> None:
        while self.h.to_producer:
            self.h.deliver(0)

    @rule()
    def writer_restarts(self) -> None:
        self.h.w.stopped = False
        self.h.to_producer.append(ready(self.h.s.producer_id))

    @invariant()
    def finished_at_most_once_and_counted(self) -> None:
        unacked = set(self.h.s.tokens())
        assert len(unacked) == len(self.h.s)
        assert not unacked & set(self.h.outcomes)
        assert unacked | set(self.h.outcomes) == set(self.h.payloads)

    def teardown(self) -> None:
        self.h.settle()
        self.h.check()


SessionMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_session_machine = SessionMachine.TestCase

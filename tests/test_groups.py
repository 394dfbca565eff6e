"""Consumer groups end to end: a real writer, consumer processes sharing a group, kill -9 in the middle.

Each consumer process writes one line per record it processed (`lsn<TAB>key`), flushed per batch, so a
consumer killed mid-way leaves exactly what it finished.  A record may be processed twice only when a
consumer was killed while holding its range (at-least-once, GUARANTEES.md "Consumer groups").
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import finish, python_env, run_cli, spawn_producer, status, wait_for

import walsvc
from walsvc.errors import ConfigError, GroupError, ServiceUnavailableError

CONSUMER = r"""
import sys, time
import walsvc
directory, group, name, out, total, slow = sys.argv[1:7]
with walsvc.Reader(directory, group=group, consumer=name, max_records=50, lease_ms=1500) as reader, \
        open(out, "a") as f:
    print("ready", flush=True)
    while True:
        batch = reader.poll(0.2)
        if batch:
            f.write("".join(f"{r.lsn}\t{r.key.decode()}\n" for r in batch))
            f.flush()
            time.sleep(float(slow))
        else:
            lag = reader.lag()
            if lag["committed_lsn"] >= int(total) and lag["records"] == 0:
                break
"""


def spawn_consumer(d: Path, group: str, name: str, out: Path, total: int, slow: float = 0.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CONSUMER, str(d), group, name, str(out), str(total), str(slow)],
                            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def processed(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line.split("\t")[0]) for line in path.read_text().splitlines() if line.endswith(tuple("0123456789"))]


def test_four_consumers_share_the_log_and_survive_two_kill9s(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writers(d).start()
    total = 4 * 1500
    outs = [tmp_path / f"c{i}.txt" for i in range(4)]
    consumers = [spawn_consumer(d, "billing", f"w{i}", outs[i], total, slow=0.02) for i in range(4)]
    producers = [spawn_producer(d, i, tmp_path / f"p{i}.txt", count=1500, batch=10, pause_s=0.01) for i in range(4)]
    wait_for(lambda: all(processed(o) for o in outs[:2]) and sum(len(processed(o)) for o in outs) > total // 4,
             60, "a quarter of the records processed, some by each consumer to be killed")
    for victim in consumers[:2]:
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    for i, p in enumerate(producers):
        finish(p, 120, f"producer {i}")
    for i, c in enumerate(consumers[2:], start=2):
        out, err = c.communicate(timeout=120)
        assert c.returncode == 0, err

    seen = [processed(o) for o in outs]
    counts = collections.Counter(lsn for lsns in seen for lsn in lsns)
    assert set(counts) == set(range(1, total + 1)), "a record was never processed"
    twice = {lsn for lsn, n in counts.items() if n > 1}
    by_killed = set(seen[0]) | set(seen[1])
    assert twice <= by_killed, "a record was processed twice although no killed consumer had it"
    assert all(n == 2 for n in counts.values() if n > 1)
    assert len(twice) <= 2 * 50 * 2, "more redelivered than the killed consumers' leases could hold"
    assert seen[2] and seen[3], "a survivor did no work"

    group = status(d)["groups"]["billing"]
    assert group["position"] == total + 1 and group["lag_records"] == 0
    wait_for(lambda: walsvc.cursor.load(d, "billing") == total, 5, "the group's cursor to be stored")


def test_a_new_group_starts_where_asked_and_bad_requests_are_refused(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writers(d).start()
    with walsvc.Producer(d) as producer:
        for f in [producer.put(f"k{i}", b"v") for i in range(10)]:
            f.result(10)
    with walsvc.Reader(d, group="late", consumer="a", start="latest") as late:
        assert late.woken_by == "commit"  # a group consumer's claims go through the writer: no HEAD watch
        assert late.poll(0.3) == []
        with walsvc.Producer(d) as producer:
            producer.put(b"new", b"v").result(10)
        assert [r.key for r in late.poll(5)] == [b"new"]
    with walsvc.Reader(d, group="all", consumer="a") as everything:
        assert [r.lsn for r in everything.poll(5)] == list(range(1, 12))
    with pytest.raises(GroupError, match="reader name"):
        walsvc.Reader(d, group="../etc", consumer="a").poll(1)
    with pytest.raises(ConfigError, match="reader.lease_ms"):  # refused before it is sent
        walsvc.Reader(d, group="g2", consumer="a", lease_ms=0).poll(1)
    assert status(d)["groups"]["all"]["position"] == 12


def test_a_group_and_a_named_reader_never_share_a_name(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    with walsvc.Reader(d, name="taken"):
        with pytest.raises(GroupError, match="in use by process"):
            walsvc.Reader(d, group="taken", consumer="a").poll(1)
    with walsvc.Reader(d, group="mine", consumer="a") as member:
        member.poll(0.1)
        with pytest.raises(walsvc.CursorBusyError, match=f"in use by process {writer.pid}"):
            walsvc.Reader(d, name="mine")


def test_a_group_needs_a_running_writer(tmp_path: Path) -> None:
    walsvc.Log.open(tmp_path / "wal").close()
    with pytest.raises(ServiceUnavailableError, match="needs a running writer"):
        walsvc.Reader(tmp_path / "wal", group="g", consumer="a")


def test_a_failed_group_cursor_store_stops_the_log(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    with walsvc.Producer(d) as producer:
        [f.result(30) for f in producer.put_many([(b"k%d" % i, b"v") for i in range(10)])]
    # The writer replaces the cursor through a temp file: a directory in its place makes that open fail (EISDIR).
    (d / "cursors").mkdir(exist_ok=True)
    (d / "cursors" / f".g.cursor.{writer.pid}.tmp").mkdir()
    with walsvc.Reader(d, group="g", consumer="a") as member:
        assert len(member.poll(5)) == 10
        member.commit(10)
        stopped = wait_for(lambda: status(d)["stopped"], 10, "the log to stop")
    assert stopped["operation"].startswith("group cursor store (g)"), stopped
    assert writer.running() and status(d)["stopped"] == stopped  # still answering, with the reason


def test_a_stuck_group_cursor_store_does_not_hold_up_the_writer(tmp_path: Path, writers) -> None:
    """The group's cursor is stored on a thread of its own: while that store hangs (a FIFO where its temp file
    goes: opening it for writing waits for a reader), producers are still acked.  Once it opens, fsyncing a
    FIFO fails (EINVAL) and the log stops, naming the store."""
    import time

    d = tmp_path / "wal"
    writer = writers(d).start()
    with walsvc.Producer(d) as producer:
        [f.result(30) for f in producer.put_many([(b"k%d" % i, b"v") for i in range(10)])]
        (d / "cursors").mkdir(exist_ok=True)
        fifo = d / "cursors" / f".g.cursor.{writer.pid}.tmp"
        os.mkfifo(fifo)
        with walsvc.Reader(d, group="g", consumer="a") as member:
            assert len(member.poll(5)) == 10
            member.commit(10)
            time.sleep(0.5)  # the store has started and waits in open()
            started = time.monotonic()
            lsns = [producer.put(b"after%d" % i, b"v").result(5) for i in range(20)]
            took = time.monotonic() - started
            assert lsns == list(range(11, 31)) and status(d)["stopped"] is None
            assert took < 4, f"20 acks took {took:.1f} s behind a stuck cursor store"
            reader_end = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            try:
                stopped = wait_for(lambda: status(d)["stopped"], 10, "the log to stop")
            finally:
                os.close(reader_end)
    assert stopped["operation"] == "group cursor store (g)", stopped
    assert writer.running()


def test_the_cursor_thread_stores_the_latest_position_and_reports_a_failure(tmp_path: Path) -> None:
    """Positions put faster than they are stored collapse to the latest; a failed store is reported through
    `fail` with the cursor's name, a bug as the thread's failure, and either ends the thread without leaving
    `close` waiting."""
    from walsvc import cursor

    failures: list[tuple[str, BaseException]] = []
    storer = cursor.CursorStorer(tmp_path, lambda op, exc: failures.append((op, exc)))
    for lsn in range(1, 200):
        storer.put({"a": lsn, "b": 2 * lsn})
    storer.close()  # stores what is pending first
    assert (cursor.load(tmp_path, "a"), cursor.load(tmp_path, "b")) == (199, 398)
    (tmp_path / "cursors" / f".c.cursor.{os.getpid()}.tmp").mkdir()  # its temp file cannot be opened: EISDIR
    failing = cursor.CursorStorer(tmp_path, lambda op, exc: failures.append((op, exc)))
    failing.put({"c": 5})
    failing.put({"a": 500})
    failing.close()  # returns: the failed thread stores nothing more
    assert [op for op, _ in failures] == ["group cursor store (c)"]
    assert isinstance(failures[0][1], IsADirectoryError)
    assert cursor.load(tmp_path, "a") == 199 and cursor.load(tmp_path, "c") is None

    # Not an OSError (a bug): reported the same way, as the thread's failure.
    broken = cursor.CursorStorer(tmp_path, lambda op, exc: failures.append((op, exc)))
    broken.put({"d": "not an LSN"})
    broken.close()
    assert [op for op, _ in failures[1:]] == ["cursor thread"]


def test_a_new_groups_start_survives_a_writer_restart_before_any_ack(tmp_path: Path, writers) -> None:
    """A group starts at 'latest' (LSN 11); its first consumer claims 11..20 and dies without an ack; the
    writer restarts.  The group resumes at 11, and retention keeps its records.  Before, nothing stored the
    start until an ack moved it: after the restart 'latest' meant LSN 21, and 11..20 were never delivered."""
    from helpers import control
    d = tmp_path / "wal"
    writer = writers(d).start()
    with walsvc.Producer(d) as producer:
        [f.result(30) for f in producer.put_many([(b"old%d" % i, b"v") for i in range(10)])]
    first = control(d, "group_claim", group="g", consumer="a", max_records=100, start="latest")
    assert first["ok"] and first["lease"] is None and first["position"] == 11, first
    with walsvc.Producer(d) as producer:
        [f.result(30) for f in producer.put_many([(b"new%d" % i, b"v") for i in range(10)])]
    held = control(d, "group_claim", group="g", consumer="a", max_records=100)
    assert (held["lease"]["first"], held["lease"]["end"]) == (11, 21), held
    wait_for(lambda: walsvc.list_cursors(d).get("g") == 10, 10, "the group's start to be stored")
    assert writer.stop() == 0
    writer.start()
    with walsvc.Reader(d, group="g", consumer="b", start="latest") as member:
        assert [r.lsn for r in member.poll(5)] == list(range(11, 21))


def test_lease_ids_never_repeat_across_a_writer_restart(tmp_path: Path, writers) -> None:
    """An ack sent before a writer restart must not name a lease of the new run.  Before, every run numbered
    its leases from 1: consumer a's late ack of lease 1 acked the range the new run had just leased to it as
    lease 1, unread."""
    from helpers import control
    d = tmp_path / "wal"
    writer = writers(d).start()
    with walsvc.Producer(d) as producer:
        [f.result(30) for f in producer.put_many([(b"k%d" % i, b"v") for i in range(20)])]
    old = control(d, "group_claim", group="g", consumer="a", max_records=10)["lease"]
    assert writer.stop() == 0
    writer.start()
    new = control(d, "group_claim", group="g", consumer="a", max_records=10)["lease"]
    assert (new["first"], new["end"]) == (old["first"], old["end"]) and new["id"] > old["id"], (old, new)
    stale = control(d, "group_ack", group="g", consumer="a", lease=old["id"])
    assert not stale["ok"], stale
    assert control(d, "group_ack", group="g", consumer="a", lease=new["id"])["ok"]


def test_leaving_the_block_on_an_exception_hands_the_range_back_unacked(tmp_path: Path, writers) -> None:
    """A handler that raises on record 3 of 1..10: before, `__exit__` acked all ten, so 3..10 were never
    processed by anyone.  Now the range goes back to the group at once and the next consumer gets it."""
    d = tmp_path / "wal"
    writers(d).start()
    with walsvc.Producer(d) as producer:
        [f.result(30) for f in producer.put_many([(b"k%d" % i, b"v") for i in range(20)])]
    with pytest.raises(RuntimeError, match="handler failed"):
        with walsvc.Reader(d, group="g", consumer="a", max_records=10) as failing:
            assert [r.lsn for r in failing.poll(5)] == list(range(1, 11))
            raise RuntimeError("handler failed on 3")
    with walsvc.Reader(d, group="g", consumer="b", max_records=10) as other:
        assert [r.lsn for r in other.poll(5)] == list(range(1, 11))
        assert other.redelivered == 10
        assert [r.lsn for r in other.poll(5)] == list(range(11, 21))  # and this acks 1..10
    assert status(d)["groups"]["g"]["position"] == 21


def test_a_refused_late_ack_is_raised_by_commit_and_counted_by_poll(tmp_path: Path, writers) -> None:
    """A consumer slower than lease_ms loses its range; its late ack is refused.  Before, poll, commit and
    close all swallowed that refusal, so a consumer never learned its work was handed to another."""
    d = tmp_path / "wal"
    writers(d).start()
    with walsvc.Producer(d) as producer:
        [f.result(30) for f in producer.put_many([(b"k%d" % i, b"v") for i in range(20)])]
    with walsvc.Reader(d, group="g", consumer="slow", max_records=10, lease_ms=200) as slow:
        batch = slow.poll(5)
        assert [r.lsn for r in batch] == list(range(1, 11))
        with walsvc.Reader(d, group="g", consumer="fast", max_records=10) as fast:
            wait_for(lambda: [r.lsn for r in fast.poll(0.1)][:1] == [1], 10, "the expired range to be handed on")
        with pytest.raises(GroupError, match="expired"):
            slow.commit(batch[-1].lsn)
        assert slow.expired_acks == 1
        slow.poll(5)
        assert slow.expired_acks == 1  # commit consumed the lease: poll has nothing left to ack twice
    with pytest.raises(walsvc.LogClosedError):
        slow.commit(1)
    with pytest.raises(walsvc.LogClosedError):  # was a zmq.ZMQError: "Socket operation on non-socket"
        slow.lag()


def test_resetting_a_group_says_the_writer_holds_it_and_works_once_it_is_stopped(tmp_path: Path, writers) -> None:
    """`walsvc cursors reset GROUP` while the writer runs said 'in use by process N ... stop that reader', N
    being the writer, which no reader of the user's is.  It now says so, and how to reset the group."""
    d = tmp_path / "wal"
    writer = writers(d).start()
    with walsvc.Producer(d) as producer:
        [f.result(30) for f in producer.put_many([(b"k%d" % i, b"v") for i in range(20)])]
    with walsvc.Reader(d, group="g", consumer="a") as member:
        assert len(member.poll(5)) == 20
    with pytest.raises(walsvc.CursorBusyError, match=f"process {writer.pid}, the log's writer.*stop the writer") as busy:
        walsvc.reset_cursor(d, "g", 5)
    assert busy.value.by_writer
    r = run_cli("cursors", "reset", "g", "--to", "5", "--dir", str(d))
    assert r.returncode == 1 and "the log's writer" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with walsvc.Reader(d, name="other"):
        with pytest.raises(walsvc.CursorBusyError, match="stop that reader") as busy:
            walsvc.reset_cursor(d, "other", 5)
        assert not busy.value.by_writer
    assert writer.stop() == 0
    assert walsvc.reset_cursor(d, "g", 5) == 4
    writer.start()
    with walsvc.Reader(d, group="g", consumer="b") as member:
        assert [r.lsn for r in member.poll(5)] == list(range(5, 21))


def test_a_group_starts_at_a_time_and_its_errors_name_it_once(tmp_path: Path, writers) -> None:
    """Reader(dir, datetime, group=...) raised TypeError (a datetime is not JSON) though a named reader takes
    one; a refused start said "consumer group 'g': consumer group 'g': ..."."""
    import datetime
    d = tmp_path / "wal"
    writers(d).start()
    with walsvc.Producer(d) as producer:
        [f.result(30) for f in producer.put_many([(b"old%d" % i, b"v") for i in range(5)])]
    time.sleep(0.05)
    cut = datetime.datetime.now(datetime.timezone.utc)
    time.sleep(0.05)
    with walsvc.Producer(d) as producer:
        [f.result(30) for f in producer.put_many([(b"new%d" % i, b"v") for i in range(5)])]
    with walsvc.Reader(d, cut, group="since", consumer="a") as member:
        assert [r.key for r in member.poll(5)] == [b"new%d" % i for i in range(5)]
    with pytest.raises(GroupError) as refused, walsvc.Reader(d, 0, group="bad", consumer="a") as bad:
        bad.poll(1)
    assert str(refused.value).count("consumer group 'bad'") == 1, refused.value
    with pytest.raises(ConfigError, match="past the end of the log"):
        walsvc.Reader(d, 99, group="far", consumer="a")


def test_a_loop_left_inside_a_range_hands_the_rest_back(tmp_path: Path, writers) -> None:
    """`for record in reader: ... break` at record 3 of 1..10, then a normal close: before, close acked all
    ten, so 4..10, never handed out, were lost to the group.  A loop that got to a range's last record acks it."""
    d = tmp_path / "wal"
    writers(d).start()
    with walsvc.Producer(d) as producer:
        [f.result(30) for f in producer.put_many([(b"k%d" % i, b"v") for i in range(20)])]
    with walsvc.Reader(d, group="g", consumer="a", max_records=10) as reader:
        for record in reader:
            if record.lsn == 3:
                break
    with walsvc.Reader(d, group="g", consumer="b", max_records=10) as reader:
        seen = []
        for record in reader:
            seen.append(record.lsn)
            if record.lsn == 10:
                break
        assert seen == list(range(1, 11)) and reader.redelivered == 10
    with walsvc.Reader(d, group="g", consumer="c", max_records=10) as reader:
        assert [r.lsn for r in reader.poll(5)] == list(range(11, 21))  # b's loop reached 10: 1..10 acked

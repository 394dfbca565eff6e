"""The round trip of one record in flight (issue 9): the writer fsyncs in its own loop under `always` (group
commit without a thread hand-off), a producer's caller receives its own reply, and a reader is woken by the
writer's rewrite of HEAD (inotify) or by a commit message, whose committed LSN it takes as its bound.  Real
processes, sockets and files.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from helpers import (check_acked_exactly_once, collect_acks, finish, process_resources, read_log, settled_resources,
                     spawn_producer, status, verify_log)

import walsvc
from walsvc import head as H
from walsvc import producer as producer_module
from walsvc.errors import AckTimeoutError, LogClosedError, LogStoppedError
from walsvc.producer import EAGER_IN_FLIGHT
from walsvc.record import Record, encode_put
from walsvc.segment import segment_name
from walsvc.wakeup import HeadWatch
from walsvc.writer import Pipelining


def test_log_without_fsync_thread_commits_only_on_sync(open_log) -> None:
    """`fsync_thread=False` under `always`: appends that do not wait stay uncommitted until the owner's
    sync(), and one fsync then commits all of them (the writer service's loop relies on both)."""
    log = open_log(fsync="always", fsync_thread=False)
    for i in range(10):
        log.append_encoded(encode_put(b"k%d" % i, b"v"), 1, wait=False)
    time.sleep(0.2)  # a background fsync thread, if one ran, would have committed them by now
    assert log.committed_lsn == 0
    assert log.stats()["fsyncs"] == 0
    assert log.sync() == 10
    assert log.committed_lsn == 10
    assert log.stats()["fsyncs"] == 1


def test_log_without_fsync_thread_commits_os_appends_only_when_told(open_log) -> None:
    """`fsync_thread=False` under `os`: appends stay uncommitted (HEAD and readers do not see them) until the
    owner's commit_written(), which commits all of them with one HEAD update and no fsync (the writer
    service's loop calls it once per turn)."""
    log = open_log(fsync="os", fsync_thread=False)
    for i in range(10):
        log.append_encoded(encode_put(b"k%d" % i, b"v"), 1, wait=False)
    assert log.committed_lsn == 0
    assert H.load(log.directory).committed_lsn == 0
    log.commit_written()
    assert log.committed_lsn == 10
    assert H.load(log.directory).committed_lsn == 10
    assert log.stats()["fsyncs"] == 0


def test_a_stop_commits_the_os_appends_written_before_it(open_log) -> None:
    """`fsync_thread=False` under `os`: when the log stops before the owner's commit_written(), the batches
    written whole before the failure are committed first, as a commit after each write would have; the
    failing one is not.  (Else the writer would nack batches that recovery then keeps.)"""
    log = open_log(fsync="os", fsync_thread=False)
    for lsn in range(2, 2000):  # the next segment cannot be installed: the rotation fails
        (log.directory / segment_name(lsn)).mkdir()
    appended = 0
    with pytest.raises(LogStoppedError) as stopped:
        for i in range(2000):
            log.append_encoded(encode_put(b"k%d" % i, b"v" * 1000), 1, wait=False)
            appended += 1
    assert stopped.value.operation == "segment rename"
    assert 500 < appended == log.committed_lsn == H.load(log.directory).committed_lsn
    for lsn in range(2, 2000):
        (log.directory / segment_name(lsn)).rmdir()


def test_a_failed_head_update_is_not_tried_again_by_the_stop() -> None:
    """Fail-stop: when the owner's commit fails in its HEAD update, the stop does not try that update again
    to commit the owed writes."""
    from walsvc.fsync import Syncer
    tries = []

    def publish(end: int) -> None:
        tries.append(end)
        raise syncer.fail("HEAD update", None, OSError(errno.EIO, "injected"))

    syncer = Syncer("os", 0, lambda: (0, 0, None), lambda end: None, 1, publish=publish, thread=False)
    syncer.written(5)
    with pytest.raises(LogStoppedError):
        syncer.commit_written()
    assert tries == [5] and syncer.committed_end == 1 and syncer.failed.operation == "HEAD update"


def test_log_with_fsync_thread_commits_os_appends_at_once(open_log) -> None:
    """The embedded log's default under `os`: every append is committed when it returns."""
    log = open_log(fsync="os")
    log.append_encoded(encode_put(b"k", b"v"), 1, wait=False)
    assert log.committed_lsn == 1 and H.load(log.directory).committed_lsn == 1


def test_writer_loop_group_commits_four_producer_processes(tmp_path: Path, writers) -> None:
    """Four producer processes, one record in flight each, under `always`: every record is acked exactly once
    and durable, and the writer loop's fsyncs each covered several producers' batches (fewer fsyncs than
    batches)."""
    d = tmp_path / "wal"
    writer = writers(d, fsync="always").start()
    per_producer = 150
    outs = [tmp_path / f"p{i}.acks" for i in range(4)]
    procs = [spawn_producer(d, i, out, count=per_producer, batch=1, pause_s=0, in_flight_one=True,
                            ack_timeout_s=30.0) for i, out in enumerate(outs)]
    for i, proc in enumerate(procs):
        finish(proc, 120, f"producer {i}")
    st = status(d)
    batches = st["counters"]["batches"]
    assert batches == 4 * per_producer  # one record per batch: each producer waited for every ack
    assert st["committed_lsn"] == 4 * per_producer
    assert 0 < st["fsyncs"] < batches, f"{st['fsyncs']} fsyncs for {batches} batches: no group commit"
    assert writer.stop() == 0
    check_acked_exactly_once(verify_log(d), collect_acks(outs))


class _WatchedProducer(walsvc.Producer):
    """Records which thread took each batch of replies off the reply socket (the code under test is
    unchanged: this only notes the thread name, then receives as usual)."""

    def __init__(self, *args, **kwargs) -> None:
        self.receivers: list[str] = []
        super().__init__(*args, **kwargs)

    def _take_replies(self, *args) -> list:
        self.receivers.append(threading.current_thread().name)
        return super()._take_replies(*args)


def test_a_caller_waiting_for_its_record_receives_the_reply_itself(tmp_path: Path, writers) -> None:
    """put().result() in a loop: the waiting caller takes its ack off the socket itself, not the I/O thread
    (one thread wake-up less per round trip); LSNs are consecutive and the log holds every record."""
    d = tmp_path / "wal"
    writer = writers(d, fsync="os").start()
    with _WatchedProducer(d) as producer:
        producer.put(b"warm", b"up").result(30)  # READY and the first ack, whoever receives them
        producer.receivers.clear()
        lsns = [producer.put(b"k%d" % i, b"v").result(30) for i in range(200)]
    assert lsns == list(range(2, 202))
    by_caller = producer.receivers.count(threading.current_thread().name)
    assert by_caller >= 150, f"only {by_caller} of {len(producer.receivers)} receives in the caller"
    assert writer.stop() == 0
    assert len(read_log(d)) == 201


def test_futures_nobody_waits_on_resolve_and_waiting_threads_hand_over(tmp_path: Path, writers) -> None:
    """Every way to look at a future gets it resolved, whoever receives: done() polling, a callback,
    await, flush; and eight threads sharing one producer, each waiting on its own records, all get theirs
    (the receiving caller hands the socket on when its own record is acked)."""
    d = tmp_path / "wal"
    writer = writers(d, fsync="always").start()
    with walsvc.Producer(d) as producer:
        producer.put(b"warm", b"up").result(30)
        polled = producer.put(b"polled", b"v")
        deadline = time.monotonic() + 10
        while not polled.done():
            assert time.monotonic() < deadline, "a future polled with done() was never resolved"
            time.sleep(0.001)
        called = threading.Event()
        producer.put(b"callback", b"v").add_done_callback(lambda f: called.set())
        assert called.wait(10), "a done callback never ran"
        assert asyncio.run(asyncio.wait_for(_awaited(producer), 10)) > 0
        flushed = [producer.put(b"flushed%d" % i, b"v") for i in range(50)]
        producer.flush(10)
        assert all(f.done() for f in flushed)

        lsns: list[list[int]] = [[] for _ in range(8)]

        def work(i: int) -> None:
            for n in range(40):
                lsns[i].append(producer.put(b"t%d-%d" % (i, n), b"v").result(30))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(len(per) == 40 for per in lsns), [len(per) for per in lsns]
        every = [lsn for per in lsns for lsn in per]
        assert len(set(every)) == len(every)
        assert all(per == sorted(per) for per in lsns)  # each thread's records in its order
    assert writer.stop() == 0
    assert len(read_log(d)) == 1 + 3 + 50 + 8 * 40


async def _awaited(producer: walsvc.Producer) -> int:
    return await producer.put(b"awaited", b"v")


def _wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_replies_nobody_watches_are_taken_by_the_caller_when_the_pipeline_fills(tmp_path: Path, writers,
                                                                                 monkeypatch) -> None:
    """Records put and not waited on: the I/O thread does not wake for each ack (here it would look only
    every 30 s), and the caller whose put finds the pipeline nearly full takes the acks waiting itself, so
    its record still goes out alone and at once.  Nothing is lost: a flush then resolves every record."""
    monkeypatch.setattr(producer_module, "LAZY_TURN_S", 30.0)
    monkeypatch.setattr(producer_module, "IDLE_POLL_MS", 30_000)
    d = tmp_path / "wal"
    writer = writers(d, fsync="os").start()
    with _WatchedProducer(d, ack_timeout_s=60) as producer:
        producer.put(b"warm", b"up")
        producer.flush(30)  # the I/O thread takes that ack, then holds the reply socket
        first = [producer.put(b"k%d" % i, b"v") for i in range(EAGER_IN_FLIGHT - 2)]
        _wait_until(lambda: status(d)["committed_lsn"] == EAGER_IN_FLIGHT - 1, "the writer never committed them")
        _wait_until(lambda: producer._io_lazy, "the I/O thread never stopped watching the reply socket")
        time.sleep(0.2)
        assert producer.acked_records == 1, "acks nobody watches were taken one by one as they came"
        assert not any(f._batch.done for f in first)
        producer.receivers.clear()
        last = producer.put(b"last", b"v")  # the pipeline holds EAGER_IN_FLIGHT - 1 batches after it
        assert producer.receivers == [threading.current_thread().name]
        assert producer.acked_records >= EAGER_IN_FLIGHT - 1
        assert [f.result(0) for f in first] == list(range(2, EAGER_IN_FLIGHT))
        producer.flush(10)
        assert last.result(0) == EAGER_IN_FLIGHT
        assert status(d)["counters"]["batches"] == EAGER_IN_FLIGHT  # each record went out alone
    assert writer.stop() == 0
    stored = read_log(d)
    assert [r.key for r in stored] == [b"warm", *(b"k%d" % i for i in range(EAGER_IN_FLIGHT - 2)), b"last"]


def test_a_record_put_as_the_producer_starts_goes_out_at_once(tmp_path: Path, writers) -> None:
    """Nothing is sent before the writer's READY: the I/O thread watches the reply socket for it even with
    nobody waiting for a record, so one put right after the producer starts is committed in milliseconds,
    not after the I/O thread's idle timeout (a second)."""
    d = tmp_path / "wal"
    writer = writers(d, fsync="os").start()
    with walsvc.Producer(d) as producer:
        start = time.monotonic()
        producer.put(b"first", b"v")
        _wait_until(lambda: status(d)["committed_lsn"] == 1, "the record was never committed")
        took = time.monotonic() - start
    assert took < 0.7, f"the first record took {took:.3f} s to be committed"
    assert writer.stop() == 0


def test_looking_at_a_future_gets_its_ack_taken_as_it_comes(tmp_path: Path, writers, monkeypatch) -> None:
    """With the I/O thread not watching the reply socket (it would look only every 30 s), each way of
    looking at a record without waiting in result() makes it watch again: done() polling, a done callback,
    await, flush; each resolves in seconds."""
    monkeypatch.setattr(producer_module, "LAZY_TURN_S", 30.0)
    monkeypatch.setattr(producer_module, "IDLE_POLL_MS", 30_000)
    d = tmp_path / "wal"
    writer = writers(d, fsync="os").start()
    with walsvc.Producer(d, ack_timeout_s=60) as producer:
        producer.put(b"warm", b"up")
        producer.flush(30)  # the I/O thread takes that ack, then holds the reply socket
        producer.put(b"unwatched", b"v")
        _wait_until(lambda: producer._io_lazy, "the I/O thread never stopped watching the reply socket")

        polled = producer.put(b"polled", b"v")
        _wait_until(polled.done, "a future polled with done() was not resolved", timeout=5)
        _wait_until(lambda: producer._io_lazy, "the I/O thread kept watching with nothing unacked")
        called = threading.Event()
        producer.put(b"callback", b"v").add_done_callback(lambda f: called.set())
        assert called.wait(5), "a done callback did not run"
        _wait_until(lambda: producer._io_lazy, "the I/O thread kept watching with nothing unacked")
        assert asyncio.run(asyncio.wait_for(_awaited(producer), 5)) > 0
        _wait_until(lambda: producer._io_lazy, "the I/O thread kept watching with nothing unacked")
        flushed = producer.put(b"flushed", b"v")
        start = time.monotonic()
        producer.flush(5)
        assert flushed.done() and time.monotonic() - start < 5
    assert writer.stop() == 0
    assert len(read_log(d)) == 6


def test_a_paced_producer_s_io_thread_does_not_wake_for_each_ack(tmp_path: Path, writers) -> None:
    """One put every millisecond, none waited on (the latency scenario's producer): the I/O thread does not
    wake once per ack (its voluntary context switches, from /proc; the caller takes the acks in bulk), and
    every record is acked and stored once, in order."""
    d = tmp_path / "wal"
    writer = writers(d, fsync="os").start()
    n = 1000
    with walsvc.Producer(d) as producer:
        producer.put(b"warm", b"up")
        producer.flush(30)  # the I/O thread takes that ack, then holds the reply socket
        before = _voluntary_switches(producer._io.native_id)
        start = time.monotonic()
        futures = []
        for i in range(n):
            delay = start + i / 1000 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(producer.put(b"p%d" % i, b"v"))
        wakes = _voluntary_switches(producer._io.native_id) - before
        producer.flush(30)
        assert [f.result(0) for f in futures] == list(range(2, n + 2))
    assert wakes < n / 4, f"the I/O thread woke {wakes} times for {n} acks nobody watched"
    assert writer.stop() == 0
    assert len(read_log(d)) == n + 1


def _voluntary_switches(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for thread {tid}")


def test_close_while_a_caller_receives(tmp_path: Path, writers) -> None:
    """A thread waiting in result() (receiving replies itself) when another thread closes the producer ends
    with the ack or with LogClosedError, never with a ZeroMQ error from a socket closed under it."""
    d = tmp_path / "wal"
    writer = writers(d, fsync="os").start()
    writer.pause()
    producer = walsvc.Producer(d, ack_timeout_s=30)
    outcome: list[object] = []

    def wait() -> None:
        try:
            outcome.append(producer.put(b"k", b"v").result(60))
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcome.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)  # the caller is receiving now (the writer is stopped, so no ack comes)
    with pytest.raises(AckTimeoutError):
        producer.close(timeout=0.5)
    t.join(30)
    assert not t.is_alive()
    writer.resume()
    assert len(outcome) == 1 and isinstance(outcome[0], LogClosedError), outcome


@pytest.mark.parametrize("wake", ["commit", "auto"])
def test_a_reader_sees_every_record_once_in_order_whatever_wakes_it(tmp_path: Path, writers, wake: str) -> None:
    """A tailing reader woken by COMMIT messages or by the HEAD watch, polled while the producer goes on,
    sees every record once, in order, each within 10 s of its ack."""
    d = tmp_path / "wal"
    writer = writers(d, fsync="os").start()
    total = 400
    with walsvc.Reader(d, "earliest", wake=wake) as reader, walsvc.Producer(d) as producer:
        assert reader.woken_by == ("commit" if wake == "commit" else "head")
        got: list[int] = []
        for i in range(total):
            producer.put(b"k%d" % i, b"v").result(30)
            if i % 2:
                while len(got) < i + 1:
                    batch = reader.poll(10)
                    assert batch, f"no records within 10 s after {len(got)}"
                    got.extend(r.lsn for r in batch)
        while len(got) < total:
            got.extend(r.lsn for r in reader.poll(10))
    assert got == list(range(1, total + 1))
    assert writer.stop() == 0


@pytest.mark.parametrize("wake", ["auto", "commit"])
def test_the_head_watch_wakes_a_reader_with_no_commit_messages(open_log, wake: str) -> None:
    """An embedded Log publishes HEAD and no COMMIT messages: a reader watching HEAD is woken by the append
    itself, long before its recheck_s (30 s here); one subscribed to COMMIT messages only at its recheck."""
    log = open_log(fsync="os")
    with walsvc.Reader(log.directory, "earliest", recheck_s=30, wake=wake) as reader:
        assert reader.poll(0.05) == []
        got: list[list] = []
        t = threading.Thread(target=lambda: got.append(reader.poll(3)))
        t.start()
        time.sleep(0.2)  # the reader is asleep now
        appended_at = time.monotonic()
        log.append(Record.put(b"k", b"v"))
        t.join(10)
        woke_after = time.monotonic() - appended_at
    if wake == "auto":
        assert [r.lsn for r in got[0]] == [1] and woke_after < 1.0, (got, woke_after)
    else:
        assert got == [[]] and woke_after > 2.0, (got, woke_after)


@pytest.mark.parametrize("preallocate", [True, False])
def test_a_tailing_reader_gets_each_record_as_it_is_appended(open_log, preallocate: bool) -> None:
    """A reader polling after every append gets exactly that record, across rotations.  It reads the new
    bytes up to HEAD's written end, and asks for the file's size only when that end lies past the size it
    knows: a segment that is not preallocated grows with every append, so its size must be read again."""
    log = open_log(fsync="os", segment_bytes=1 << 20, preallocate=preallocate)
    with walsvc.Reader(log.directory, "earliest", recheck_s=30) as reader:
        assert reader.poll(0) == []
        for i in range(700):
            log.append(Record.put(b"k%d" % i, bytes([i % 251]) * 4000))
            got = reader.poll(1)
            assert [(r.lsn, r.key, r.value) for r in got] == [(i + 1, b"k%d" % i, bytes([i % 251]) * 4000)]
        assert reader.poll(0) == []
    assert log.stats()["segments"] >= 3


def test_a_tailing_reader_notices_that_its_writer_was_killed(tmp_path: Path, writers) -> None:
    """A reader that saw HEAD move takes the writer as alive without asking the kernel; once HEAD stands
    still it asks, so after kill -9 it reads what was committed and then says `offline`."""
    d = tmp_path / "wal"
    writer = writers(d).start()
    with walsvc.Reader(d, "earliest") as reader, walsvc.Producer(d) as producer:
        for i in range(20):
            producer.put(b"k%d" % i, b"v").result(30)
            assert [r.lsn for r in reader.poll(5)] == [i + 1]
        assert not reader.offline
        for i in range(20, 30):
            producer.put(b"k%d" % i, b"v")
        producer.flush(30)
        writer.kill9()
        got = []
        deadline = time.monotonic() + 10
        while (len(got) < 10 or not reader.offline) and time.monotonic() < deadline:
            got.extend(reader.poll(0.1))
        assert [r.lsn for r in got] == list(range(21, 31))
        assert reader.offline, "the reader still takes a killed writer for alive"


def test_a_reader_started_before_head_exists_watches_it_once_it_does(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    d.mkdir()
    with walsvc.Reader(d, "earliest", recheck_s=0.05) as reader:
        assert reader.poll(0.1) == [] and reader.woken_by is None
        writer = writers(d, fsync="os").start()
        with walsvc.Producer(d) as producer:
            producer.put(b"a", b"1").result(30)
            assert [r.key for r in reader.poll(5)] == [b"a"]
            assert reader.poll(0.1) == []
            assert reader.woken_by == "head"
            reader.recheck_s = 30  # from now on only the watch can wake it in time
            producer.put(b"b", b"2").result(30)
            started = time.monotonic()
            assert [r.key for r in reader.poll(5)] == [b"b"]
            assert time.monotonic() - started < 1.0
    assert writer.stop() == 0


@pytest.mark.parametrize("turns, expected", [
    # each inner list is one drain's producer ids; expected: whether the drain counts as pipelined
    ([[1], [2], [1, 2, 3]], [False, False, False]),           # one batch in flight each: the loop fsyncs
    ([[1, 1], [1], [2]], [True, True, False]),                 # producer 1 sent twice: its later drains too
    ([[2, 1, 1, 3]], [True]),                                  # the repeat is not first in the drain
    ([[1, 1]] + [[2]] * 3 + [[1]], [True, False, False, False, True]),  # remembered across other drains
])
def test_pipelining_marks_the_drains_of_a_producer_that_sent_two_batches_in_one(turns, expected) -> None:
    p = Pipelining(turns=8)
    got = []
    for producers in turns:
        p.new_turn()
        for pid in producers:
            p.note(pid)
        got.append(p.turn_pipelined)
    assert got == expected


def test_pipelining_is_forgotten_after_its_turns() -> None:
    p = Pipelining(turns=3)
    p.new_turn()
    p.note(7)
    p.note(7)
    for _ in range(3):  # within the window: still pipelining
        p.new_turn()
        p.note(7)
        assert p.turn_pipelined
    p = Pipelining(turns=3)
    p.new_turn()
    p.note(7)
    p.note(7)
    for _ in range(3):
        p.new_turn()  # drains without producer 7
    p.new_turn()
    p.note(7)
    assert not p.turn_pipelined


def test_cancelling_one_await_leaves_the_batch_and_the_producer_alone(tmp_path: Path, writers) -> None:
    """Two tasks await two records of one batch; the first is cancelled before the ack (the writer is
    stopped with SIGSTOP meanwhile).  The other still gets its LSN, the batch's outcome is intact for
    result() and flush(), and the producer's I/O thread lives on to ack the next record."""
    d = tmp_path / "wal"
    writer = writers(d, fsync="always").start()
    with walsvc.Producer(d) as producer:
        producer.put(b"warm", b"up").result(30)
        os.kill(writer.pid, signal.SIGSTOP)
        try:
            first, second = producer.put_many([(b"a", b"1"), (b"b", b"2")])
            assert first._batch is second._batch  # one batch: the case where a shared outcome could suffer

            async def scenario() -> tuple[bool, int]:
                cancelled = asyncio.ensure_future(_await(first))
                kept = asyncio.ensure_future(_await(second))
                await asyncio.sleep(0.2)
                cancelled.cancel()
                os.kill(writer.pid, signal.SIGCONT)
                await asyncio.wait([cancelled, kept], timeout=30)
                return cancelled.cancelled(), kept.result()

            was_cancelled, lsn = asyncio.run(scenario())
        finally:
            os.kill(writer.pid, signal.SIGCONT)
        assert was_cancelled
        assert lsn == first.result(10) + 1
        producer.flush(10)
        assert producer.put(b"after", b"v").result(30) == lsn + 1
    assert writer.stop() == 0
    assert len(read_log(d)) == 4


async def _await(record: walsvc.producer.RecordFuture) -> int:
    return await record


class _BrokenIOProducer(walsvc.Producer):
    """A producer whose I/O thread meets a bug once `broken` is set: the next reply it takes raises (the code
    under test, the thread's guard, is unchanged; callers receive replies themselves as usual).  Not before:
    the I/O thread may take the writer's READY, and a failure then would fail the first record too."""

    broken = False

    def _take_replies(self, msg: bytes | None = None) -> list:
        if self.broken and threading.current_thread().name == "walsvc-producer-io":
            raise RuntimeError("a bug in the I/O thread")
        return super()._take_replies(msg)


def test_a_failed_io_thread_fails_every_unacked_record_at_once(tmp_path: Path, writers) -> None:
    """An exception in the producer's I/O thread does not end it silently: the records nobody waits on fail
    at once with LogClosedError naming the failure, later puts are refused the same way, and close() ends."""
    d = tmp_path / "wal"
    writer = writers(d, fsync="always").start()
    producer = _BrokenIOProducer(d)
    try:
        assert producer.put(b"waited", b"v").result(30) >= 1
        producer.broken = True
        unwatched = [producer.put(b"k%d" % i, b"v") for i in range(20)]
        deadline = time.monotonic() + 30
        while not all(f.done() for f in unwatched):  # done() wakes the I/O thread, which takes the replies
            assert time.monotonic() < deadline, "records hang after the I/O thread failed"
            time.sleep(0.01)
        assert producer._io.is_alive() is False
        errors = [f.exception(0) for f in unwatched]
        failed = [e for e in errors if e is not None]
        assert failed and all(isinstance(e, LogClosedError) and "I/O thread failed" in str(e) for e in failed)
        with pytest.raises(LogClosedError, match="I/O thread failed"):
            producer.put(b"after", b"v")
    finally:
        producer.close(5)
    assert writer.stop() == 0


def test_pipelining_forgets_producers_that_never_come_back() -> None:
    """A writer outlives many producer processes: those seen pipelining once and then gone are dropped once
    their window is over, so the table stays bounded by the producers of the last window."""
    p = Pipelining(turns=4)
    for pid in range(1, 1001):  # a thousand short-lived producers, each pipelining in one drain, never again
        p.new_turn()
        p.note(pid)
        p.note(pid)
    for _ in range(8):
        p.new_turn()
    assert len(p._until) == 0
    p.new_turn()
    p.note(5)
    assert not p.turn_pipelined


def test_a_commit_woken_reader_that_found_no_endpoints_subscribes_once_they_appear(tmp_path: Path,
                                                                                   writers) -> None:
    """With `wake="commit"`, a reader that starts beside a live writer whose ENDPOINTS it cannot read yet (a
    writer starting up writes HEAD first) looks for them after each wait that timed out, so COMMIT messages
    wake it soon after, long before its recheck_s."""
    d = tmp_path / "wal"
    writer = writers(d, fsync="os").start()
    with walsvc.Producer(d) as producer:
        (d / "ENDPOINTS").rename(tmp_path / "ENDPOINTS.aside")
        with walsvc.Reader(d, "latest", wake="commit", recheck_s=30) as reader:
            assert not reader.offline and reader.poll(0.2) == []
            (tmp_path / "ENDPOINTS.aside").rename(d / "ENDPOINTS")
            got: list = []
            deadline = time.monotonic() + 10
            while not got:  # the first COMMITs may go out before the subscription reaches the writer
                assert time.monotonic() < deadline, "no COMMIT woke the reader within 10 s"
                producer.put(b"k", b"v").result(30)
                got = reader.poll(0.3)
    assert writer.stop() == 0


def test_a_reader_out_of_inotify_instances_is_woken_by_commit_messages(tmp_path: Path, writers) -> None:
    """Every inotify instance this user may have is taken (fs.inotify.max_user_instances, a real limit): a
    reader then subscribes to COMMIT messages and is still woken in time, long before its recheck_s."""
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    if limit > 4096:
        pytest.skip(f"max_user_instances is {limit}: too many to take in a test")
    d = tmp_path / "wal"
    writer = writers(d, fsync="os").start()
    taken: list[HeadWatch] = []
    try:
        while len(taken) <= limit:
            try:
                taken.append(HeadWatch(d / "HEAD"))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                break
        else:
            pytest.fail(f"{len(taken)} inotify instances and no EMFILE")
        with walsvc.Reader(d, "earliest", recheck_s=30) as reader, walsvc.Producer(d) as producer:
            assert reader.woken_by == "commit"
            assert reader.poll(0.2) == []
            producer.put(b"k", b"v").result(30)
            started = time.monotonic()
            assert [r.key for r in reader.poll(5)] == [b"k"]
            assert time.monotonic() - started < 1.0
    finally:
        for watch in taken:
            watch.close()
    assert writer.stop() == 0


def test_producers_dropped_without_close_free_their_thread_and_sockets(tmp_path: Path, writers) -> None:
    """A Producer garbage collected without close ends its I/O thread and frees its ZeroMQ context (two
    more threads) and sockets.  Before, the I/O thread held the producer for ever: each dropped producer
    kept 3 threads and 11 file descriptors (200 of them: 661 threads, 2,426 fds)."""
    d = tmp_path / "wal"
    writers(d).start()
    with walsvc.Producer(d) as warm:
        warm.put(b"k", b"v").result(10)
    baseline = process_resources()
    for _ in range(150):
        producer = walsvc.Producer(d, ack_timeout_s=0.2)
        producer.put(b"k", b"v").result(10)
        del producer
    fds, threads = settled_resources(baseline, margin=10)
    assert fds <= baseline[0] + 10 and threads <= baseline[1] + 10, (baseline, (fds, threads))

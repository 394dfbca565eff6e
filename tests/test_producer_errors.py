"""What a producer says when something is wrong, at once and in words: no writer, a stalled writer, bad
arguments.  Real writer processes (killed and stopped for real), no mocks."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from helpers import read_log, run_cli

import walsvc
from walsvc.errors import (AckTimeoutError, ConfigError, InvalidRecordError, ProducerIdError,
                           ServiceUnavailableError)


def test_no_writer_is_said_at_once(tmp_path: Path, writers) -> None:
    with pytest.raises(ServiceUnavailableError, match="no writer has run"):
        walsvc.Producer(tmp_path / "never")
    d = tmp_path / "wal"
    writer = writers(d).start()
    pid = writer.pid
    writer.kill9()  # leaves ENDPOINTS behind, naming a dead process
    began = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match=f"no writer is running .*pid {pid}.*walsvc serve"):
        walsvc.Producer(d)
    assert time.monotonic() - began < 1.0
    began = time.monotonic()
    proc = run_cli("produce", "--dir", str(d), input="a\tb\n", timeout=30)
    assert proc.returncode != 0 and time.monotonic() - began < 10
    assert "no writer is running" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_leaving_the_block_after_the_writer_died_fails_at_once(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    producer = walsvc.Producer(d)
    assert producer.put(b"k", b"v").result(30) == 1
    writer.kill9()
    future = producer.put(b"lost?", b"v")
    began = time.monotonic()
    with pytest.raises(ServiceUnavailableError, match="1 records were never acknowledged.*no writer is running"):
        producer.close()
    assert time.monotonic() - began < 2.0
    with pytest.raises(walsvc.LogClosedError):
        future.result(1)


def test_a_timeout_says_whether_the_writer_runs(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    with walsvc.Producer(d) as producer:
        producer.put(b"warm", b"up").result(30)
        writer.pause()  # SIGSTOP: alive, but answering nothing
        try:
            future = producer.put(b"k", b"v")
            with pytest.raises(AckTimeoutError, match=f"pid {writer.pid}.* runs but has not acknowledged") as info:
                future.result(0.3)
            assert isinstance(info.value, TimeoutError)
        finally:
            writer.resume()
        assert future.result(30) == 2
    producer = walsvc.Producer(d)
    writer.pause()
    try:
        future = producer.put(b"late", b"v")
        with pytest.raises(AckTimeoutError, match="still unacknowledged after 0.3 s"):
            producer.close(0.3)  # documented: closed all the same, the record failed
        with pytest.raises(walsvc.LogClosedError, match="closed before the writer acknowledged"):
            future.result(0)
    finally:
        writer.resume()


def test_put_many_checks_pairs_as_put_does_and_callbacks_run(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writers(d).start()
    done = threading.Event()
    seen: list[int] = []
    with walsvc.Producer(d) as producer:
        futures = producer.put_many([("text", "is utf-8"), (b"raw", b"bytes")])
        assert [f.result(30) for f in futures] == [1, 2]
        for bad in ([(1, b"v")], [(b"k", None)]):
            with pytest.raises(InvalidRecordError, match="must be bytes or str"):
                producer.put_many(bad)
            with pytest.raises(InvalidRecordError, match="must be bytes or str"):
                producer.put(*bad[0])
        future = producer.put(b"cb", b"v")
        future.add_done_callback(lambda f: (seen.append(f.result()), done.set()))
        assert done.wait(30) and seen == [3]
        late: list[int] = []
        future.add_done_callback(lambda f: late.append(f.result()))  # already done: runs at once
        assert late == [3]
    assert [r.key for r in walsvc.LogReader(d)] == [b"text", b"raw", b"cb"]


def test_a_done_callback_may_call_the_producer(tmp_path: Path, writers) -> None:
    """Done callbacks run after the producer's lock is released, so one may put the next record (a chain of
    steps, each appended once the one before is in the log), and they run in the order their batches
    finished.  Before, `_finish` ran them under the lock: the callback's put deadlocked the producer for good
    (its I/O thread too, so close() hung)."""
    d = tmp_path / "wal"
    writers(d).start()
    producer = walsvc.Producer(d)
    lsns: list[int] = []
    chained = threading.Event()

    def step(future: walsvc.RecordFuture) -> None:
        lsns.append(future.result())
        if len(lsns) < 20:
            producer.put(b"step%d" % len(lsns), b"v").add_done_callback(step)
        else:
            chained.set()

    producer.put(b"step0", b"v").add_done_callback(step)
    assert chained.wait(10), f"the chain stopped after {len(lsns)} steps"
    assert lsns == list(range(1, 21))
    order: list[int] = []
    for f in producer.put_many([(b"k%d" % i, b"v") for i in range(50)]):
        f.add_done_callback(lambda f: order.append(f.result()))
    producer.flush(10)
    assert order == list(range(21, 71))
    producer.close(5)


def test_a_reused_producer_id_fails_loudly_and_moves_on(tmp_path: Path, writers) -> None:
    """A second Producer with the id of one that closed: the writer holds that id's sequence 1, so the new
    producer's first batch is answered DUPLICATE though sent once.  It fails with ProducerIdError, and the
    producer goes on under a fresh id.  Before, its first three records resolved with the first producer's
    LSNs 1..3 and were never stored."""
    d = tmp_path / "wal"
    writers(d).start()
    with walsvc.Producer(d, producer_id=42) as first:
        assert [first.put(b"run1-%d" % i, b"x").result(10) for i in range(3)] == [1, 2, 3]
    with walsvc.Producer(d, producer_id=42) as second:
        with pytest.raises(ProducerIdError, match="another producer uses that id"):
            second.put(b"run2-0", b"y").result(10)
        assert second.producer_id != 42
        assert [second.put(b"run2-%d" % i, b"y").result(10) for i in (1, 2)] == [4, 5]
    assert [r.key for r in read_log(d)] == [b"run1-0", b"run1-1", b"run1-2", b"run2-1", b"run2-2"]


def test_a_producer_in_a_forked_child_refuses_every_call(tmp_path: Path, writers) -> None:
    """In a forked child every entry point raises LogClosedError at once (the sockets and I/O thread stay in
    the parent); the parent's producer goes on.  Before, the child's put was accepted and result(timeout=2)
    spun at 100 % CPU for ever."""
    d = tmp_path / "wal"
    writers(d).start()
    with walsvc.Producer(d) as producer:
        assert producer.put(b"parent", b"p").result(10) == 1
        unacked = producer.put(b"open", b"p")  # may be acked or not when the child looks: both must refuse
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report each call's outcome, never return into pytest
            outcomes = []
            for call in (lambda: producer.put(b"child", b"c"), lambda: producer.put(b"k", b"v", ttl_ms=5),
                         lambda: producer.put_many([(b"a", b"b")]), lambda: producer.append_many([]),
                         lambda: producer.flush(1), lambda: producer.close(1)):
                try:
                    call()
                    outcomes.append("accepted")
                except walsvc.LogClosedError as exc:
                    outcomes.append("refused" if "create a new Producer after fork" in str(exc) else str(exc))
                except BaseException as exc:
                    outcomes.append(repr(exc))
            os.write(write_end, " ".join(outcomes).encode())
            os._exit(0)
        os.close(write_end)
        deadline = time.monotonic() + 15
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child never finished its calls")
            time.sleep(0.05)
        with os.fdopen(read_end, "rb") as f:
            assert f.read().decode().split(" ") == ["refused"] * 6
        assert unacked.result(10) == 2
        assert producer.put(b"after", b"p").result(10) == 3


def test_a_file_where_a_directory_is_meant_names_the_python_argument(tmp_path: Path) -> None:
    not_toml = tmp_path / "notes.txt"
    not_toml.write_text("just words\n")
    with pytest.raises(ConfigError, match=r"^directory: .*notes.txt is a file, so it must be a TOML config"):
        walsvc.Producer(not_toml)


def test_a_reader_start_past_the_end_is_refused_and_a_time_seeks(tmp_path: Path, writers) -> None:
    import datetime
    d = tmp_path / "wal"
    writers(d).start()
    with walsvc.Producer(d) as producer:
        assert [f.result(30) for f in producer.put_many([(b"a", b"1"), (b"b", b"2")])] == [1, 2]
        middle = datetime.datetime.now()
        time.sleep(0.01)
        assert producer.put(b"c", b"3").result(30) == 3
    with pytest.raises(ConfigError, match=r"^start: LSN 9 is past the end .*committed up to LSN 3.*'latest'"):
        walsvc.Reader(d, 9)
    with walsvc.Reader(d, 4) as reader:  # the next record: allowed, it waits for exactly that LSN
        assert reader.poll(0.1) == []
    with walsvc.Reader(d, middle) as reader:
        assert [r.key for r in reader.poll(5)] == [b"c"]


def test_the_writer_advertises_its_codecs_and_a_producer_heeds_them(tmp_path: Path, writers) -> None:
    import dataclasses

    from walsvc.endpoints import load as load_endpoints
    from walsvc.record import codecs
    d = tmp_path / "wal"
    writers(d).start()
    endpoints = load_endpoints(d)
    assert endpoints.codecs == codecs() and "zstd" in endpoints.codecs
    no_lz4 = dataclasses.replace(endpoints, codecs=("zstd",))  # as a writer without the lz4 package says
    with walsvc.Producer(d, endpoints=no_lz4) as producer:
        with pytest.raises(walsvc.CompressionUnavailableError, match="cannot decode lz4 values .*decodes zstd"):
            producer.put(b"k", b"v" * 1000, compression="lz4")
        assert producer.put(b"k", b"v" * 1000, compression="zstd").result(30) == 1

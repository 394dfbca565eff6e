"""The service end to end: a real `walsvc serve` process, producer and reader processes, real sockets and files.

Covers ordering and exactly-once delivery across processes, reader start-up cases (before the writer, late
joiners, offline), idempotent producing on the wire, socket placement for long paths, and group commit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from helpers import (RawClient, control, finish, parse_key, producer_key, read_acks, read_log,
                     read_seen, run_cli, spawn_producer, spawn_reader, status, verify_log, wait_ready)

import walsvc
from walsvc import protocol as P, record as R
from walsvc.record import Record, encode_many, encode_put


def poll_until(reader: walsvc.Reader, count: int, timeout: float = 20.0) -> list[Record]:
    """Poll a Reader until it has returned `count` records (fails on timeout; returns all it got)."""
    got: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"reader got {len(got)} of {count} records within {timeout} s"
        got.extend(reader.poll(min(remaining, 0.5)))
    return got


# -- many processes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("writer_code", ["compiled", "python"])
def test_four_producer_processes_three_reader_processes(tmp_path: Path, writers, writer_code: str) -> None:
    """Every record reaches every reader exactly once, in one total order, with each producer's order kept:
    with the writer's compiled store of a batch (where it was built) and with its Python alone."""
    d = tmp_path / "wal"
    writer = writers(d, env={"WALSVC_PURE_PYTHON": "1"} if writer_code == "python" else None).start()
    compiled = writer_code == "compiled" and R._c is not None
    assert status(d)["batch_store"] == ("C" if compiled else "pure Python")
    n_producers, per_producer = 4, 1500
    total = n_producers * per_producer
    readers = [spawn_reader(d, tmp_path / f"reader{i}.txt", expect=total) for i in range(3)]
    for r in readers:
        wait_ready(r)
    producers = [spawn_producer(d, i, tmp_path / f"producer{i}.txt", count=per_producer, batch=25, pause_s=0.002)
                 for i in range(n_producers)]
    for i, p in enumerate(producers):
        finish(p, 120, f"producer {i}")
    for i, r in enumerate(readers):
        finish(r, 60, f"reader {i}")

    views = [read_seen(tmp_path / f"reader{i}.txt") for i in range(3)]
    for i, view in enumerate(views):
        assert [lsn for lsn, _, _ in view] == list(range(1, total + 1)), f"reader {i}: gaps or repeats in LSNs"
        keys = [key for _, key, _ in view]
        assert len(set(keys)) == total, f"reader {i} saw some record twice"
        assert all(vlen == 32 for _, _, vlen in view)
    assert views[0] == views[1] == views[2], "readers disagree on the order"

    expected_keys = {producer_key(i, c) for i in range(n_producers) for c in range(per_producer)}
    assert {key for _, key, _ in views[0]} == expected_keys
    # Each producer's records appear in the order it appended them.
    counters: dict[int, list[int]] = {i: [] for i in range(n_producers)}
    for _, key, _ in views[0]:
        who, counter = parse_key(key)
        counters[who].append(counter)
    for who, seq in counters.items():
        assert seq == list(range(per_producer)), f"producer {who}'s order not kept"

    # What each producer was acked matches what the readers saw at that LSN.
    at = {lsn: key for lsn, key, _ in views[0]}
    for i in range(n_producers):
        acks = read_acks(tmp_path / f"producer{i}.txt")
        assert [k for k, _ in acks] == [producer_key(i, c) for c in range(per_producer)]
        for key, lsn in acks:
            assert at[lsn] == key
        lsns = [lsn for _, lsn in acks]
        assert lsns == sorted(lsns)

    assert writer.stop() == 0
    assert [(r.lsn, r.key.decode()) for r in verify_log(d)] == [(lsn, key) for lsn, key, _ in views[0]]


# -- idempotent producing on the wire --------------------------------------------------------------------------

def test_resent_batch_is_duplicate_and_gap_is_out_of_sequence(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    pid, probe = 0xA11CE0000001, 0x5EED
    client = RawClient(d, [pid])
    try:
        first = client.sync(probe, encode_put(b"probe", b"1"))
        # DUPLICATE when the ACK of the first send went out before the SUB had joined and a resend got answered.
        assert first.status in (P.ACK, P.DUPLICATE) and first.base_lsn == 1
        dup_before = status(d)["counters"].get("duplicates", 0)

        batch1 = P.encode_append(pid, 1, 2, encode_many([Record.put("a", "1"), Record.put("b", "2")]))
        client.send(batch1)
        ack = client.wait_reply(pid, 1)
        assert (ack.status, ack.base_lsn, ack.count) == (P.ACK, 2, 2)

        client.send(batch1)  # the same (producer id, sequence) again
        dup = client.wait_reply(pid, 1)
        assert (dup.status, dup.base_lsn, dup.count) == (P.DUPLICATE, 2, 2)

        client.send(P.encode_append(pid, 3, 1, encode_put(b"c", b"3")))  # sequence 2 is missing
        gap = client.wait_reply(pid, 3)
        assert gap.status == P.NACK and gap.code == P.OUT_OF_SEQUENCE
        assert "expected sequence 2" in gap.detail

        client.send(P.encode_append(pid, 2, 1, encode_put(b"c", b"3")))
        ack2 = client.wait_reply(pid, 2)
        assert (ack2.status, ack2.base_lsn, ack2.count) == (P.ACK, 4, 1)

        st = status(d)
        assert st["counters"]["duplicates"] == dup_before + 1
        assert st["rejected"].get(P.OUT_OF_SEQUENCE) == 1
        assert st["committed_lsn"] == 4
    finally:
        client.close()

    # The dedup window is rebuilt from the log: after kill -9 and a restart the resend is still a duplicate.
    writer.kill9()
    writer.start()
    client = RawClient(d, [pid])
    try:
        client.sync(probe, encode_put(b"probe", b"1"))
        client.send(batch1)
        again = client.wait_reply(pid, 1)
        assert (again.status, again.base_lsn, again.count) == (P.DUPLICATE, 2, 2)
    finally:
        client.close()
    assert writer.stop() == 0
    assert [(r.lsn, r.key) for r in verify_log(d)] == [(1, b"probe"), (2, b"a"), (3, b"b"), (4, b"c")]


def test_a_resend_of_a_batch_not_yet_committed_is_answered_after_its_commit(tmp_path: Path, writers) -> None:
    """A DUPLICATE names LSNs as an ACK does, so it waits for the same commit: under `batch` with a long window
    the copy of a batch still waiting for its fsync gets no answer before that batch is committed."""
    d = tmp_path / "wal"
    config = tmp_path / "walsvc.toml"
    config.write_text('[log]\nfsync = "batch"\nfsync_window_ms = 1000\n')
    writers(d, config=config).start()
    pid, probe = 0xA11CE0000002, 0x5EED
    client = RawClient(d, [pid])
    try:
        client.sync(probe, encode_put(b"probe", b"1"))  # fsynced at once: the next write waits for the window
        batch = P.encode_append(pid, 1, 2, encode_many([Record.put("a", "1"), Record.put("b", "2")]))
        client.send(batch)
        client.send(batch)  # a resend before the first copy is committed
        first = client.wait_reply(pid, 1)
        assert first.status == P.ACK, first  # a DUPLICATE first would ack LSNs that are not yet durable
        dup = client.wait_reply(pid, 1)
        assert (dup.status, dup.base_lsn, dup.count) == (P.DUPLICATE, first.base_lsn, 2)
        assert status(d)["committed_lsn"] >= first.base_lsn + 1
    finally:
        client.close()


# -- readers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("directory", ["empty", "missing"])
def test_reader_started_before_the_writer(tmp_path: Path, writers, directory: str) -> None:
    d = tmp_path / "wal"
    if directory == "empty":
        d.mkdir()
    with walsvc.Reader(d, "earliest") as reader:
        assert reader.offline
        assert reader.poll(0.2) == []
        writer = writers(d).start()
        with walsvc.Producer(d) as producer:
            futures = [producer.put(f"k{i}", f"v{i}") for i in range(5)]
            producer.flush(30)
        assert [f.result(0) for f in futures] == [1, 2, 3, 4, 5]
        got = poll_until(reader, 5)
        assert [(r.lsn, r.key, r.value) for r in got] == [(i + 1, f"k{i}".encode(), f"v{i}".encode())
                                                          for i in range(5)]
        assert not reader.offline
        # It is woken for later records too.
        with walsvc.Producer(d) as producer:
            producer.put("later", "x").result(30)
        assert [r.key for r in poll_until(reader, 1)] == [b"later"]
    assert writer.stop() == 0


def test_late_readers_earliest_and_latest(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    with walsvc.Producer(d) as producer:
        for i in range(50):
            producer.put(f"old{i}", "x")
        producer.flush(30)
        with walsvc.Reader(d, "earliest") as early, walsvc.Reader(d, "latest") as late:
            assert not early.offline and not late.offline, "a Reader opened beside a live writer says offline"
            old = poll_until(early, 50)
            assert [r.lsn for r in old] == list(range(1, 51))
            assert [r.key for r in old] == [f"old{i}".encode() for i in range(50)]
            assert late.poll(0.3) == []
            for i in range(10):
                producer.put(f"new{i}", "y")
            producer.flush(30)
            new_early = poll_until(early, 10)
            new_late = poll_until(late, 10)
            for got in (new_early, new_late):
                assert [(r.lsn, r.key) for r in got] == [(51 + i, f"new{i}".encode()) for i in range(10)]
            assert late.poll(0.2) == [] and early.poll(0.2) == []
    assert writer.stop() == 0


@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_reader_without_a_writer_reads_everything_valid(tmp_path: Path, writers, how: str) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    with walsvc.Producer(d) as producer:
        lsns = [f.result(30) for f in [producer.put(f"k{i}", f"v{i}") for i in range(30)]]
    assert lsns == list(range(1, 31))
    if how == "kill9":
        writer.kill9()
    else:
        assert writer.stop() == 0
    with walsvc.Reader(d, "earliest") as reader:
        got = poll_until(reader, 30, timeout=10)
        assert reader.offline
        assert [(r.lsn, r.key) for r in got] == [(i + 1, f"k{i}".encode()) for i in range(30)]
        assert reader.poll(0.2) == []
        assert reader.offline


def test_second_writer_is_refused_and_the_first_keeps_serving(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    first = writers(d).start()
    endpoints = (d / "ENDPOINTS").read_text()
    second = writers(d)
    with pytest.raises(AssertionError, match="exited with 1"):
        second.start(timeout=30)
    err = second.stderr()
    assert "already open for writing by process" in err and str(first.pid) in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert (d / "ENDPOINTS").read_text() == endpoints, "the refused writer touched ENDPOINTS"
    with walsvc.Producer(d) as producer:
        assert producer.put("still", "serving").result(30) == 1
    assert control(d, "ping")["pid"] == first.pid
    assert first.stop() == 0


# -- socket placement --------------------------------------------------------------------------------------

def test_default_sockets_live_in_the_log_directory(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    eps = json.loads((d / "ENDPOINTS").read_text())
    assert eps["pid"] == writer.pid
    for name in ("ingest", "publish", "control"):
        assert eps[name] == f"ipc://{d.resolve()}/sockets/{name}.sock"
        assert stat.S_ISSOCK(os.stat(eps[name][len("ipc://"):]).st_mode)
    assert stat.S_IMODE(os.stat(d / "sockets").st_mode) == 0o700
    assert writer.stop() == 0


def test_long_directory_path_uses_a_private_runtime_dir(tmp_path: Path, writers) -> None:
    d = tmp_path / ("d" * 60) / ("e" * 60) / "wal"
    assert len(str(d)) > 110
    writer = writers(d).start()
    eps = json.loads((d / "ENDPOINTS").read_text())
    socket_dirs = set()
    for name in ("ingest", "publish", "control"):
        path = eps[name][len("ipc://"):]
        assert eps[name].startswith("ipc://") and len(path) < 108, eps[name]
        assert not path.startswith(str(d)), "sockets should not be under a too-long log path"
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        socket_dirs.add(os.path.dirname(path))
    assert len(socket_dirs) == 1
    socket_dir = socket_dirs.pop()
    assert stat.S_IMODE(os.stat(socket_dir).st_mode) == 0o700
    assert os.stat(socket_dir).st_uid == os.getuid()
    try:
        # Producer, Reader and the control socket find everything from the directory alone.
        with walsvc.Reader(d) as reader, walsvc.Producer(d) as producer:
            lsns = [f.result(30) for f in [producer.put(f"k{i}", "v") for i in range(10)]]
            assert lsns == list(range(1, 11))
            assert [r.key for r in poll_until(reader, 10)] == [f"k{i}".encode() for i in range(10)]
        assert control(d, "ping")["pid"] == writer.pid
        assert writer.stop() == 0
        # A restart binds the same place again.
        writer.start()
        assert json.loads((d / "ENDPOINTS").read_text())["ingest"] == eps["ingest"]
        with walsvc.Producer(d) as producer:
            assert producer.put("again", "v").result(30) == 11
        assert writer.stop() == 0
    finally:
        for name in ("ingest", "publish", "control"):
            Path(eps[name][len("ipc://"):]).unlink(missing_ok=True)
        try:
            os.rmdir(socket_dir)
        except OSError:
            pass


# -- fsync policies over the service ------------------------------------------------------------------------

def test_fsync_always_group_commits_across_producers(tmp_path: Path, writers) -> None:
    """Four producers (threads, each its own Producer and sockets), each with one record in flight, appending
    in lockstep: every record is acked, and fewer fsyncs than acked batches show one fsync covering several
    producers' batches (group commit)."""
    d = tmp_path / "wal"
    writer = writers(d, fsync="always").start()
    assert "fsync=always" in writer.ready_line
    n_producers, rounds = 4, 40
    barrier = threading.Barrier(n_producers)
    acked: list[list[tuple[str, int | None]]] = [[] for _ in range(n_producers)]
    errors: list[BaseException] = []

    def produce(i: int) -> None:
        try:
            with walsvc.Producer(d) as producer:
                for n in range(rounds):
                    barrier.wait(30)  # all four append at once, then each waits for its own ack
                    key = f"t{i}-{n:03d}"
                    acked[i].append((key, producer.put(key, "v").result(30)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(n_producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    lsns = [lsn for per in acked for _, lsn in per]
    assert sorted(lsns) == list(range(1, n_producers * rounds + 1))
    st = status(d)
    assert st["fsync"] == "always"
    batches = st["counters"]["batches"]
    assert batches == n_producers * rounds  # one record per batch: each waited for its ack
    assert 0 < st["fsyncs"] < batches, f"{st['fsyncs']} fsyncs for {batches} batches: no group commit"
    assert st["committed_lsn"] == n_producers * rounds
    assert writer.stop() == 0
    assert {r.key.decode(): r.lsn for r in read_log(d)} == {key: lsn for per in acked for key, lsn in per}


def test_the_log_threads_wake_the_loop_safely_from_many_threads(tmp_path: Path) -> None:
    """Under `batch` the fsync thread commits and wakes the writer's loop; the rotation thread can commit at
    the same moment.  With three more threads waking the loop all the while, every round trip of a real
    producer is acked promptly (a lost wake-up costs the loop's 100 ms poll timeout), and the loop goes on."""
    import dataclasses

    from walsvc.config import LogConfig, load
    from walsvc.writer import Writer

    d = tmp_path / "wal"
    cfg = load(directory=d)
    cfg = dataclasses.replace(cfg, log=dataclasses.replace(LogConfig(), fsync="batch", fsync_window_ms=1,
                                                           segment_bytes=1 << 20))
    made: list[Writer] = []
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            made.append(Writer(cfg))
            made[0].serve()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)
            raise

    loop = threading.Thread(target=serve, daemon=True)
    loop.start()
    deadline = time.monotonic() + 30
    while not made and not failed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert made, f"the writer did not start: {failed}"
    w = made[0]
    stop = threading.Event()
    pokes = [0, 0, 0]

    def poke(i: int) -> None:
        while not stop.is_set():
            w._wake_loop()
            pokes[i] += 1
            time.sleep(0.0002)

    pokers = [threading.Thread(target=poke, args=(i,), daemon=True) for i in range(3)]
    for t in pokers:
        t.start()
    n = 300
    try:
        started = time.monotonic()
        with walsvc.Producer(d) as producer:
            # 12 KiB values: 300 of them fill several 1 MiB segments, so rotations commit too
            lsns = [producer.put(f"k{i:04d}", os.urandom(12288)).result(30) for i in range(n)]
        took = time.monotonic() - started
    finally:
        stop.set()
        for t in pokers:
            t.join(10)
        w.stop()
        loop.join(60)
    assert not failed, failed
    assert not loop.is_alive()
    assert lsns == list(range(1, n + 1))
    assert min(pokes) > 100, pokes
    assert w.log.stop_reason is None
    assert took < 15, f"{n} round trips took {took:.1f} s: wake-ups were lost"
    assert [r.lsn for r in read_log(d)] == lsns
    assert len(list(d.glob("*.wal"))) >= 3


def test_bulk_appends_and_the_asyncio_form(tmp_path: Path, writers) -> None:
    """put_many / append_many hand over many records at once; append_async and awaiting a future give the
    LSN in asyncio code.  All of them keep order and land exactly once."""
    import asyncio

    d = tmp_path / "wal"
    writers(d).start()
    with walsvc.Producer(d) as producer:
        many = producer.put_many([(b"m%03d" % i, b"v") for i in range(200)])
        mixed = producer.append_many([walsvc.Record.put(b"ttl", b"x", ttl_ms=5), walsvc.Record.delete(b"m000")])

        async def use_asyncio() -> list[int | None]:
            first = await producer.append_async(walsvc.Record.put(b"async-1", b"a"))
            second = await producer.put(b"async-2", b"b")
            return [first, second]

        lsns = [f.result(30) for f in many + mixed] + asyncio.run(use_asyncio())
    assert lsns == list(range(1, 205))
    records = verify_log(d)
    assert [r.key for r in records[:200]] == [b"m%03d" % i for i in range(200)]
    assert records[200].ttl_ms == 5 and records[201].tombstone
    assert [r.key for r in records[202:]] == [b"async-1", b"async-2"]


def test_clients_accept_a_config_file(tmp_path: Path, writers) -> None:
    """Producer and Reader take the log directory, a Config, or the TOML file that names it."""
    from walsvc import config as C

    config = tmp_path / "walsvc.toml"
    config.write_text('[log]\ndir = "data"\n')
    writers(tmp_path / "data").start()
    with walsvc.Producer(config) as producer:
        assert producer.put(b"k", b"v").result(20) == 1
    with walsvc.Reader(C.load(config), "earliest") as reader:
        assert [r.key for r in reader.poll(10)] == [b"k"]


def test_the_writer_raises_its_open_file_limit_to_the_hard_one(tmp_path: Path, writers) -> None:
    """Started with a soft limit of 64 open files (hard 4096), the writer raises it to 4096 and serves 100
    producer connections.  Before, its accepts met EMFILE past the limit: here no producer got an ack within
    30 s, and with `ulimit -n 256` and 300 connections libzmq aborted the writer (SIGABRT)."""
    if not shutil.which("prlimit"):
        pytest.skip("needs util-linux's prlimit")
    d = tmp_path / "wal"
    writer = writers(d, wrapper=["prlimit", "--nofile=64:4096", "--"]).start()
    limits = Path(f"/proc/{writer.pid}/limits").read_text()
    assert re.search(r"Max open files\s+4096\s+4096", limits), limits
    producers = [walsvc.Producer(d) for _ in range(100)]
    try:
        assert sorted(p.put(b"k", b"v").result(30) for p in producers) == list(range(1, 101))
    finally:
        for p in producers:
            p.close()
    assert writer.stop() == 0


def test_subscription_spam_gets_at_most_ten_readies_a_second_and_never_none(tmp_path: Path, writers) -> None:
    """Any account that may read the publish socket can subscribe to a producer's reply topic, and each READY
    makes that producer resend everything in flight.  2,000 subscriptions in a burst now get one READY at
    once and one more when 100 ms have passed (before, the listener got 1,000 in half a second); a
    subscription after a quiet spell gets its READY at once."""
    import zmq
    from walsvc.endpoints import load as load_endpoints
    d = tmp_path / "wal"
    writer = writers(d).start()
    eps = load_endpoints(d)
    ctx = zmq.Context()
    try:
        listener = ctx.socket(zmq.SUB)
        listener.connect(eps.publish)
        topic = P.reply_topic(0xBAD)
        listener.setsockopt(zmq.SUBSCRIBE, topic)  # itself a subscription: one READY
        attacker = ctx.socket(zmq.XSUB)  # sends every subscription message on, repeats included
        attacker.connect(eps.publish)
        time.sleep(0.3)

        def readies(window: float) -> list[float]:
            got, end = [], time.monotonic() + window
            while (left := end - time.monotonic()) > 0:
                if listener.poll(int(left * 1000) + 1):
                    reply = P.decode_reply(listener.recv())
                    assert reply.status == P.READY and reply.producer_id == 0xBAD
                    got.append(time.monotonic())
            return got

        assert len(readies(0.3)) == 1
        for _ in range(2000):
            attacker.send(b"\x01" + topic)
        burst = readies(0.5)
        assert 1 <= len(burst) <= 3, len(burst)  # at once, then the one deferred
        time.sleep(0.2)
        attacker.send(b"\x01" + topic)
        start = time.monotonic()
        late = readies(0.5)
        assert len(late) == 1 and late[0] - start < 0.05, late
    finally:
        ctx.destroy(linger=0)
    assert writer.stop() == 0


def test_explicit_endpoints_that_cannot_be_bound_are_a_config_error(tmp_path: Path) -> None:
    """Two endpoints on one port: the second bind fails.  Before, a ZMQError traceback (exit 1); now one line
    naming the key and the endpoint, exit 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "walsvc.toml"
    config.write_text(f'[service]\ningest = "tcp://127.0.0.1:{port}"\npublish = "tcp://127.0.0.1:{port}"\n'
                      f'control = "tcp://127.0.0.1:{port + 1}"\n')
    proc = run_cli("serve", "--dir", str(tmp_path / "wal"), "--config", str(config))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "service.publish" in proc.stderr, proc.stderr
    assert f"tcp://127.0.0.1:{port}" in proc.stderr and "Address already in use" in proc.stderr, proc.stderr

"""Real faults against a real writer process: kill -9 under load (20 times), SIGTERM, SIGSTOP backpressure,
garbage on the ingest socket.  Producers and readers are real processes or real in-process clients."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import zmq

from helpers import (RawClient, check_acked_exactly_once, collect_acks, control, finish, read_acks,
                     read_seen, run_cli, spawn_producer, spawn_reader, status, verify_log, wait_for, wait_ready)

import walsvc
from walsvc import protocol as P
from walsvc.endpoints import load as load_endpoints
from walsvc.errors import BackpressureError
from walsvc.record import Record, encode, encode_many, encode_put


# -- kill -9 under load ----------------------------------------------------------------------------------

def test_kill9_writer_20_times_under_load(tmp_path: Path, writers) -> None:
    """20 kill -9 / restart cycles with 3 producer processes and a reader process running throughout; 1 MiB
    segments, so segments are sealed and started between (and during) the kills."""
    acked_per_cycle = kill9_under_load(tmp_path, writers, cycles=20, unwatched=False)
    assert sum(b > a for a, b in zip(acked_per_cycle, acked_per_cycle[1:])) >= 15, acked_per_cycle


def test_kill9_writer_under_load_while_nobody_watches_the_acks(tmp_path: Path, writers) -> None:
    """The same with producers that look at no record until they flush at the end: their acks are taken in
    bulk (by a `put` at a nearly full pipeline, or the I/O thread's look every LAZY_TURN_S), so the resends
    after each restart rest on the I/O thread seeing READY and judging ack timeouts without being asked."""
    kill9_under_load(tmp_path, writers, cycles=10, unwatched=True)


def kill9_under_load(tmp_path: Path, writers, cycles: int, unwatched: bool) -> list[int]:
    """Kill -9 and restart the writer `cycles` times under load, then check that every record was acked once
    at the LSN the log holds it at, and that a reader running throughout saw the whole log; returns the acks
    the producers had written down at each kill."""
    d = tmp_path / "wal"
    config = tmp_path / "walsvc.toml"
    config.write_text("[log]\nsegment_bytes = 1048576\n")
    writer = writers(d, config=config).start()
    stop, until = tmp_path / "stop", tmp_path / "until"
    reader = spawn_reader(d, tmp_path / "reader.txt", until_file=until)
    wait_ready(reader)
    outs = [tmp_path / f"producer{i}.txt" for i in range(3)]
    producers = [spawn_producer(d, i, out, stop_file=stop, batch=10, pause_s=0.01, ack_timeout_s=0.5,
                                unwatched=unwatched)
                 for i, out in enumerate(outs)]
    if unwatched:
        wait_for(lambda: len(read_seen(tmp_path / "reader.txt")) >= 100, 30, "records from the producers")
    else:
        wait_for(lambda: all(read_acks(o) for o in outs), 30, "first acks from every producer")

    rng = random.Random(20)
    recovered = [writer.ready_committed_lsn()]
    acked_per_cycle = []
    for _ in range(cycles):
        time.sleep(rng.uniform(0.2, 0.4))
        writer.kill9()
        acked_per_cycle.append(sum(len(read_acks(o)) for o in outs))
        writer.start()
        recovered.append(writer.ready_committed_lsn())
        assert all(p.poll() is None for p in producers), "a producer died"
        assert reader.poll() is None, f"the reader died: {reader.stderr.read()}"

    stop.touch()
    for i, p in enumerate(producers):
        finish(p, 60, f"producer {i}")
    committed = control(d, "committed")["committed_lsn"]
    until.write_text(str(committed))
    finish(reader, 30, "reader")
    assert writer.stop() == 0

    # LSNs are never reused: what each incarnation recovered only grows, and load ran between the kills.
    assert recovered == sorted(recovered)
    assert sum(b > a for a, b in zip(recovered, recovered[1:])) >= cycles * 3 // 4, \
        f"too few writes between kills: {recovered}"

    assert len(list(d.glob("*.wal"))) >= 2, "no segment rotation happened under the kills"
    records = verify_log(d)
    acked = collect_acks(outs)
    assert None not in acked.values(), "some batch was acked without its LSNs"
    check_acked_exactly_once(records, acked)
    # Everything the producers appended was acked in the end (they flushed), so the log holds exactly that.
    assert {r.key.decode() for r in records} == set(acked)
    assert records[-1].lsn == committed
    # The reader that ran across every kill saw the whole log, in order, once.
    assert [(lsn, key) for lsn, key, _ in read_seen(tmp_path / "reader.txt")] == \
        [(r.lsn, r.key.decode()) for r in records]
    return acked_per_cycle


def test_first_batch_lost_in_a_crash_is_resent_not_reported_stored(tmp_path: Path, writers) -> None:
    """A producer's first batch dies with the writer (read off the socket by a stopped writer, then kill -9)
    while its second batch waits in ZeroMQ's queue.  The restarted writer has no window for this producer,
    so if batch 2 arrived first it would be stored and batch 1 answered "stored, LSNs unknown": lost."""
    d = tmp_path / "wal"
    writer = writers(d).start()
    with walsvc.Producer(d, ack_timeout_s=0.5, linger_ms=1) as producer:
        time.sleep(0.5)  # let the PUSH connection finish its handshake (not observable from outside)
        writer.pause()
        first = producer.put("first", "1")  # goes into the stopped writer's socket buffer
        time.sleep(0.2)
        writer.kill9()
        second = producer.put("second", "2")  # queued by ZeroMQ until the writer is back
        time.sleep(0.1)
        writer.start()
        producer.flush(20)
        assert first.result(0) is not None and second.result(0) is not None
        assert first.result(0) < second.result(0)
    assert writer.stop() == 0
    assert [(r.lsn, r.key) for r in verify_log(d)] == [(first.result(0), b"first"), (second.result(0), b"second")]


# -- SIGTERM -----------------------------------------------------------------------------------------------

def test_sigterm_loses_nothing_acked(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    out, stop = tmp_path / "producer.txt", tmp_path / "stop"
    producer = spawn_producer(d, 0, out, stop_file=stop, batch=20, pause_s=0.005)
    try:
        wait_for(lambda: len(read_acks(out)) >= 500, 30, "500 acked records")
        assert writer.stop() == 0
    finally:
        producer.kill()
        producer.wait(10)
    stdout = writer.stdout()
    stopped = [line for line in stdout.splitlines() if line.startswith("walsvc writer stopped: committed_lsn=")]
    assert len(stopped) == 1, stdout
    final = int(stopped[0].rsplit("=", 1)[1])
    assert "Traceback" not in writer.stderr()

    acked = dict(read_acks(out))
    assert len(acked) >= 500
    records = verify_log(d)
    check_acked_exactly_once(records, acked)
    assert max(lsn for lsn in acked.values() if lsn is not None) <= final
    assert records[-1].lsn == final
    # A restart recovers exactly what the stopped writer reported.
    writer.start()
    assert writer.ready_committed_lsn() == final
    assert writer.stop() == 0


# -- backpressure --------------------------------------------------------------------------------------------

def test_backpressure_while_writer_is_stopped(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    value = b"x" * 1000
    with walsvc.Producer(d, max_buffer_bytes=32 * 1024, block_timeout_s=1.0, ack_timeout_s=0.5,
                         linger_ms=1) as producer:
        assert producer.put("first", "x").result(10) == 1
        writer.pause()
        futures = []
        try:
            started = time.monotonic()
            with pytest.raises(BackpressureError):
                for i in range(1000):  # 1 MB: far more than the 32 KiB buffer
                    futures.append(producer.put(f"bp-{i:04d}", value))
            elapsed = time.monotonic() - started
            assert 0.9 <= elapsed < 15, elapsed
            assert 20 <= len(futures) <= 40, len(futures)
            assert not any(f.done() for f in futures)
            stopped = json.loads(run_cli("status", "--dir", str(d), "--json").stdout)
            assert stopped["writer"] == "unresponsive" and stopped["writer_pid"] == writer.pid
        finally:
            writer.resume()
        producer.flush(30)
        assert [f.result(0) for f in futures] == list(range(2, 2 + len(futures)))
        # Space is back: appends work again.
        assert producer.put("after", "x").result(10) == 2 + len(futures)
    assert writer.stop() == 0
    keys = [r.key for r in verify_log(d)]
    assert keys == [b"first"] + [f"bp-{i:04d}".encode() for i in range(len(futures))] + [b"after"]


# -- garbage on the ingest socket -------------------------------------------------------------------------------

GARBAGE_CONFIG = """\
[log]
max_record_bytes = 4096
max_batch_bytes = 8192

[service]
max_message_bytes = 16384
"""


def test_garbage_on_the_ingest_socket(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    config = tmp_path / "walsvc.toml"
    config.write_text(GARBAGE_CONFIG)
    writer = writers(d, config=config).start()
    with walsvc.Producer(d) as producer:
        before = [f.result(30) for f in [producer.put(f"before-{i}", f"v{i}") for i in range(10)]]
    assert before == list(range(1, 11))

    rng = random.Random(3)
    bad_crc, version, count, too_big, batch_big, truncated = (0xBAD0000 + i for i in range(1, 7))
    client = RawClient(d, [bad_crc, version, count, too_big, batch_big, truncated])
    probe = 0x9900
    try:
        assert client.sync(probe, encode_put(b"probe", b"1")).base_lsn == 11
        st = status(d)
        assert {k: v for k, v in st["rejected"].items() if v} == {}
        batches_before = st["counters"]["batches"]

        randoms = [b"", b"W", bytes(27), bytes(28), b"SW" + bytes(40), bytes(rng.randrange(256) for _ in range(300))]
        for msg in randoms:
            assert not msg.startswith(P.APPEND_MAGIC)
            client.send(msg)
        good = encode_put(b"k", b"v")
        corrupt = bytearray(encode_put(b"key", b"value"))
        corrupt[-1] ^= 0xFF  # the record's CRC no longer matches
        client.send(P.encode_append(bad_crc, 1, 1, bytes(corrupt)))
        wrong_version = bytearray(P.encode_append(version, 1, 1, good))
        wrong_version[2] = P.VERSION + 1
        client.send(bytes(wrong_version))
        client.send(P.encode_append(count, 1, 3, good + good))  # says 3 records, holds 2
        client.send(P.encode_append(too_big, 1, 1, encode(Record.put(b"big", b"v" * 5000), 1 << 20)))
        client.send(P.encode_append(batch_big, 1, 3, encode_many([Record.put(b"b", b"v" * 3000)] * 3, 1 << 20)))
        client.send(P.encode_append(truncated, 1, 1, encode_put(b"key", b"value")[:-6]))
        client.send(P.encode_append(0, 1, 1, good))  # producer id 0: malformed, nobody to answer
        client.send(P.encode_append(probe, 2, 1, encode_put(b"probe", b"2")))  # ingest is in order: a barrier
        assert client.wait_reply(probe, 2).base_lsn == 12

        expect = {bad_crc: P.MALFORMED, version: P.UNKNOWN_VERSION, count: P.MALFORMED, too_big: P.TOO_LARGE,
                  batch_big: P.TOO_LARGE, truncated: P.MALFORMED}
        nacks = {}
        for pid, code in expect.items():
            reply = nacks[pid] = client.wait_reply(pid, 1)
            assert reply.status == P.NACK and reply.code == code, (hex(pid), reply)
            assert (reply.base_lsn, reply.count) == (0, 0)
        assert "header says 3 records, payload holds 2" in nacks[count].detail
        assert "max_batch_bytes" in nacks[batch_big].detail
        assert "CRC" in nacks[bad_crc].detail
        st = status(d)
        assert {k: v for k, v in st["rejected"].items() if v} == {P.MALFORMED: len(randoms) + 4, P.UNKNOWN_VERSION: 1, P.TOO_LARGE: 2}
        assert st["committed_lsn"] == 12
        assert st["counters"]["batches"] == batches_before + 1  # the barrier: no garbage was accepted
    finally:
        client.close()

    # A message above service.max_message_bytes: ZeroMQ drops it (and that connection); the writer goes on.
    eps = load_endpoints(d)
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(eps.ingest)
        push.send(P.encode_append(0x77, 1, 1, encode_put(b"huge", b"h" * 20000)))
        time.sleep(0.2)
    finally:
        ctx.destroy(linger=1000)

    with walsvc.Producer(d) as producer:
        after = [f.result(30) for f in [producer.put(f"after-{i}", f"v{i}") for i in range(10)]]
    assert after == list(range(13, 23))
    assert writer.running()
    assert "rejected a message" in writer.stderr()
    assert writer.stop() == 0
    records = verify_log(d)
    assert [(r.lsn, r.key, r.value) for r in records] == (
        [(i + 1, f"before-{i}".encode(), f"v{i}".encode()) for i in range(10)]
        + [(11, b"probe", b"1"), (12, b"probe", b"2")]
        + [(13 + i, f"after-{i}".encode(), f"v{i}".encode()) for i in range(10)])


def test_garbage_on_the_control_socket(tmp_path: Path, writers) -> None:
    """Bad control requests get an error reply; none of them (a multipart one included) stops the writer."""
    d = tmp_path / "wal"
    writer = writers(d).start()
    eps = load_endpoints(d)
    ctx = zmq.Context()
    replies = []
    try:
        for request in ([b"not json"], [b"[1, 2]"], [b'{"op": "status"}', b"a second frame"], [b'{"op": "drop"}'],
                        [b'{"op": 5}']):
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(eps.control)
            sock.send_multipart(request)
            assert sock.poll(10_000), f"no reply to {request}; writer alive: {writer.running()}"
            replies.append(json.loads(sock.recv()))
            sock.close()
    finally:
        ctx.destroy(linger=0)
    assert [r["ok"] for r in replies] == [False] * 5, replies
    assert "not JSON" in replies[0]["error"] and "JSON object" in replies[1]["error"]
    assert "2 frames" in replies[2]["error"] and "unknown op" in replies[3]["error"]
    assert writer.running()
    st = status(d)
    assert {k: v for k, v in st["rejected"].items() if v} == {"control_malformed": 3}
    with walsvc.Producer(d) as producer:
        assert producer.put("after", "x").result(30) == 1
    assert writer.stop() == 0
    assert "Traceback" not in writer.stderr()

"""Redis Streams as a peer: a real redis-server with an append-only file, clients using redis-py.

This is what a user would set up instead of walsvc: one stream as the shared log, XADD to append, XREAD BLOCK
to tail, XRANGE to replay, and the AOF for durability ("os"/"batch"/"always" = appendfsync no/everysec/always).
RDB snapshots and AOF rewrites are off, so the server writes nothing but the log during a measurement (a
rewrite would fork and copy the whole stream mid-run).  The server listens on 127.0.0.1 only, on a free port,
and is shut down before each function returns.  Interface: see harness.py.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from .harness import measure_latency, on_cpus, paced_send, proc_cpu_seconds, run_workers, throughput_result

NAME = "redis"
DURABILITIES = ("os", "batch", "always")
SERVER = True  # the pinned latency scenario places its server process
APPENDFSYNC = {"os": "no", "batch": "everysec", "always": "always"}
HOST = "127.0.0.1"
STREAM = b"log"
FIELD = b"d"
READ_CHUNK = 10_000
FILL_PIPELINE = 1_000


def available() -> str | None:
    """None if redis-server and redis-py are both there."""
    if shutil.which("redis-server") is None:
        return "redis-server not found: apt-get install redis-server"
    if importlib.util.find_spec("redis") is None:
        return "redis-py not installed: pip install redis"
    return None


def _client(port: int) -> Any:
    """A connection that fails at once instead of silently retrying (redis-py retries 3 times by default)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(host=HOST, port=port, socket_timeout=600, retry=Retry(NoBackoff(), 0))
    client.ping()
    return client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def _server(tmpdir: str, durability: str, cpu: int | None = None) -> Iterator[tuple[int, int]]:
    """A fresh redis-server on loopback with its AOF in tmpdir (all its threads on CPU `cpu` if given);
    yields (port, pid), always shuts it down."""
    import redis

    for _attempt in range(3):  # the free port may be taken between probing it and redis binding it
        port = _free_port()
        logpath = os.path.join(tmpdir, "redis.log")
        with on_cpus(None if cpu is None else {cpu}):  # the server and its threads inherit this thread's CPUs
            proc = subprocess.Popen(
                ["redis-server", "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "yes",
                 "--appendfsync", APPENDFSYNC[durability], "--auto-aof-rewrite-percentage", "0",
                 "--dir", tmpdir, "--logfile", logpath, "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while proc.poll() is None:
                try:
                    _client(port).close()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not answer PING within 10 s (log: {logpath})")
                    time.sleep(0.01)
            if proc.poll() is None:
                yield port, proc.pid
                return
        finally:
            proc.terminate()  # SIGTERM: redis fsyncs the AOF and exits; --save "" means no snapshot
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    with open(logpath, errors="replace") as f:
        raise RuntimeError(f"redis-server failed to start: {f.read()[-2000:]}")


def _produce(barrier: Any, port: int, record_size: int, seconds: float, batch: int) -> tuple[int, float, float]:
    """Pipeline `batch` XADDs per round trip until the deadline; returns (records, end time, CPU seconds)."""
    client = _client(port)
    pipe = client.pipeline(transaction=False)
    payload = os.urandom(record_size)
    barrier.wait()
    cpu = time.process_time()
    end = time.monotonic() + seconds
    records = 0
    while time.monotonic() < end:
        for _ in range(batch):
            pipe.xadd(STREAM, {FIELD: payload})
        pipe.execute()
        records += batch
    return records, time.monotonic(), time.process_time() - cpu


def throughput(tmpdir: str, producers: int, record_size: int, durability: str, seconds: float,
               batch: int) -> dict[str, float]:
    with _server(tmpdir, durability) as (port, pid):
        server_cpu = proc_cpu_seconds(pid)
        start, results = run_workers(_produce, [(port, record_size, seconds, batch)] * producers,
                                     timeout=seconds + 120)
        server_cpu = proc_cpu_seconds(pid) - server_cpu
        records = sum(r[0] for r in results)
        stored = _client(port).xlen(STREAM)
    if stored != records:
        raise RuntimeError(f"producers counted {records} acknowledged records but the stream holds {stored}")
    wall = max(r[1] for r in results) - start
    return throughput_result(records, wall, server_cpu + sum(r[2] for r in results), record_size)


def _xadd_command(payload: bytes) -> bytes:
    """XADD log * d <payload> in RESP, as redis-py would send it."""
    args = (b"XADD", STREAM, b"*", FIELD, payload)
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _count_replies(sock: socket.socket, count: int, failures: list[str]) -> None:
    """Read `count` XADD replies (RESP bulk strings: the new entry IDs); note the first error and stop."""
    buf = b""
    pos = 0
    while count:
        end = buf.find(b"\r\n", pos)
        if end >= 0:
            if buf[pos:pos + 1] != b"$":
                failures.append(buf[pos:end].decode(errors="replace"))
                return
            after = end + 2 + int(buf[pos + 1:end]) + 2
            if after <= len(buf):
                pos = after
                count -= 1
                continue
        chunk = sock.recv(1 << 16)
        if not chunk:
            failures.append(f"connection closed with {count} replies missing")
            return
        buf = buf[pos:] + chunk
        pos = 0


def _paced_producer(barrier: Any, port: int, rate: int, count: int) -> float:
    """XADD one record at a time on a fixed schedule, each sent without waiting for the one before to be
    answered (a thread reads the replies), as walsvc's `put` does: one client waiting for every reply tops
    out near 7,000 XADDs/s on a 2-vCPU VM, and the scenario asks for 10,000.  Returns the rate sent, once
    every XADD has been answered."""
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    failures: list[str] = []
    replies = threading.Thread(target=_count_replies, args=(sock, count, failures), daemon=True)
    replies.start()
    try:
        sent = paced_send(barrier, rate, count, lambda payload: sock.sendall(_xadd_command(payload)))
        replies.join(60)
    finally:
        sock.close()
    if replies.is_alive() or failures:
        raise RuntimeError(f"XADD replies: {failures[0] if failures else 'not all answered within 60 s'}")
    return sent


def _tail_reader(barrier: Any, port: int, count: int, timeout: float) -> list[int]:
    """XREAD BLOCK from the start of the stream; returns one latency (ns) per record received."""
    client = _client(port)
    last = b"0-0"
    latencies: list[int] = []
    barrier.wait()
    deadline = time.monotonic() + timeout
    while len(latencies) < count and time.monotonic() < deadline:
        reply = client.xread({STREAM: last}, count=1000, block=100)
        now = time.monotonic_ns()
        for _stream, entries in reply:
            latencies.extend(now - struct.unpack_from("<q", fields[FIELD])[0] for _id, fields in entries)
            last = entries[-1][0]
    return latencies


def latency(tmpdir: str, rate: int, seconds: float, durability: str, server_cpu: int | None = None) -> dict[str, float]:
    with _server(tmpdir, durability, server_cpu) as (port, _pid):
        return measure_latency(_paced_producer, _tail_reader, (port,), rate, seconds, server_cpu)


def _fill(port: int, records: int, record_size: int) -> None:
    client = _client(port)
    pipe = client.pipeline(transaction=False)
    payload = os.urandom(record_size)
    for done in range(0, records, FILL_PIPELINE):
        for _ in range(min(FILL_PIPELINE, records - done)):
            pipe.xadd(STREAM, {FIELD: payload})
        pipe.execute()


def _replay_reader(barrier: Any, port: int) -> tuple[int, int, float]:
    """XRANGE the whole stream in chunks; returns (records, payload bytes, end time)."""
    client = _client(port)
    barrier.wait()
    records = nbytes = 0
    low = b"-"
    while entries := client.xrange(STREAM, min=low, count=READ_CHUNK):
        nbytes += sum(len(fields[FIELD]) for _id, fields in entries)
        records += len(entries)
        low = b"(" + entries[-1][0]
    return records, nbytes, time.monotonic()


def replay(tmpdir: str, records: int, record_size: int) -> dict[str, float]:
    with _server(tmpdir, "batch") as (port, _pid):
        _fill(port, records, record_size)
        start, ((count, nbytes, end),) = run_workers(_replay_reader, [(port,)], timeout=600)
    if count != records:
        raise RuntimeError(f"replay read {count} records, expected {records}")
    return {"records_per_s": count / (end - start), "mib_per_s": nbytes / (end - start) / 2**20}

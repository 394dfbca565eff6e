"""SQLite in WAL mode as a peer: one table as the shared log, written by separate processes (stdlib sqlite3).

This is the serverless choice a user would make instead of walsvc: every producer opens the database file and
appends rows in its own transactions (BEGIN IMMEDIATE, so writers queue on the lock instead of failing), and
readers poll by rowid.  Durability "os"/"batch"/"always" = PRAGMA synchronous OFF/NORMAL/FULL; in WAL mode
NORMAL fsyncs only at checkpoints, FULL fsyncs the WAL at every commit.  Checkpointing is left at SQLite's
default (automatic, every 1,000 pages), run by whichever producer commits past it, as in real use.
Interface: see harness.py.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import time
from typing import Any

from .harness import measure_latency, paced_send, run_workers, throughput_result

NAME = "sqlite"
DURABILITIES = ("os", "batch", "always")
SYNCHRONOUS = {"os": "OFF", "batch": "NORMAL", "always": "FULL"}
BUSY_TIMEOUT_MS = 600_000
POLL_INTERVAL_S = 0.001
READ_CHUNK = 10_000
FILL_TRANSACTION = 10_000
INSERT = "INSERT INTO log (data) VALUES (?)"


def available() -> str | None:
    """None: sqlite3 is in the standard library; WAL needs SQLite 3.7 or later."""
    if sqlite3.sqlite_version_info < (3, 7, 0):
        return f"SQLite {sqlite3.sqlite_version} has no WAL mode: Python must be linked with SQLite >= 3.7"
    return None


def _create(tmpdir: str) -> str:
    """An empty log database in WAL mode (the mode is persistent, so every later connection uses it)."""
    path = os.path.join(tmpdir, "log.db")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise RuntimeError(f"SQLite refused WAL mode on {path}")
        conn.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
    finally:
        conn.close()
    return path


def _connect(path: str, durability: str) -> sqlite3.Connection:
    """Autocommit connection (transactions are explicit) that waits for the write lock instead of failing."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS[durability]}")
    return conn


def _count(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM log").fetchone()[0]
    finally:
        conn.close()


def _produce(barrier: Any, path: str, durability: str, record_size: int, seconds: float,
             batch: int) -> tuple[int, float, float]:
    """Insert `batch` rows per transaction until the deadline; returns (records, end time, CPU seconds)."""
    conn = _connect(path, durability)
    rows = [(os.urandom(record_size),)] * batch
    barrier.wait()
    cpu = time.process_time()
    end = time.monotonic() + seconds
    records = 0
    while time.monotonic() < end:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT, rows)
        conn.execute("COMMIT")
        records += batch
    conn.close()
    return records, time.monotonic(), time.process_time() - cpu


def throughput(tmpdir: str, producers: int, record_size: int, durability: str, seconds: float,
               batch: int) -> dict[str, float]:
    path = _create(tmpdir)
    start, results = run_workers(_produce, [(path, durability, record_size, seconds, batch)] * producers,
                                 timeout=seconds + 120)
    records = sum(r[0] for r in results)
    stored = _count(path)
    if stored != records:
        raise RuntimeError(f"producers counted {records} committed rows but the table holds {stored}")
    wall = max(r[1] for r in results) - start
    return throughput_result(records, wall, sum(r[2] for r in results), record_size)


def _paced_producer(barrier: Any, path: str, durability: str, rate: int, count: int) -> float:
    """Insert one row per transaction on a fixed schedule; returns the rate actually sent."""
    conn = _connect(path, durability)
    try:
        return paced_send(barrier, rate, count, lambda payload: conn.execute(INSERT, (payload,)))
    finally:
        conn.close()


def _tail_reader(barrier: Any, path: str, count: int, timeout: float) -> list[int]:
    """Poll for rows past the last rowid seen, sleeping 1 ms after a poll that found nothing."""
    conn = _connect(path, "batch")
    last = 0
    latencies: list[int] = []
    barrier.wait()
    deadline = time.monotonic() + timeout
    while len(latencies) < count and time.monotonic() < deadline:
        rows = conn.execute("SELECT id, data FROM log WHERE id > ? ORDER BY id", (last,)).fetchall()
        now = time.monotonic_ns()
        if not rows:
            time.sleep(POLL_INTERVAL_S)
            continue
        latencies.extend(now - struct.unpack_from("<q", data)[0] for _id, data in rows)
        last = rows[-1][0]
    conn.close()
    return latencies


def latency(tmpdir: str, rate: int, seconds: float, durability: str) -> dict[str, float]:
    path = _create(tmpdir)
    return measure_latency(lambda barrier, at, rate, count: _paced_producer(barrier, at, durability, rate, count),
                           _tail_reader, (path,), rate, seconds)


def _fill(path: str, records: int, record_size: int) -> None:
    conn = _connect(path, "batch")
    payload = (os.urandom(record_size),)
    try:
        for done in range(0, records, FILL_TRANSACTION):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT, [payload] * min(FILL_TRANSACTION, records - done))
            conn.execute("COMMIT")
    finally:
        conn.close()


def _replay_reader(barrier: Any, path: str) -> tuple[int, int, float, float]:
    """SELECT by rowid ranges from the start; returns (records, payload bytes, end time, CPU seconds)."""
    conn = _connect(path, "batch")
    barrier.wait()
    cpu = time.process_time()
    records = nbytes = 0
    last = 0
    while rows := conn.execute("SELECT id, data FROM log WHERE id > ? ORDER BY id LIMIT ?",
                               (last, READ_CHUNK)).fetchall():
        nbytes += sum(len(data) for _id, data in rows)
        records += len(rows)
        last = rows[-1][0]
    conn.close()
    return records, nbytes, time.monotonic(), time.process_time() - cpu


def replay(tmpdir: str, records: int, record_size: int) -> dict[str, float]:
    path = _create(tmpdir)
    _fill(path, records, record_size)
    start, ((count, nbytes, end, cpu),) = run_workers(_replay_reader, [(path,)], timeout=600)
    if count != records:
        raise RuntimeError(f"replay read {count} records, expected {records}")
    return {"records_per_s": count / (end - start), "mib_per_s": nbytes / (end - start) / 2**20,
            "records_per_cpu_s": count / cpu}

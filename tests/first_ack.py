"""How long a producer's first ack takes on a fresh writer and after a kill -9 and restart, with other
processes keeping the cores busy (issue 13: replies on PUB were dropped before the subscription was live,
and the 5 s ack timeout recovered them).  Used by tests/test_first_ack.py and scripts/first_ack.py."""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import walsvc
from helpers import WriterProcess, control

BUSY_LOOP = "while True: pass"


@contextlib.contextmanager
def busy_cores(n: int) -> Iterator[None]:
    """`n` processes spinning on a core each for the duration; ended by their own pids."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(10)


def fresh_start_first_ack(directory: Path, fsync: str, logs: Path, records: int = 100) -> float:
    """Start a writer on an empty directory, wait until it answers, open a Producer, put `records` records:
    seconds from the first put to the first record's ack.  Checks the acks are the LSNs 1..records."""
    writer = WriterProcess(directory, fsync=fsync, logs=logs)
    try:
        writer.start(timeout=60)
        assert control(directory, "ping", timeout=30)["ok"]
        with walsvc.Producer(directory) as producer:
            start = time.monotonic()
            futures = [producer.put(b"k%04d" % i, b"v") for i in range(records)]
            futures[0].result(30)
            first = time.monotonic() - start
            assert [f.result(30) for f in futures] == list(range(1, records + 1))
        assert writer.stop() == 0
        return first
    finally:
        writer.cleanup()


class _Appender(threading.Thread):
    """Appends all the time, one record in flight (or `burst` at once), noting when each ack came."""

    def __init__(self, directory: Path, index: int, burst: int) -> None:
        super().__init__(daemon=True)
        self.producer = walsvc.Producer(directory, ack_timeout_s=5.0)
        self.index = index
        self.burst = burst
        self.acks: list[tuple[float, bytes, int]] = []  # (when, key, LSN)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                keys = [b"p%d-%08d" % (self.index, n + i) for i in range(self.burst)]
                futures = [self.producer.put(k, b"v") for k in keys]
                n += self.burst
                for k, f in zip(keys, futures):
                    lsn = f.result(60)
                    self.acks.append((time.monotonic(), k, lsn))
                time.sleep(0.002)
        except BaseException as exc:  # reported by the caller
            self.error = exc


def restart_first_acks(directory: Path, fsync: str, logs: Path, producers: int = 3,
                       restarts: int = 1) -> tuple[list[float], dict[bytes, int]]:
    """Producers append while the writer is killed with SIGKILL and restarted `restarts` times: for each
    producer and restart, seconds from the new writer's ready line to that producer's first ack after it.
    Also returns every acked key's LSN."""
    writer = WriterProcess(directory, fsync=fsync, logs=logs)
    appenders: list[_Appender] = []
    delays: list[float] = []
    try:
        writer.start(timeout=60)
        appenders = [_Appender(directory, i, burst=1 if i % 2 == 0 else 20) for i in range(producers)]
        for a in appenders:
            a.start()
        for _ in range(restarts):
            _wait(lambda: all(len(a.acks) >= 20 for a in appenders), 60, "acks before the kill")
            writer.kill9()
            killed_at = time.monotonic()
            marks = [len(a.acks) for a in appenders]
            time.sleep(0.2)
            writer.start(timeout=60)
            ready_at = time.monotonic()
            _wait(lambda: all(any(t > killed_at for t, _, _ in a.acks[m:]) for a, m in zip(appenders, marks)),
                  60, "a first ack after the restart from every producer")
            for a, m in zip(appenders, marks):
                first = min(t for t, _, _ in a.acks[m:] if t > killed_at)
                delays.append(max(0.0, first - ready_at))
        for a in appenders:
            a.stop.set()
        for a in appenders:
            a.join(60)
            assert a.error is None, a.error
            a.producer.close()
        assert writer.stop() == 0
        return delays, {k: lsn for a in appenders for _, k, lsn in a.acks}
    finally:
        for a in appenders:
            a.stop.set()
        writer.cleanup()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.005)


def describe(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    if not ms:
        return "no samples"
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return (f"n={len(ms)} min {ms[0]:.1f} ms, median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms, "
            f"max {ms[-1]:.1f} ms")

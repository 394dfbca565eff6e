"""The embedded engine alone, in one process: append_batch and read-back speed, and sqlite3 beside it.

    python benchmarks/engine.py [--seconds 3] [--runs 3] [--rows 300000]

Appends batches of 1,000 records of 100 bytes with `Log.append_batch` under the `os` and `batch` (5 ms)
policies, then reads everything back with `Log.read`; also reads 64 KiB records.  Then the side-by-side
check (issue 12): `--rows` rows of 100 bytes (a 10-byte key, a 90-byte value) appended in batches of 1,000
with `Log.append_batch` (fsync "os") and, in the same process, inserted into a stdlib `sqlite3` table used as
a log (WAL mode, synchronous=OFF, one `executemany` transaction per 1,000 rows), then read back whole:
`Log.read` / `Log.read_batches` against `SELECT key, value ... ORDER BY id`, each summing the value lengths.
Prints the median of `--runs` runs and the issue's target beside each figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import walsvc  # noqa: E402


def append_run(policy: str, seconds: float) -> tuple[float, Path]:
    directory = Path(tempfile.mkdtemp(prefix="walsvc-engine-"))
    batch = [walsvc.Record(b"key-%06d" % i, b"v" * 90) for i in range(1000)]  # 100-byte records
    with walsvc.Log.open(directory, fsync=policy) as log:
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            log.append_batch(batch)
            n += len(batch)
        log.sync()
        elapsed = time.perf_counter() - start
    return n / elapsed, directory


def read_run(directory: Path) -> tuple[float, float]:
    with walsvc.Log.open(directory, fsync="os") as log:
        n = nbytes = 0
        start = time.perf_counter()
        for record in log.read():
            n += 1
            nbytes += len(record.value)
        elapsed = time.perf_counter() - start
    return n / elapsed, nbytes / elapsed


def side_by_side(rows: int) -> dict[str, tuple[float, float]]:
    """(records per second, records per CPU second) for append and read, walsvc and sqlite3, on the same
    `rows` rows (one run).  Both run in this process, so CPU time compares them even on a busy machine."""
    items = [(b"key-%06d" % (i % 1000), b"v" * 90) for i in range(1000)]
    batch = [walsvc.Record(k, v) for k, v in items]
    out: dict[str, tuple[float, float]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="walsvc-engine-"))

    def timed(what: str, fn: Callable[[], int]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        n = fn()
        out[what] = (n / (time.perf_counter() - wall), n / (time.process_time() - cpu))
        assert n == rows, (what, n)

    def append(log: walsvc.Log) -> int:
        for done in range(0, rows, len(batch)):
            log.append_batch(batch[:rows - done])
        return rows

    def insert(conn: sqlite3.Connection) -> int:
        for done in range(0, rows, len(items)):
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO log (key, value) VALUES (?, ?)", items[:rows - done])
            conn.execute("COMMIT")
        return rows

    def select(conn: sqlite3.Connection) -> int:
        n = nbytes = 0
        for _key, value in conn.execute("SELECT key, value FROM log ORDER BY id"):
            n += 1
            nbytes += len(value)
        return n

    try:
        with walsvc.Log.open(scratch / "log", fsync="os") as log:
            timed("walsvc append_batch", lambda: append(log))
            timed("walsvc Log.read", lambda: _read_records(log))
            timed("walsvc Log.read_batches", lambda: _read_batches(log))
        conn = sqlite3.connect(scratch / "log.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, key BLOB NOT NULL, value BLOB NOT NULL)")
        timed("sqlite3 INSERT", lambda: insert(conn))
        timed("sqlite3 SELECT", lambda: select(conn))
        conn.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _read_records(log: walsvc.Log) -> int:
    n = nbytes = 0
    for record in log.read():
        n += 1
        nbytes += len(record.value)
    return n


def _read_batches(log: walsvc.Log) -> int:
    n = nbytes = 0
    for batch in log.read_batches():
        n += len(batch)
        for record in batch:
            nbytes += len(record.value)
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=300_000, help="rows for the side-by-side check with sqlite3")
    parser.add_argument("--only-sqlite-check", action="store_true", help="run the side-by-side check alone")
    args = parser.parse_args()
    runs = [side_by_side(args.rows) for _ in range(args.runs)]
    print(f"{args.rows:,} rows of 100 B, medians of {args.runs} runs; records per second, then per CPU second:")
    print(f"{'':22} {'walsvc':>11} {'sqlite3':>11} {'ratio':>6} {'walsvc/cpu':>11} {'sqlite3/cpu':>11} {'ratio':>6}"
          "  target")
    for what, ours, theirs in (("append", "walsvc append_batch", "sqlite3 INSERT"),
                               ("read (Log.read)", "walsvc Log.read", "sqlite3 SELECT"),
                               ("read (read_batches)", "walsvc Log.read_batches", "sqlite3 SELECT")):
        row = f"{what:22}"
        for i in (0, 1):
            a = statistics.median(run[ours][i] for run in runs)
            b = statistics.median(run[theirs][i] for run in runs)
            row += f" {a:11,.0f} {b:11,.0f} {a / b:5.2f}x"
        print(row + "  >= 2x")
    if args.only_sqlite_check:
        return 0
    rows = []
    for policy, target in (("os", 1_000_000), ("batch", 800_000)):
        rates, reads = [], []
        for _ in range(args.runs):
            rate, directory = append_run(policy, args.seconds)
            rates.append(rate)
            reads.append(read_run(directory)[0])
        rows.append((f"append_batch 100 B, {policy}", statistics.median(rates), "records/s", target))
        rows.append((f"read back 100 B ({policy} log)", statistics.median(reads), "records/s", 1_000_000))
    big = Path(tempfile.mkdtemp(prefix="walsvc-engine-"))
    value = os.urandom(64 * 1024)
    with walsvc.Log.open(big, fsync="os") as log:
        for _ in range(1024):  # 1 GiB
            log.append_batch([walsvc.Record(b"k", value)] * 16)
    speeds = [read_run(big)[1] / 2**30 for _ in range(args.runs)]
    rows.append(("read back 64 KiB records", statistics.median(speeds), "GiB/s", 1.0))
    print(f"{'what':36} {'median':>14} {'unit':10} {'target':>12}")
    for what, value, unit, target in rows:
        print(f"{what:36} {value:14,.2f} {unit:10} {target:12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

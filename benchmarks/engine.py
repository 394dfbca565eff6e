"""The embedded engine alone, in one process: append_batch and read-back speed.

    python benchmarks/engine.py [--seconds 3] [--runs 3]

Appends batches of 1,000 records of 100 bytes with `Log.append_batch` under the `os` and `batch` (5 ms)
policies, then reads everything back with `Log.read`; also reads 64 KiB records.  Prints the median of
`--runs` runs and the issue's target beside each figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
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

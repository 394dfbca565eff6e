"""A multi-GiB log: open time with a torn tail, and a reader replaying all of it (time and peak memory).

    python benchmarks/large_log.py [--gib 4] [--dir DIR] [--runs 3] [--cold]

Builds the log with the embedded API (64 KiB records, 16 per batch, 128 MiB segments), then per run: tears
the tail (half a batch frame after the last one, as a crash mid-write leaves it), times `Log.open` until it
accepts an append, and replays the whole log in a separate process.  `--cold` drops the page cache before
each measurement (root only), so the figures include reading from the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import walsvc  # noqa: E402
from benchmarks.suite.walsvc_system import _tear_tail  # noqa: E402

RECORD = 64 * 1024
PER_BATCH = 16
SEGMENT = 128 * 1024 * 1024  # the published figure's segment size (the default is smaller)

REPLAY = """
import resource, sys, time, walsvc
start = time.perf_counter(); n = b = 0
with walsvc.Reader(sys.argv[1], "earliest") as reader:
    while batch := reader.poll(0):
        n += len(batch); b += sum(len(r.value) for r in batch)
print(n, b, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def build(directory: Path, gib: float) -> int:
    value = os.urandom(RECORD)
    batches = int(gib * 2**30 / (RECORD * PER_BATCH))
    with walsvc.Log.open(directory, fsync="os", segment_bytes=SEGMENT) as log:
        for _ in range(batches):
            log.append_batch([walsvc.Record(b"k", value)] * PER_BATCH)
    return batches * PER_BATCH


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--dir", help="where to build the log (default: a temporary directory, deleted after)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each measurement")
    args = parser.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="walsvc-large-")) / "log"
    try:
        t = time.perf_counter()
        records = build(directory, args.gib)
        size = sum(p.stat().st_size for p in directory.glob("*.wal"))
        print(f"built {size / 2**30:.2f} GiB ({records:,} records of 64 KiB, "
              f"{len(list(directory.glob('*.wal')))} segments) in {time.perf_counter() - t:.1f} s", flush=True)
        opens, replays = [], []
        for run in range(args.runs):
            _tear_tail(directory)
            if args.cold:
                drop_caches()
            t = time.perf_counter()
            with walsvc.Log.open(directory, fsync="os", segment_bytes=SEGMENT) as log:
                log.append(walsvc.Record(b"after", b"recovery"))
                opened = time.perf_counter() - t
                assert log.recovery.torn_tail, log.recovery.summary()
            opens.append(opened)
            if args.cold:
                drop_caches()
            out = subprocess.run([sys.executable, "-c", REPLAY, str(directory)], capture_output=True, text=True,
                                 check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
            n, nbytes, seconds, peak = out.stdout.split()
            replays.append((int(n), int(nbytes), float(seconds), float(peak)))
            print(f"run {run + 1}: open with torn tail {opened * 1000:.0f} ms; replay {int(n):,} records "
                  f"{int(nbytes) / float(seconds) / 2**30:.2f} GiB/s, peak RSS {float(peak):.0f} MiB", flush=True)
        print(f"median open {statistics.median(opens) * 1000:.0f} ms (min {min(opens) * 1000:.0f}, "
              f"max {max(opens) * 1000:.0f}); median replay "
              f"{statistics.median(b / s for _, b, s, _ in replays) / 2**30:.2f} GiB/s; "
              f"peak reader RSS {max(p for *_, p in replays):.0f} MiB ({'cold' if args.cold else 'warm'} cache)")
    finally:
        if not args.dir:
            shutil.rmtree(directory.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Append latency of the embedded engine across segment rotations.

    python benchmarks/rotation.py [--segment-mib 8] [--rotations 20] [--policy os] [--runs 3]
                                  [--batch 100] [--rate 0]

Appends batches of `--batch` records of 100 bytes (`Log.append_batch`), as fast as it can or `--rate`
batches a second, until `--rotations` segments have been started, timing every call; prints, for each run, the median and p99 of all appends and the median and
maximum of the appends that started a new segment.  The service's writer appends the same way, so a slow
rotating append here is a stall for every producer there (issue 8.3).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import walsvc  # noqa: E402


def run(segment_bytes: int, rotations: int, policy: str, size: int, rate: float) -> tuple[list[float], list[float]]:
    """(every append's seconds, the rotating appends' seconds)."""
    directory = Path(tempfile.mkdtemp(prefix="walsvc-rotation-"))
    batch = [walsvc.Record(b"key-%06d" % i, b"v" * 90) for i in range(size)]
    every, rotating = [], []
    try:
        with walsvc.Log.open(directory, fsync=policy, segment_bytes=segment_bytes) as log:
            t0 = time.perf_counter()
            while len(rotating) < rotations:
                if rate:
                    delay = t0 + len(every) / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                segments = log.stats()["segments"]
                start = time.perf_counter()
                log.append_batch(batch)
                elapsed = time.perf_counter() - start
                every.append(elapsed)
                if log.stats()["segments"] != segments:
                    rotating.append(elapsed)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return every, rotating


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segment-mib", type=int, default=8)
    parser.add_argument("--rotations", type=int, default=20)
    parser.add_argument("--policy", choices=("os", "batch", "always"), default="os")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100, help="records of 100 B per append_batch")
    parser.add_argument("--rate", type=float, default=0, help="appends per second (default: unpaced)")
    args = parser.parse_args()
    pace = f"{args.rate:,.0f}/s" if args.rate else "unpaced"
    print(f"{args.segment_mib} MiB segments, fsync={args.policy}, batches of {args.batch} x 100 B, {pace}, "
          f"{args.rotations} rotations")
    print(f"{'run':>3} {'appends':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'rotating p50 ms':>16} "
          f"{'rotating max ms':>16}")
    for i in range(args.runs):
        every, rotating = run(args.segment_mib << 20, args.rotations, args.policy, args.batch, args.rate)
        ordered = sorted(every)
        print(f"{i + 1:>3} {len(every):>8,} {statistics.median(every) * 1e3:>8.3f} "
              f"{ordered[int(len(ordered) * 0.99)] * 1e3:>8.3f} {ordered[-1] * 1e3:>8.3f} "
              f"{statistics.median(rotating) * 1e3:>16.3f} {max(rotating) * 1e3:>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

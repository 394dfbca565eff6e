#!/usr/bin/env python3
"""Issue 13's measurement in full: a producer's first ack on a freshly started writer, many times per fsync
policy, and after kill -9 and restart of the writer, with two busy-loop processes keeping the cores busy.

    python scripts/first_ack.py [--starts 50] [--restarts 10] [--busy 2] [--policies always,batch,os]

Prints the distribution per policy and exits 1 if any first ack took 200 ms or more (fresh writer) or 1 s or
more from the restarted writer's ready line.  tests/test_first_ack.py runs a short version.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from first_ack import busy_cores, describe, fresh_start_first_ack, restart_first_acks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=50, help="fresh writer starts per fsync policy")
    parser.add_argument("--restarts", type=int, default=10, help="kill -9 and restart cycles per policy")
    parser.add_argument("--producers", type=int, default=3, help="producers appending across the restarts")
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes")
    parser.add_argument("--policies", default="always,batch,os")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="walsvc-first-ack-"))
    failed = False
    try:
        with busy_cores(args.busy):
            for fsync in args.policies.split(","):
                firsts = [fresh_start_first_ack(scratch / f"{fsync}-{i}", fsync, scratch / f"{fsync}-{i}-logs")
                          for i in range(args.starts)]
                slow = sum(f >= 0.2 for f in firsts)
                print(f"fresh writer, fsync={fsync}: {describe(firsts)}; {slow} at or above 200 ms", flush=True)
                delays, _ = restart_first_acks(scratch / f"{fsync}-restarts", fsync, scratch / f"{fsync}-r-logs",
                                               producers=args.producers, restarts=args.restarts)
                late = sum(d >= 1.0 for d in delays)
                print(f"after kill -9, from ready, fsync={fsync}: {describe(delays)}; {late} at or above 1 s",
                      flush=True)
                failed |= bool(slow or late)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

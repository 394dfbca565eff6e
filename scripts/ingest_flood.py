#!/usr/bin/env python3
"""Flood a real writer's ingest socket from many hostile connections and report its peak memory.

Hostile processes send, from PROCESSES x CONNECTIONS ingest connections and as fast as ZeroMQ takes them,
messages of the largest accepted size (random, and valid-looking APPENDs with one bad CRC), messages one
byte too long, multipart messages and small garbage, while a legitimate producer keeps appending
(tests/ingest_flood.py).  Then it checks the writer is alive, every acked record is in the log at its LSN,
`walsvc verify` is clean, and prints the writer's peak RSS (VmHWM).

    python scripts/ingest_flood.py --connections 8 --seconds 30                  # the default config
    python scripts/ingest_flood.py --processes 4 --connections 16                # 64 connections
    python scripts/ingest_flood.py --set service.ingest_hwm=1000 --set service.max_message_bytes=67108864 \\
        --set log.max_record_bytes=16777216                                      # the defaults before issue 7
    python scripts/ingest_flood.py --processes 1 --connections 1 --multipart-frames 2000 --frame-bytes 100000

Exit status 0 when every check passes and the peak stays under --limit-mib (default 150), 1 otherwise.
tests/test_ingest_memory.py runs a short version in the suite.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ingest_flood import MiB, run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="hostile processes (default 2)")
    parser.add_argument("--connections", type=int, default=8, help="ingest connections per process (default 8)")
    parser.add_argument("--seconds", type=float, default=30.0, help="flood duration (default 30)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config value in TOML syntax, e.g. service.ingest_hwm=4 (repeatable)")
    parser.add_argument("--multipart-frames", type=int, default=0,
                        help="instead of the mix: one multipart message of this many frames per connection")
    parser.add_argument("--frame-bytes", type=int, default=100_000, help="frame size with --multipart-frames")
    parser.add_argument("--limit-mib", type=float, default=150.0, help="peak VmHWM allowed (default 150)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="walsvc-flood-"))
    try:
        result = run(work, processes=args.processes, connections=args.connections, seconds=args.seconds,
                     settings=args.set, multipart_frames=args.multipart_frames, frame_bytes=args.frame_bytes,
                     seed=args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.seconds:g} s: {result.describe()}")
    ok = result.peak_hwm < args.limit_mib * MiB
    print("PASS" if ok else f"FAIL: peak above {args.limit_mib:g} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Power-loss crash-state exploration at full size (tests/test_crash_states.py runs a short version).

Runs a real writer under strace, builds the crash states a power cut could leave at many points of the
run, recovers each with Log.open, and checks that every acked record survived, none was invented, and the
log opened or refused with CorruptionError.  Prints the counts as JSON.

    python scripts/crash_states.py --policy batch --cuts 400 --per-cut 8
    python scripts/crash_states.py --policy always --threads 4 --batches 150

Exit status 0 when every state passes, 1 when one fails (the message names the state).  Needs strace.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from crash_explorer import CrashCheckFailed, explore  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", choices=["always", "batch", "os"], default="batch")
    parser.add_argument("--threads", type=int, default=3, help="producer threads (group commit)")
    parser.add_argument("--batches", type=int, default=150, help="batches per producer thread")
    parser.add_argument("--cuts", type=int, default=400, help="random cut points (plus every point near a rotation)")
    parser.add_argument("--per-cut", type=int, default=8, help="crash states per cut point at most")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="walsvc-crash-") as work:
        try:
            counts = explore(Path(work), policy=args.policy, threads=args.threads, batches=args.batches,
                             cuts=args.cuts, per_cut=args.per_cut, seed=args.seed)
        except CrashCheckFailed as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
    print(json.dumps({"policy": args.policy, **counts}))
    return 1 if counts["refused"] else 0


if __name__ == "__main__":
    sys.exit(main())

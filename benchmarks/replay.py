"""Replay from the start through the public reading API, per record size, with SQLite beside it.

    python benchmarks/replay.py [--sizes 100,1024,65536] [--mib 256] [--runs 3]

For each size, the suite's replay step (the same functions as `replay 100B` in the suite: the log is filled
with the embedded API, untimed, then one fresh reader process reads it all with `walsvc.Reader.poll`,
summing the value lengths) on walsvc and on SQLite (`SELECT` by rowid ranges), `--mib` of record values per
log.  Prints the medians of `--runs` runs: records/s, MiB/s of values, and walsvc against SQLite; then the
same per CPU second of the reader process, which a machine shared with other jobs disturbs less.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.suite import sqlite_wal, walsvc_system  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1024,65536", help="record sizes in bytes, comma-separated")
    parser.add_argument("--mib", type=float, default=256.0, help="MiB of record values per log")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"{'size':>7} {'walsvc rec/s':>14} {'walsvc MiB/s':>13} {'sqlite rec/s':>14} {'sqlite MiB/s':>13} "
          f"{'ratio':>6} {'walsvc rec/cpu-s':>17} {'sqlite rec/cpu-s':>17} {'ratio':>6}")
    for size in (int(s) for s in args.sizes.split(",")):
        records = max(1000, int(args.mib * 2**20 / size))
        results: dict[str, list[dict[str, float]]] = {"walsvc": [], "sqlite": []}
        for _ in range(args.runs):
            for name, system in (("walsvc", walsvc_system), ("sqlite", sqlite_wal)):
                scratch = tempfile.mkdtemp(prefix="walsvc-replay-")
                try:
                    results[name].append(system.replay(scratch, records, size))
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
        med = {name: {key: statistics.median(r[key] for r in runs)
                      for key in ("records_per_s", "mib_per_s", "records_per_cpu_s")}
               for name, runs in results.items()}
        w, s = med["walsvc"], med["sqlite"]
        print(f"{size:>7} {w['records_per_s']:>14,.0f} {w['mib_per_s']:>13,.0f} {s['records_per_s']:>14,.0f} "
              f"{s['mib_per_s']:>13,.0f} {w['records_per_s'] / s['records_per_s']:>5.2f}x "
              f"{w['records_per_cpu_s']:>17,.0f} {s['records_per_cpu_s']:>17,.0f} "
              f"{w['records_per_cpu_s'] / s['records_per_cpu_s']:>5.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

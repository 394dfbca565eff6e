"""A consumer group against producers: does a group of consumer processes keep up with the log?

    python benchmarks/groups.py [--producers 4] [--consumers 4] [--size 100] [--seconds 5] [--max-records 5000]

Starts its own writer (`walsvc serve`, fsync batch) on a temporary directory, then the group's consumers,
then producer processes appending with `put_many` for --seconds.  Prints the producers' rate, the group's
rate (records processed by all consumers / time from the first append to the last record processed), how
long the group needed after the producers' last ack to catch up, and checks every record was processed
exactly once (nothing is killed here, so no record may be redelivered).
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import walsvc  # noqa: E402
from benchmarks.suite.walsvc_system import _writer  # noqa: E402

from producers import produce  # noqa: E402


def consume(directory: str, index: int, max_records: int, done: "multiprocessing.Event",
            out: "multiprocessing.Queue") -> None:
    """Process (count and checksum the LSNs of) every record the group hands this consumer."""
    count = lsn_sum = 0
    last = time.perf_counter()
    with walsvc.Reader(directory, group="bench", consumer=f"c{index}", max_records=max_records) as reader:
        while True:
            batch = reader.poll(0.2)
            if batch:
                count += len(batch)
                lsn_sum += sum(r.lsn for r in batch)
                last = time.perf_counter()
            elif done.is_set() and reader.lag()["records"] == 0:
                break
    out.put((count, lsn_sum, last))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--size", type=int, default=100, help="record size in bytes (>= 16)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-records", type=int, default=5000, help="records per claimed range")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="walsvc-groups-"))
    directory = scratch / "log"
    try:
        with _writer(directory, "batch"):
            ctx = multiprocessing.get_context("spawn")
            produced, consumed, done = ctx.Queue(), ctx.Queue(), ctx.Event()
            consumers = [ctx.Process(target=consume, args=(str(directory), i, args.max_records, done, consumed))
                         for i in range(args.consumers)]
            for c in consumers:
                c.start()
            time.sleep(1.0)  # let every consumer join before the first record
            began = time.perf_counter()
            producers = [ctx.Process(target=produce, args=(str(directory), i, args.size, "put_many", args.seconds,
                                                           produced))
                         for i in range(args.producers)]
            for p in producers:
                p.start()
            results = [produced.get(timeout=args.seconds + 180) for _ in producers]
            acked_at = time.perf_counter()
            done.set()
            got = [consumed.get(timeout=300) for _ in consumers]
            for proc in producers + consumers:
                proc.join(30)
        records = sum(n for n, _, _ in results)
        processed = sum(n for n, _, _ in got)
        finished = max(t for _, _, t in got)
        produce_wall = max(t for _, t, _ in results)
        if processed != records or sum(s for _, s, _ in got) != records * (records + 1) // 2:
            raise SystemExit(f"FAILED: {records} records acked, the group processed {processed}, "
                             "or some LSN twice and another never")
        print(f"{args.producers} producers, {args.size} B, put_many: {records / produce_wall:,.0f} acked records/s")
        print(f"group of {args.consumers} consumers, ranges of {args.max_records}: "
              f"{processed / (finished - began):,.0f} records/s processed, per consumer "
              f"{', '.join(f'{n:,}' for n, _, _ in got)}; caught up {max(0.0, finished - acked_at) * 1000:,.0f} ms "
              "after the last ack")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A producer worker: appends records to the log as fast as the writer acknowledges them.

Copy this to start your own: open a `walsvc.Producer` on the log directory, `append` (or `put`/`delete`)
records, keep the returned futures only if you need each LSN, and `flush()` before exiting so that
everything you appended is acknowledged (durable under the writer's fsync policy).

    python -m walsvc.workers.producer_worker --dir wal-data --records 100000 --record-bytes 100
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import walsvc


def run(directory: str, *, record_bytes: int = 100, records: int = 0, stop: Any = None, counter: Any = None,
        worker: int = 0) -> int:
    """Append `records` records (0: until `stop` is set); keep `counter.value` at the number acked so far."""
    value = b"x" * max(0, record_bytes - 16)  # the key is 16 bytes
    sent = 0
    with walsvc.Producer(directory) as producer:
        while (records == 0 or sent < records) and not (stop is not None and stop.is_set()):
            for _ in range(1000 if records == 0 else min(1000, records - sent)):
                producer.put(b"w%02d-%012d" % (worker, sent), value)
                sent += 1
            if counter is not None:
                counter.value = producer.acked_records
        producer.flush(60)
        if counter is not None:
            counter.value = producer.acked_records
        if producer.acked_records < sent:  # some futures failed: the writer stopped its log, or went away
            raise SystemExit(f"producer {worker}: {sent - producer.acked_records} of {sent} records were not "
                             f"acknowledged: {producer.writer_state()}")
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="wal-data")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--record-bytes", type=int, default=100)
    args = parser.parse_args()
    print(f"producer: appending {args.records:,} records of {args.record_bytes} bytes to {args.dir}", flush=True)
    started = time.perf_counter()
    try:
        n = run(args.dir, record_bytes=args.record_bytes, records=args.records)
    except walsvc.ServiceUnavailableError as exc:  # no writer: `walsvc serve --dir DIR` starts one
        raise SystemExit(f"producer: {exc}") from None
    elapsed = time.perf_counter() - started
    print(f"appended {n} records in {elapsed:.2f} s ({n / elapsed:,.0f} records/s), all acknowledged")


if __name__ == "__main__":
    main()

"""A consumer worker with a named, durable cursor: process each record once, resume after a restart.

Copy this to start your own: `walsvc.Reader(directory, name=...)` resumes after the last LSN it committed;
process a batch, then `commit(last_lsn)` (one fsync per call, so commit per batch, not per record).
Retention keeps what a named reader still needs, within `max_cursor_lag_bytes`.

    python -m walsvc.workers.consumer_worker --dir wal-data --name billing
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import walsvc


def handle(record: walsvc.Record) -> None:
    """Your processing goes here."""


def run(directory: str, *, name: str, stop: Any = None, counter: Any = None, lag: Any = None) -> int:
    """Consume until `stop` is set (or forever); keep `counter.value` at the records seen, `lag.value` current."""
    seen = 0
    next_lag_check = 0.0
    with walsvc.Reader(directory, name=name) as reader:
        while not (stop is not None and stop.is_set()):
            batch = reader.poll(0.2)
            if batch:
                for record in batch:
                    handle(record)
                reader.commit(batch[-1].lsn)
                seen += len(batch)
                if counter is not None:
                    counter.value = seen
            if lag is not None and time.monotonic() >= next_lag_check:
                lag.value = reader.lag()["records"]
                next_lag_check = time.monotonic() + 0.5
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="wal-data")
    parser.add_argument("--name", default="consumer")
    args = parser.parse_args()
    print(f"consumer {args.name}: reading {args.dir} from after its cursor; Ctrl-C stops", flush=True)
    try:
        seen = run(args.dir, name=args.name)
    except KeyboardInterrupt:
        return
    except walsvc.CursorBusyError as exc:  # another process reads under this name
        raise SystemExit(f"consumer {args.name}: {exc}") from None
    except walsvc.CorruptionError as exc:  # damage in the log: never skipped, see docs/GUARANTEES.md
        raise SystemExit(f"consumer {args.name}: stopped at damaged data: {exc}") from None
    print(f"consumer {args.name}: processed {seen:,} records")


if __name__ == "__main__":
    main()

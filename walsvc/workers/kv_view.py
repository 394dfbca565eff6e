"""A key-value materialized view: rebuild state by replaying the log, then follow the tail.

nori-wal's key-value recipe, done right: it reads every segment (not just the first), a tombstone deletes
its key, a TTL expires relative to the record's write timestamp (stored in the log, so expiry survives
restarts), and it keeps following new records instead of stopping at the end.

    python -m walsvc.workers.kv_view --dir wal-data            # replay, then print stats as it follows
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import walsvc


class KVView:
    """The latest value per key, as of `applied_lsn`."""

    def __init__(self) -> None:
        self.data: dict[bytes, tuple[bytes, int | None]] = {}  # key -> (value, expiry in µs or None)
        self.applied_lsn = 0

    def apply(self, record: walsvc.Record) -> None:
        if record.tombstone:
            self.data.pop(record.key, None)
        else:
            self.data[record.key] = (record.value, record.expires_at_us())
        self.applied_lsn = record.lsn

    def get(self, key: bytes, now_us: int | None = None) -> bytes | None:
        item = self.data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= (now_us if now_us is not None else time.time_ns() // 1000):
            del self.data[key]
            return None
        return value

    def live_keys(self, now_us: int | None = None) -> list[bytes]:
        now = now_us if now_us is not None else time.time_ns() // 1000
        return [k for k, (_, exp) in self.data.items() if exp is None or exp > now]


def run(directory: str, *, stop: Any = None, follow: bool = True, report_s: float = 0.0) -> KVView:
    """Replay the whole log into a view, then (if `follow`) apply new records until `stop` is set."""
    view = KVView()
    with walsvc.Reader(directory, "earliest") as reader:
        last_report = time.monotonic()
        while not (stop is not None and stop.is_set()):
            batch = reader.poll(0.2)
            for record in batch:
                view.apply(record)
            if not batch and not follow:
                break
            if report_s and time.monotonic() - last_report >= report_s:
                print(f"applied up to LSN {view.applied_lsn}: {len(view.live_keys())} live keys", flush=True)
                last_report = time.monotonic()
    return view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="wal-data")
    parser.add_argument("--no-follow", action="store_true", help="stop after replaying what is there")
    args = parser.parse_args()
    try:
        view = run(args.dir, follow=not args.no_follow, report_s=1.0)
        print(f"applied up to LSN {view.applied_lsn}: {len(view.live_keys())} live keys")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

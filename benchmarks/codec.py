"""The record codec's hot functions, compiled twin against the pure-Python reference, per record.

    python benchmarks/codec.py [--records 1024] [--value-bytes 100]

For a batch of plain puts it times `count_records` (the writer's check of every producer batch),
`decode_payload` (a reader building Record objects), encoding (`encode_puts` for the batch, `encode_put`
one record at a time) and a producer's put buffer (`put_buffer`: each record put on its own, with its
handle, then the batch taken), each with the compiled codec and with the pure-Python one, and prints ns per
record and the speed-up.  Prints "compiled codec not built" and exits 1 when there is no compiled twin to compare.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from walsvc import record as R  # noqa: E402


def per_record_ns(fn, records: int, seconds: float = 0.5) -> float:
    """Best of 5 timings of `fn` (which handles `records` records), in ns per record of this process's CPU
    time (one thread: on a machine shared with other jobs, wall time also counts their turns)."""
    number = max(1, int(seconds / max(timeit.timeit(fn, number=1), 1e-7) / 5))
    return min(timeit.repeat(fn, number=number, repeat=5, timer=time.process_time)) / number / records * 1e9


class Handle:
    """What a put buffer hands back per record (walsvc.producer.RecordFuture has the same two slots)."""

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: object, index: int) -> None:
        self._batch = batch
        self._index = index


def fill_put_buffer(items: list[tuple[bytes, bytes]]) -> bytes:
    buf = R.put_buffer(Handle)
    buf.open(object(), 1 << 40)
    put = buf.put
    for key, value in items:
        put(key, value)
    return buf.take()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1024)
    parser.add_argument("--value-bytes", type=int, default=100)
    args = parser.parse_args()
    if R._c is None:
        print("compiled codec not built (python setup.py build_ext --inplace)", file=sys.stderr)
        return 1
    items = [(b"key-%010d" % i, os.urandom(args.value_bytes)) for i in range(args.records)]
    payload = R.encode_puts(items)
    key, value = items[0]
    cases = [
        ("count_records", lambda: R.count_records(payload, 0, len(payload)), args.records),
        ("decode_payload", lambda: R.decode_payload(payload, 1, args.records, 0), args.records),
        ("encode_puts (a batch)", lambda: R.encode_puts(items), args.records),
        ("encode_put (one record)", lambda: R.encode_put(key, value), 1),
        ("put_buffer (one by one)", lambda: fill_put_buffer(items), args.records),
    ]
    print(f"{args.records} plain puts of {args.value_bytes}-byte values, {R.implementation()} vs pure Python")
    for name, fn, n in cases:
        fast = per_record_ns(fn, n)
        saved, R._c = R._c, None
        try:
            slow = per_record_ns(fn, n)
        finally:
            R._c = saved
        print(f"{name:26s} C {fast:8.1f} ns/record   Python {slow:8.1f} ns/record   {slow / fast:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

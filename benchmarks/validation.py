"""What the writer's input checks cost per record and per message, in one process.

    python benchmarks/validation.py [--repeat 7]

`record.count_records` (the writer's check of every batch a producer sends) on batches of 100 plain records
of 100 B and 1 KiB, and of 100 zstd-compressed 1 KiB records; and one ingest receive as the writer does it
(`recv(copy=False)`, the frame's `more` flag for multipart, `.bytes`) against a plain `recv()`, over inproc.
Prints the minimum of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq  # noqa: E402

from walsvc import record as R  # noqa: E402
from walsvc.record import Record  # noqa: E402


def per_record(payload: bytes, n: int, number: int, repeat: int) -> float:
    best = min(timeit.repeat(lambda: R.count_records(payload, 0, len(payload)), number=number, repeat=repeat))
    return best / number / n * 1e6


def per_message(size: int, multipart_check: bool, repeat: int) -> float:
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    pull.bind("inproc://validation")
    push.connect("inproc://validation")
    msg = b"x" * size

    def run() -> None:
        for _ in range(1000):
            push.send(msg)
        for _ in range(1000):
            if multipart_check:
                frame = pull.recv(zmq.NOBLOCK, copy=False)
                if frame.more:
                    raise AssertionError("unexpected multipart")
                frame.bytes
            else:
                pull.recv(zmq.NOBLOCK)

    try:
        return min(timeit.repeat(run, number=10, repeat=repeat)) / 10 / 1000 * 1e6
    finally:
        ctx.destroy(linger=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    for size in (100, 1024):
        payload = R.encode_many([Record.put(b"key-%06d" % i, bytes(size - 10)) for i in range(100)])
        print(f"count_records, plain {size} B: {per_record(payload, 100, 2000, args.repeat):.3f} us/record")
    value = (b"some log line with words %d " * 40)[:1024]
    payload = R.encode_many([Record.put(b"k%d" % i, value, compression="zstd") for i in range(100)])
    print(f"count_records, zstd 1 KiB: {per_record(payload, 100, 200, args.repeat):.3f} us/record")
    for size in (100, 65536):
        print(f"ingest receive {size} B: recv() {per_message(size, False, args.repeat):.2f} us, "
              f"recv(copy=False) + more + bytes {per_message(size, True, args.repeat):.2f} us")


if __name__ == "__main__":
    main()

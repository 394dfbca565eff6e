"""Producer processes against one writer, one API at a time: how much each way of appending gets through.

    python benchmarks/producers.py [--producers 4] [--size 100] [--fsync batch] [--api put|put_many|one]
                                   [--seconds 5]

`put`: one `Producer.put` per record (client-side batching does the rest); `put_many`: 64 records per call;
`one`: `put(...).result()`, one record in flight per producer.  Starts its own writer (`walsvc serve`) on a
temporary directory, prints acknowledged records per second and MiB/s and the producers' CPU time per record
(their own work, which a machine shared with other jobs disturbs less), and checks the log holds them all.
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
from walsvc.scan import end_of_valid_data  # noqa: E402


def produce(directory: str, index: int, size: int, api: str, seconds: float, out: "multiprocessing.Queue") -> None:
    value = b"x" * (size - 16)
    n = 0
    with walsvc.Producer(directory) as producer:
        start = time.perf_counter()
        cpu = time.process_time()
        while time.perf_counter() - start < seconds:
            if api == "put":
                for _ in range(1000):
                    producer.put(b"p%02d-%012d" % (index, n), value)
                    n += 1
            elif api == "put_many":
                for _ in range(16):
                    producer.put_many([(b"p%02d-%012d" % (index, n + i), value) for i in range(64)])
                    n += 64
            else:
                producer.put(b"p%02d-%012d" % (index, n), value).result(30)
                n += 1
        producer.flush(120)
        out.put((n, time.perf_counter() - start, time.process_time() - cpu))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--size", type=int, default=100, help="record size in bytes (>= 16)")
    parser.add_argument("--fsync", choices=["os", "batch", "always"], default="batch")
    parser.add_argument("--api", choices=["put", "put_many", "one"], default="put")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="walsvc-producers-"))
    directory = scratch / "log"
    try:
        with _writer(directory, args.fsync):
            ctx = multiprocessing.get_context("spawn")
            out = ctx.Queue()
            procs = [ctx.Process(target=produce, args=(str(directory), i, args.size, args.api, args.seconds, out))
                     for i in range(args.producers)]
            for p in procs:
                p.start()
            results = [out.get(timeout=args.seconds + 180) for _ in procs]
            for p in procs:
                p.join()
        records = sum(n for n, _, _ in results)
        wall = max(t for _, t, _ in results)
        cpu = sum(c for _, _, c in results)
        stored = end_of_valid_data(directory) - 1
        assert stored == records, f"acknowledged {records}, the log holds {stored}"
        print(f"{args.producers} producers, {args.size} B, fsync={args.fsync}, api={args.api}: "
              f"{records / wall:,.0f} acked records/s, {records * args.size / wall / 2**20:,.1f} MiB/s, "
              f"producers' CPU {cpu / records * 1e9:,.0f} ns per record")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

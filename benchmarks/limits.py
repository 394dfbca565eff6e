"""The physical bound for one durable record in flight: one fdatasync plus two one-way ZeroMQ hops.

A producer that waits for each record's ack cannot go faster than one round trip to the writer (two hops,
producer -> writer -> producer) plus the fdatasync that makes the record durable.  Both parts are measured
here, on the filesystem of --dir and with the pyzmq build in use, so the bound is this machine's, today:

    python benchmarks/limits.py [--dir DIR] [--samples N] [--size BYTES] [--quick]

It prints each part's median and p99 and the bound in records/s.  PERFORMANCE.md compares the
"throughput 1p 1KiB always x1" figure of the suite with it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import zmq


def _quantiles(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    return statistics.median(ordered) / 1000, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000


def fdatasync_us(directory: str, samples: int, size: int) -> tuple[float, float]:
    """Append `size` bytes and fdatasync, `samples` times, into a preallocated file: the writer's own pattern."""
    fd, path = tempfile.mkstemp(prefix="limits-", dir=directory)
    try:
        os.posix_fallocate(fd, 0, size * (samples + 1))
        os.fsync(fd)
        block = os.urandom(size)
        times = []
        for i in range(samples):
            os.pwrite(fd, block, i * size)
            began = time.perf_counter_ns()
            os.fdatasync(fd)
            times.append(time.perf_counter_ns() - began)
        return _quantiles(times)
    finally:
        os.close(fd)
        os.unlink(path)


def _echo(endpoint: str, count: int) -> None:
    """The far end: send back every message received, as the writer answers a batch."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(endpoint)
    for _ in range(count):
        sock.send(sock.recv(copy=False), copy=False)
    sock.close(linger=1000)
    ctx.term()


def zmq_hop_us(directory: str, samples: int, size: int) -> tuple[float, float]:
    """Half of a ping-pong over ipc between two processes: one one-way hop, Python to Python."""
    endpoint = f"ipc://{directory}/limits-{os.getpid()}.sock"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.bind(endpoint)
    warmup = min(200, samples)
    child = multiprocessing.get_context("spawn").Process(target=_echo, args=(endpoint, samples + warmup))
    child.start()
    try:
        payload = os.urandom(size)
        for _ in range(warmup):
            sock.send(payload)
            sock.recv()
        times = []
        for _ in range(samples):
            began = time.perf_counter_ns()
            sock.send(payload)
            sock.recv()
            times.append((time.perf_counter_ns() - began) // 2)
        return _quantiles(times)
    finally:
        child.join(10)
        sock.close(linger=0)
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=".", help="a folder on the filesystem the log would use (default .)")
    parser.add_argument("--samples", type=int, default=5000, help="samples per measurement (default 5000)")
    parser.add_argument("--size", type=int, default=1024, help="bytes per record (default 1024)")
    parser.add_argument("--quick", action="store_true", help="200 samples: checks the script, not a measurement")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.size < 1:
        parser.error("--samples and --size must be positive")
    samples = 200 if args.quick else args.samples
    sync_p50, sync_p99 = fdatasync_us(args.dir, samples, args.size)
    hop_p50, hop_p99 = zmq_hop_us(args.dir, samples, args.size)
    round_trip = sync_p50 + 2 * hop_p50
    print(f"fdatasync after a {args.size} B append: p50 {sync_p50:,.1f} us, p99 {sync_p99:,.1f} us")
    print(f"one-way ZeroMQ ipc hop, Python to Python: p50 {hop_p50:,.1f} us, p99 {hop_p99:,.1f} us")
    print(f"bound for one durable record in flight: {round_trip:,.1f} us, {1e6 / round_trip:,.0f} rec/s "
          f"(80 %: {0.8e6 / round_trip:,.0f} rec/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where walsvc's append-to-reader time goes, hop by hop: the suite's `latency 10k/s os` scenario
(`walsvc.Producer`, a writer process, `walsvc.Reader`) with a timestamp at each edge.

    python benchmarks/latency_hops.py [--runs 1] [--rate 10000] [--seconds 10] [--pin writer|apart] [--config TOML]
                                      [--quick]

Each record carries its send time (benchmarks/suite/harness.paced_send).  The producer notes when `put`
returned; the writer process (this script, timing `Writer._handle` and `Writer._drain` of an unchanged
`walsvc serve`) notes when it began and ended each batch; the reader notes when `poll` returned each record.
All clocks are CLOCK_MONOTONIC, shared by the processes.  Per record, percentiles (µs) of:

- put returned: send time to `put` returning (the producer library's share in the caller's thread);
- reached the writer: send time to the writer beginning the record's batch (the producer library, ZeroMQ's
  two hops and any wait behind the writer's earlier batches);
- writer's handling: the writer's work on the batch (checks, append, HEAD update: what wakes readers);
- writer to reader: the writer done with the batch to `poll` returning the record (it can be below 0: the
  HEAD update that wakes the reader is not the batch's last step);

then append to reader again for the records that were their batch's only record, and the share of records
that shared a batch (a `put` is one record, so such a batch waited while the producer's pipeline was full);
and of the writer: how long it sat idle between two batches, and how many batches a loop turn took.  A
writer that is rarely idle and takes several batches per turn is the bottleneck: records wait in its queue.
Last, each process's CPU time per record: the producer's from its first `put` to its last ack, the
writer's over its whole life (start-up included), the reader's while it read.

`--pin writer` runs the writer on CPU 0 (`walsvc serve --cpus 0`: all its threads); `--pin apart` also keeps
the producer and reader off CPU 0.
"""

from __future__ import annotations

import argparse
import bisect
import os
import pickle
import statistics
import struct
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.suite.harness import measure_latency, paced_send  # noqa: E402 - needs ROOT on the path
from benchmarks.suite.walsvc_system import _writer  # noqa: E402

HOPS = ("put returned", "reached the writer", "writer's handling", "writer to reader", "append to reader")


def writer_role(marks: str, serve_args: list[str]) -> int:
    """`walsvc SERVE_ARGS` (a `serve`), timing each batch and each drain; the marks go to `marks` when it
    stops (SIGTERM)."""
    from walsvc import cli
    from walsvc.writer import Writer
    # Arrays, not lists of tuples: tuples are objects the collector tracks, and 100,000 of them made the
    # writer run a full collection (18 ms) in the middle of a run.
    firsts, began_at, ended_at, drains = array("q"), array("q"), array("q"), array("q")
    handle, drain = Writer._handle, Writer._drain

    def timed_handle(self: Writer, msg: bytes) -> None:
        firsts.append(self.log.next_lsn)
        began_at.append(time.monotonic_ns())
        handle(self, msg)
        ended_at.append(time.monotonic_ns())

    def counted_drain(self: Writer) -> int:
        n = drain(self)
        if n:
            drains.append(n)
        return n

    Writer._handle, Writer._drain = timed_handle, counted_drain
    try:
        return cli.main(serve_args)
    finally:
        with open(marks, "wb") as f:
            pickle.dump((firsts, began_at, ended_at, drains, time.process_time()), f)


def _producer(barrier: Any, directory: str, scratch: str, rate: int, count: int) -> float:
    """Paced `put`s, as the suite's; notes (send time, `put` returned) of each, and the process's CPU time
    from the first `put` to the last ack."""
    import walsvc
    sent_at, returned_at = array("q"), array("q")  # arrays: see writer_role
    with walsvc.Producer(directory) as producer:
        put = producer.put

        def send(payload: bytes) -> None:
            put(b"", payload)
            returned_at.append(time.monotonic_ns())
            sent_at.append(struct.unpack_from("<q", payload)[0])

        cpu = time.process_time()
        sent = paced_send(barrier, rate, count, send)
        producer.flush(60)
        cpu = time.process_time() - cpu
    with open(Path(scratch) / "producer", "wb") as f:
        pickle.dump((sent_at, returned_at, cpu), f)
    return sent


def _reader(barrier: Any, directory: str, scratch: str, count: int, timeout: float) -> list[int]:
    """The suite's tailing reader; also notes (LSN, send time, `poll` returned) of each record, and the
    process's CPU time while reading."""
    import walsvc
    lsns, sent_at, polled_at = array("q"), array("q"), array("q")  # arrays: see writer_role
    with walsvc.Reader(directory, "latest") as reader:
        barrier.wait()
        cpu = time.process_time()
        deadline = time.monotonic() + timeout
        while len(lsns) < count and time.monotonic() < deadline:
            batch = reader.poll(0.1)
            now = time.monotonic_ns()
            for r in batch:
                lsns.append(r.lsn)
                sent_at.append(struct.unpack_from("<q", r.value)[0])
                polled_at.append(now)
        cpu = time.process_time() - cpu
    with open(Path(scratch) / "reader", "wb") as f:
        pickle.dump((lsns, sent_at, polled_at, cpu), f)
    return [polled - sent for sent, polled in zip(sent_at, polled_at)]


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    return tuple(ordered[min(len(ordered) - 1, int(len(ordered) * q))] for q in (0.5, 0.9, 0.99))


def run(rate: int, seconds: float, pin: str | None, config: Path | None = None) -> dict[str, Any]:
    """One run: per-record hop times (µs) and the writer's idle gaps and batches per drain."""
    with tempfile.TemporaryDirectory(prefix="latency-hops-") as tmp:
        directory, marks = Path(tmp) / "log", Path(tmp) / "writer-marks"
        with _writer(directory, "os", config, cpu=0 if pin else None,
                     command=[sys.executable, __file__, "--writer-role", str(marks)]):
            result = measure_latency(_producer, _reader, (str(directory), tmp), rate, seconds,
                                     server_cpu=0 if pin == "apart" else None)
        with open(marks, "rb") as f:
            firsts, began_at, ended_at, drains, writer_cpu = pickle.load(f)
        with open(Path(tmp) / "producer", "rb") as f:
            sent_at, returned_at, producer_cpu = pickle.load(f)
            returned = dict(zip(sent_at, returned_at))
        with open(Path(tmp) / "reader", "rb") as f:
            lsns, sent_at, polled_at, reader_cpu = pickle.load(f)
    seen = list(zip(lsns, sent_at, polled_at))
    batches = sorted(zip(firsts, began_at, ended_at))
    starts = [b[0] for b in batches]
    hops: list[list[float]] = [[] for _ in HOPS]
    alone: list[float] = []  # append to reader of the records that were their batch's only record
    measured = set()
    for lsn, sent, polled in seen[len(seen) // 20:]:  # the suite's warm-up: first 5 % dropped
        at = bisect.bisect_right(starts, lsn) - 1
        first, began, ended = batches[at]
        measured.add(first)
        for i, t in enumerate((returned[sent] - sent, began - sent, ended - began, polled - ended, polled - sent)):
            hops[i].append(t / 1000)
        if at + 1 < len(starts) and starts[at + 1] == first + 1:
            alone.append((polled - sent) / 1000)
    together = len(hops[0]) - len(alone)
    by_time = sorted(batches, key=lambda b: b[1])
    idle = [(b[1] - a[2]) / 1000 for a, b in zip(by_time, by_time[1:])]
    cpu_us = {"producer": producer_cpu, "writer": writer_cpu, "reader": reader_cpu}
    return {"hops": [_percentiles(h) for h in hops], "records": len(hops[0]), "batches": len(measured),
            "alone": _percentiles(alone) if alone else None, "together": together,
            "idle": _percentiles(idle), "per_drain": statistics.mean(drains), "sent_per_s": result["sent_per_s"],
            "cpu_us": {who: t * 1e6 / len(seen) for who, t in cpu_us.items()}}


def report(r: dict[str, Any]) -> str:
    lines = [f"{r['records']:,} records ({r['sent_per_s']:,.0f}/s sent) in {r['batches']:,} batches; "
             "µs p50 / p90 / p99:"]
    lines += [f"  {name:<20} {p50:>6,.0f} / {p90:>6,.0f} / {p99:>6,.0f}" for name, (p50, p90, p99)
              in zip(HOPS, r["hops"])]
    shared = (f"{r['together'] / r['records']:.0%} of records shared a batch (held while the producer's pipeline "
              "was full)")
    if r["alone"] is None:
        lines.append(f"  no record was sent alone; {shared}")
    else:
        p50, p90, p99 = r["alone"]
        lines.append(f"  append to reader of the records sent alone {p50:,.0f} / {p90:,.0f} / {p99:,.0f}; {shared}")
    lines.append(f"  writer idle between batches {r['idle'][0]:,.0f} / {r['idle'][1]:,.0f} / {r['idle'][2]:,.0f}; "
                 f"{r['per_drain']:.2f} batches per loop turn")
    lines.append("  CPU µs per record: " + ", ".join(f"{who} {us:.1f}" for who, us in r["cpu_us"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--writer-role"]:
        return writer_role(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs (default 1)")
    parser.add_argument("--rate", type=int, default=10_000, help="records/s (default 10000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument("--pin", choices=["writer", "apart"],
                        help="the writer on CPU 0; apart: the producer and reader off CPU 0 too")
    parser.add_argument("--config", type=Path, help="a TOML config for the writer (to compare settings)")
    parser.add_argument("--quick", action="store_true", help="1 run of 1 s: checks the script, not a measurement")
    args = parser.parse_args(argv)
    if min(args.runs, args.rate, args.seconds) <= 0:
        parser.error("--runs, --rate and --seconds must be positive")
    if args.pin and (0 not in os.sched_getaffinity(0) or len(os.sched_getaffinity(0)) < 2):
        parser.error("--pin needs CPU 0 and at least one more CPU")
    runs, seconds = (1, 1.0) if args.quick else (args.runs, args.seconds)
    for _ in range(runs):
        print(report(run(args.rate, seconds, args.pin, args.config)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which part of walsvc's append-to-reader latency is the producer library's: the suite's `latency 10k/s os`
scenario, run with `walsvc.Producer` and with a producer that speaks the wire protocol with plain pyzmq.

    python benchmarks/latency_parts.py [--rounds 3] [--rate 10000] [--seconds 10] [--quick]

Both runs use the same writer process (`walsvc serve --fsync os`) and the same `walsvc.Reader`
(benchmarks/suite/walsvc_system.py), paced like the suite (benchmarks/suite/harness.py).  The wire producer
does what docs/PROTOCOL.md asks and no more: PUSH one APPEND of one record per send, its own sequence
numbers, a SUB on its reply topic with READY awaited first, and a second thread that takes the acks (as
`walsvc.Producer`'s I/O thread does).  The two alternate round by round; it prints p50/p99/p99.9 of each
run and the medians.  PERFORMANCE.md section 13 reads them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from benchmarks.suite import walsvc_system  # noqa: E402 - needs ROOT on the path
from benchmarks.suite.harness import measure_latency, paced_send  # noqa: E402
from walsvc import protocol as P  # noqa: E402
from walsvc.endpoints import load as load_endpoints  # noqa: E402
from walsvc.record import encode_put  # noqa: E402

WIRE_PRODUCER_ID = 0x5EED


def wire_producer(barrier: Any, directory: str, rate: int, count: int) -> float:
    """Paced APPENDs of one record each over plain pyzmq; returns the rate sent once every ack came back."""
    endpoints = load_endpoints(Path(directory))
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.connect(endpoints.ingest)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, P.reply_topic(WIRE_PRODUCER_ID))
        sub.connect(endpoints.publish)
        if not sub.poll(30_000) or P.decode_reply(sub.recv()).status != P.READY:
            raise RuntimeError("no READY from the writer within 30 s")
        acked = [0]
        refused: list[P.Reply] = []

        def take_acks() -> None:
            while acked[0] < count and not refused and sub.poll(30_000):
                reply = P.decode_reply(sub.recv())
                if reply.status == P.ACK:
                    acked[0] += 1
                else:
                    refused.append(reply)

        acks = threading.Thread(target=take_acks, daemon=True)
        acks.start()
        seq = 0

        def send(value: bytes) -> None:
            nonlocal seq
            seq += 1
            push.send(P.encode_append(WIRE_PRODUCER_ID, seq, 1, encode_put(b"", value)))

        sent = paced_send(barrier, rate, count, send)
        acks.join(60)
        if acked[0] != count:
            raise RuntimeError(f"{acked[0]} of {count} records were acked" + (f"; the writer answered {refused[0]}"
                                                                               if refused else ""))
        return sent
    finally:
        ctx.destroy(linger=0)


PRODUCERS = {"walsvc.Producer": walsvc_system._paced_producer, "wire protocol": wire_producer}


def run(kind: str, rate: int, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="latency-parts-") as tmp:
        directory = Path(tmp) / "log"
        with walsvc_system._writer(directory, "os"):
            return measure_latency(PRODUCERS[kind], walsvc_system._tail_reader, (str(directory),), rate, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--rate", type=int, default=10_000, help="records/s (default 10000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s: checks the script, not a measurement")
    args = parser.parse_args(argv)
    if min(args.rounds, args.rate, args.seconds) <= 0:
        parser.error("--rounds, --rate and --seconds must be positive")
    rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)
    figures: dict[str, list[dict[str, float]]] = {kind: [] for kind in PRODUCERS}
    for _ in range(rounds):
        for kind in PRODUCERS:
            r = run(kind, args.rate, seconds)
            figures[kind].append(r)
            print(f"{kind}: p50 {r['p50_us']:,.0f} us, p99 {r['p99_us']:,.0f} us, p99.9 {r['p999_us']:,.0f} us "
                  f"({r['samples']:,.0f} records, sent {r['sent_per_s']:,.0f}/s)", flush=True)
    for kind, runs in figures.items():
        medians = {q: statistics.median(r[q] for r in runs) for q in ("p50_us", "p99_us", "p999_us")}
        print(f"median of {len(runs)}, {kind}: p50 {medians['p50_us']:,.0f} us, p99 {medians['p99_us']:,.0f} us, "
              f"p99.9 {medians['p999_us']:,.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())

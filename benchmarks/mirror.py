"""The mirror to JetStream: throughput (per-record and packed) and end-to-end lag at 10,000 rec/s, each beside
what nats-py publishing straight to the same stream achieves in the same run.

    python benchmarks/mirror.py [--records 200000] [--batch 64] [--lag-seconds 10] [--profile FILE] [--no-lag]

Starts its own three-node JetStream cluster on loopback (tests/nats_cluster.py) and one R3 stream with
subjects `bench.>`.  Throughput: a log of `--records` 100-byte records written in batches of `--batch`
(one frame each, as a producer's `put_many` makes), mirrored with `Mirror(once=True)` in this process;
nats-py direct publishes the same records (100-byte payloads, a Nats-Msg-Id each) with `publish_async`,
256 in flight, or, for packed, the same v1 batch payloads.  Lag: a `walsvc serve` writer, a producer sending
100 records every 10 ms, and `walsvc mirror` as a process; a JetStream consumer of the stream measures
arrival time minus the record's append timestamp (its frame timestamp).  nats-py direct: publish time to
arrival, same pace and consumer.  `--profile` writes a cProfile of the packed mirror run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import nats  # noqa: E402
from nats.js import api  # noqa: E402

import walsvc  # noqa: E402
from nats_cluster import Cluster  # noqa: E402
from walsvc.jetstream import JetStreamSink  # noqa: E402
from walsvc.mirror import H_TIMESTAMP, Mirror  # noqa: E402
from walsvc.record import encode_many  # noqa: E402

STREAM = "BENCH"
VALUE = b"v" * 84  # with a 12-byte key and 4 bytes of header/CRC: 100-byte records


def records(n: int, batch: int) -> list[list[walsvc.Record]]:
    return [[walsvc.Record(b"k-%09d" % (i + j), VALUE) for j in range(min(batch, n - i))] for i in range(0, n, batch)]


async def create_stream(urls: list[str]) -> None:
    nc = await nats.connect(urls)
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name=STREAM, subjects=["bench.>"], num_replicas=3,
                                         storage=api.StorageType.FILE, duplicate_window=120))
    await nc.close()


def mirror_throughput(log_dir: Path, urls: list[str], packed: bool, profile: str | None) -> float:
    sink = JetStreamSink(urls, STREAM, "bench.packed" if packed else "bench.record")
    m = Mirror(log_dir, sink, name="packed" if packed else "record", packed=packed, once=True, window=256)
    prof = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if prof:
        prof.enable()
    state = asyncio.run(m.run())
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    elapsed = time.perf_counter() - start
    return state.mirrored_lsn / elapsed


async def direct_throughput(urls: list[str], batches: list[list[walsvc.Record]], packed: bool) -> float:
    nc = await nats.connect(urls)
    js = nc.jetstream(publish_async_max_pending=256)
    subject = "bench.direct-packed" if packed else "bench.direct"
    n = sum(len(b) for b in batches)
    start = time.perf_counter()
    lsn = 0
    if packed:
        for b in batches:
            lsn += len(b)
            await js.publish_async(subject, encode_many(b), headers={"Nats-Msg-Id": f"d:{lsn}"})
    else:
        for b in batches:
            for r in b:
                lsn += 1
                await js.publish_async(subject, r.value, headers={"Nats-Msg-Id": f"d:{lsn}"})
    await js.publish_async_completed()
    elapsed = time.perf_counter() - start
    await nc.close()
    return n / elapsed


def quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    if not xs:
        return {}
    return {"n": len(xs), "p50_ms": xs[len(xs) // 2], "p99_ms": xs[int(len(xs) * 0.99)], "max_ms": xs[-1]}


async def collect_lag(urls: list[str], subject: str, seconds: float, sent_at: dict[str, float] | None) -> list[float]:
    """Arrival minus append (or publish) time, in ms, of each message stored on `subject` during `seconds`."""
    nc = await nats.connect(urls)
    js = nc.jetstream()
    lags: list[float] = []

    async def on_msg(msg) -> None:
        now = time.time()
        if sent_at is not None:
            t = sent_at.pop(msg.headers["Nats-Msg-Id"], None)
            if t is not None:
                lags.append((now - t) * 1000)
        else:
            lags.append((now - int(msg.headers[H_TIMESTAMP]) / 1e6) * 1000)

    sub = await js.subscribe(subject, stream=STREAM, ordered_consumer=True, cb=on_msg,
                             deliver_policy=api.DeliverPolicy.NEW)
    await asyncio.sleep(seconds)
    await sub.unsubscribe()
    await nc.close()
    return lags


def paced_producer(log_dir: Path, seconds: float, rate: int, stop: threading.Event) -> int:
    per_tick = rate // 100
    sent = 0
    with walsvc.Producer(log_dir) as p:
        start = time.perf_counter()
        while not stop.is_set() and time.perf_counter() - start < seconds:
            p.put_many([(b"k-%09d" % (sent + i), VALUE) for i in range(per_tick)])
            sent += per_tick
            delay = start + sent / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        p.flush(30)
    return sent


def mirror_lag(root: Path, urls: list[str], packed: bool, seconds: float, rate: int) -> dict[str, float]:
    log_dir = root / ("lag-packed" if packed else "lag-record")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    writer = subprocess.Popen([sys.executable, "-m", "walsvc", "serve", "--dir", str(log_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in writer.stdout:
        if "writer ready" in line:
            break
    subject = "bench.lag-packed" if packed else "bench.lag-record"
    mirror = subprocess.Popen([sys.executable, "-m", "walsvc", "mirror", "--dir", str(log_dir), "--servers",
                               ",".join(urls), "--stream", STREAM, "--subject", subject]
                              + (["--packed"] if packed else []), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    stop = threading.Event()
    sent: list[int] = []
    t = threading.Thread(target=lambda: sent.append(paced_producer(log_dir, seconds + 1, rate, stop)))
    try:
        time.sleep(1.5)  # the mirror connects
        t.start()
        time.sleep(0.5)
        lags = asyncio.run(collect_lag(urls, subject, seconds, None))
    finally:
        stop.set()
        t.join()
        mirror.terminate()
        mirror.wait(30)
        writer.terminate()
        writer.wait(30)
    return quantiles(lags)


async def direct_lag(urls: list[str], seconds: float, rate: int) -> dict[str, float]:
    nc = await nats.connect(urls)
    js = nc.jetstream(publish_async_max_pending=256)
    sent_at: dict[str, float] = {}
    collector = asyncio.create_task(collect_lag(urls, "bench.lag-direct", seconds, sent_at))
    await asyncio.sleep(0.5)
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds - 1:
        for _ in range(rate // 100):
            n += 1
            mid = f"lag:{n}"
            sent_at[mid] = time.time()
            await js.publish_async("bench.lag-direct", VALUE, headers={"Nats-Msg-Id": mid})
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    lags = await collector
    await nc.close()
    return quantiles(lags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lag-seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--profile", help="write a cProfile of the packed mirror run here")
    parser.add_argument("--no-lag", action="store_true", help="throughput only")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="walsvc-mirror-bench-"))
    results: dict[str, object] = {"records": args.records, "batch": args.batch}
    with Cluster(root / "nats").start() as cluster:
        cluster.wait_ready(60)
        urls = cluster.urls
        asyncio.run(create_stream(urls))
        batches = records(args.records, args.batch)
        log_dir = root / "log"
        with walsvc.Log.open(log_dir, fsync="os") as log:
            for b in batches:
                log.append_batch(b)
        for name, fn in (("mirror per-record", lambda: mirror_throughput(log_dir, urls, False, None)),
                         ("nats-py direct per-record", lambda: asyncio.run(direct_throughput(urls, batches, False))),
                         ("mirror packed", lambda: mirror_throughput(log_dir, urls, True, args.profile)),
                         ("nats-py direct packed", lambda: asyncio.run(direct_throughput(urls, batches, True)))):
            rate = fn()
            results[name] = {"rec_per_s": round(rate), "MiB_per_s": round(rate * 100 / (1 << 20), 2)}
            print(f"{name:28s} {rate:12,.0f} rec/s  {rate * 100 / (1 << 20):7.2f} MiB/s", flush=True)
        lag_runs = (("lag mirror per-record", lambda: mirror_lag(root, urls, False, args.lag_seconds, args.rate)),
                    ("lag mirror packed", lambda: mirror_lag(root, urls, True, args.lag_seconds, args.rate)),
                    ("lag nats-py direct", lambda: asyncio.run(direct_lag(urls, args.lag_seconds, args.rate))))
        for name, fn in () if args.no_lag else lag_runs:
            q = fn()
            results[name] = q
            print(f"{name:28s} " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in q.items()), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

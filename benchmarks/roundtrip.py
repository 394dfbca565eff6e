"""One record in flight per producer: round trips per second, CPU and thread wake-ups per record.

    python benchmarks/roundtrip.py [--fsync always] [--producers 1] [--seconds 3] [--dir /dev/shm]

Each producer process loops `put(...).result()` against a real writer process.  Besides the rate it prints
the CPU time and the voluntary context switches (a thread going to sleep and being woken again, summed over
every thread of the process) per record, for the writer and for the producers: the count of thread
hand-offs a round trip costs, which a loaded machine changes far less than it changes the rate.  On tmpfs
(`--dir /dev/shm`) fdatasync costs nothing, so what is left is the hand-offs and the Python work around them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of `pid` so far."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except OSError:
            pass  # the thread ended
    return total


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _produce(directory: str, seconds: float, barrier, results) -> None:
    import walsvc
    value = os.urandom(1000)
    with walsvc.Producer(directory) as producer:
        producer.put(b"warm-up", value).result(30)
        barrier.wait()
        cpu0, wake0, n = time.process_time(), wakeups(os.getpid()), 0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            producer.put(b"k%d" % n, value).result(30)
            n += 1
        results.put((n, time.monotonic() - started, time.process_time() - cpu0, wakeups(os.getpid()) - wake0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fsync", default="always", choices=("always", "batch", "os"))
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dir", default=None, help="where the log goes (default: the system's temp folder)")
    args = parser.parse_args()
    if args.producers < 1 or args.seconds <= 0:
        parser.error("--producers and --seconds must be positive")
    if args.dir is not None and not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir}: no such folder (the log is made in a new folder inside it)")
    scratch = tempfile.mkdtemp(prefix="walsvc-roundtrip-", dir=args.dir)
    directory = os.path.join(scratch, "log")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    writer = subprocess.Popen([sys.executable, "-m", "walsvc", "serve", "--dir", directory, "--fsync", args.fsync],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in writer.stdout:
            if line.startswith("walsvc writer ready"):
                break
        ctx = multiprocessing.get_context("fork")
        barrier, results = ctx.Barrier(args.producers + 1), ctx.Queue()
        procs = [ctx.Process(target=_produce, args=(directory, args.seconds, barrier, results))
                 for _ in range(args.producers)]
        for p in procs:
            p.start()
        barrier.wait()
        cpu0, wake0 = cpu_seconds(writer.pid), wakeups(writer.pid)
        got = [results.get(timeout=args.seconds + 60) for _ in procs]
        writer_cpu, writer_wakes = cpu_seconds(writer.pid) - cpu0, wakeups(writer.pid) - wake0
        for p in procs:
            p.join()
    finally:
        writer.terminate()
        writer.wait(60)
        shutil.rmtree(scratch, ignore_errors=True)
    n = sum(r[0] for r in got)
    wall = max(r[1] for r in got)
    print(f"{args.producers} producer(s), fsync={args.fsync}: {n / wall:,.0f} rec/s, "
          f"{wall / (n / args.producers) * 1e6:,.0f} us per round trip")
    print(f"per record: writer {writer_cpu / n * 1e6:.1f} us CPU, {writer_wakes / n:.2f} wake-ups; producers "
          f"{sum(r[2] for r in got) / n * 1e6:.1f} us CPU, {sum(r[3] for r in got) / n:.2f} wake-ups")


if __name__ == "__main__":
    main()

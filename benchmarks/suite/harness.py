"""The benchmark harness: scenarios, the system registry, the runner, and helpers for system modules.

Every system (walsvc and the peers a user would pick instead) is a module with the same interface, so the
harness can run them side by side, interleaved run by run, on the same machine and filesystem.

System interface
----------------
A system module exposes (all arguments are plain ints/floats/strs; every result is a dict of floats):

    NAME: str                                       # "redis", "sqlite", "walsvc"
    DURABILITIES: tuple[str, ...]                   # optional; levels it runs (default ("batch", "always"))
    SERVER: bool                                    # optional; True if a server process does the writing
    available() -> str | None                       # None if usable, else how to make it usable

    throughput(tmpdir: str, producers: int, record_size: int, durability: str, seconds: float,
               batch: int) -> {"records_per_s", "mib_per_s", "cpu_s_per_million"}
    latency(tmpdir: str, rate: int, seconds: float, durability: str, server_cpu: int | None = None)
        -> {"p50_us", "p99_us", "p999_us", "samples"}
    rotation(tmpdir: str, rate: int, seconds: float, segment_bytes: int, durability: str)
        -> {"p50_us", "p99_us", "p999_us", "max_us", "rotations", "samples"}
    replay(tmpdir: str, records: int, record_size: int) -> {"records_per_s", "mib_per_s"}
    recovery(tmpdir: str, records: int, record_size: int) -> {"seconds", "records_per_s", "mib_per_s"}

A function may return more figures than these (the peers' latency adds "sent_per_s", the rate the producer
actually achieved); the report shows them beside the metric.  Any of the four functions may be missing: its
scenarios then show "n/a" for that system.  So does a scenario whose durability is not in DURABILITIES.
Each call gets a fresh empty `tmpdir` on the filesystem under test (the harness deletes it afterwards); the
function must stop every process it started before returning, even when it fails, and must raise rather
than return made-up numbers.

What the functions measure:

- throughput: `producers` separate OS processes append records of `record_size` random bytes to one shared
  log, `batch` records per round trip (one pipeline / transaction / append_batch), for `seconds` after a start
  barrier.  records_per_s = records acknowledged / wall time from the barrier to the last producer's end.
  cpu_s_per_million = user+sys CPU seconds of every process doing the work (producers, and the server or
  writer process) during that window, per million records.
- latency: one producer process paced at `rate` records/s, each record 100 bytes carrying its send time
  (time.monotonic_ns, which is one clock for all processes on Linux); one reader process tailing the log.
  Latency = reader's receive time - embedded send time; the first 5 % of records are warm-up and not counted.
  `samples` is the number of latencies counted.  With `server_cpu` (the "pinned" scenario) the server
  process and every thread it starts run on that CPU, and the producer and reader on the others
  (`measure_latency` places them): the placement an operator gives a latency-critical server on a small
  machine.  A system with no server process (SERVER false) shows n/a there.  `measure_latency` adds
  `cpu_cores` and `steal_cores`: the whole machine's busy and stolen CPU (from /proc/stat) averaged over the
  run, in cores (sampled in 10 ms ticks: a light, short run can read 0).  On a small machine the busy share is what latency grows with (every thread's work waits for
  a core), and stolen time is the hypervisor's: a run with much of it says more about the VM than the system.
  The runner adds `steal_cores` to every other run, measured over the whole call.
- rotation: one producer process paced at `rate` records/s of 100 bytes into a log of `segment_bytes`
  segments, long enough to cross many segment rotations; latency = the producer's time from handing a record
  over to its ack (no warm-up dropped: the first rotation may come early).  `rotations` is the number of
  segments the run started.  Only walsvc provides it: the peers have no segments to rotate.
- replay: pre-fill `records` records (not timed), then time one reader process reading them all from the start.
- recovery: leave a log of `records` records as an unclean stop would (writer killed), then time reopening it
  until it accepts appends again.  Only walsvc provides it.

Durability levels (what an acknowledged record survives):

- "os": a process crash, not a power loss (Redis appendfsync no, SQLite synchronous=OFF).
- "batch": each system's group/periodic level: Redis appendfsync everysec (up to ~1 s lost on power loss),
  SQLite WAL synchronous=NORMAL (commits not fsynced until a checkpoint), walsvc's group commit policy.
- "always": fsync before acknowledging (Redis appendfsync always, SQLite synchronous=FULL).

The walsvc module is `benchmarks.suite.walsvc_system`; `load_systems` imports it only if it exists, so the suite
runs without it.  The helpers below (run_workers, proc_cpu_seconds, percentiles_us, throughput_result) are
for system modules, so all systems count time, CPU and percentiles the same way.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import multiprocessing
import os
import queue
import shutil
import statistics
import struct
import threading
import time
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

SUBJECT = "walsvc"
PEER_MODULES = ("benchmarks.suite.redis_streams", "benchmarks.suite.sqlite_wal")
SUBJECT_MODULE = "benchmarks.suite.walsvc_system"
DEFAULT_DURABILITIES = ("batch", "always")
WARMUP_FRACTION = 0.05
LATENCY_RECORD_SIZE = 100

# --------------------------------------------------------------------------------------------------------
# Helpers for system modules
# --------------------------------------------------------------------------------------------------------


def _worker_main(target: Callable[..., Any], barrier: Any, results: Any, index: int, args: tuple) -> None:
    """Run one worker; report its result or its traceback, and break the barrier on failure so nobody waits."""
    try:
        results.put((index, True, target(barrier, *args)))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        barrier.abort()
        results.put((index, False, traceback.format_exc()))


def run_workers(target: Callable[..., Any], arglists: Sequence[tuple], timeout: float,
                context: str = "fork", setup_timeout: float = 60.0,
                on_start: Callable[[], object] | None = None) -> tuple[float, list[Any]]:
    """Run `target(barrier, *args)` in one process per entry of `arglists`, all released together.

    Each worker sets itself up (connects, opens files), calls `barrier.wait()`, does the measured work and
    returns a picklable result.  `on_start` is called as the barrier opens.  Returns (monotonic time at which
    the barrier opened, results in arglists order).  Raises RuntimeError with the worker's traceback if any
    worker fails or the run exceeds `timeout` seconds after the barrier.  Fork is the default because it
    starts a worker in milliseconds; a system whose parent holds threads or ZeroMQ contexts should pass
    context="spawn".
    """
    ctx = multiprocessing.get_context(context)
    barrier = ctx.Barrier(len(arglists) + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(target, barrier, results, i, tuple(args)), daemon=True)
             for i, args in enumerate(arglists)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        try:
            barrier.wait(setup_timeout)
        except threading.BrokenBarrierError:
            pass  # a worker failed during setup: its traceback is on the queue
        start = time.monotonic()
        if on_start is not None:
            on_start()
        deadline = start + timeout
        while len(out) < len(procs):
            try:
                index, ok, value = results.get(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
            except queue.Empty as exc:
                dead = [i for i, p in enumerate(procs) if i not in out and p.exitcode is not None]
                if dead and results.empty():  # died without a word (a crash, or no __main__ guard)
                    raise RuntimeError(f"benchmark worker {dead[0]} exited with {procs[dead[0]].exitcode} "
                                       "and no result") from exc
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"benchmark workers did not finish within {timeout:.0f} s") from exc
                continue
            if not ok:
                raise RuntimeError(_first_cause(index, value, results))
            out[index] = value
        for p in procs:
            p.join(10)
        return start, [out[i] for i in range(len(procs))]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()


def _first_cause(index: int, tb: str, results: Any) -> str:
    """The failure to show: when one worker fails in setup the others see a broken barrier; show the cause."""
    failures = [(index, tb)]
    try:
        while True:
            i, ok, value = results.get(timeout=1.0)
            if not ok:
                failures.append((i, value))
    except queue.Empty:
        pass
    failures.sort(key=lambda f: "BrokenBarrierError" in f[1])
    return f"benchmark worker {failures[0][0]} failed:\n{failures[0][1]}"


def proc_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds used so far by process `pid` (including waited-for children), from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()  # the command name may contain spaces
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def paced_send(barrier: Any, rate: int, count: int, send: Callable[[bytes], Any]) -> float:
    """Wait at `barrier`, then call `send` with `count` 100-byte payloads on a fixed schedule of `rate` per
    second, each starting with its send time (monotonic ns, little-endian i64).  Returns the rate really
    sent: below `rate` when `send` cannot keep up."""
    pad = bytes(LATENCY_RECORD_SIZE - 8)
    barrier.wait()
    t0 = time.monotonic_ns()
    for i in range(count):
        delay = t0 + i * 1_000_000_000 // rate - time.monotonic_ns()
        if delay > 0:
            time.sleep(delay / 1e9)
        send(struct.pack("<q", time.monotonic_ns()) + pad)
    return count * 1e9 / (time.monotonic_ns() - t0)


def _latency_role(barrier: Any, role: str, produce: Callable[..., float], tail: Callable[..., list[int]],
                  target: tuple, rate: int, count: int, timeout: float) -> Any:
    if role == "producer":
        return produce(barrier, *target, rate, count)
    return tail(barrier, *target, count, timeout)


def measure_latency(produce: Callable[..., float], tail: Callable[..., list[int]], target: tuple, rate: int,
                    seconds: float, server_cpu: int | None = None) -> dict[str, float]:
    """The latency scenario's two workers: `produce(barrier, *target, rate, count)` sends paced records (see
    `paced_send`) and returns the rate it sent, `tail(barrier, *target, count, timeout)` reads them and returns
    one latency (ns) each; with `server_cpu`, both run on every CPU but that one.  Returns the percentiles and
    the rate sent."""
    count = int(rate * seconds)
    off_server = None if server_cpu is None else os.sched_getaffinity(0) - {server_cpu}
    started: list[tuple[int, int, int, int]] = []
    with on_cpus(off_server):  # the workers fork from this thread and inherit it
        _start, (sent_per_s, latencies) = run_workers(
            _latency_role, [(role, produce, tail, target, rate, count, seconds + 30)
                            for role in ("producer", "reader")], timeout=seconds + 60,
            on_start=lambda: started.append(machine_cpu()))
    return {**percentiles_us(latencies), "sent_per_s": sent_per_s, **cpu_cores(started[0], machine_cpu())}


def machine_cpu() -> tuple[int, int, int, int]:
    """(busy, stolen, all) clock ticks of every CPU since boot, and the number of CPUs, from /proc/stat.  Busy
    is user, nice, system, irq and softirq (a guest's time is inside user); all adds idle, iowait and stolen."""
    with open("/proc/stat", "rb") as f:
        lines = f.read().splitlines()
    fields = [int(x) for x in lines[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    busy = user + nice + system + irq + softirq
    cpus = sum(1 for line in lines[1:] if line[:3] == b"cpu" and line[3:4].isdigit())
    return busy, steal, busy + idle + iowait + steal, cpus


def cpu_cores(before: tuple[int, int, int, int], after: tuple[int, int, int, int]) -> dict[str, float]:
    """The machine's busy and stolen CPU between two `machine_cpu` readings, in cores (averaged)."""
    busy, steal, every = (b - a for a, b in zip(before[:3], after[:3]))
    if every <= 0:
        return {}
    return {"cpu_cores": busy / every * after[3], "steal_cores": steal / every * after[3]}


@contextlib.contextmanager
def on_cpus(cpus: set[int] | None) -> Iterator[None]:
    """Run this thread on `cpus` (None: leave it as it is) for the block, so that the processes and threads
    it starts meanwhile inherit them; the thread's own CPUs come back afterwards."""
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def server_cpu_problem(cpu: int) -> str | None:
    """Why the pinned scenario cannot run here (its server CPU, and one more for the clients), or None."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if cpu not in cpus or len(cpus) < 2:
        return f"needs CPU {cpu} and another CPU for the clients"
    return None


def percentiles_us(latencies_ns: Sequence[int]) -> dict[str, float]:
    """p50/p99/p99.9 (nearest rank) in microseconds of latencies in ns, after dropping the warm-up records."""
    kept = sorted(latencies_ns[int(len(latencies_ns) * WARMUP_FRACTION):])
    if not kept:
        raise RuntimeError("the reader received no records")

    def rank(q: float) -> float:
        return kept[min(len(kept) - 1, max(0, math.ceil(q * len(kept)) - 1))] / 1000.0

    return {"p50_us": rank(0.50), "p99_us": rank(0.99), "p999_us": rank(0.999), "samples": float(len(kept))}


def throughput_result(records: int, wall_s: float, cpu_s: float, record_size: int) -> dict[str, float]:
    """The throughput dict from raw counts, so every system derives it the same way."""
    if records <= 0 or wall_s <= 0:
        raise RuntimeError(f"no records committed ({records} in {wall_s:.3f} s)")
    return {"records_per_s": records / wall_s,
            "mib_per_s": records * record_size / wall_s / 2**20,
            "cpu_s_per_million": cpu_s / records * 1e6}


# --------------------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal an issue set for walsvc in one scenario: beat a peer by a ratio, or stay within a fixed bound.

    `peer` set: walsvc's median of `metric` against that peer's, as a ratio above 1 when walsvc is better
    (inverted for lower-is-better metrics), must reach `value`.  `peer` None: walsvc's median of `metric`
    must be at most (`at_most`) or at least `value`.
    """

    metric: str
    value: float
    peer: str | None = None
    at_most: bool = False

    @property
    def lower_is_better(self) -> bool:
        return self.metric.endswith("_us") or self.metric.startswith("cpu_")

    def describe(self) -> str:
        label = FIGURE_UNITS.get(self.metric, self.metric)
        if self.peer is None:
            return f"{label} {'<=' if self.at_most else '>='} {format_value(self.value, label)}"
        if self.lower_is_better:
            return f"{label} <= {self.peer}" + (f" / {self.value:g}" if self.value != 1 else "")
        return f"{label} >= {self.value:g}x {self.peer}"


@dataclass(frozen=True)
class Scenario:
    """One row group of the report: a system function, its arguments, and the figure that decides."""

    name: str
    kind: str  # the system function to call: throughput | latency | rotation | replay | recovery
    params: dict[str, Any]
    metric: str
    higher_is_better: bool
    unit: str
    targets: tuple[Target, ...] = ()

    def applies_to(self, system: ModuleType) -> str | None:
        """None if `system` can run this scenario, else why not (shown as n/a)."""
        if not callable(getattr(system, self.kind, None)):
            return f"{system.NAME} has no {self.kind} benchmark"
        durability = self.params.get("durability")
        if durability is not None and durability not in getattr(system, "DURABILITIES", DEFAULT_DURABILITIES):
            return f"{system.NAME} has no durability level {durability!r}"
        server_cpu = self.params.get("server_cpu")
        if server_cpu is not None:
            if not getattr(system, "SERVER", False):
                return f"{system.NAME} has no server process to place"
            return server_cpu_problem(server_cpu)
        return None


# The goals the open issues set (issue 9: the round trip; issue 12: per-record cost), shown beside the figures.
TARGETS: dict[str, tuple[Target, ...]] = {
    "throughput 1p 1KiB always x1": (Target("records_per_s", 1.0, "redis"),),
    "throughput 4p 1KiB always x1": (Target("records_per_s", 1.5, "redis"), Target("records_per_s", 2.0, "sqlite"),
                                     Target("cpu_s_per_million", 1.0, "redis")),
    "throughput 16p 1KiB always x1": (Target("records_per_s", 3.0, "redis"),),
    "throughput 4p 100B batch x64": (Target("records_per_s", 10.0, "redis"),),
    "throughput 4p 1KiB batch x64": (Target("records_per_s", 3.0, "redis"), Target("mib_per_s", 400.0)),
    "latency 10k/s os": (Target("p50_us", 1.0, "redis"), Target("p99_us", 1.0, "redis"),
                         Target("p999_us", 5000.0, at_most=True)),
    "latency 10k/s os pinned": (Target("p50_us", 1.0, "redis"), Target("p99_us", 1.0, "redis"),
                                Target("p999_us", 5000.0, at_most=True)),
    "replay 100B": (Target("records_per_s", 2.0, "sqlite"),),
    # issue 8.3: rotation off the append path; one append never waits for a segment switch
    "rotation 10k/s os": (Target("p999_us", 5000.0, at_most=True), Target("max_us", 10000.0, at_most=True)),
}
RATE_SHORTFALL = 0.95  # a paced producer that sent less than this share of the rate asked is named in the report
OUTLIER_FACTOR = 10.0  # a latency run whose p99 is this many times the median run's is flagged
STOLEN_SHARE = 0.05  # a run during which the hypervisor took this share of the machine's CPU is noted


def _size_label(size: int) -> str:
    return f"{size // 1024}KiB" if size % 1024 == 0 else f"{size}B"


def scenarios(quick: bool = False) -> list[Scenario]:
    """The suite.  Names do not depend on `quick`, so quick and full reports line up."""
    seconds = 1.0 if quick else 5.0
    latency_seconds = 1.0 if quick else 10.0
    log_records = 50_000 if quick else 1_000_000
    out = []
    shapes = [(p, size, dur, 64) for dur in ("batch", "always") for p in (1, 4) for size in (100, 1024)]
    shapes.append((1, 1024, "always", 1))  # one record per round trip: what fsync costs without grouping
    shapes.append((4, 1024, "always", 1))  # four such producers: what group commit across processes buys
    shapes.append((16, 1024, "always", 1))  # many workers each waiting for its own record
    for producers, size, durability, batch in shapes:
        name = f"throughput {producers}p {_size_label(size)} {durability} x{batch}"
        out.append(Scenario(
            name=name, kind="throughput",
            params={"producers": producers, "record_size": size, "durability": durability,
                    "seconds": seconds, "batch": batch},
            metric="records_per_s", higher_is_better=True, unit="rec/s", targets=TARGETS.get(name, ())))
    for rate, durability in ((10_000, "os"), (10_000, "batch"), (1_000, "batch")):
        name = f"latency {rate // 1000}k/s {durability}"
        out.append(Scenario(  # 1k/s: latency of a system that is not near saturation
            name=name, kind="latency",
            params={"rate": rate, "seconds": latency_seconds, "durability": durability},
            metric="p99_us", higher_is_better=False, unit="us p99", targets=TARGETS.get(name, ())))
    name = "latency 10k/s os pinned"
    out.append(Scenario(  # the server process on CPU 0, the producer and reader off it (see `measure_latency`)
        name=name, kind="latency",
        params={"rate": 10_000, "seconds": latency_seconds, "durability": "os", "server_cpu": 0},
        metric="p99_us", higher_is_better=False, unit="us p99", targets=TARGETS.get(name, ())))
    name = "rotation 10k/s os"
    out.append(Scenario(  # 8 MiB segments: at 10k/s of 100 B one fills in ~7 s
        name=name, kind="rotation",
        params={"rate": 10_000, "seconds": 3.0 if quick else 60.0, "segment_bytes": 8 << 20, "durability": "os"},
        metric="p999_us", higher_is_better=False, unit="us p99.9", targets=TARGETS.get(name, ())))
    for kind in ("replay", "recovery"):
        name = f"{kind} {_size_label(LATENCY_RECORD_SIZE)}"
        out.append(Scenario(
            name=name, kind=kind,
            params={"records": log_records, "record_size": LATENCY_RECORD_SIZE},
            metric="mib_per_s", higher_is_better=True, unit="MiB/s", targets=TARGETS.get(name, ())))
    return out


def select_scenarios(all_scenarios: list[Scenario], patterns: Sequence[str]) -> list[Scenario]:
    """The scenarios whose name contains any of `patterns` (all of them if none given)."""
    if not patterns:
        return all_scenarios
    chosen = [s for s in all_scenarios if any(p in s.name for p in patterns)]
    if not chosen:
        raise ValueError(f"no scenario matches {', '.join(patterns)}; names: "
                         + "; ".join(s.name for s in all_scenarios))
    return chosen


# --------------------------------------------------------------------------------------------------------
# System registry
# --------------------------------------------------------------------------------------------------------


@dataclass
class SystemEntry:
    """A system as the registry found it: the module if usable, else why not."""

    name: str
    module: ModuleType | None
    unavailable: str | None


def load_systems() -> list[SystemEntry]:
    """The peers, plus walsvc if its bench module exists.  A system that cannot run says why instead."""
    entries = []
    for modname in (*PEER_MODULES, SUBJECT_MODULE):
        try:
            module = importlib.import_module(modname)
        except ImportError as exc:
            if modname == SUBJECT_MODULE and getattr(exc, "name", None) == SUBJECT_MODULE:
                continue  # not written yet: the suite runs with the peers alone
            entries.append(SystemEntry(modname.rsplit(".", 1)[-1], None, f"cannot import {modname}: {exc}"))
            continue
        entries.append(SystemEntry(module.NAME, module, module.available()))
    return entries


# --------------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """Every run of one system on one scenario."""

    runs: list[dict[str, float]] = field(default_factory=list)
    na: str | None = None
    errors: list[str] = field(default_factory=list)

    def stats(self, metric: str) -> dict[str, Any] | None:
        """median/min/max of `metric` over the successful runs, plus the median of every other figure."""
        if not self.runs:
            return None
        values = [r[metric] for r in self.runs]
        out = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        out["medians"] = {k: statistics.median(r[k] for r in self.runs) for k in self.runs[0]}
        return out

    def outliers(self, metric: str) -> list[int]:
        """Indexes of runs whose `metric` is over OUTLIER_FACTOR times the median run's: a stall, not noise."""
        if len(self.runs) < 2:
            return []
        median = statistics.median(r[metric] for r in self.runs)
        return [i for i, r in enumerate(self.runs) if median > 0 and r[metric] > OUTLIER_FACTOR * median]


@dataclass
class SuiteResult:
    scenarios: list[Scenario]
    systems: list[SystemEntry]
    cells: dict[tuple[str, str], Cell]  # (scenario name, system name) -> Cell
    runs: int
    quick: bool
    elapsed_s: float

    def ratio(self, scenario: Scenario) -> tuple[float | None, str | None]:
        """walsvc against the best peer, >1 meaning walsvc is better (inverted when lower is better)."""
        subject = self.cells.get((scenario.name, SUBJECT))
        subject_stats = subject.stats(scenario.metric) if subject else None
        peers = [(c.stats(scenario.metric), sysname) for (sname, sysname), c in self.cells.items()
                 if sname == scenario.name and sysname != SUBJECT]
        peers = [(s["median"], n) for s, n in peers if s]
        if not subject_stats or not peers:
            return None, None
        pick = max if scenario.higher_is_better else min
        best, best_name = pick(peers)
        mine = subject_stats["median"]
        if best <= 0 or mine <= 0:
            return None, best_name
        return (mine / best if scenario.higher_is_better else best / mine), best_name

    def target_results(self, scenario: Scenario) -> list[tuple[Target, float | None, bool | None]]:
        """Each target with the figure it is judged on (a ratio, or walsvc's median) and whether it is met."""
        out = []
        mine = self.cells.get((scenario.name, SUBJECT))
        mine_stats = mine.stats(scenario.metric) if mine else None
        for target in scenario.targets:
            figure = None
            if mine_stats:
                ours = mine_stats["medians"].get(target.metric)
                if target.peer is None:
                    figure = ours
                else:
                    peer = self.cells.get((scenario.name, target.peer))
                    peer_stats = peer.stats(scenario.metric) if peer else None
                    theirs = peer_stats["medians"].get(target.metric) if peer_stats else None
                    if ours and theirs:
                        figure = theirs / ours if target.lower_is_better else ours / theirs
            if figure is None:
                met = None
            elif target.peer is None and target.at_most:
                met = figure <= target.value
            else:
                met = figure >= target.value
            out.append((target, figure, met))
        return out

    def below_rate(self, scenario: Scenario, system: str) -> float | None:
        """The median rate `system` really sent in a paced scenario, if under RATE_SHORTFALL of the rate asked:
        its latency was then measured at a lighter load than the others' (a client that waits for each reply
        cannot keep up), which a comparison must say."""
        rate = scenario.params.get("rate")
        cell = self.cells.get((scenario.name, system))
        stats = cell.stats(scenario.metric) if cell and rate else None
        sent = stats["medians"].get("sent_per_s") if stats else None
        return sent if sent is not None and sent < RATE_SHORTFALL * rate else None

    def flagged(self) -> list[tuple[str, str, int, float]]:
        """(scenario, system, run number, p99) for every latency run the outlier guard flags."""
        out = []
        for scenario in self.scenarios:
            if scenario.kind != "latency":
                continue
            for entry in self.systems:
                cell = self.cells.get((scenario.name, entry.name))
                for i in cell.outliers("p99_us") if cell else ():
                    out.append((scenario.name, entry.name, i + 1, cell.runs[i]["p99_us"]))
        return out

    def contended(self, cpus: int | None) -> list[tuple[str, str, int, float]]:
        """(scenario, system, run number, cores stolen) for every run during which the hypervisor took at least
        STOLEN_SHARE of the machine's `cpus` (none when that is unknown): such a run measured the VM as much as
        the system."""
        out: list[tuple[str, str, int, float]] = []
        if not cpus:
            return out
        for scenario in self.scenarios:
            for entry in self.systems:
                cell = self.cells.get((scenario.name, entry.name))
                for i, run in enumerate(cell.runs if cell else ()):
                    if run.get("steal_cores", 0.0) >= STOLEN_SHARE * cpus:
                        out.append((scenario.name, entry.name, i + 1, run["steal_cores"]))
        return out

    def uncontended(self, cpus: int | None) -> "SuiteResult | None":
        """This result with the contended runs (see `contended`) left out, or None when there are none:
        the runs a verdict can trust on a VM whose neighbours come and go."""
        if not self.contended(cpus):
            return None
        limit = STOLEN_SHARE * (cpus or 0)
        cells = {key: Cell(runs=[r for r in cell.runs if r.get("steal_cores", 0.0) < limit], na=cell.na,
                           errors=cell.errors) for key, cell in self.cells.items()}
        return SuiteResult(self.scenarios, self.systems, cells, self.runs, self.quick, self.elapsed_s)

    @property
    def failed(self) -> bool:
        return any(c.errors for c in self.cells.values())


def format_value(value: float, unit: str) -> str:
    """Numbers as a reader wants them: thousands separators for counts, decimals only where they matter."""
    if unit in ("cores busy", "cores stolen"):
        return f"{value:.2f}"
    if unit == "MiB/s" or abs(value) < 100:
        return f"{value:,.1f}"
    return f"{value:,.0f}"


FIGURE_UNITS = {"records_per_s": "rec/s", "mib_per_s": "MiB/s", "cpu_s_per_million": "CPU s/M rec",
                "p50_us": "us p50", "p99_us": "us p99", "p999_us": "us p99.9", "max_us": "us max",
                "rotations": "rotations", "samples": "samples",
                "seconds": "s", "sent_per_s": "sent/s", "cpu_cores": "cores busy", "steal_cores": "cores stolen"}


def other_figures(scenario: Scenario, figures: dict[str, float]) -> str:
    """The figures besides the scenario's metric, e.g. "52.1 MiB/s, 18.4 CPU s/M rec"."""
    return ", ".join(f"{format_value(value, FIGURE_UNITS.get(key, key))} {FIGURE_UNITS.get(key, key)}"
                     for key, value in figures.items() if key != scenario.metric)


def run_suite(systems: list[SystemEntry], suite: list[Scenario], runs: int, quick: bool, scratch: str,
              log: Callable[[str], None] = print) -> SuiteResult:
    """Run every (scenario, system) `runs` times, interleaved run by run so drift hits all systems alike."""
    usable = [s for s in systems if s.module is not None and s.unavailable is None]
    cells: dict[tuple[str, str], Cell] = {}
    plan = []
    for scenario in suite:
        for entry in usable:
            cell = cells[(scenario.name, entry.name)] = Cell()
            cell.na = scenario.applies_to(entry.module)
            if cell.na is None:
                plan.append((scenario, entry))
    total = len(plan) * runs
    began = time.monotonic()
    step = 0
    os.makedirs(scratch, exist_ok=True)
    for run in range(runs):
        for scenario, entry in plan:
            step += 1
            cell = cells[(scenario.name, entry.name)]
            tmpdir = os.path.join(scratch, f"{step:04d}-{entry.name}-{scenario.kind}")
            os.makedirs(tmpdir)
            try:
                measure = getattr(entry.module, scenario.kind)
                before = machine_cpu()
                result = {k: float(v) for k, v in measure(tmpdir, **scenario.params).items()}
                stolen = cpu_cores(before, machine_cpu()).get("steal_cores")
                if "steal_cores" not in result and stolen is not None:  # latency runs measure their own window
                    result["steal_cores"] = stolen
                cell.runs.append(result)
                line = (f"{format_value(result[scenario.metric], scenario.unit)} {scenario.unit}"
                        f" ({other_figures(scenario, result)})")
            except Exception as exc:  # noqa: BLE001 - one broken system must not stop the others' figures
                cell.errors.append(f"run {run + 1}: {exc}")
                line = f"FAILED: {exc}"
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
            log(f"[{step}/{total}] {entry.name} {scenario.name}: {line}")
    return SuiteResult(suite, systems, cells, runs, quick, time.monotonic() - began)

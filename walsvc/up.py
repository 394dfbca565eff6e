"""`walsvc up`: the writer plus N producer and M consumer workers, with a live throughput line.

The workers are the `walsvc.workers` modules, or with `--workers DIR` your own programs of the same names
loaded from DIR, each in its own process started with the `multiprocess` package.

`up` always ends, and takes its children with it:
- `--seconds`, the first Ctrl-C, SIGTERM, SIGHUP or a closed stdout (`walsvc up | head`) start an orderly stop
  with a bound on every step: producers first, consumers once they caught up, the writer last (it drains and
  fsyncs).  A step that overruns its bound is ended with SIGKILL.
- A second signal during the stop SIGKILLs every child at once.
- Each child runs in its own process group (a terminal's Ctrl-C reaches only this process, which decides the
  order) and asks the kernel to signal it when this process dies (PR_SET_PDEATHSIG), so even a SIGKILL of
  `up` leaves no worker writing and no writer holding the log lock.
Flags shared with children are plain shared integers, never locks: a SIGKILLed child cannot leave one held.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import multiprocess as mp

from .config import Config, cpu_list
from .errors import ConfigError

WORKER_FILES = ("producer_worker.py", "consumer_worker.py")
PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = 30.0
PRODUCER_STOP_S = 5.0     # producers flush what they appended, then exit
CONSUMER_CATCH_UP_S = 10.0  # only while they are behind; the summary reports any lag left
CONSUMER_STOP_S = 3.0
WRITER_STOP_S = 10.0      # SIGTERM: drain, fsync, close
KILL_WAIT_S = 5.0


def find_workers(explicit: str | None) -> Path | None:
    """The directory of the user's own worker programs (--workers), or None for the built-in `walsvc.workers`."""
    if explicit is None:
        return None
    directory = Path(explicit)
    missing = [f for f in WORKER_FILES if not (directory / f).is_file()]
    if missing:
        raise ConfigError("--workers", f"no worker program {', '.join(missing)} in {directory}")
    return directory


def load_worker(directory: Path | None, filename: str) -> ModuleType:
    if directory is None:
        return importlib.import_module(f"walsvc.workers.{filename[:-3]}")
    spec = importlib.util.spec_from_file_location(f"walsvc_worker_{filename[:-3]}", directory / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Flag:
    """A stop flag the parent sets and children poll; lock-free, so a killed child cannot wedge it."""

    def __init__(self, ctx: Any) -> None:
        self._value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)


def _die_with_parent(parent_pid: int, sig: int) -> None:
    """First thing in every child: leave the terminal's process group and die (by `sig`) with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # not the parent's handlers, inherited through fork
        signal.signal(sig, signal.SIG_DFL)
    os.setpgid(0, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _serve(cfg: Config, parent_pid: int, conn: Any) -> None:
    from .writer import Writer
    _die_with_parent(parent_pid, signal.SIGTERM)  # SIGTERM: the writer drains, fsyncs and releases the lock
    try:
        writer = Writer(cfg)
    except Exception as exc:  # reported by the parent as one line (LogLockedError names the holder's pid)
        conn.send(("error", str(exc) or type(exc).__name__))
        sys.exit(1)
    writer.install_signal_handlers()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(("ready", os.getpid()))
    writer.serve()


def _worker(parent_pid: int, directory: Path | None, filename: str, cpus: set[int] | None, kwargs: dict) -> None:
    _die_with_parent(parent_pid, signal.SIGKILL)
    if cpus:
        os.sched_setaffinity(0, cpus)
    load_worker(directory, filename).run(**kwargs)


def worker_cpus(cfg: Config) -> set[int] | None:
    """Where the workers run when the writer has CPUs of its own (`[service] cpus`): on the others this process
    may use, so that the writer's loop never waits behind them for a core.  None (anywhere) when the writer
    is not pinned, or its CPUs leave no other."""
    if not cfg.service.cpus:
        return None
    return (os.sched_getaffinity(0) - cpu_list(cfg.service.cpus)) or None


class Supervisor:
    """The parent's side: children, the reason to stop, and escalation on a second signal."""

    def __init__(self) -> None:
        self.children: list[Any] = []
        self.reason: str | None = None
        self.forced = False

    def request_stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            return
        if not self.forced:
            self.forced = True
            self.kill_all()

    def on_signal(self, signum: int, _frame: Any) -> None:
        """Only flags and kill(2): printing here could re-enter a stdout write the main loop is in."""
        self.request_stop(signal.Signals(signum).name)

    def kill_all(self) -> None:
        for p in self.children:
            kill(p, signal.SIGKILL)

    def join(self, procs: list[Any], seconds: float) -> None:
        """Wait up to `seconds` for `procs` to exit; SIGKILL the rest (and every child once forced)."""
        procs = [p for p in procs if p.pid is not None]  # a stop during start-up leaves some never started
        deadline = time.monotonic() + seconds
        for p in procs:
            while p.is_alive() and time.monotonic() < deadline and not self.forced:
                p.join(0.05)
        for p in procs:
            if p.is_alive():
                kill(p, signal.SIGKILL)
        for p in procs:
            p.join(KILL_WAIT_S)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.reason is None and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def kill(p: Any, sig: int) -> None:
    if p.pid is not None and p.exitcode is None:
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass


class Output:
    """stdout that turns a closed pipe (`walsvc up | head`) into a stop request instead of an exception."""

    def __init__(self) -> None:
        self.closed = False
        self.on_close: Callable[[], None] = lambda: None

    def __call__(self, line: str) -> None:
        if self.closed:
            return
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except (BrokenPipeError, ValueError, OSError):
            self.closed = True
            devnull = os.open(os.devnull, os.O_WRONLY)  # so that no later flush (at exit) raises again
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            self.on_close()


def _disk_usage(directory: Path) -> tuple[int, int]:
    """(bytes allocated on disk, apparent size) of everything under `directory`."""
    used = size = 0
    for root, _dirs, files in os.walk(directory):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except FileNotFoundError:
                continue
            used += st.st_blocks * 512
            size += st.st_size
    return used, size


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def run(cfg: Config, *, producers: int, consumers: int, seconds: float, record_bytes: int,
        workers_dir: str | None) -> int:
    workers = find_workers(workers_dir)
    out = Output()
    sup = Supervisor()
    out.on_close = lambda: sup.request_stop("stdout closed")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, sup.on_signal)
    try:
        return _run(cfg, sup, out, workers, producers, consumers, seconds, record_bytes)
    finally:
        sup.kill_all()  # only children still running: an exception above must not orphan any
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)


def _run(cfg: Config, sup: Supervisor, out: Output, workers: Path | None, producers: int, consumers: int,
         seconds: float, record_bytes: int) -> int:
    ctx = mp.get_context("fork")
    me = os.getpid()
    started = time.monotonic()
    cfg.directory.mkdir(parents=True, exist_ok=True)
    rx, tx = ctx.Pipe(duplex=False)
    writer = ctx.Process(target=_serve, args=(cfg, me, tx), name="walsvc-writer")
    writer.start()
    sup.children.append(writer)
    tx.close()
    while not rx.poll(0.05):
        if not writer.is_alive() or sup.reason or time.monotonic() - started > START_TIMEOUT_S:
            sup.join([writer], 0 if writer.is_alive() and not sup.reason else WRITER_STOP_S)
            why = sup.reason or ("it exited" if writer.exitcode is not None else f"not within {START_TIMEOUT_S:.0f} s")
            print(f"walsvc: error: up: the writer did not start ({why})", file=sys.stderr)
            return 1
    try:
        state, detail = rx.recv()
    except EOFError:
        state, detail = "error", "it exited without a word"
    if state != "ready":
        sup.join([writer], KILL_WAIT_S)
        print(f"walsvc: error: up: {detail}", file=sys.stderr)
        return 1

    stop_producers, stop_consumers = Flag(ctx), Flag(ctx)
    produced = [ctx.RawValue("q", 0) for _ in range(producers)]
    consumed = [ctx.RawValue("q", 0) for _ in range(consumers)]
    lags = [ctx.RawValue("q", 0) for _ in range(consumers)]
    cpus = worker_cpus(cfg)
    procs = [ctx.Process(target=_worker, name=f"producer-{i}", args=(me, workers, "producer_worker.py", cpus, {
        "directory": str(cfg.directory), "record_bytes": record_bytes, "stop": stop_producers,
        "counter": produced[i], "worker": i})) for i in range(producers)]
    procs += [ctx.Process(target=_worker, name=f"consumer-{i}", args=(me, workers, "consumer_worker.py", cpus, {
        "directory": str(cfg.directory), "name": f"consumer-{i}", "stop": stop_consumers,
        "counter": consumed[i], "lag": lags[i]})) for i in range(consumers)]
    for p in procs:
        if sup.reason:
            break
        p.start()
        sup.children.append(p)
    prod_procs, cons_procs = procs[:producers], procs[producers:]

    def total(values: list[Any]) -> int:
        return sum(v.value for v in values)

    out(f"walsvc up: writer pid {writer.pid}, producer pids {[p.pid for p in prod_procs]}, consumer pids "
        f"{[p.pid for p in cons_procs]}; data in {cfg.directory.resolve()} (fsync={cfg.log.fsync}); "
        + (f"stops after {seconds:g} s or Ctrl-C" if seconds else "Ctrl-C to stop"))
    deadline = started + seconds if seconds else float("inf")
    last_t, last_p, last_c = time.monotonic(), 0, [0] * consumers
    while sup.reason is None:
        sup.sleep(min(1.0, deadline - time.monotonic()))
        now = time.monotonic()
        if sup.reason is None and now >= deadline:
            sup.request_stop(f"--seconds {seconds:g}")
        if sup.reason is not None:
            break
        p_now, c_now = total(produced), [c.value for c in consumed]
        dt = max(now - last_t, 1e-6)
        rates = " ".join(f"{(c - lc) / dt:,.0f}" for c, lc in zip(c_now, last_c))
        out(f"[{now - started:5.1f}s] produced {(p_now - last_p) / dt:12,.0f} rec/s (total {p_now:,})  "
            f"consumed/s [{rates}]  lag [{' '.join(str(v.value) for v in lags)}]")
        last_t, last_p, last_c = now, p_now, c_now
        failed = [p for p in procs if p.exitcode not in (None, 0)]
        if not writer.is_alive() or failed:
            who = "the writer" if not writer.is_alive() else failed[0].name
            print(f"walsvc: error: up: {who} exited early (exit code "
                  f"{(writer if who == 'the writer' else failed[0]).exitcode})", file=sys.stderr)
            sup.request_stop(f"{who} exited")
    elapsed = time.monotonic() - started
    out(f"walsvc up: stopping ({sup.reason}): producers, then consumers, then the writer; "
        "Ctrl-C again kills everything now")

    stop_producers.set()
    sup.join(prod_procs, PRODUCER_STOP_S)
    produced_for = time.monotonic() - started  # records still in flight at the stop are acked in the join
    catch_up = time.monotonic() + CONSUMER_CATCH_UP_S
    while (not sup.forced and time.monotonic() < catch_up and writer.is_alive()
           and any(c.value < total(produced) for c, p in zip(consumed, cons_procs) if p.is_alive())):
        time.sleep(0.05)
    consumed_for = time.monotonic() - started
    stop_consumers.set()
    sup.join(cons_procs, CONSUMER_STOP_S)
    latency = _writer_latency(cfg.directory) if writer.is_alive() and not sup.forced else None
    kill(writer, signal.SIGTERM)
    sup.join([writer], WRITER_STOP_S)

    acked, c_final = total(produced), [c.value for c in consumed]
    used, size = _disk_usage(cfg.directory)
    say = out if not out.closed else (lambda line: print(line, file=sys.stderr))
    say(f"walsvc up: done; {acked:,} records acknowledged, consumed {c_final}, writer exit code {writer.exitcode}")
    say(f"  stopped by: {sup.reason}{' (forced: every child killed)' if sup.forced else ''}; "
        f"ran {elapsed:.1f} s; producers until their last ack {produced_for:.1f} s, consumers until they "
        f"caught up {consumed_for:.1f} s")
    # Each rate over its own span: consumers that catch up after the stop read at their rate, not the producers'.
    say(f"  rates: produced {acked / produced_for:,.0f} rec/s, consumed "
        f"[{' '.join(f'{c / consumed_for:,.0f}' for c in c_final)}] rec/s")
    if latency and latency.get("count"):
        say(f"  append-to-ack latency (writer): p50 {latency['p50_us']:,.0f} us, p99 {latency['p99_us']:,.0f} us, "
            f"max {latency['max_us']:,.0f} us over {latency['count']:,} batches")
    say(f"  final lag: [{' '.join(str(max(0, acked - c)) for c in c_final)}] records")
    say(f"  data: {cfg.directory.resolve()}: {_mb(used)} on disk ({_mb(size)} apparent); "
        f"delete it with rm -r, or read it with walsvc tail/dump --dir")
    if sup.forced:
        return 130
    return 0 if writer.exitcode == 0 else 1


def _writer_latency(directory: Path) -> dict[str, Any] | None:
    """The writer's append-to-ack histogram summary, or None if it does not answer in time."""
    from .status import query_writer
    status = query_writer(directory)
    return status.get("append_to_ack_latency") if status else None

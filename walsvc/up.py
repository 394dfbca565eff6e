"""`walsvc up`: the writer plus N producer and M consumer workers, with a live throughput line.

The workers are the programs in `workers/` (loaded by path, so a checkout, an installed copy or your own
directory all work), each in its own process started with the `multiprocess` package.  Ctrl-C (or
`--seconds`) stops producers first, lets the writer drain and fsync, then stops consumers and the writer.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
import time
from pathlib import Path
from types import ModuleType

import multiprocess as mp

from .config import Config
from .errors import ConfigError

WORKER_FILES = ("producer_worker.py", "consumer_worker.py")


def find_workers(explicit: str | None) -> Path:
    """The directory holding the worker programs: --workers, ./workers, or the copy installed with walsvc."""
    here = Path(__file__).resolve().parent
    candidates = [Path(explicit)] if explicit else [Path.cwd() / "workers", here / "workers", here.parent / "workers"]
    for c in candidates:
        if all((c / f).is_file() for f in WORKER_FILES):
            return c
    raise ConfigError("--workers", f"no worker programs ({', '.join(WORKER_FILES)}) in "
                      f"{', '.join(map(str, candidates))}")


def load_worker(directory: Path, filename: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"walsvc_worker_{filename[:-3]}", directory / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _serve(cfg: Config, ready: "mp.Event") -> None:
    from .writer import Writer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    writer = Writer(cfg)
    writer.install_signal_handlers()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ready.set()
    writer.serve()


def _worker(path: str, filename: str, kwargs: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    load_worker(Path(path), filename).run(**kwargs)


def run(cfg: Config, *, producers: int, consumers: int, seconds: float, record_bytes: int,
        workers_dir: str | None) -> int:
    workers = find_workers(workers_dir)
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    writer = ctx.Process(target=_serve, args=(cfg, ready), name="walsvc-writer")
    writer.start()
    if not ready.wait(30):
        writer.terminate()
        print("walsvc up: the writer did not start within 30 s", file=sys.stderr)
        return 1
    stop_producers, stop_consumers = ctx.Event(), ctx.Event()
    produced = ctx.Value("q", 0)
    consumed = [ctx.Value("q", 0) for _ in range(consumers)]
    lags = [ctx.Value("q", 0) for _ in range(consumers)]
    procs = [ctx.Process(target=_worker, args=(str(workers), "producer_worker.py", {
        "directory": str(cfg.directory), "record_bytes": record_bytes, "stop": stop_producers,
        "counter": produced, "worker": i})) for i in range(producers)]
    procs += [ctx.Process(target=_worker, args=(str(workers), "consumer_worker.py", {
        "directory": str(cfg.directory), "name": f"consumer-{i}", "stop": stop_consumers,
        "counter": consumed[i], "lag": lags[i]})) for i in range(consumers)]
    for p in procs:
        p.start()
    print(f"walsvc up: writer pid {writer.pid} on {cfg.directory} (fsync={cfg.log.fsync}), {producers} producers, "
          f"{consumers} consumers; Ctrl-C to stop", flush=True)
    started = last_t = time.monotonic()
    last_p, last_c = 0, [0] * consumers
    try:
        while not seconds or time.monotonic() - started < seconds:
            time.sleep(1.0)
            now = time.monotonic()
            p_now, c_now = produced.value, [c.value for c in consumed]
            dt = now - last_t
            rates = " ".join(f"{(c - lc) / dt:,.0f}" for c, lc in zip(c_now, last_c))
            print(f"[{now - started:5.1f}s] produced {(p_now - last_p) / dt:12,.0f} rec/s (total {p_now:,})  "
                  f"consumed/s [{rates}]  lag [{' '.join(str(l.value) for l in lags)}]", flush=True)
            last_t, last_p, last_c = now, p_now, c_now
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if not writer.is_alive() or failed:
                print(f"walsvc up: {'the writer' if not writer.is_alive() else failed[0].name} exited early",
                      file=sys.stderr)
                break
    except KeyboardInterrupt:
        print("\nwalsvc up: stopping", flush=True)
    stop_producers.set()
    for p in procs[:producers]:
        p.join(90)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(c.value < produced.value for c in consumed):
        time.sleep(0.1)
    stop_consumers.set()
    for p in procs[producers:]:
        p.join(30)
    writer.terminate()  # SIGTERM: drain, fsync, exit 0
    writer.join(30)
    print(f"walsvc up: done; {produced.value:,} records acknowledged, consumed "
          f"{[c.value for c in consumed]}, writer exit code {writer.exitcode}", flush=True)
    return 0 if writer.exitcode == 0 else 1

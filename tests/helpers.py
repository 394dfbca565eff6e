"""Shared helpers for the service tests: real writer processes, real sockets, real files, no mocks.

Imported by tests/test_service.py, test_faults.py, test_cli.py and scripts/soak_kill9.py.  Also runnable as
a program (`python tests/helpers.py producer|reader ...`) so that tests can start producer and reader
*processes* that use the public walsvc API and record what they saw in plain files:

- producer: appends records with keys `p<index>-<counter:08d>` and writes one `key<TAB>lsn` line per acked
  record to its output file (in append order, flushed as acks arrive);
- reader: tails the log with `walsvc.Reader` and writes one `lsn<TAB>key<TAB>value-length` line per record.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve()
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import zmq  # noqa: E402

from walsvc import protocol as P  # noqa: E402
from walsvc.endpoints import load as load_endpoints  # noqa: E402
from walsvc.scan import LogReader  # noqa: E402
from walsvc.record import Record  # noqa: E402

READY_LINE = "walsvc writer ready"
STOPPED_LINE = "walsvc writer stopped"


def python_env() -> dict[str, str]:
    """The environment for child Pythons: the source tree first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONSTARTUP", None)
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def walsvc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "walsvc", *map(str, args)]


def run_cli(*args: str, input: str | bytes | None = None, timeout: float = 60.0,
            text: bool = True) -> subprocess.CompletedProcess:
    """`python -m walsvc ARGS` to completion (cwd = the repo root, so the source tree is what runs)."""
    return subprocess.run(walsvc_cmd(*args), input=input, capture_output=True, text=text, timeout=timeout,
                          cwd=REPO_ROOT, env=python_env())


def run_all(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Independent `walsvc` commands at once: each spends most of its time starting Python."""
    procs = [subprocess.Popen(walsvc_cmd(*c), cwd=REPO_ROOT, env=python_env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    out = []
    for c, p in zip(commands, procs):
        stdout, stderr = p.communicate(timeout=60)
        out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    return out


def run_with_terminal_stderr(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """`python -m walsvc ARGS` with stderr on a pseudo-terminal (80x24), as a person at a terminal runs it;
    returns (exit code, stdout, what the terminal showed).  Skips the test where no pty can be opened."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    import pytest
    try:
        master, slave = pty.openpty()
    except OSError as exc:  # a container without /dev/ptmx
        pytest.skip(f"no pseudo-terminal: {exc}")
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new pty is 0x0: tqdm hides
    proc = subprocess.Popen(walsvc_cmd(*args), stdout=subprocess.PIPE, stderr=slave, cwd=REPO_ROOT,
                            env=python_env())
    os.close(slave)
    stdout_fd = proc.stdout.fileno()
    out = {master: b"", stdout_fd: b""}
    open_fds = set(out)
    while open_fds:  # read both, or a child writing much to stdout blocks on the full pipe
        ready = select.select(list(open_fds), [], [], timeout)[0]
        if not ready:
            break
        for fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if chunk:
                out[fd] += chunk
            else:
                open_fds.discard(fd)
    os.close(master)
    proc.wait(timeout)
    proc.stdout.close()
    return proc.returncode, out[stdout_fd].decode(errors="replace"), out[master].decode(errors="replace")


# -- the writer process ------------------------------------------------------------------------------------

class WriterProcess:
    """`python -m walsvc serve --dir D [--fsync P] [--config F]` as a subprocess, its output in files.

    Output goes to files, not pipes, so a writer that logs a lot never blocks on a full pipe and the output
    of every incarnation (restart) stays available for assertions.
    """

    def __init__(self, directory: Path, *, fsync: str | None = None, config: Path | None = None,
                 logs: Path | None = None, wrapper: Iterable[str] = (), env: dict[str, str] | None = None) -> None:
        """`wrapper` prefixes the command (e.g. fiu-run -x) and `env` adds variables (e.g. LD_PRELOAD), for
        every incarnation started with `start(faulty=True)`."""
        self.directory = Path(directory)
        self.fsync = fsync
        self.config = config
        self.wrapper = list(wrapper)
        self.extra_env = dict(env or {})
        self.logs = Path(logs) if logs is not None else self.directory.parent / f"{self.directory.name}-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.ready_line = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _paths(self) -> tuple[Path, Path]:
        return self.logs / f"writer-{self.starts}.out", self.logs / f"writer-{self.starts}.err"

    def start(self, timeout: float = 30.0, *, faulty: bool = True) -> "WriterProcess":
        """Start a new incarnation and wait for its ready line (AssertionError with its stderr if none).
        `faulty=False` starts it without the wrapper and extra environment (a restart after a fault)."""
        assert self.proc is None or self.proc.poll() is not None, "writer already running"
        self.starts += 1
        out, err = self._paths()
        args = ["serve", "--dir", str(self.directory)]
        if self.fsync:
            args += ["--fsync", self.fsync]
        if self.config:
            args += ["--config", str(self.config)]
        env = python_env()
        cmd = walsvc_cmd(*args)
        if faulty:
            env.update(self.extra_env)
            cmd = self.wrapper + cmd
        with open(out, "wb") as fo, open(err, "wb") as fe:
            self.proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            for line in out.read_text(errors="replace").splitlines():
                if line.startswith(READY_LINE):
                    self.ready_line = line
                    return self
            if self.proc.poll() is not None:
                raise AssertionError(f"writer exited with {self.proc.returncode} before its ready line; "
                                     f"stdout: {self.stdout()!r} stderr: {self.stderr()!r}")
            if time.monotonic() >= deadline:
                self.kill9()
                raise AssertionError(f"writer not ready after {timeout} s; stderr: {self.stderr()!r}")
            time.sleep(0.02)

    def ready_committed_lsn(self) -> int:
        """The committed LSN the current incarnation reported on its ready line (after recovery)."""
        return int(self.ready_line.rsplit("committed_lsn=", 1)[1].split()[0])

    def stdout(self) -> str:
        return self._paths()[0].read_text(errors="replace")

    def stderr(self) -> str:
        return self._paths()[1].read_text(errors="replace")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"writer did not exit within {timeout} s of SIGTERM") from None

    def kill9(self) -> None:
        """SIGKILL and reap (an unreaped zombie would still look alive to readers checking the PID)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        """For fixtures: make sure no incarnation outlives the test."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


# -- talking to a writer -------------------------------------------------------------------------------------

def control(directory: Path, op: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """One request on the writer's control socket; AssertionError if no reply within `timeout`."""
    eps = load_endpoints(directory)
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(eps.control)
        sock.send(P.encode_request(op, **args))
        if not sock.poll(int(timeout * 1000)):
            raise AssertionError(f"no reply to control op {op!r} within {timeout} s")
        return json.loads(sock.recv())
    finally:
        ctx.destroy(linger=0)


def status(directory: Path) -> dict[str, Any]:
    reply = control(directory, "status")
    assert reply["ok"], reply
    return reply


def read_log(directory: Path) -> list[Record]:
    """Every valid record on disk, read directly from the files (no bound: meant for a stopped writer)."""
    with LogReader(directory, "earliest") as reader:
        return list(reader)


def verify_log(directory: Path) -> list[Record]:
    """Check the whole log: `walsvc.verify.verify` when that module exists, and always a full read in which
    every frame's CRC is checked and LSNs strictly increase.  Returns the records."""
    try:
        from walsvc.verify import verify  # type: ignore[import-not-found]
    except ImportError:
        verify = None
    if verify is not None:
        report = verify(directory)
        assert report.ok, report.summary()
    records = read_log(directory)
    lsns = [r.lsn for r in records]
    assert all(a < b for a, b in zip(lsns, lsns[1:])), "LSNs do not strictly increase"
    return records


class RawClient:
    """A plain-pyzmq client speaking the wire protocol directly (docs/PROTOCOL.md): PUSH + SUB, and nothing
    sent for a producer id before the writer's READY on its reply topic."""

    def __init__(self, directory: Path, producer_ids: Iterable[int] = ()) -> None:
        eps = load_endpoints(directory)
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 1000)
        self.push.connect(eps.ingest)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(eps.publish)
        self.replies: list[P.Reply] = []
        for pid in producer_ids:
            self.subscribe(pid)

    def subscribe(self, producer_id: int, timeout: float = 10.0) -> None:
        """Subscribe to the producer's replies and wait for the writer's READY on them."""
        self.sub.setsockopt(zmq.SUBSCRIBE, P.reply_topic(producer_id))
        ready = self.wait_reply(producer_id, 0, timeout)
        assert ready.status == P.READY, ready

    def send(self, msg: bytes) -> None:
        self.push.send(msg)

    def collect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sub.poll(max(1, int(remaining * 1000))):
                return
            while True:
                try:
                    self.replies.append(P.decode_reply(self.sub.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break

    def wait_reply(self, producer_id: int, seq: int, timeout: float = 10.0) -> P.Reply:
        """The first not-yet-consumed reply for (producer_id, seq); it is removed from `replies`.  READY is
        the reply with sequence 0."""
        deadline = time.monotonic() + timeout
        while True:
            for i, r in enumerate(self.replies):
                if r.producer_id == producer_id and r.seq == seq:
                    return self.replies.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no reply for producer {producer_id:x} seq {seq} within {timeout} s; "
                                     f"other replies: {self.replies}")
            self.collect(min(remaining, 0.05))

    def sync(self, producer_id: int, payload: bytes, timeout: float = 10.0) -> P.Reply:
        """Subscribe (READY proves the writer has the subscription), then send (producer_id, seq 1) once:
        its reply cannot be dropped."""
        self.subscribe(producer_id, timeout)
        self.send(P.encode_append(producer_id, 1, 1, payload))
        return self.wait_reply(producer_id, 1, timeout)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


# -- producer and reader processes -----------------------------------------------------------------------

def producer_key(index: int, counter: int) -> str:
    return f"p{index}-{counter:08d}"


def parse_key(key: str) -> tuple[int, int]:
    """(producer index, counter) from a producer key."""
    who, counter = key[1:].split("-")
    return int(who), int(counter)


def spawn_helper(*args: str, stdout: Any = subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HELPERS), *map(str, args)], cwd=REPO_ROOT, env=python_env(),
                            stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def spawn_producer(directory: Path, index: int, out: Path, *, count: int = 0, stop_file: Path | None = None,
                   batch: int = 20, pause_s: float = 0.005, ack_timeout_s: float = 2.0,
                   in_flight_one: bool = False, value_bytes: int = 32, until_stopped: bool = False,
                   unwatched: bool = False) -> subprocess.Popen:
    """A producer process; `until_stopped`: a LogStoppedError ends it (exit 0), and each key it failed is
    written to `out` + ".stopped" (see `read_stopped`); `unwatched`: it looks at no record until the end
    (acks are taken in bulk, walsvc/producer.py), then flushes and writes every ack to `out`."""
    args = ["producer", "--dir", directory, "--index", index, "--out", out, "--count", count, "--batch", batch,
            "--pause", pause_s, "--ack-timeout", ack_timeout_s, "--value-bytes", value_bytes]
    if stop_file is not None:
        args += ["--stop-file", stop_file]
    if in_flight_one:
        args.append("--in-flight-one")
    if until_stopped:
        args.append("--until-stopped")
    if unwatched:
        args.append("--unwatched")
    return spawn_helper(*args)


def spawn_reader(directory: Path, out: Path, *, expect: int = 0, until_file: Path | None = None,
                 start: str = "earliest") -> subprocess.Popen:
    """A reader process; it prints "reader ready" once its Reader exists (use `wait_ready`)."""
    args = ["reader", "--dir", directory, "--out", out, "--expect", expect, "--start", start]
    if until_file is not None:
        args += ["--until-file", until_file]
    return spawn_helper(*args, stdout=subprocess.PIPE)


def wait_ready(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait for a helper process's "ready" line on stdout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "ready" in line:
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"helper process not ready: {proc.stderr.read()}")


def finish(proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Wait for a helper process to exit 0; kill it and fail with its stderr otherwise."""
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"{what} did not finish within {timeout} s; stderr: {proc.stderr.read()}") from None
    err = proc.stderr.read()
    assert rc == 0, f"{what} exited with {rc}: {err}"


def read_lines(path: Path) -> list[list[str]]:
    """TAB-separated fields of every complete line (a line cut short by a kill is ignored)."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")[:-1]  # the last element is "" or an incomplete line
    return [line.split("\t") for line in lines]


def read_acks(path: Path) -> list[tuple[str, int | None]]:
    return [(key, None if lsn == "None" else int(lsn)) for key, lsn in read_lines(path)]


def read_stopped(out: Path) -> list[str]:
    """Keys an `until_stopped` producer saw fail with LogStoppedError (a log_stopped nack)."""
    return [fields[0] for fields in read_lines(Path(str(out) + ".stopped"))]


def read_seen(path: Path) -> list[tuple[int, str, int]]:
    return [(int(lsn), key, int(vlen)) for lsn, key, vlen in read_lines(path)]


def collect_acks(outs: Iterable[Path]) -> dict[str, int | None]:
    """key -> acked LSN over every producer output file; AssertionError if a key was acked twice."""
    acked: dict[str, int | None] = {}
    for out in outs:
        for key, lsn in read_acks(out):
            assert key not in acked, f"{key} acked twice"
            acked[key] = lsn
    return acked


def check_acked_exactly_once(records: list[Record], acked: dict[str, int | None]) -> None:
    """Every acked key is in the log exactly once, at the LSN it was acked with; no key appears twice; no
    LSN was acked to two records."""
    keys = [r.key.decode() for r in records]
    assert len(keys) == len(set(keys)), "a record is in the log twice"
    at = {r.lsn: r.key.decode() for r in records}
    where = {r.key.decode(): r.lsn for r in records}
    missing = [k for k in acked if k not in where]
    assert not missing, f"{len(missing)} acked records are not in the log, e.g. {missing[:5]}"
    lsns = [lsn for lsn in acked.values() if lsn is not None]
    assert len(lsns) == len(set(lsns)), "two records were acked with the same LSN"
    wrong = [(k, lsn, at.get(lsn)) for k, lsn in acked.items() if lsn is not None and at.get(lsn) != k]
    assert not wrong, f"acked LSNs that hold something else: {wrong[:5]}"


def _producer_main(args: argparse.Namespace) -> int:
    import walsvc
    from walsvc.errors import LogStoppedError
    pending: collections.deque = collections.deque()
    out = open(args.out, "a")
    failed = open(args.out + ".stopped", "a") if args.until_stopped else None
    counter = 0
    stopped = threading.Event()  # a record failed with LogStoppedError: the until_stopped producer ends

    def drain(block: bool) -> None:
        wrote = False
        while pending and (block or pending[0][1].done()):
            key, fut = pending.popleft()
            try:
                out.write(f"{key}\t{fut.result(60)}\n")
            except LogStoppedError:
                if failed is None:
                    raise
                failed.write(f"{key}\n")
                stopped.set()
            wrote = True
        if wrote:
            out.flush()
            if failed is not None:
                failed.flush()

    value = b"v" * args.value_bytes
    with walsvc.Producer(args.dir, ack_timeout_s=args.ack_timeout, block_timeout_s=120.0,
                         max_in_flight=1 if args.in_flight_one else 64) as producer:
        while True:
            if args.count and counter >= args.count:
                break
            if args.stop_file and os.path.exists(args.stop_file):
                break
            n = args.batch if not args.count else min(args.batch, args.count - counter)
            for _ in range(n):
                key = producer_key(args.index, counter)
                pending.append((key, producer.put(key, value)))
                counter += 1
            if args.in_flight_one:
                drain(True)
            elif not args.unwatched:
                drain(False)
            if stopped.is_set():
                break  # the writer's log stopped: what is still pending is nacked too
            if args.pause:
                time.sleep(args.pause)
        producer.flush(120)
        drain(True)
    out.close()
    return 0


def _reader_main(args: argparse.Namespace) -> int:
    import walsvc
    out = open(args.out, "a")
    seen = 0
    target: int | None = None
    start: int | str = int(args.start) if args.start.isdigit() else args.start
    with walsvc.Reader(args.dir, start) as reader:
        print("reader ready", flush=True)
        while True:
            batch = reader.poll(0.2)
            if batch:
                out.write("".join(f"{r.lsn}\t{r.key.decode()}\t{len(r.value)}\n" for r in batch))
                out.flush()
                seen += len(batch)
            if args.expect and seen >= args.expect:
                break
            if args.until_file and target is None and os.path.exists(args.until_file):
                text = Path(args.until_file).read_text().strip()
                target = int(text) if text else None
            if target is not None and reader.next_lsn > target:
                break
    out.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="producer and reader processes for the service tests")
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("producer")
    p.add_argument("--dir", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=0, help="records to append (0: until --stop-file exists)")
    p.add_argument("--stop-file")
    p.add_argument("--batch", type=int, default=20, help="records appended between pauses")
    p.add_argument("--pause", type=float, default=0.005)
    p.add_argument("--ack-timeout", type=float, default=2.0)
    p.add_argument("--value-bytes", type=int, default=32)
    p.add_argument("--in-flight-one", action="store_true", help="wait for each record's ack before the next")
    p.add_argument("--until-stopped", action="store_true",
                   help="end at a LogStoppedError; list the keys that failed in OUT.stopped")
    p.add_argument("--unwatched", action="store_true",
                   help="look at no record until the end (no done(), no result()), then flush and write every ack")
    r = sub.add_parser("reader")
    r.add_argument("--dir", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--expect", type=int, default=0, help="exit after this many records")
    r.add_argument("--until-file", help="exit once past the LSN written in this file")
    r.add_argument("--start", default="earliest")
    args = parser.parse_args(argv)
    if args.role == "producer" and args.unwatched and (args.in_flight_one or args.until_stopped):
        parser.error("--unwatched looks at no record, so it goes with neither --in-flight-one nor --until-stopped")
    return _producer_main(args) if args.role == "producer" else _reader_main(args)


if __name__ == "__main__":
    sys.exit(main())


def process_resources() -> tuple[int, int]:
    """This process's open file descriptors and threads (ZeroMQ's native ones too), from /proc."""
    with open("/proc/self/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return len(os.listdir("/proc/self/fd")), threads


def settled_resources(baseline: tuple[int, int], margin: int, timeout: float = 15.0) -> tuple[int, int]:
    """process_resources() once within `margin` of `baseline` (collecting garbage meanwhile), or the last
    reading after `timeout`: freeing an abandoned client may take a collection and a thread's wake-up."""
    import gc
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        now = process_resources()
        if all(n <= b + margin for n, b in zip(now, baseline)) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)

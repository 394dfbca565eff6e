"""Physical bounds on this machine: what any code with walsvc's transport and Python on both ends can reach.

    python benchmarks/limits.py [--dir DIR] [--samples N] [--size BYTES] [--quick]
                                [--architecture] [--producers 1,4,16] [--seconds 3]
                                [--latency] [--rate 10000] [--messages 20000] [--transports zmq,unix]

Always first, the bound for one durable record in flight: a producer that waits for each ack cannot go
faster than one round trip to the writer (two one-way ZeroMQ hops) plus the fdatasync that makes the record
durable.  Both parts are measured on the filesystem of --dir with the pyzmq build in use; it prints each
part's median and p99 and the bound in records/s.

--architecture runs the smallest Python program with walsvc's socket pattern and none of its code, under
`always`: N producer processes each loop send(one record) and wait for its own reply; one server process
polls, drains every waiting message, writes them with one pwrite into a preallocated file, makes them durable
with ONE fdatasync and replies to each.  `zmq` uses walsvc's sockets (producer PUSH -> server PULL, server
XPUB -> producer SUB, topic = the producer's id); `unix` the same shape without libzmq (AF_UNIX sockets, one
epoll loop in the server, send and receive in the producer's own thread: the shape of Redis).  It prints the
rate, CPU µs and voluntary wake-ups per record for the server and the producers: the ceiling for walsvc's
transport, and what libzmq's I/O threads cost.

--latency runs the append-to-reader path under `os` (no fsync): one producer paced like the suite's latency
scenario (benchmarks/suite/harness.py), 100 B records carrying their send time; the server writes each drain
and publishes the committed end offset (and rewrites it in a small `head` file); a reader process receives
it, preads the new bytes from the file and counts receive time - send time.  It prints p50/p99/p99.9.  With
the `zmq` transport a second run wakes the reader with an inotify watch on the head file instead of the
message (what `walsvc.Reader` does by default, walsvc/wakeup.py), and a third adds what walsvc's writer also
does under `os`: a reply per record, which a second thread of the producer takes (walsvc's producer I/O
thread); `unix+acks` does the same over Unix sockets (Redis's shape: the reply comes back on the producer's
own connection).  PERFORMANCE.md (7.3, 11.1, 12, 13) compares the suite's figures with these.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import selectors
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.roundtrip import cpu_seconds, wakeups  # noqa: E402 - needs ROOT on the path
from benchmarks.suite.harness import LATENCY_RECORD_SIZE, measure_latency, paced_send, run_workers  # noqa: E402
from walsvc.wakeup import HeadWatch  # noqa: E402

TRANSPORTS = ("zmq", "unix")
HEAD = struct.Struct("<IQ")  # producer id, sequence: the start of every record and the whole of its reply
END = struct.Struct("<Q")  # a commit message: the file offset up to which records are written
HEAD_FILE = struct.Struct("<QQ")  # the head file: that offset twice (a read racing the rewrite sees them differ)
SUBSCRIBE = b"R"  # the first message of a reader on the unix transport (a record is never one byte)
ACK = b"\x00ACK"  # --latency with acks: each reply is this topic and the record's first 8 bytes (its send time)
PROBE = -1  # the send time of a record a producer sends until acks reach it: not a latency sample
READ_CHUNK = 1 << 16
FILE_BYTES = 256 << 20  # an --architecture file: preallocated, enough for ~85k rec/s of 1 KiB for 3 s


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
    path = f"{directory}/limits-{os.getpid()}.sock"
    endpoint = f"ipc://{path}"
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
        Path(path).unlink(missing_ok=True)  # libzmq leaves the socket file of an ipc bind behind


# --------------------------------------------------------------------------------------------------------
# The skeleton: one server, producers and a reader, over ZeroMQ or plain Unix sockets
# --------------------------------------------------------------------------------------------------------


class Server(Protocol):
    """The server loop's view of a transport: take in what is waiting, answer one producer, tell readers."""

    def drain(self) -> list[tuple[Any, bytes]]: ...
    def reply(self, origin: Any, head: bytes) -> None: ...
    def publish(self, message: bytes) -> None: ...


class Client(Protocol):
    """A producer's or reader's view: send a message, wait (bounded) for the next one addressed to it."""

    def send(self, message: bytes) -> None: ...
    def recv(self, timeout_s: float) -> bytes | None: ...


class ZmqServer:
    """walsvc's writer sockets: PULL for records, one XPUB for replies (topic = producer id) and commits."""

    def __init__(self, folder: str) -> None:
        ctx = zmq.Context()
        self.pull = ctx.socket(zmq.PULL)
        self.pull.bind(f"ipc://{folder}/in")
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.SNDHWM, 1_000_000)
        self.pub.bind(f"ipc://{folder}/out")

    def drain(self) -> list[tuple[Any, bytes]]:
        """Everything waiting, after waiting up to 1 s for the first; poll(0) to look, as walsvc's drains do."""
        if not self.pull.poll(1000):
            return []
        got = [(None, self.pull.recv())]
        while self.pull.poll(0):
            got.append((None, self.pull.recv()))
        return got

    def reply(self, origin: Any, head: bytes) -> None:
        self.pub.send(head)  # starts with the producer id: its SUB's topic

    def publish(self, message: bytes) -> None:
        self.pub.send(message)


class Frames:
    """Length-prefixed messages on a byte stream, as Redis's protocol frames commands: feed what recv
    returned, take the whole messages."""

    LENGTH = struct.Struct("<I")

    def __init__(self) -> None:
        self.buffer = bytearray()

    @classmethod
    def frame(cls, message: bytes) -> bytes:
        return cls.LENGTH.pack(len(message)) + message

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        out, at = [], 0
        while len(self.buffer) - at >= self.LENGTH.size:
            (n,) = self.LENGTH.unpack_from(self.buffer, at)
            if len(self.buffer) - at - self.LENGTH.size < n:
                break
            out.append(bytes(self.buffer[at + self.LENGTH.size:at + self.LENGTH.size + n]))
            at += self.LENGTH.size + n
        del self.buffer[:at]
        return out


class UnixServer:
    """The same shape without libzmq: one epoll loop over AF_UNIX stream connections, every send and receive
    in the server's one thread, as redis-server does it."""

    def __init__(self, folder: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(f"{folder}/unix")
        self.listener.listen(64)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.readers: list[socket.socket] = []

    def drain(self) -> list[tuple[Any, bytes]]:
        got: list[tuple[Any, bytes]] = []
        for key, _events in self.selector.select(1.0):
            sock = key.fileobj
            if sock is self.listener:
                conn, _addr = self.listener.accept()
                conn.setblocking(False)
                self.selector.register(conn, selectors.EVENT_READ, Frames())
                continue
            try:
                data = sock.recv(READ_CHUNK)
            except BlockingIOError:
                continue
            if not data:  # the peer closed
                self.selector.unregister(sock)
                sock.close()
                continue
            for message in key.data.feed(data):
                if message == SUBSCRIBE:
                    self.readers.append(sock)
                else:
                    got.append((sock, message))
        return got

    def reply(self, origin: Any, head: bytes) -> None:
        origin.sendall(Frames.frame(head))

    def publish(self, message: bytes) -> None:
        for reader in self.readers:
            reader.sendall(Frames.frame(message))


class ZmqClient:
    """walsvc's producer and reader sockets: PUSH to the server, SUB for what the server sends under `topic`
    (b"" for every commit; None for a producer that wants no replies)."""

    def __init__(self, folder: str, topic: bytes | None) -> None:
        ctx = zmq.Context()
        self.push = ctx.socket(zmq.PUSH)
        self.push.connect(f"ipc://{folder}/in")
        self.sub = ctx.socket(zmq.SUB)
        if topic is not None:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
            self.sub.connect(f"ipc://{folder}/out")

    def send(self, message: bytes) -> None:
        self.push.send(message)

    def recv(self, timeout_s: float) -> bytes | None:
        return self.sub.recv() if self.sub.poll(int(timeout_s * 1000)) else None


class UnixClient:
    """One stream connection; a reader (topic b"") announces itself, a producer's replies come back on its
    own connection, so it needs no topic.  Everything happens in the caller's thread."""

    def __init__(self, folder: str, topic: bytes | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(f"{folder}/unix")
        self.frames = Frames()
        self.received: list[bytes] = []
        self.timeout: float | None = None
        if topic == b"":
            self.send(SUBSCRIBE)

    def send(self, message: bytes) -> None:
        self.sock.sendall(Frames.frame(message))

    def recv(self, timeout_s: float) -> bytes | None:
        if timeout_s != self.timeout:  # settimeout is a syscall: only when it changes
            self.sock.settimeout(timeout_s)
            self.timeout = timeout_s
        while not self.received:
            try:
                data = self.sock.recv(READ_CHUNK)
            except (TimeoutError, BlockingIOError):
                return None
            if not data:
                raise ConnectionError("the server closed the connection")
            self.received = self.frames.feed(data)
        return self.received.pop(0)


SERVERS: dict[str, type] = {"zmq": ZmqServer, "unix": UnixServer}
CLIENTS: dict[str, type] = {"zmq": ZmqClient, "unix": UnixClient}


def _serve(transport: str, folder: str, durable: bool, file_bytes: int, ready: Any, acks: bool = False) -> None:
    """The server loop: drain, one pwrite, then either (durable) one fdatasync and a reply per record, or a
    commit message with the written end, and with `acks` a reply per record after it (as walsvc's writer
    acks every batch under `os`).  Past `file_bytes` it writes from the start again (only --architecture
    runs can get there, at over 85k rec/s)."""
    server: Server = SERVERS[transport](folder)
    fd = os.open(f"{folder}/log", os.O_RDWR | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 0, file_bytes)
    os.fsync(fd)
    head = os.open(f"{folder}/head", os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(head, HEAD_FILE.pack(0, 0), 0)
    ready.set()
    offset = 0
    while True:
        got = server.drain()
        if not got:
            continue
        data = b"".join(message for _origin, message in got)
        if offset + len(data) > file_bytes:
            offset = 0
        if os.pwrite(fd, data, offset) != len(data):
            raise OSError(f"short write at {offset} of {folder}/log")
        offset += len(data)
        if durable:
            os.fdatasync(fd)
            for origin, message in got:
                server.reply(origin, message[:HEAD.size])
        else:
            os.pwrite(head, HEAD_FILE.pack(offset, offset), 0)
            server.publish(END.pack(offset))
            if acks:
                for origin, message in got:
                    server.reply(origin, ACK + message[:8])


def _ask(client: Client, record: bytes, timeout_s: float) -> bool:
    """Send `record` and wait for its own reply; replies to earlier (timed-out) records are skipped."""
    client.send(record)
    head = record[:HEAD.size]
    while (reply := client.recv(timeout_s)) is not None:
        if reply == head:
            return True
    return False


def _producer(barrier: Any, transport: str, folder: str, index: int, size: int,
              seconds: float) -> tuple[int, float, float, int]:
    """One record in flight for `seconds`; returns (records, end time, CPU seconds, wake-ups)."""
    client: Client = CLIENTS[transport](folder, HEAD.pack(index, 0)[:4])  # the id: how every reply starts
    pad = bytes(size - HEAD.size)
    seq = 1
    while not _ask(client, HEAD.pack(index, seq) + pad, 0.1):  # a reply sent before the SUB's topic reached
        seq += 1                                                # the server is lost: ask until one arrives
    barrier.wait()
    cpu0, wake0, records = time.process_time(), wakeups(os.getpid()), 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seq += 1
        if not _ask(client, HEAD.pack(index, seq) + pad, 30.0):
            raise RuntimeError(f"producer {index}: no reply within 30 s")
        records += 1
    return records, time.monotonic(), time.process_time() - cpu0, wakeups(os.getpid()) - wake0


class _ServerProcess:
    """The server in its own process on a fresh folder under `directory`; killed and removed on exit."""

    def __init__(self, transport: str, directory: str, durable: bool, file_bytes: int, acks: bool = False) -> None:
        self.folder = tempfile.mkdtemp(prefix="limits-", dir=directory)
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        self.process = ctx.Process(target=_serve, args=(transport, self.folder, durable, file_bytes, ready, acks),
                                   daemon=True)
        self.process.start()
        if not ready.wait(60):
            self.__exit__()
            raise RuntimeError(f"the {transport} server did not start within 60 s")

    def __enter__(self) -> _ServerProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.process.kill()
        self.process.join(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def architecture(transport: str, directory: str, producers: int, size: int, seconds: float) -> dict[str, float]:
    """Rate, and CPU µs and wake-ups per record of the server and of the producers, one record in flight each."""
    with _ServerProcess(transport, directory, True, FILE_BYTES) as server:
        pid = server.process.pid
        cpu0, wake0 = cpu_seconds(pid), wakeups(pid)
        start, results = run_workers(_producer, [(transport, server.folder, i, size, seconds)
                                                 for i in range(producers)], timeout=seconds + 60)
        server_cpu, server_wakes = cpu_seconds(pid) - cpu0, wakeups(pid) - wake0
    records = sum(r[0] for r in results)
    return {"records_per_s": records / (max(r[1] for r in results) - start),
            "server_cpu_us": server_cpu / records * 1e6, "server_wakeups": server_wakes / records,
            "producer_cpu_us": sum(r[2] for r in results) / records * 1e6,
            "producer_wakeups": sum(r[3] for r in results) / records}


def _base(transport: str) -> str:
    """The socket transport of a --latency variant ("zmq+inotify+acks" -> "zmq")."""
    return transport.split("+")[0]


def _count_acks(client: Client, count: int, got: list[int]) -> None:
    """A producer's reply thread (walsvc's producer I/O thread, or a Redis client reading replies): take
    `count` acks, or stop after 30 s without one."""
    while got[0] < count and client.recv(30.0) is not None:
        got[0] += 1


def _paced_producer(barrier: Any, transport: str, folder: str, rate: int, count: int) -> float:
    """Paced sends; with "+acks", a second thread takes one reply per record, and the rate counts once all
    have come back."""
    acks = transport.endswith("+acks")
    client: Client = CLIENTS[_base(transport)](folder, ACK if acks and _base(transport) == "zmq" else None)
    if not acks:
        return paced_send(barrier, rate, count, client.send)
    probe = struct.pack("<q", PROBE) + bytes(LATENCY_RECORD_SIZE - 8)
    client.send(probe)
    while client.recv(0.1) is None:  # an ack published before the SUB's topic reached the server is lost
        client.send(probe)
    got = [0]
    replies = threading.Thread(target=_count_acks, args=(client, count, got), daemon=True)
    replies.start()
    sent = paced_send(barrier, rate, count, client.send)
    replies.join(60)
    if got[0] != count:
        raise RuntimeError(f"{transport}: {got[0]} of {count} acks came back")
    return sent


def _tail_reader(barrier: Any, transport: str, folder: str, count: int, timeout: float) -> list[int]:
    """Wait for a commit, pread up to the end it carries, one latency per record read (missed commits are
    harmless: the next one covers their records).  `zmq+inotify`: the commit is the head file's content,
    read when an inotify watch on it fires (no reader socket at all)."""
    watch = HeadWatch(Path(folder) / "head") if "+inotify" in transport else None
    client: Client | None = None if watch else CLIENTS[_base(transport)](folder, b"")
    head = os.open(f"{folder}/head", os.O_RDONLY)
    fd = os.open(f"{folder}/log", os.O_RDONLY)
    position = 0
    latencies: list[int] = []
    barrier.wait()
    deadline = time.monotonic() + timeout
    while len(latencies) < count and time.monotonic() < deadline:
        if watch is not None:
            if watch.wait(0.1) is None:
                continue
            while (ends := HEAD_FILE.unpack(os.pread(head, HEAD_FILE.size, 0)))[0] != ends[1]:
                pass  # read while the server rewrote it: read again
            commit = END.pack(ends[0])
        else:
            commit = client.recv(0.1)
            if commit is None:
                continue
            while (newer := client.recv(0)) is not None:
                commit = newer
        (end,) = END.unpack(commit)
        data = os.pread(fd, end - position, position)
        now = time.monotonic_ns()
        for i in range(0, len(data), LATENCY_RECORD_SIZE):
            (sent,) = struct.unpack_from("<q", data, i)
            if sent != PROBE:
                latencies.append(now - sent)
        position = end
    os.close(fd)
    os.close(head)
    if watch is not None:
        watch.close()
    return latencies


def latency(transport: str, directory: str, rate: int, messages: int) -> dict[str, float]:
    """Append-to-reader latency percentiles (µs) with no fsync, as the suite's `latency 10k/s os`."""
    with _ServerProcess(_base(transport), directory, False, messages * LATENCY_RECORD_SIZE + (1 << 20),  # + probes
                        acks=transport.endswith("+acks")) as server:
        return measure_latency(_paced_producer, _tail_reader, (transport, server.folder), rate, messages / rate)


def _positive_ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _transports(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or set(names) - set(TRANSPORTS):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(TRANSPORTS)}, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=".", help="a folder on the filesystem the log would use (default .)")
    parser.add_argument("--samples", type=int, default=5000, help="samples per measurement (default 5000)")
    parser.add_argument("--size", type=int, default=1024, help="bytes per record (default 1024)")
    parser.add_argument("--quick", action="store_true",
                        help="200 samples, 0.5 s runs, 2,000 latency records: checks the script, not a measurement")
    parser.add_argument("--architecture", action="store_true",
                        help="also measure the skeleton's one-in-flight rate, CPU and wake-ups under always")
    parser.add_argument("--producers", type=_positive_ints, default=[1, 4, 16],
                        help="producer counts for --architecture (default 1,4,16)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per --architecture run (default 3)")
    parser.add_argument("--latency", action="store_true", help="also measure the skeleton's append-to-reader latency")
    parser.add_argument("--rate", type=int, default=10_000, help="records/s for --latency (default 10000)")
    parser.add_argument("--messages", type=int, default=20_000, help="records per --latency run (default 20000)")
    parser.add_argument("--transports", type=_transports, default=list(TRANSPORTS),
                        help="skeleton transports, interleaved (default zmq,unix)")
    args = parser.parse_args(argv)
    if min(args.samples, args.rate, args.messages, args.seconds) <= 0 or args.size < HEAD.size:
        parser.error(f"--samples, --rate, --messages and --seconds must be positive, --size at least {HEAD.size}")
    if not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir}: no such folder (the measurements write their files there)")
    samples = 200 if args.quick else args.samples
    sync_p50, sync_p99 = fdatasync_us(args.dir, samples, args.size)
    hop_p50, hop_p99 = zmq_hop_us(args.dir, samples, args.size)
    round_trip = sync_p50 + 2 * hop_p50
    print(f"fdatasync after a {args.size} B append: p50 {sync_p50:,.1f} us, p99 {sync_p99:,.1f} us")
    print(f"one-way ZeroMQ ipc hop, Python to Python: p50 {hop_p50:,.1f} us, p99 {hop_p99:,.1f} us")
    print(f"bound for one durable record in flight: {round_trip:,.1f} us, {1e6 / round_trip:,.0f} rec/s "
          f"(80 %: {0.8e6 / round_trip:,.0f} rec/s)")
    if args.architecture:
        seconds = 0.5 if args.quick else args.seconds
        for producers in args.producers:
            for transport in args.transports:
                r = architecture(transport, args.dir, producers, args.size, seconds)
                print(f"architecture {transport} {producers}p always x1: {r['records_per_s']:,.0f} rec/s; per record "
                      f"CPU us server {r['server_cpu_us']:.1f} + producers {r['producer_cpu_us']:.1f} = "
                      f"{r['server_cpu_us'] + r['producer_cpu_us']:.1f}; wake-ups server "
                      f"{r['server_wakeups']:.2f}, producers {r['producer_wakeups']:.2f}")
    if args.latency:
        messages = 2_000 if args.quick else args.messages
        variants = {"zmq": ["zmq", "zmq+inotify", "zmq+inotify+acks"], "unix": ["unix", "unix+acks"]}
        for transport in [t for name in args.transports for t in variants[name]]:
            r = latency(transport, args.dir, args.rate, messages)
            print(f"latency {transport} {args.rate:,}/s os: p50 {r['p50_us']:,.0f} us, p99 {r['p99_us']:,.0f} us, "
                  f"p99.9 {r['p999_us']:,.0f} us ({r['samples']:,.0f} records, sent {r['sent_per_s']:,.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

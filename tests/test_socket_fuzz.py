"""A socket fuzzer against a real writer process, while a legitimate producer process and reader process run.

For FUZZ_SECONDS (default 12) one seeded client sends, as fast as the sockets take them, random, truncated,
bit-flipped, oversized, multipart, deeply nested, zip-bomb and damaged-compression messages to every endpoint
in DIR/ENDPOINTS (ingest PUSH, control DEALER speaking to REP, publish XSUB sending subscriptions and junk
upstream), and raw non-ZeroMQ bytes to each ipc socket.  Then: the writer never died and answers status,
the legitimate producer's acks kept flowing, every acked record is in the log at its LSN and was seen by
the reader, `walsvc verify` is clean, the writer's peak RSS (VmHWM) stayed under 150 MiB, and the
bad-input counters moved.  The counts per kind are printed (run with -s) for docs/GUARANTEES.md.
`WALSVC_SOCKET_FUZZ_SECONDS` and `WALSVC_SOCKET_FUZZ_SEED` change the budget and the seed.
"""

from __future__ import annotations

import collections
import json
import os
import random
import socket
import time
from pathlib import Path

import zmq
import zstandard
from crc32c import crc32c

from helpers import (collect_acks, finish, read_acks, read_log, read_seen, run_cli, spawn_producer, spawn_reader,
                     status, wait_ready)
from walsvc import protocol as P
from walsvc.endpoints import load as load_endpoints
from walsvc.record import Record, ZSTD_MAGIC, encode_many, encode_varint

try:
    import lz4.block  # noqa: F401  (the optional 'lz4' extra)
    CODECS = [None, "zstd", "lz4"]
except ImportError:
    CODECS = [None, "zstd", None]  # same number of choices: the seeded sequence stays the same
MiB = 1024 * 1024
FUZZ_SECONDS = float(os.environ.get("WALSVC_SOCKET_FUZZ_SECONDS", "12"))
SEED = int(os.environ.get("WALSVC_SOCKET_FUZZ_SEED", "20261202"))
MEMORY_LIMIT = 150 * MiB
MAX_RECORD = 64 * 1024
MAX_BATCH = 256 * 1024
MAX_MESSAGE = 512 * 1024
CONFIG = f"""
[log]
segment_bytes = {MiB}
max_record_bytes = {MAX_RECORD}
max_batch_bytes = {MAX_BATCH}
[service]
max_message_bytes = {MAX_MESSAGE}
ingest_hwm = 50
"""


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def _zstd_record(stored: bytes) -> bytes:
    body = b"\x02" + encode_varint(len(stored)) + bytes((2 << 2,)) + b"zb" + stored
    return body + crc32c(body).to_bytes(4, "little")


def _rle_frame(total: int, declared: int | None, rng: random.Random) -> bytes:
    """A zstd frame of RLE blocks inflating to `total` bytes; header claims `declared` (None: no size)."""
    out = bytearray(ZSTD_MAGIC + bytes((0xC0 if declared is not None else 0x00, 7 << 3)))
    if declared is not None:
        out += declared.to_bytes(8, "little")
    while True:
        n = min(total, 128 * 1024)
        total -= n
        out += ((1 if total == 0 else 0) | 2 | n << 3).to_bytes(3, "little") + bytes((rng.randrange(256),))
        if total == 0:
            return bytes(out)


class Fuzzer:
    """Builds hostile messages from one seeded RNG and counts what it sent, per endpoint and kind."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.sent: collections.Counter[str] = collections.Counter()
        self.seq = 0

    def _records(self) -> list[Record]:
        rng = self.rng
        out = []
        for _ in range(rng.randint(1, 6)):
            key = f"fz-{rng.randrange(10**9)}".encode()
            value = rng.randbytes(rng.randrange(0, 200)) if rng.random() < 0.5 else bytes(rng.randrange(1, 3000))
            out.append(Record.put(key, value, compression=rng.choice(CODECS)))
        return out

    def valid_append(self) -> bytes:
        self.seq += 1
        recs = self._records()
        return P.encode_append(self.rng.randrange(1, 1 << 64), self.rng.randrange(1, 100), len(recs),
                               encode_many(recs))

    def ingest(self) -> tuple[str, list[bytes]]:
        rng = self.rng
        kind = rng.choices(["random", "header_random", "bitflip", "truncated", "multipart", "zip_bomb",
                            "bad_zstd", "too_large", "oversized"],
                           weights=[20, 15, 25, 15, 8, 6, 8, 2, 1])[0]
        if kind == "random":
            return kind, [rng.randbytes(rng.randrange(0, 300))]
        if kind == "header_random":
            return kind, [P.APPEND.pack(P.APPEND_MAGIC, rng.choice([1, 1, 2]), rng.choice([1, 1, 0, 9]),
                                        rng.randrange(1 << 64), rng.randrange(1 << 64), rng.randrange(1 << 32),
                                        rng.choice([0, 0, 1])) + rng.randbytes(rng.randrange(0, 200))]
        if kind == "bitflip":
            msg = bytearray(self.valid_append())
            for _ in range(rng.randint(1, 3)):
                msg[rng.randrange(len(msg))] ^= 1 << rng.randrange(8)
            return kind, [bytes(msg)]
        if kind == "truncated":
            msg = self.valid_append()
            return kind, [msg[:rng.randrange(len(msg))]]
        if kind == "multipart":
            return kind, [self.valid_append() if rng.random() < 0.5 else rng.randbytes(40)
                          for _ in range(rng.randint(2, 4))]
        if kind == "zip_bomb":
            if rng.random() < 0.2:  # an LZ4 value whose length prefix claims a terabyte
                body = b"\x02" + encode_varint(8) + bytes((1 << 2,)) + b"zb" + encode_varint(1 << 40) + b"\x10\x00"
                payload = body + crc32c(body).to_bytes(4, "little")
                return kind, [P.encode_append(rng.randrange(1, 1 << 64), 1, 1, payload)]
            if rng.random() < 0.5:  # one record claiming far more than max_record_bytes
                payload = _zstd_record(_rle_frame(MAX_RECORD, rng.choice([1 << 40, MAX_RECORD * 2]), rng))
                return kind, [P.encode_append(rng.randrange(1, 1 << 64), 1, 1, payload)]
            one = _zstd_record(_rle_frame(MAX_RECORD - 64, rng.choice([MAX_RECORD - 64, None]), rng))
            n = rng.randint(5, 60)  # each fits; together they pass the batch's decompression budget
            return kind, [P.encode_append(rng.randrange(1, 1 << 64), 1, n, one * n)]
        if kind == "bad_zstd":
            frame = zstandard.ZstdCompressor(write_content_size=rng.random() < 0.5).compress(b"fz " * 300)
            frame = rng.choice([frame[:rng.randrange(len(frame))], frame + rng.randbytes(rng.randint(1, 8)),
                                frame + frame])
            return kind, [P.encode_append(rng.randrange(1, 1 << 64), 1, 1, _zstd_record(frame))]
        if kind == "too_large":  # inside max_message_bytes, above max_batch_bytes
            return kind, [P.encode_append(rng.randrange(1, 1 << 64), 1, 1, bytes(MAX_BATCH + 100))]
        return kind, [bytes(MAX_MESSAGE + 1000)]  # oversized: ZeroMQ drops it and the connection

    def control(self) -> tuple[str, list[bytes]]:
        rng = self.rng
        kind = rng.choices(["random", "truncated_json", "nested", "too_large", "oversized", "multipart",
                            "bad_version", "unknown_op", "no_envelope", "ping"],
                           weights=[20, 15, 15, 5, 1, 10, 8, 8, 8, 10])[0]
        if kind == "random":
            body = [rng.randbytes(rng.randrange(0, 200))]
        elif kind == "truncated_json":
            msg = P.encode_request("status", extra=[1, {"a": "b"}])
            body = [msg[:rng.randrange(len(msg))]]
        elif kind == "nested":
            n = rng.choice([17, 100, 5000, 30000])
            body = [rng.choice([b"[" * n, b"[" * n + b"]" * n, b'{"a":' * n + b"1" + b"}" * n])[:P.MAX_CONTROL_BYTES]]
        elif kind == "too_large":
            body = [b'{"op": "ping", "pad": "' + b"x" * (P.MAX_CONTROL_BYTES + rng.randrange(1, 100_000)) + b'"}']
        elif kind == "oversized":
            body = [b"x" * (P.CONTROL_SOCKET_MAX_BYTES + 1)]
        elif kind == "multipart":
            body = [P.encode_request("ping"), rng.randbytes(rng.randrange(0, 50))]
        elif kind == "bad_version":
            body = [json.dumps({"op": "status", "version": rng.choice([0, 2, "1", None, [1]])}).encode()]
        elif kind == "unknown_op":
            body = [json.dumps({"op": rng.choice(["drop", 5, None, {"x": 1}, "x" * 500])}).encode()]
        elif kind == "no_envelope":  # a DEALER frame without the empty delimiter: REP drops it
            return kind, [rng.randbytes(rng.randrange(1, 50))]
        else:
            body = [P.encode_request("ping")]
        return kind, [b"", *body]

    def publish(self) -> tuple[str, list[bytes]]:
        rng = self.rng
        kind = rng.choice(["subscribe", "unsubscribe", "junk"])
        if kind == "subscribe":
            return kind, [b"\x01" + rng.randbytes(rng.randrange(0, 12))]
        if kind == "unsubscribe":
            return kind, [b"\x00" + rng.randbytes(rng.randrange(0, 12))]
        return kind, [rng.randbytes(rng.randrange(0, 100))]

    def raw_bytes(self) -> bytes:
        """Bytes for a raw AF_UNIX connection: junk, or a ZMTP greeting start then junk."""
        rng = self.rng
        head = b"\xff" + bytes(8) + b"\x7f\x03\x00NULL" if rng.random() < 0.5 else b""
        return head + rng.randbytes(rng.randrange(0, 300))


def _send(sock: zmq.Socket, frames: list[bytes]) -> bool:
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False


def _drain(sock: zmq.Socket) -> int:
    """Receive every reply waiting on `sock`; returns how many there were."""
    n = 0
    while True:
        try:
            sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return n
        n += 1


def test_socket_fuzzer_against_a_live_writer(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    config = tmp_path / "walsvc.toml"
    config.write_text(CONFIG)
    writer = writers(d, config=config).start()
    eps = load_endpoints(d)
    stop, until = tmp_path / "stop", tmp_path / "until"
    acks_out, seen_out = tmp_path / "acks.txt", tmp_path / "seen.txt"
    reader = spawn_reader(d, seen_out, until_file=until)
    wait_ready(reader)
    producer = spawn_producer(d, 0, acks_out, stop_file=stop, batch=10, pause_s=0.01, ack_timeout_s=2.0)
    start = time.monotonic()
    while not read_acks(acks_out):
        assert time.monotonic() - start < 30, "no first ack from the legitimate producer"
        time.sleep(0.05)

    rng = random.Random(SEED)
    fuzz = Fuzzer(rng)
    ctx = zmq.Context()
    sockets = {}
    for name, kind, endpoint in (("ingest", zmq.PUSH, eps.ingest), ("control", zmq.DEALER, eps.control),
                                 ("publish", zmq.XSUB, eps.publish)):
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100)
        sock.connect(endpoint)
        sockets[name] = sock
    ingest2 = ctx.socket(zmq.PUSH)  # a second sender: the writer's queues are per connection
    ingest2.setsockopt(zmq.LINGER, 0)
    ingest2.setsockopt(zmq.SNDHWM, 100)
    ingest2.connect(eps.ingest)
    ipc_paths = [e[len("ipc://"):] for e in (eps.ingest, eps.control, eps.publish) if e.startswith("ipc://")]
    control_replies = blocked = 0
    ack_progress = []  # (seconds since the fuzzing started, acks so far)
    acks_before = len(read_acks(acks_out))
    started = time.monotonic()
    next_check = started
    try:
        while (now := time.monotonic()) - started < FUZZ_SECONDS:
            roll = rng.random()
            if roll < 0.6:
                kind, frames = fuzz.ingest()
                ok = _send(sockets["ingest"] if rng.random() < 0.5 else ingest2, frames)
                endpoint = "ingest"
            elif roll < 0.85:
                kind, frames = fuzz.control()
                ok = _send(sockets["control"], frames)
                endpoint = "control"
            elif roll < 0.98:
                kind, frames = fuzz.publish()
                ok = _send(sockets["publish"], frames)
                endpoint = "publish"
            else:
                path = rng.choice(ipc_paths)
                endpoint, kind, ok = "raw_" + Path(path).stem, "raw_bytes", True
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                    raw.settimeout(0.5)
                    try:
                        raw.connect(path)
                        raw.sendall(fuzz.raw_bytes())
                    except OSError:
                        pass  # the writer may close a bad connection first
            if ok:
                fuzz.sent[f"{endpoint}/{kind}"] += 1
            else:
                blocked += 1
                time.sleep(0.0005)
            control_replies += _drain(sockets["control"])
            if now >= next_check:
                assert writer.running(), f"writer died after {dict(fuzz.sent)}: {writer.stderr()[-3000:]}"
                ack_progress.append((now - started, len(read_acks(acks_out)) - acks_before))
                next_check = now + 0.5
        time.sleep(0.5)
        control_replies += _drain(sockets["control"])
    finally:
        ctx.destroy(linger=0)

    assert writer.running(), writer.stderr()[-3000:]
    peak = vm_hwm(writer.pid)
    st = status(d)
    stop.touch()
    finish(producer, 120, "legitimate producer")
    acked = collect_acks([acks_out])
    acks_during = ack_progress[-1][1]
    longest_stall = max(b[0] - a[0] for a, b in zip(ack_progress, ack_progress[1:]) if b[1] == a[1]) \
        if any(b[1] == a[1] for a, b in zip(ack_progress, ack_progress[1:])) else 0.0
    committed = status(d)["committed_lsn"]
    until.write_text(str(committed))
    finish(reader, 60, "reader")

    total = sum(fuzz.sent.values())
    report = {"seed": SEED, "seconds": FUZZ_SECONDS, "messages": total, "blocked_sends": blocked,
              "control_replies": control_replies, "legit_acks_during_fuzz": acks_during,
              "legit_acks_total": len(acked), "writer_vmhwm_mib": round(peak / MiB, 1),
              "rejected": st["rejected"], "sent": dict(sorted(fuzz.sent.items()))}
    print("socket fuzz:", json.dumps(report, indent=1))

    assert total > 1000, report
    assert peak < MEMORY_LIMIT, report
    assert acks_during >= 50 and longest_stall < 5.0, (ack_progress, report)
    rejected = st["rejected"]
    assert rejected.get(P.MALFORMED, 0) > 100 and rejected.get(P.TOO_LARGE, 0) > 0, report
    assert rejected.get("control_malformed", 0) > 50 and rejected.get("control_too_large", 0) > 0, report
    assert control_replies > 100, report

    assert writer.stop() == 0
    assert "Traceback" not in writer.stderr()
    verify = run_cli("verify", "--dir", str(d))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    legit = {r.key.decode(): r.lsn for r in read_log(d) if r.key.startswith(b"p0-")}
    assert len(legit) == len(acked), "a legitimate record is in the log twice, or an unacked one appeared"
    assert legit == {k: v for k, v in acked.items()}, "an acked record is missing or at another LSN"
    seen = {key: lsn for lsn, key, _ in read_seen(seen_out) if key.startswith("p0-")}
    assert all(seen.get(k) == v for k, v in acked.items()), "the reader missed an acked record"

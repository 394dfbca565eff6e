"""Hostile input against a real writer process: crafted control requests, pipelined floods, multipart
messages, zip bombs and damaged compressed values.  Each is refused with a specific error before it costs
much; the writer keeps serving; its peak memory (VmHWM) stays bounded."""

from __future__ import annotations

import json
import time
from pathlib import Path

import zmq
import zstandard
from crc32c import crc32c

from helpers import RawClient, status, verify_log
import walsvc
from walsvc import protocol as P
from walsvc.endpoints import load as load_endpoints
from walsvc.record import ZSTD_MAGIC, encode_put, encode_varint

MiB = 1024 * 1024
MEMORY_LIMIT = 150 * MiB


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a process, in bytes (Linux /proc/PID/status VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def zstd_record(stored: bytes, key: bytes = b"k") -> bytes:
    body = encode_varint(len(key)) + encode_varint(len(stored)) + bytes((2 << 2,)) + key + stored
    return body + crc32c(body).to_bytes(4, "little")


def rle_zstd(total: int, content_size: bool = True, declared: int | None = None) -> bytes:
    """A hand-made zstd frame of RLE blocks (4 bytes per 128 KiB) that inflates to `total` zero bytes (its
    header may claim `declared` instead)."""
    out = bytearray(ZSTD_MAGIC + bytes((0xC0 if content_size else 0x00, 7 << 3)))
    if content_size:
        out += (total if declared is None else declared).to_bytes(8, "little")
    while total:
        n = min(total, 128 * 1024)
        total -= n
        out += ((1 if total == 0 else 0) | 2 | n << 3).to_bytes(3, "little") + b"\0"
    return bytes(out)


class Control:
    """A DEALER on the control socket: requests can be pipelined, and any frames sent."""

    def __init__(self, directory: Path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(load_endpoints(directory).control)

    def ask(self, *frames: bytes, timeout: float = 10.0) -> dict | None:
        self.sock.send_multipart([b"", *frames])
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return json.loads(self.sock.recv_multipart()[-1])

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def test_crafted_control_requests_get_error_replies(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    c = Control(d)
    try:
        cases = [
            (b"[" * 50_000, "nests 50000 levels"),              # json.loads raised RecursionError: writer died
            (b'{"a":' * 20 + b"1" + b"}" * 20, "nests 20 levels"),
            (b'{"op": "ping", "pad": "' + b"x" * 70_000 + b'"}', "too_large"),
            (b'{"op": "ping", "version": 2}', "unknown_version"),
            (b'{"op": "ping", "n": ' + b"9" * 5000 + b"}", "not JSON"),
            (b"\xff\xfe{", "not JSON"),
            (b'{"op": "' + b"[" * 1000 + b'"}', "unknown op"),   # brackets in a string are not nesting
        ]
        for request, expected in cases:
            reply = c.ask(request)
            assert reply is not None, f"no reply to {request[:40]!r}; writer alive: {writer.running()}"
            assert reply["ok"] is False and expected in reply["error"], (request[:40], reply)
        # Above the socket's MAXMSGSIZE, ZeroMQ drops the request unread (and that connection).
        assert c.ask(b"[" * (P.CONTROL_SOCKET_MAX_BYTES + 1), timeout=1.0) is None
    finally:
        c.close()
    assert writer.running()
    st = status(d)
    assert {k: v for k, v in st["rejected"].items() if v} == {"control_malformed": 4, "control_too_large": 1,
                                                            "control_unknown_version": 1}
    with walsvc.Producer(d) as producer:
        assert producer.put("after", "x").result(30) == 1
    assert writer.stop() == 0
    assert "Traceback" not in writer.stderr()


def test_pipelined_control_flood_keeps_memory_bounded(tmp_path: Path, writers) -> None:
    """Two clients pipeline 200 KiB requests as fast as ZeroMQ takes them: each is answered too_large, the
    writer's peak RSS stays under 150 MiB (ZeroMQ queued 1000 per client before: ~200 MiB each)."""
    d = tmp_path / "wal"
    writer = writers(d).start()
    request = b'{"op": "ping", "pad": "' + b"x" * (200 * 1024) + b'"}'
    clients = [Control(d) for _ in range(2)]
    sent = 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            for c in clients:
                try:
                    c.sock.send_multipart([b"", request], zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    time.sleep(0.001)
        assert writer.running()
        answers = Control(d)
        try:
            reply = answers.ask(P.encode_request("ping"), timeout=30)
        finally:
            answers.close()
        assert reply == {"ok": True, "pid": writer.pid}
        peak = vm_hwm(writer.pid)
    finally:
        for c in clients:
            c.close()
    assert sent > 100
    assert peak < MEMORY_LIMIT, f"writer VmHWM {peak / MiB:.0f} MiB after {sent} requests"
    assert status(d)["rejected"]["control_too_large"] > 0


def test_multipart_ingest_message_is_refused_whole(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    writer = writers(d).start()
    pid = 0xAB01
    client = RawClient(d, [pid])
    try:
        assert client.sync(pid, encode_put(b"first", b"1")).base_lsn == 1
        # Before: the first part was stored and acked as an APPEND, the rest counted as garbage.
        client.push.send_multipart([P.encode_append(pid, 2, 1, encode_put(b"two", b"2")), b"tail", b"more"])
        reply = client.wait_reply(pid, 2)
        assert reply.status == P.NACK and reply.code == P.MALFORMED and "3 frames" in reply.detail
        client.send(P.encode_append(pid, 2, 1, encode_put(b"two", b"single")))
        assert client.wait_reply(pid, 2).base_lsn == 2
    finally:
        client.close()
    assert {k: v for k, v in status(d)["rejected"].items() if v} == {P.MALFORMED: 1}
    assert writer.stop() == 0
    assert [(r.key, r.value) for r in verify_log(d)] == [(b"first", b"1"), (b"two", b"single")]


def test_zip_bombs_and_damaged_zstd_values_are_nacked(tmp_path: Path, writers) -> None:
    """Batches of a few KiB that claim 1 TiB or would inflate to 100 MiB are refused by their frame headers;
    damaged zstd values (cut short, bytes after the frame) are refused instead of stored as b"" forever."""
    d = tmp_path / "wal"
    writer = writers(d).start()
    ids = bomb, many, nosize, cut, junk, good = range(0xB001, 0xB007)
    client = RawClient(d, ids)
    value = b"compressible " * 100
    frame = zstandard.ZstdCompressor().compress(value)
    try:
        assert client.sync(good, encode_put(b"sync", b"s")).base_lsn == 1
        started = time.monotonic()
        client.send(P.encode_append(bomb, 1, 1, zstd_record(rle_zstd(MiB, declared=1 << 40))))  # claims 1 TiB
        one = zstd_record(rle_zstd(MiB - 1024))  # within max_record_bytes, but 100 of them: 100 MiB
        client.send(P.encode_append(many, 1, 100, one * 100))
        client.send(P.encode_append(nosize, 1, 1, zstd_record(rle_zstd(64 * MiB, content_size=False))))
        client.send(P.encode_append(cut, 1, 1, zstd_record(frame[:-5])))
        client.send(P.encode_append(junk, 1, 1, zstd_record(frame + b"\0\0")))
        client.send(P.encode_append(good, 2, 1, zstd_record(frame)))
        assert client.wait_reply(good, 2).status == P.ACK
        codes = {pid: client.wait_reply(pid, 1) for pid in (bomb, many, nosize, cut, junk)}
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert {pid: r.code for pid, r in codes.items()} == {bomb: P.TOO_LARGE, many: P.TOO_LARGE,
                                                           nosize: P.TOO_LARGE, cut: P.MALFORMED,
                                                           junk: P.MALFORMED}
    assert "declares 1099511627776 bytes" in codes[bomb].detail
    assert "cut short" in codes[cut].detail and "after its frame" in codes[junk].detail
    assert elapsed < 10.0  # inflating 100 MiB + 64 MiB took seconds before; the headers are read in ms
    assert "payload offset 0:" not in codes[many].detail  # refused by the batch's budget, not the record's
    assert writer.running()
    peak = vm_hwm(writer.pid)
    assert peak < MEMORY_LIMIT, f"writer VmHWM {peak / MiB:.0f} MiB"
    assert writer.stop() == 0
    records = verify_log(d)
    assert [(r.key, r.value) for r in records] == [(b"sync", b"s"), (b"k", value)]


def test_zstd_frame_declaring_no_content_with_blocks_is_nacked(tmp_path: Path, writers) -> None:
    """A frame whose header declares content size 0 but which carries a garbage block was acked, stored as b""
    and passed verify (python-zstandard's decompress() returns b"" for it without decoding the blocks)."""
    d = tmp_path / "wal"
    writer = writers(d).start()
    bad, good = 0xC001, 0xC002
    client = RawClient(d, (bad, good))
    garbage = ZSTD_MAGIC + bytes((0x20, 0)) + (1 | 2 << 1 | 10 << 3).to_bytes(3, "little") + b"\xff" * 10
    try:
        client.send(P.encode_append(bad, 1, 1, zstd_record(garbage)))
        reply = client.wait_reply(bad, 1)
        assert client.sync(good, zstd_record(zstandard.ZstdCompressor().compress(b""), key=b"empty")).base_lsn == 1
    finally:
        client.close()
    assert reply.code == P.MALFORMED and "does not decompress" in reply.detail, reply
    assert writer.stop() == 0
    assert [(r.key, r.value) for r in verify_log(d)] == [(b"empty", b"")]

"""Flood a real writer's ingest socket from many hostile connections and measure its memory.

Used by tests/test_ingest_memory.py (a short run in the suite) and scripts/ingest_flood.py (longer runs, any
config).  Hostile processes each open `connections` PUSH sockets to the writer's ingest endpoint and send,
as fast as ZeroMQ takes them, a mix of: messages of exactly the largest size the writer accepts (random
bytes; and APPENDs of valid records whose last CRC is wrong, so the writer checks every record before it
refuses), messages one byte longer (ZeroMQ drops them and the connection), multipart messages, and small
garbage.  A legitimate producer process keeps appending meanwhile.  Afterwards the writer must be alive,
every record the producer had acked must be in the log at its LSN, and `walsvc verify` must be clean.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import (WriterProcess, check_acked_exactly_once, collect_acks, finish, spawn_producer, status,
                     verify_log, wait_for)

MiB = 1024 * 1024


def proc_status(pid: int, field: str) -> int:
    """A size field of /proc/PID/status (VmRSS, VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


def hostile_messages(max_message: int, max_record: int, rng: random.Random) -> list[list[bytes]]:
    """The messages one hostile process cycles through, each a list of frames."""
    from walsvc import protocol as P
    from walsvc.record import encode_put
    largest = rng.randbytes(max_message)
    value = rng.randbytes(min(max_record - 64, 16 * 1024))
    record = encode_put(b"hostile", value)
    count = (max_message - P.APPEND_HEADER_SIZE) // len(record)
    records = bytearray(record * count)
    records[-1] ^= 0xFF  # the last record's CRC is wrong: the writer walks all the others before refusing
    valid_looking = P.encode_append(rng.randrange(1, 1 << 63), 1, count, bytes(records))
    valid_looking += rng.randbytes(max_message - len(valid_looking))  # exactly the largest size
    return [[largest], [valid_looking], [largest + b"!"],
            [rng.randbytes(64 * 1024) for _ in range(8)], [rng.randbytes(rng.randrange(0, 300))]]


def hostile_main(endpoint: str, connections: int, seconds: float, max_message: int, max_record: int,
                 seed: int, multipart_frames: int, frame_bytes: int, counts: "multiprocessing.Queue") -> None:
    """One hostile process: `connections` PUSH sockets sending at full speed for `seconds`; puts the number
    of messages ZeroMQ took on `counts`.  With `multipart_frames`, each connection sends one multipart message
    of that many frames of `frame_bytes` instead, and holds it open until the time is up."""
    import zmq
    rng = random.Random(seed)
    ctx = zmq.Context()
    socks = []
    for _ in range(connections):
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 4)
        s.connect(endpoint)
        socks.append(s)
    if multipart_frames:
        messages = [[rng.randbytes(frame_bytes)] * multipart_frames]
    else:
        messages = hostile_messages(max_message, max_record, rng)
    frames = [[zmq.Frame(part) for part in msg] for msg in messages]
    sent = i = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        progress = False
        for s in socks:
            try:
                s.send_multipart(frames[i % len(frames)], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            i += 1
            sent += 1
            progress = True
        if multipart_frames and sent >= connections:
            time.sleep(max(0.0, deadline - time.monotonic()))
            break
        if not progress:
            time.sleep(0.0005)
    counts.put(sent)
    ctx.destroy(linger=0)


@dataclass
class FloodResult:
    max_message: int
    rcvhwm: int
    connections: int
    hostile_messages: int
    legit_acks_during: int
    legit_records: int
    start_hwm: int  # writer VmHWM before the flood
    peak_rss: int  # largest VmRSS sampled every 20 ms during the flood
    peak_hwm: int  # writer VmHWM after the flood
    rejected: dict[str, int]

    def describe(self) -> str:
        return (f"{self.connections} hostile connections, max message {self.max_message:,} B, RCVHWM "
                f"{self.rcvhwm}: {self.hostile_messages:,} hostile messages, {self.legit_acks_during:,} "
                f"legitimate acks during the flood ({self.legit_records:,} in all, each at its LSN), verify "
                f"clean; writer VmHWM {self.start_hwm / MiB:.1f} MiB before, {self.peak_hwm / MiB:.1f} MiB "
                f"peak (largest sampled VmRSS {self.peak_rss / MiB:.1f} MiB); rejected {self.rejected}")


def write_config(path: Path, settings: list[str]) -> None:
    """A TOML config from SECTION.KEY=VALUE items (VALUE in TOML syntax)."""
    sections: dict[str, list[str]] = {}
    for item in settings:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        sections.setdefault(section, []).append(f"{name} = {value}")
    path.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items()))


def run(work: Path, *, processes: int, connections: int, seconds: float, settings: list[str] = (),
        multipart_frames: int = 0, frame_bytes: int = 0, seed: int = 1) -> FloodResult:
    """Start a writer in `work` (the default config, or `settings`), flood it, check it afterwards
    (AssertionError if a check fails), and return the numbers."""
    from walsvc import config
    from walsvc.endpoints import load as load_endpoints
    d = work / "wal"
    cfg_path = None
    if settings:
        cfg_path = work / "flood.toml"
        write_config(cfg_path, list(settings))
    cfg = config.load(cfg_path, directory=d)
    writer = WriterProcess(d, config=cfg_path, logs=work / "logs").start()
    try:
        endpoint = load_endpoints(d).ingest
        start_hwm = proc_status(writer.pid, "VmHWM")
        stop_file, out = work / "stop-producer", work / "acks-0"
        producer = spawn_producer(d, 0, out, stop_file=stop_file, batch=20, pause_s=0.002, ack_timeout_s=5.0)
        wait_for(lambda: out.exists() and out.stat().st_size > 0, 60, "the legitimate producer's first ack")
        mp = multiprocessing.get_context("spawn")
        counts = mp.Queue()
        hostiles = [mp.Process(target=hostile_main, daemon=True, args=(
            endpoint, connections, seconds, cfg.max_message_bytes, cfg.log.max_record_bytes, seed + k,
            multipart_frames, frame_bytes, counts)) for k in range(processes)]
        for h in hostiles:
            h.start()
        acks_before = len(out.read_text().splitlines())
        peak_rss = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            peak_rss = max(peak_rss, proc_status(writer.pid, "VmRSS"))
            time.sleep(0.02)
        sent = sum(counts.get(timeout=60) for _ in hostiles)
        for h in hostiles:
            h.join(30)
        acks_during = len(out.read_text().splitlines()) - acks_before
        assert writer.running(), f"the writer died: {writer.stderr()[-2000:]}"
        stop_file.touch()
        finish(producer, 120, "legitimate producer")
        peak_hwm = proc_status(writer.pid, "VmHWM")
        rejected = {k: v for k, v in status(d)["rejected"].items() if v}
        assert writer.stop() == 0
        acked = collect_acks([out])
        check_acked_exactly_once(verify_log(d), acked)
    finally:
        writer.cleanup()
    return FloodResult(cfg.max_message_bytes, cfg.service.ingest_hwm, processes * connections, sent,
                       acks_during, len(acked), start_hwm, peak_rss, peak_hwm, rejected)

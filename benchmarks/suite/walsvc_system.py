"""walsvc in the benchmark: a real writer process (`python -m walsvc serve`), producer and reader processes.

Durability levels map to fsync policies one to one ("os", "batch" = group commit within 5 ms, "always").
Producers hand over `batch` records per call (`Producer.put_many`), as the peers pipeline `batch` XADDs or
insert `batch` rows per transaction, and the client batches further (linger, 256 KiB); `batch == 1` means
one record in flight per producer (`put(...).result()`).
Interface: see harness.py.
"""

from __future__ import annotations

import math
import os
import signal
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .harness import measure_latency, paced_send, proc_cpu_seconds, run_workers, throughput_result

NAME = "walsvc"
DURABILITIES = ("os", "batch", "always")
SERVER = True  # the pinned latency scenario places its server process
READY = "walsvc writer ready"


def available() -> str | None:
    return None


@contextmanager
def _writer(directory: Path, policy: str, config: Path | None = None, cpu: int | None = None,
            command: list[str] | None = None) -> Iterator[int]:
    """A writer process on `directory` (with the TOML `config` if given; on CPU `cpu` if given); yields its
    pid; SIGTERM (drain, fsync) afterwards.  `command` runs `walsvc` another way (default: python -m walsvc);
    it gets the `serve ...` arguments."""
    extra = ["--config", str(config)] if config is not None else []
    extra += ["--cpus", str(cpu)] if cpu is not None else []
    proc = subprocess.Popen([*(command or [sys.executable, "-m", "walsvc"]), "serve", *extra, "--dir",
                             str(directory), "--fsync", policy],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith(READY):
                break
        else:
            raise RuntimeError(f"walsvc writer exited with {proc.wait()} before it was ready")
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _produce(barrier: Any, directory: str, index: int, record_size: int, seconds: float,
             batch: int) -> tuple[int, float, float]:
    import walsvc
    value = os.urandom(record_size - 16)
    with walsvc.Producer(directory) as producer:
        put = producer.put
        barrier.wait()
        cpu0 = time.process_time()
        deadline = time.monotonic() + seconds
        n = 0
        if batch == 1:
            while time.monotonic() < deadline:
                put(b"p%02d-%012d" % (index, n), value).result(60)
                n += 1
        else:
            put_many = producer.put_many
            while time.monotonic() < deadline:
                for _ in range(16):
                    put_many([(b"p%02d-%012d" % (index, n + i), value) for i in range(batch)])
                    n += batch
            producer.flush(120)
        end = time.monotonic()
        cpu = time.process_time() - cpu0
    return n, end, cpu


def throughput(tmpdir: str, producers: int, record_size: int, durability: str, seconds: float,
               batch: int) -> dict[str, float]:
    directory = Path(tmpdir) / "log"
    with _writer(directory, durability) as pid:
        writer_cpu = proc_cpu_seconds(pid)
        start, results = run_workers(_produce, [(str(directory), i, record_size, seconds, batch)
                                                for i in range(producers)], timeout=seconds + 180)
        writer_cpu = proc_cpu_seconds(pid) - writer_cpu
        writer_peak_rss = _peak_rss_mib(pid)
    records = sum(r[0] for r in results)
    stored = _count(directory)
    if stored != records:
        raise RuntimeError(f"producers counted {records} acknowledged records but the log holds {stored}")
    wall = max(r[1] for r in results) - start
    result = throughput_result(records, wall, writer_cpu + sum(r[2] for r in results), record_size)
    result["writer_peak_rss_mib"] = writer_peak_rss
    return result


def _peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM) so far, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def _count(directory: Path) -> int:
    from walsvc.scan import end_of_valid_data
    return end_of_valid_data(directory) - 1


def _paced_producer(barrier: Any, directory: str, rate: int, count: int) -> float:
    """One `put` at a time on a fixed schedule; returns the rate actually sent."""
    import walsvc
    with walsvc.Producer(directory) as producer:
        sent = paced_send(barrier, rate, count, lambda payload: producer.put(b"", payload))
        producer.flush(60)
    return sent


def _tail_reader(barrier: Any, directory: str, count: int, timeout: float) -> list[int]:
    import walsvc
    latencies: list[int] = []
    with walsvc.Reader(directory, "latest") as reader:
        barrier.wait()
        deadline = time.monotonic() + timeout
        while len(latencies) < count and time.monotonic() < deadline:
            batch = reader.poll(0.1)
            now = time.monotonic_ns()
            latencies.extend(now - struct.unpack_from("<q", r.value)[0] for r in batch)
    return latencies


def latency(tmpdir: str, rate: int, seconds: float, durability: str, server_cpu: int | None = None) -> dict[str, float]:
    directory = Path(tmpdir) / "log"
    with _writer(directory, durability, cpu=server_cpu):
        return measure_latency(_paced_producer, _tail_reader, (str(directory),), rate, seconds, server_cpu)


def _acked_producer(barrier: Any, directory: str, rate: int, count: int) -> tuple[float, list[int]]:
    """Paced `put`s, each timed from the call to its ack (the callback runs in the producer's I/O thread)."""
    import walsvc
    latencies = [0] * count
    sent = [0] * count
    done = 0

    def acked(i: int) -> None:
        nonlocal done
        latencies[i] = time.monotonic_ns() - sent[i]
        done += 1

    with walsvc.Producer(directory) as producer:
        i = 0

        def send(_payload: bytes) -> None:
            nonlocal i
            n = i
            i += 1
            sent[n] = time.monotonic_ns()
            producer.put(b"", _payload).add_done_callback(lambda f: (f.result(), acked(n)))

        rate_sent = paced_send(barrier, rate, count, send)
        producer.flush(60)
    if done != count:
        raise RuntimeError(f"{count - done} of {count} records were not acked")
    return rate_sent, latencies


def rotation(tmpdir: str, rate: int, seconds: float, segment_bytes: int, durability: str) -> dict[str, float]:
    """Append-to-ack latency of one paced producer while the writer rotates `segment_bytes` segments."""
    from walsvc.segment import list_segments
    count = int(rate * seconds)
    directory = Path(tmpdir) / "log"
    config = Path(tmpdir) / "walsvc.toml"
    config.write_text(f"[log]\nsegment_bytes = {segment_bytes}\n")
    with _writer(directory, durability, config):
        _start, ((sent_per_s, latencies),) = run_workers(
            _acked_producer, [(str(directory), rate, count)], timeout=seconds + 60)
    kept = sorted(latencies)
    rank = {q: kept[min(len(kept) - 1, max(0, math.ceil(q * len(kept)) - 1))] / 1000.0
            for q in (0.5, 0.99, 0.999)}
    return {"p50_us": rank[0.5], "p99_us": rank[0.99], "p999_us": rank[0.999], "max_us": kept[-1] / 1000.0,
            "rotations": float(len(list_segments(directory)) - 1), "samples": float(len(kept)),
            "sent_per_s": sent_per_s}


def _fill(directory: Path, records: int, record_size: int) -> int:
    """Write `records` records with the embedded API (not timed); returns the bytes of record values."""
    import walsvc
    value = os.urandom(record_size)
    per_batch = max(1, min(1000, (1 << 20) // record_size))
    with walsvc.Log.open(directory, fsync="os") as log:
        for done in range(0, records, per_batch):
            log.append_batch([walsvc.Record(b"", value)] * min(per_batch, records - done))
    return records * record_size


def _replay_reader(barrier: Any, directory: str) -> tuple[int, int, float, float, float]:
    import resource

    import walsvc
    count = nbytes = 0
    with walsvc.Reader(directory, "earliest") as reader:
        barrier.wait()
        cpu = time.process_time()
        while batch := reader.poll(0):
            count += len(batch)
            nbytes += sum(len(r.value) for r in batch)
        cpu = time.process_time() - cpu
    return count, nbytes, time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, cpu


def replay(tmpdir: str, records: int, record_size: int) -> dict[str, float]:
    directory = Path(tmpdir) / "log"
    _fill(directory, records, record_size)
    start, ((count, nbytes, end, peak_mib, cpu),) = run_workers(_replay_reader, [(str(directory),)], timeout=600,
                                                               context="spawn")
    if count != records:
        raise RuntimeError(f"replay read {count} records, expected {records}")
    return {"records_per_s": count / (end - start), "mib_per_s": nbytes / (end - start) / 2**20,
            "reader_peak_rss_mib": peak_mib, "records_per_cpu_s": count / cpu}


def _tear_tail(directory: Path) -> None:
    """Leave the log as a crash mid-write would: half of a batch frame after the last complete one."""
    import walsvc
    from walsvc import frame as F
    from walsvc.segment import list_segments
    with walsvc.Log.open(directory, fsync="os") as log:
        end = log._active.end
        path = log._active.path
        next_lsn = log.next_lsn
    payload = walsvc.record.encode_many([walsvc.Record(b"torn", b"x" * 4000)])
    frame = F.encode_frame(F.KIND_DATA, payload, 1, next_lsn, 0)
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(frame[:len(frame) // 2])
    assert list_segments(directory)[-1][1] == path


def recovery(tmpdir: str, records: int, record_size: int) -> dict[str, float]:
    """Open time of a log whose last batch is torn, until it accepts an append again."""
    import walsvc
    directory = Path(tmpdir) / "log"
    _fill(directory, records, record_size)
    _tear_tail(directory)
    total = sum(p.stat().st_size for p in directory.glob("*.wal"))
    started = time.perf_counter()
    with walsvc.Log.open(directory, fsync="os") as log:
        log.append(walsvc.Record(b"after", b"recovery"))
        elapsed = time.perf_counter() - started
        if not log.recovery.torn_tail:
            raise RuntimeError(f"recovery did not report the torn tail: {log.recovery.summary()}")
    return {"seconds": elapsed, "records_per_s": records / elapsed, "mib_per_s": total / elapsed / 2**20}

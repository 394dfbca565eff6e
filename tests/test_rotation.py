"""Rotation off the append path (walsvc/rotation.py): appends racing segment switches, readers tailing across
switches whose seals are not written yet, and kill -9 with a rotation in flight or a spare file on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import MiB, frame_offsets, python_env, segment_paths, value_for, wait_line
from test_reader import CHILD_READER
from walsvc import Log, LogReader, Record
from walsvc import frame as F
from walsvc.scan import LogReader as ScanLogReader
from walsvc.segment import SPARE_NAME


def _assert_sealed_chain(directory: Path) -> None:
    """Every segment but the last ends with a seal naming the next one's base LSN."""
    paths = segment_paths(directory)
    for path, nxt in zip(paths, paths[1:]):
        off, h = frame_offsets(path)[-1]
        assert h.kind == F.KIND_SEAL and h.base_lsn == int(nxt.name[:20]), path.name
        assert off + h.size == path.stat().st_size, path.name


@pytest.mark.parametrize("policy", ["always", "os"])
def test_appends_racing_rotations_keep_every_record_once(open_log, policy):
    """Four threads append (each waiting for its ack under `always`) while a reader tails; segments switch
    about a dozen times under them.  Every batch gets its own LSNs, the reader sees each record once in
    order, and after a restart the log holds exactly what was acked, with every seal in place."""
    log = open_log(segment_bytes=MiB, fsync=policy)
    got: dict[bytes, int] = {}
    errors: list[BaseException] = []
    seen: list[int] = []
    total = 4 * 100 * 30  # 12 MB of 1,000-byte records
    appending = threading.Event()
    appending.set()

    def append(t: int) -> None:
        try:
            for i in range(100):
                keys = [b"t%d-%03d-%d" % (t, i, j) for j in range(30)]
                lsns = log.append_batch([Record.put(k, b"v" * 1000) for k in keys])
                got.update(zip(keys, lsns))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    def read() -> None:
        try:
            with LogReader(log.directory, bound=lambda: log.committed_lsn) as reader:
                deadline = time.monotonic() + 60
                while len(seen) < total and time.monotonic() < deadline:
                    batch = reader.read_batch()
                    seen.extend(r.lsn for r in batch)
                    if not batch:
                        time.sleep(0.0005)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(t,)) for t in range(4)] + [threading.Thread(target=read)]
    for th in threads:
        th.start()
    for th in threads[:4]:
        th.join(60)
    log.sync()
    threads[4].join(60)
    assert not errors, errors
    assert sorted(got.values()) == list(range(1, total + 1))  # each record one LSN, no gap, no repeat
    assert seen == list(range(1, total + 1))
    rotations = log.stats()["segments"] - 1
    assert rotations >= 10, rotations
    directory = log.directory
    log.close()
    assert not (directory / SPARE_NAME).exists()  # close deletes the unused spare
    _assert_sealed_chain(directory)
    with Log.open(directory, segment_bytes=MiB) as again:
        assert again.recovery.sealed_segments == rotations and not again.recovery.torn_tail
        assert {r.key: r.lsn for r in again.read()} == got


def test_reader_tails_across_many_rotations_before_their_seals(open_log, monkeypatch):
    """With 1 MiB segments, 20+ switches; a reader in this process (bound: the committed LSN) and one in
    another process (bound: HEAD) read every record exactly once, often reaching the end of a full segment
    before the rotation thread sealed it (counted: the reader moved on without the seal)."""
    moved_on = 0
    original = ScanLogReader._moved_on

    def counting(self, seg, stop):
        nonlocal moved_on
        moved = original(self, seg, stop)
        moved_on += moved
        return moved

    monkeypatch.setattr(ScanLogReader, "_moved_on", counting)
    log = open_log(segment_bytes=MiB, fsync="os")
    total = 50_000  # 400-byte records: about 21 MiB
    out = log.directory.parent / "seen.json"
    proc = subprocess.Popen([sys.executable, "-c", CHILD_READER, str(log.directory), str(total), str(out)],
                            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_line(proc, "ready")
        seen: list[int] = []
        with LogReader(log.directory, bound=lambda: log.committed_lsn) as reader:
            lsn = 1
            while lsn <= total:
                n = min(50, total - lsn + 1)
                log.append_batch([Record.put(b"k%08d" % (lsn + i), value_for(lsn + i, 400)) for i in range(n)])
                lsn += n
                while batch := reader.read_batch():
                    seen.extend(r.lsn for r in batch)
        wait_line(proc, "done", timeout=60)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert seen == list(range(1, total + 1))
    assert log.stats()["segments"] >= 20
    assert moved_on > 0, "the reader never got ahead of a seal: the test did not exercise the switch"
    result = json.loads(out.read_text())
    assert result["seen"] == list(range(1, total + 1)) and result["bad"] == [] and result["errors"] == []


CHILD_WRITER = r"""
import sys
from pathlib import Path
from walsvc import Log, Record
directory, tag, policy = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
log = Log.open(directory, segment_bytes=1 << 20, fsync=policy)
print("ready", flush=True)
segments = log.stats()["segments"]
i = 0
while True:
    keys = [b"%s-%06d-%d" % (tag.encode(), i, j) for j in range(10)]
    lsns = log.append_batch([Record.put(k, b"v" * 1000) for k in keys])  # under always: after its fsync
    print("acked", " ".join("%s=%d" % (k.decode(), n) for k, n in zip(keys, lsns)), flush=True)
    i += 1
    if log.stats()["segments"] != segments:
        segments = log.stats()["segments"]
        print("rotated", flush=True)
"""


@pytest.mark.parametrize("delay,policy", [(0.0, "os"), (0.3, "always")], ids=["seal-in-flight", "spare-ready"])
def test_kill_9_around_a_rotation_keeps_every_acked_record(tmp_path, delay, policy):
    """A writer process is killed right after a segment switch (under `os` its seal, behind an fdatasync of
    the whole segment, is still being written) or a moment later (the next spare prepared, under `always`);
    three times over.  Each restart recovers every acked record (a kill -9 loses nothing written, whatever
    the policy), finishes any seal, replaces the spare, and appends and rotates on."""
    directory = tmp_path / "wal"
    acked: dict[str, int] = {}
    seal_pending = spare_found = False
    for cycle in range(3):
        proc = subprocess.Popen([sys.executable, "-c", CHILD_WRITER, str(directory), f"c{cycle}", policy], env=python_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_line(proc, "ready", timeout=30)
            rotations = 0
            deadline = time.monotonic() + 30
            while rotations < 2:
                line = proc.stdout.readline()
                assert line and time.monotonic() < deadline, proc.stderr.read()
                if line.startswith("acked "):
                    acked.update((k, int(v)) for k, v in (p.split("=") for p in line.split()[1:]))
                elif line.startswith("rotated"):
                    rotations += 1
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            for line in proc.stdout:  # acks printed before the kill
                if line.startswith("acked "):
                    acked.update((k, int(v)) for k, v in (p.split("=") for p in line.split()[1:]))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        paths = segment_paths(directory)
        seal_pending |= any(frame_offsets(p)[-1][1].kind != F.KIND_SEAL for p in paths[:-1])
        spare_found |= (directory / SPARE_NAME).exists()
        with Log.open(directory, segment_bytes=MiB) as log:
            _assert_sealed_chain(directory)
            where = {r.key.decode(): r.lsn for r in log.read()}
            missing = {k: v for k, v in acked.items() if where.get(k) != v}
            assert not missing, f"cycle {cycle}: acked records lost or moved: {list(missing.items())[:5]}"
            # A rotation after the restart: the leftover spare is gone, or the new one could not be created.
            segments = log.stats()["segments"]
            log.append_batch([Record.put(b"after-%d" % i, b"v" * 1000) for i in range(1100)])
            log.append(Record.put(b"after", b"restart"))
            assert log.stats()["segments"] > segments
            log._pipeline.drain()
            assert log.stop_reason is None
            _assert_sealed_chain(directory)
    if delay:
        assert spare_found, "no kill found a prepared spare: the test did not exercise recovery's cleanup"
    else:
        assert seal_pending, "no kill caught a seal in flight: the test did not exercise recovery's seal"


class _OwnedLock:
    """threading.Lock that knows which thread holds it (a plain Lock can only say that someone does)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def acquire(self, *args: object) -> bool:
        got = self._lock.acquire(*args)
        if got:
            self.owner = threading.get_ident()
        return got

    def release(self) -> None:
        self.owner = None
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()


@pytest.mark.parametrize("policy", ["batch", "always", "os"])
def test_every_fsync_of_a_segment_holds_the_syncer_lock(open_log, monkeypatch, policy):
    """Linux reports a lost write-back once per file, to whichever fsync asks first: were the rotation
    thread's fsync of the active segment to run beside the fsync thread's, that one could return 0 and
    commit frames whose write-back had failed.  So every fsync of a segment after the open (the rotation
    thread's before it prepares a spare, the settling of a switched-from segment, the fsync thread's) runs
    with the syncer's lock held by the thread that calls it, and a failure is recorded before it is
    released."""
    import walsvc.fsync as fsync_module
    import walsvc.log as log_module
    log = open_log(segment_bytes=MiB, fsync=policy)
    lock = _OwnedLock()
    log._syncer.lock = lock
    calls: list[tuple[str, bool]] = []
    for module in (fsync_module, log_module):
        real = module.sync_data

        def checked(fd: int, real=real) -> None:
            calls.append((threading.current_thread().name, lock.owner == threading.get_ident()))
            real(fd)

        monkeypatch.setattr(module, "sync_data", checked)
    for i in range(400):  # 4 MB: three switches or more
        log.append_batch([Record.put(b"k%05d-%d" % (i, j), b"v" * 1000) for j in range(10)])
    log.close()
    assert log.stats()["segments"] >= 4
    threads = {name for name, _ in calls}
    assert "walsvc-rotation" in threads, threads
    unlocked = [name for name, owned in calls if not owned]
    assert not unlocked, f"fsyncs of a segment without the syncer's lock, on threads {sorted(set(unlocked))}"

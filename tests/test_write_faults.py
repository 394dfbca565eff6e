"""Real I/O faults on the write path of a real writer process: fail-stop, under every fsync policy.

Each case starts `walsvc serve` with one libc call set to fail (EIO or ENOSPC, once or persistently), appends
until the writer has acked some records, arms the fault, and appends until the log stops.  Two real tools:

- libfiu (`fiu-run -x`, armed at runtime with `fiu-ctrl`) for the calls it wraps: fdatasync (the batch
  fsync), fsync (the directory fsync after a segment create), pwrite (the HEAD update), ftruncate (the
  seal), unlink (the retention delete);
- our LD_PRELOAD shim, tests/faults/walsvc_fault.c, built here with gcc, for what libfiu misses: CPython's
  os.pwritev calls pwritev64v2 and os.posix_fallocate calls posix_fallocate64 (libfiu wraps neither), and
  the directory fsync after a retention delete, which libfiu cannot single out (it is the second
  directory fsync of a rotation; libfiu can neither skip calls nor filter by file).

What every case checks: the log stops, and status names the failed operation, its file and errno; the
writer keeps answering status; the producer's unacked records fail at once with LogStoppedError (log_stopped
nacks: the producer's ack timeout is far longer than the test waits); a batch from a new client is nacked
log_stopped; SIGTERM exits 0; a restart recovers every acked record at its LSN and appends again.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import frame_offsets, segment_paths
from helpers import (REPO_ROOT, RawClient, check_acked_exactly_once, collect_acks, control, finish, python_env,
                     read_acks, read_stopped, run_cli, spawn_producer, status, verify_log, wait_for, walsvc_cmd)

import walsvc
from walsvc import Log, frame as F, head as H, protocol as P, stopped
from walsvc.errors import LogStoppedError, WriteStepError
from walsvc.frame import Appended
from walsvc.record import Record
from walsvc.segment import ActiveSegment, now_us, seal_segment, segment_name
from walsvc.verify import verify
from walsvc.record import encode_put

FAULTS_DIR = Path(__file__).resolve().parent / "faults"
FIU_RUN, FIU_CTRL = shutil.which("fiu-run"), shutil.which("fiu-ctrl")
REQUIRED = os.environ.get("WALSVC_REQUIRE_FAULT_TOOLS") == "1"  # set by .ci/run: a missing tool fails there
MiB = 1 << 20


def _need(ok: bool, what: str) -> None:
    if not ok:
        if REQUIRED:
            pytest.fail(f"{what} is required (WALSVC_REQUIRE_FAULT_TOOLS=1)")
        pytest.skip(f"{what} is not installed (apt-get install fiu-utils libfiu-dev gcc)")


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/faults/walsvc_fault.c compiled into a temporary shared object."""
    _need(shutil.which("gcc") is not None, "gcc")
    out = tmp_path_factory.mktemp("shim") / "walsvc_fault.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(out),
                    str(FAULTS_DIR / "walsvc_fault.c"), "-ldl"], check=True, capture_output=True, text=True)
    return out


@dataclass(frozen=True)
class Site:
    """One call on the write path and how to make it fail."""
    name: str
    tool: str  # "fiu": libfiu failure point `point`; "shim": walsvc_fault.c call `point`
    point: str
    operation: str  # the stop reason's operation
    file: str | tuple[str, ...]  # what the stop reason's path ends with: ".wal", "HEAD" or "" (the directory)
    rotating: bool = False  # needs segment rotations (1 MiB segments, 1 KiB records)
    retention: bool = False  # needs retention to delete a segment at each rotation
    shim_options: str = ""


FRAME_WRITE = Site("frame-write", "shim", "pwritev", "frame write at offset", ".wal")
# Under `os` the first fdatasync after a switch may be the next spare's (the rotation thread prepares it
# first) or the old segment's (the fsync thread under always/batch, or the seal).
FDATASYNC = Site("fdatasync", "fiu", "posix/io/sync/fdatasync", "fdatasync", (".wal", "next-segment.tmp"),
                 rotating=True)
HEAD_UPDATE = Site("head-update", "fiu", "posix/io/rw/pwrite", "HEAD update", "HEAD")
RENAME_DIR_FSYNC = Site("rename-dir-fsync", "fiu", "posix/io/sync/fsync", "directory fsync after segment rename",
                        "", rotating=True)
# The rotation thread prepares the next segment's file (next-segment.tmp) ahead of time, and seals the old
# segment while appends go on in the new one: faults there stop the log just the same.
PREALLOCATE = Site("preallocate", "shim", "fallocate", "preallocate", "next-segment.tmp", rotating=True)
SPARE_FDATASYNC = Site("spare-fdatasync", "shim", "fdatasync", "fdatasync", "next-segment.tmp", rotating=True,
                       shim_options="path=next-segment.tmp")
# Under `os` only the rotation thread fdatasyncs a segment: the new active one right after a switch (before
# it makes the next spare), then the old one's frames before its seal.  The first after arming fails: the
# new active segment's, as the arming waits for the rotation thread to go idle between switches.
SEAL_FDATASYNC = Site("seal-fdatasync", "shim", "fdatasync", "fdatasync", ".wal", rotating=True,
                      shim_options="path=.wal")
SEAL_TRUNCATE = Site("seal-truncate", "fiu", "posix/io/rw/ftruncate", "seal truncate", ".wal", rotating=True)
RETENTION_UNLINK = Site("retention-unlink", "fiu", "posix/io/dir/unlink", "retention unlink", ".wal",
                        rotating=True, retention=True)
# The first directory fsync once armed is the next rotation's segment create: skip it, fail the retention one.
RETENTION_DIR_FSYNC = Site("retention-dir-fsync", "shim", "fsync", "directory fsync after retention delete", "",
                           rotating=True, retention=True, shim_options="after=1")
SITES = [FRAME_WRITE, FDATASYNC, HEAD_UPDATE, RENAME_DIR_FSYNC, PREALLOCATE, SEAL_TRUNCATE, RETENTION_UNLINK,
         RETENTION_DIR_FSYNC]


class Fault:
    """Arms one fault in one writer process, through libfiu or the shim."""

    def __init__(self, site: Site, err: int, once: bool, tmp: Path, shim: Path | None) -> None:
        self.site, self.err, self.once = site, err, once
        self.arm_file = tmp / "armed"
        self.fifo = str(tmp / "fiu")
        self.wrapper: list[str] = []
        self.env: dict[str, str] = {}
        if site.tool == "fiu":
            _need(FIU_RUN is not None and FIU_CTRL is not None, "libfiu's fiu-run and fiu-ctrl")
            self.wrapper = [FIU_RUN, "-x", "-f", self.fifo]
        else:
            assert shim is not None
            options = [f"call={site.point}", f"errno={errno.errorcode[err]}",
                       f"mode={'once' if once else 'persistent'}", f"arm={self.arm_file}"]
            options += [site.shim_options] if site.shim_options else []
            self.env = {"LD_PRELOAD": str(shim), "WALSVC_FAULT": ",".join(options)}

    def arm(self, pid: int) -> None:
        if self.site.tool == "shim":
            self.arm_file.touch()
            return
        command = f"enable name={self.site.point},failinfo={self.err}" + (",onetime=1" if self.once else "")
        done = subprocess.run([FIU_CTRL, "-f", self.fifo, "-c", command, str(pid)], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0 and "rror" not in done.stdout, (done.stdout, done.stderr)


def _config(tmp: Path, site: Site) -> Path:
    config = tmp / "walsvc.toml"
    retention = f"\n[retention]\nmax_bytes = {3 * MiB // 2}\n" if site.retention else ""
    config.write_text(f"[log]\nsegment_bytes = {MiB if site.rotating else 64 * MiB}\n" + retention)
    return config


def _append_until_stopped(producer: walsvc.Producer, value: bytes, first: int, limit_s: float = 30.0
                          ) -> tuple[dict[str, int], list[str]]:
    """Put batches of 20 until one fails with LogStoppedError; return acked key -> LSN and the keys that
    failed.  Every record must be answered within 15 s of the stop: none is left waiting."""
    futures: list[tuple[str, walsvc.RecordFuture]] = []
    deadline = time.monotonic() + limit_s
    i = first
    while not any(f.done() and f.exception(0) is not None for _, f in futures[-200:]):
        assert time.monotonic() < deadline, f"the log did not stop within {limit_s} s of the fault"
        try:
            for _ in range(20):
                key = f"k{i:08d}"
                futures.append((key, producer.put(key.encode(), value)))
                i += 1
        except LogStoppedError:
            break
        time.sleep(0.002)
    answer_by = time.monotonic() + 15  # log_stopped nacks, not the producer's resend timeout (minutes)
    acked, failed = {}, []
    for key, fut in futures:
        try:
            exc = fut.exception(max(0.0, answer_by - time.monotonic()))
        except TimeoutError:
            raise AssertionError(f"{key} got neither ack nor nack within 15 s of the stop") from None
        if exc is None:
            acked[key] = fut.result(0)
        else:
            assert isinstance(exc, LogStoppedError), repr(exc)
            failed.append(key)
    return acked, failed


def _check_stop_reason(stopped: dict, site: Site, err: int, directory: Path) -> None:
    assert stopped is not None, "status does not say the log stopped"
    assert stopped["operation"].startswith(site.operation), stopped
    assert stopped["errno"] == err and stopped["errno_name"] == errno.errorcode[err], stopped
    path = Path(stopped["path"])
    assert path.parent == directory if site.file else path == directory, stopped
    assert path.name.endswith(site.file), stopped
    assert errno.errorcode[err] in stopped["message"] and str(path) in stopped["message"], stopped


def _new_client_is_nacked(directory: Path) -> None:
    client = RawClient(directory)
    try:
        reply = client.sync(0xFA17, encode_put(b"after", b"stop"))
        assert reply.code == "log_stopped", reply
        assert "log stopped" in reply.detail, reply
    finally:
        client.close()


def _restart_and_check(writer, directory: Path, acked: dict[str, int], failed: list[str], committed: int, *,
                       real_restart: bool) -> None:
    """SIGTERM exits 0; recovery has every acked record at its LSN, and no record that failed (was nacked)
    was committed before the stop (`committed`: the stopped writer's committed LSN).  `real_restart`: recovery
    by a new writer process, which then appends again; else by Log.open in this process (the same recovery)."""
    assert writer.stop() == 0, writer.stderr()
    assert "walsvc log had stopped" in writer.stdout()
    assert "Traceback" not in writer.stderr()
    stop = stopped.load(directory)  # recorded unless the fault keeps the disk from taking even that
    assert stop is None or stop.committed_lsn == committed, (stop, committed)
    if real_restart:
        writer.start(faulty=False)
        assert writer.ready_committed_lsn() >= max(acked.values())
        with walsvc.Producer(directory, ack_timeout_s=0.5) as producer:
            assert producer.put(b"after-restart", b"x").result(30) > max(acked.values())
        assert writer.stop() == 0
    else:
        with walsvc.Log.open(directory) as log:
            assert log.committed_lsn >= max(acked.values())
    records = verify_log(directory)
    # Retention deleted the oldest segments on purpose: what is acked from the first LSN kept on must be there.
    check_acked_exactly_once(records, {k: lsn for k, lsn in acked.items() if lsn >= records[0].lsn})
    # A failed record may be in the log (written before the stop, never committed), but never below the
    # committed LSN: every batch committed before the stop was acked, not nacked.
    where = {r.key.decode(): r.lsn for r in records}
    nacked_committed = [(k, where[k]) for k in failed if k in where and where[k] <= committed]
    assert not nacked_committed, f"committed (LSN <= {committed}) but nacked: {nacked_committed[:5]}"
    if stop is not None:  # the restart cut everything after the stop's committed LSN
        kept = [k for k in failed if k in where]
        assert not kept, f"nacked after the stop, yet kept by the restart: {kept[:5]}"
        assert stopped.load(directory) is None


def _case(site: Site, err: int, once: bool, policy: str) -> pytest.param:
    return pytest.param(site, err, once, policy,
                        id=f"{site.name}-{errno.errorcode[err]}-{'once' if once else 'persistent'}-{policy}")


POLICIES = ("always", "batch", "os")
THREADED = [FRAME_WRITE, FDATASYNC, HEAD_UPDATE]  # where the policy decides which thread meets the fault
ROTATION = [RENAME_DIR_FSYNC, PREALLOCATE, SEAL_TRUNCATE, RETENTION_UNLINK, RETENTION_DIR_FSYNC]  # rotation thread
# Every site under every policy, once and persistently, EIO and (where a disk can report it) ENOSPC; not the
# full cross product, to stay within the suite's time budget.
CASES = ([_case(site, errno.EIO, False, policy) for site in THREADED for policy in POLICIES]
         + [_case(site, errno.EIO, False, POLICIES[i % 3]) for i, site in enumerate(ROTATION)]
         + [_case(site, errno.EIO, True, POLICIES[(i + 1) % 3]) for i, site in enumerate(SITES)]
         + [_case(site, errno.ENOSPC, i % 2 == 0, POLICIES[(i + 2) % 3])
            for i, site in enumerate(s for s in SITES if s is not RETENTION_UNLINK)]
         + [_case(SPARE_FDATASYNC, errno.EIO, False, "batch"), _case(SPARE_FDATASYNC, errno.ENOSPC, True, "os"),
            _case(SEAL_FDATASYNC, errno.EIO, False, "os"), _case(SEAL_FDATASYNC, errno.EIO, True, "os")])


@pytest.mark.parametrize("site,err,once,policy", CASES)
def test_write_path_fault_stops_the_log(tmp_path: Path, writers, shim: Path, site: Site, err: int, once: bool,
                                        policy: str) -> None:
    d = tmp_path / "wal"
    fault = Fault(site, err, once, tmp_path, shim)
    writer = writers(d, fsync=policy, config=_config(tmp_path, site), wrapper=fault.wrapper,
                     env=fault.env).start()
    value = b"v" * (1000 if site.rotating else 50)
    # A short ack timeout while warming up: ZeroMQ drops replies published before the SUB has joined.
    with walsvc.Producer(d, ack_timeout_s=0.5, linger_ms=1) as producer:
        warm = [producer.put(f"w{i:08d}".encode(), value) for i in range(300)]
        producer.flush(30)
        acked = {f"w{i:08d}": f.result(0) for i, f in enumerate(warm)}
        if site.retention:  # arm once rotations delete segments, so the next one deletes too
            n = len(acked)
            while status(d)["segments_deleted"] < 1:
                more = [producer.put(f"w{n + i:08d}".encode(), value) for i in range(500)]
                producer.flush(30)
                acked.update({f"w{n + i:08d}": f.result(0) for i, f in enumerate(more)})
                n += 500
                assert n < 20_000, "retention never deleted a segment"
        # From here on a resend would take minutes: every answer within the test's waits is the writer's own.
        producer.ack_timeout = 600.0
        # A rotation's seal and retention run on the rotation thread: arm between rotations, as the shim's
        # `after` counts calls from there.
        wait_for(lambda: status(d)["rotation_backlog"] == 0, 30, "the rotation thread to go idle")
        fault.arm(writer.pid)
        more_acked, failed = _append_until_stopped(producer, value, len(acked))
        acked.update(more_acked)
        assert failed, "no record failed after the fault"
        with pytest.raises(LogStoppedError):  # a new record goes out under a new producer id, and is refused too
            producer.put(b"after", b"stop").result(15)

    assert writer.running(), f"the writer died: {writer.stderr()}"
    st = status(d)  # still answering, with the reason
    _check_stop_reason(st["stopped"], site, err, d)
    assert st["committed_lsn"] >= max(acked.values())
    assert st["rejected"].get("log_stopped", 0) >= 1
    if site.tool == "shim":
        assert "walsvc_fault:" in writer.stderr()  # the shim reports each failure it injects
    assert "log stopped: " + site.operation in writer.stderr()
    assert st["segments"] == len(list(d.glob("*.wal"))), st  # the log's list of segments matches the files
    if once:  # the same code path for every site: enough to show it for some
        _new_client_is_nacked(d)
    assert status(d)["stopped"] == st["stopped"]
    _restart_and_check(writer, d, acked, failed, st["committed_lsn"], real_restart=once)


def test_walsvc_status_and_a_producer_process_after_a_stop(tmp_path: Path, writers, shim: Path) -> None:
    """The CLI shows the stop reason; a producer process (tests/helpers.py) gets its nacks and ends on its own."""
    d = tmp_path / "wal"
    fault = Fault(FDATASYNC, errno.EIO, False, tmp_path, shim)
    writer = writers(d, fsync="always", wrapper=fault.wrapper, env=fault.env).start()
    out = tmp_path / "producer.txt"
    proc = spawn_producer(d, 0, out, batch=20, pause_s=0.002, ack_timeout_s=1, until_stopped=True,
                          stop_file=tmp_path / "never")
    try:
        wait_for(lambda: len(read_acks(out)) >= 200, 30, "200 acked records")
        fault.arm(writer.pid)
        finish(proc, 20, "producer")  # ends by itself: its unacked records were nacked, not timed out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert read_stopped(out), "the producer saw no LogStoppedError"
    shown = json.loads(run_cli("status", "--dir", str(d), "--json").stdout)
    assert shown["writer"] == "stopped"  # the process runs; its log refuses writes
    _check_stop_reason(shown["stopped"], FDATASYNC, errno.EIO, d)
    text = run_cli("status", "--dir", str(d)).stdout
    assert text.startswith("writer: STOPPED") and "fdatasync failed on " in text and "(EIO)" in text, text
    acked = collect_acks([out])
    _restart_and_check(writer, d, acked, read_stopped(out), shown["committed_lsn"], real_restart=True)


# -- a real full disk ----------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path):
    """An 8 MiB tmpfs, mounted for the test (CI runs as root); skipped only where mounting is not permitted."""
    yield from _tmpfs(tmp_path, "8m")


@pytest.fixture
def four_mib_disk(tmp_path: Path):
    """A 4 MiB tmpfs, as `small_disk`: room for three preallocated 1 MiB segments and the small files."""
    yield from _tmpfs(tmp_path, "4m")


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 64 KiB tmpfs (16 pages), as `small_disk`."""
    yield from _tmpfs(tmp_path, "64k")


def _tmpfs(tmp_path: Path, size: str):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:  # not root, or a container without CAP_SYS_ADMIN
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip() or 'not root'}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("preallocate", [True, False], ids=["preallocated", "not-preallocated"])
def test_full_disk_stops_the_log(tmp_path: Path, writers, small_disk: Path, preallocate: bool) -> None:
    """The log fills a real (small) file system.  Preallocated, ENOSPC comes from posix_fallocate when a
    rotation thread prepares the next segment's file (or from a seal that extends its file, after the spare
    took the last page); not preallocated, from the frame write (or the new segment's header, or the seal the
    rotation thread writes meanwhile)."""
    d = small_disk / "wal"
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave about 4 MiB (the spare reserves a segment ahead): a few thousand records
        f.write(b"\xff" * (4 * MiB))
    config = tmp_path / "walsvc.toml"
    config.write_text(f"[log]\nsegment_bytes = {MiB}\npreallocate = {'true' if preallocate else 'false'}\n")
    writer = writers(d, fsync="batch", config=config).start()
    value = b"v" * 1000
    with walsvc.Producer(d, ack_timeout_s=0.5, linger_ms=1) as producer:
        warm = [producer.put(f"w{i:08d}".encode(), value) for i in range(100)]
        producer.flush(30)
        acked = {f"w{i:08d}": f.result(0) for i, f in enumerate(warm)}
        producer.ack_timeout = 600.0
        more_acked, failed = _append_until_stopped(producer, value, len(acked), limit_s=60)
        acked.update(more_acked)
        assert failed and len(acked) > 1000, (len(acked), len(failed))

    assert writer.running(), writer.stderr()
    st = status(d)
    stopped = st["stopped"]
    assert stopped["errno"] == errno.ENOSPC and stopped["errno_name"] == "ENOSPC", stopped
    if preallocate:
        # The rotation thread preallocates the next segment's file ahead of time: the disk fills up there.
        # Or, when that spare took the last free page, at the seal of a segment filled to the brim (the seal
        # then extends the file): recovery below finishes that seal.
        assert ((stopped["operation"] == "preallocate" and stopped["path"].endswith("next-segment.tmp"))
                or (stopped["operation"] == "seal write" and stopped["path"].endswith(".wal"))), stopped
    else:  # every write grows a file: the frame's, a new segment's header, or the old segment's seal meets it
        assert stopped["operation"].startswith(("frame write at offset", "segment header write", "seal write")), \
            stopped
    _new_client_is_nacked(d)
    assert writer.stop() == 0, writer.stderr()
    filler.unlink()  # free space, then restart: recovery keeps every acked record, and appends work again
    _restart_and_check(writer, d, acked, failed, st["committed_lsn"], real_restart=True)


def _fill(disk: Path, leave: int = 0) -> None:
    """Fill the file system at `disk` with a file of pages until ENOSPC, then free `leave` bytes of it."""
    filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(filler, b"\xff" * 4096)
        assert full.value.errno == errno.ENOSPC
        os.ftruncate(filler, os.fstat(filler).st_size - leave)
    finally:
        os.close(filler)


def test_a_seal_cut_short_by_a_full_disk_fails_instead_of_leaving_a_bad_seal(tiny_disk: Path) -> None:
    """A write may stop short when the disk fills up during it: tmpfs allocates page by page, and returns
    the count written so far.  Here the seal crosses into a page the full file system cannot give.  The
    seal write must fail with ENOSPC (the rotation thread then stops the log).  It must not take the short
    count for the whole: the truncate after it would pad the seal with zeros, and recovery would later
    find a seal that never checks, before valid data, and refuse the log (seen in
    `test_full_disk_stops_the_log`)."""
    path = tiny_disk / segment_name(1)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        header = F.SegmentHeader(1, 1, now_us())
        os.pwrite(fd, F.encode_segment_header(header), 0)
        frame = F.encode_frame(F.KIND_DATA, encode_put(b"k", b"v" * 100), 1, 1, now_us())
        os.pwrite(fd, frame, F.SEGMENT_HEADER_SIZE)
        seg = ActiveSegment(path, fd, header, F.SEGMENT_HEADER_SIZE + len(frame), last_lsn=1, record_count=1,
                            index=[(1, F.SEGMENT_HEADER_SIZE)])
        _fill(tiny_disk)
        window = [Appended(seq, seq, 1) for seq in range(1, 129)]
        producers = {7: window, 8: window}  # a seal of about 5 KiB: it needs the next page
        assert len(F.encode_seal(F.Seal(1, 2, 1, 0, seg.index, producers), seg.end, 0)) > 4096 - seg.end
        with pytest.raises(WriteStepError) as info:
            seal_segment(seg, 2, producers)
        assert info.value.operation == "seal write" and info.value.errno == errno.ENOSPC, info.value
    finally:
        os.close(fd)


def test_a_seal_the_full_disk_cut_short_is_finished_by_recovery(four_mib_disk: Path) -> None:
    """End to end, on a real full file system: the first segment is filled to 200 bytes short of its
    preallocated MiB, and the rotation thread's next spare takes the last free page, so the seal (about 350
    bytes: it must grow the file) is cut short by ENOSPC, after its header.  The log stops naming the seal
    write.  Once space is freed, a new open finishes the seal, and every record reads back."""
    d = four_mib_disk / "wal"
    value = b"v" * 1000  # key b"k": a frame of 1,065 bytes (56 header, 9 record framing)
    with Log.open(d, segment_bytes=MiB, fsync="os") as log:
        lsns = [log.append(Record.put(b"k", value)) for _ in range(984)]
        lsns.append(log.append(Record.put(b"k", b"w" * 287)))  # a frame of 352: the frames end at MiB - 200
        assert log.stats()["segments"] == 1
        _fill(four_mib_disk, leave=MiB)  # the pages of one segment: the spare the next switch asks for takes all
        try:  # does not fit: the switch, then the seal
            lsns.append(log.append(Record.put(b"k", value)))
        except LogStoppedError:
            pass  # the seal failed before this append committed: not acknowledged (written, so it may be kept)
        wait_for(lambda: log.stop_reason is not None, 10, "the seal write to fail")
        assert log.stop_reason.operation == "seal write" and log.stop_reason.errno == errno.ENOSPC, log.stop_reason
    (four_mib_disk / "filler").unlink()
    with Log.open(d, segment_bytes=MiB, fsync="os") as log:
        assert log.recovery.sealed_segments == 1
        read = [r.lsn for r in log.read()]
        assert read[:len(lsns)] == lsns and len(read) <= 986, (len(read), len(lsns))
        assert not log.recovery.torn_tail  # the seal was finished, not cut as a torn tail
    assert not (d / "quarantine").exists()
    report = verify(d)
    assert report.ok, report.problems


def test_after_a_stop_each_batch_gets_one_true_answer(tmp_path: Path, writers, shim: Path) -> None:
    """Speaking the wire protocol directly: after the stop, a resend of a committed batch still gets its
    DUPLICATE ack with its LSNs, and every other batch a log_stopped nack, whatever its sequence number (a gap
    is not answered out_of_sequence: nothing could fill it)."""
    d = tmp_path / "wal"
    fault = Fault(FRAME_WRITE, errno.EIO, False, tmp_path, shim)
    writer = writers(d, fsync="batch", wrapper=fault.wrapper, env=fault.env).start()
    client = RawClient(d)
    try:
        pid = 0xC0FFEE
        first = client.sync(pid, encode_put(b"one", b"1"))
        # DUPLICATE when the ACK of the first send went out before the SUB had joined and a resend got answered.
        assert first.status in (P.ACK, P.DUPLICATE) and first.base_lsn == 1, first
        fault.arm(writer.pid)
        client.send(P.encode_append(pid, 2, 1, encode_put(b"two", b"2")))
        second = client.wait_reply(pid, 2)
        assert second.status == P.NACK and second.code == P.LOG_STOPPED, second
        assert "frame write at offset" in second.detail and "EIO" in second.detail, second
        client.send(P.encode_append(pid, 1, 1, encode_put(b"one", b"1")))
        again = client.wait_reply(pid, 1)
        assert (again.status, again.base_lsn, again.count) == (P.DUPLICATE, 1, 1), again
        client.send(P.encode_append(pid, 7, 1, encode_put(b"gap", b"7")))
        gap = client.wait_reply(pid, 7)
        assert gap.status == P.NACK and gap.code == P.LOG_STOPPED, gap
    finally:
        client.close()
    assert writer.stop() == 0
    assert [(r.lsn, r.key) for r in verify_log(d)] == [(1, b"one")]


def test_a_failed_directory_fsync_for_a_new_group_stops_the_log(tmp_path: Path, writers, shim: Path) -> None:
    """The first consumer group makes the cursors folder and fsyncs the log directory.  That fsync failing
    stops the log, as the directory fsync after a segment switch does: Linux reports a lost write-back of the
    directory once, so the next fsync of it would return 0.  Before, the claim was refused and the log went
    on acking.  A claim refused for another reason (a folder where the group's lock file goes, on a second
    log) refuses that group alone."""
    d = tmp_path / "wal"
    fault = Fault(Site("group-dir-fsync", "shim", "fsync", "directory fsync", ""), errno.EIO, True, tmp_path, shim)
    writer = writers(d, fsync="os", wrapper=fault.wrapper, env=fault.env).start()  # `os`: no fsync but this one
    with walsvc.Producer(d) as producer:
        assert producer.put(b"before", b"1").result(10) == 1
        fault.arm(writer.pid)
        reply = control(d, "group_claim", group="billing", consumer="c1", max_records=10)
        assert not reply["ok"], reply
        assert "log stopped: directory fsync after making the cursors folder failed" in reply["error"], reply
        assert "walsvc_fault: fsync" in writer.stderr()
        stopped = status(d)["stopped"]
        assert stopped["operation"] == "directory fsync after making the cursors folder", stopped
        assert stopped["path"] == str(d) and stopped["errno_name"] == "EIO", stopped
        with pytest.raises(LogStoppedError):
            producer.put(b"after", b"2").result(10)
    assert writer.stop() == 0
    assert [(r.lsn, r.key) for r in verify_log(d)] == [(1, b"before")]

    other = tmp_path / "other"
    writer = writers(other, fsync="os").start()
    (other / "cursors" / "billing.lock").mkdir(parents=True)  # a folder where the group's lock file goes
    reply = control(other, "group_claim", group="billing", consumer="c1", max_records=10)
    assert not reply["ok"] and "cannot take its cursor lock" in reply["error"], reply
    assert "Is a directory" in reply["error"], reply
    assert status(other)["stopped"] is None
    with walsvc.Producer(other) as producer:
        assert producer.put(b"still", b"1").result(10) == 1
    assert writer.stop() == 0


def test_after_a_stop_nothing_past_the_committed_lsn_is_read_or_kept(tmp_path: Path, writers, shim: Path) -> None:
    """An fdatasync fails (EIO, once) under `always` while a producer has many batches in flight: some are
    written after the failed fsync and nacked.  Linux may have dropped those pages while the page cache still
    shows them, and a restart's fsync would "succeed" on them.  So the stop is recorded (STOPPED, with the
    committed LSN): with the writer gone, readers read exactly the committed records, and the restart cuts
    the rest into quarantine/, never reusing its LSNs.  Before, a reader read the nacked records and the
    restart committed them."""
    d = tmp_path / "wal"
    fault = Fault(Site("fdatasync-in-flight", "shim", "fdatasync", "fdatasync", ".wal", shim_options="path=.wal"),
                  errno.EIO, True, tmp_path, shim)
    writer = writers(d, fsync="always", wrapper=fault.wrapper, env=fault.env).start()
    producer = walsvc.Producer(d, ack_timeout_s=30)
    acked = [producer.put(b"before", b"%d" % i).result(10) for i in range(50)]
    fault.arm(writer.pid)
    futures = [producer.put(b"after", b"%d" % i) for i in range(2000)]
    for future in futures:
        try:
            acked.append(future.result(30))
        except LogStoppedError:
            pass
    producer.close(1)
    committed = status(d)["committed_lsn"]
    assert writer.stop() == 0
    assert committed == max(acked), (committed, max(acked))
    written = max(h.end_lsn - 1 for path in segment_paths(d) for _, h in frame_offsets(path) if h.kind == F.KIND_DATA)
    assert written > committed, "no batch was written past the failed fsync: the test proves nothing"
    stop = stopped.load(d)
    assert stop is not None and stop.committed_lsn == committed and "fdatasync" in stop.reason, stop

    with walsvc.LogReader(d) as reader:  # no writer: the stop record bounds it
        assert [r.lsn for r in reader] == list(range(1, committed + 1))
    with walsvc.Reader(d, "earliest") as reader:
        seen = []
        while batch := reader.poll(0.2):
            seen += [r.lsn for r in batch]
    assert seen == list(range(1, committed + 1))
    shown = run_cli("tail", "--dir", str(d), "--from", "earliest", "--json").stdout.splitlines()
    assert [json.loads(line)["lsn"] for line in shown] == list(range(1, committed + 1))

    writer.start(faulty=False)
    assert writer.ready_committed_lsn() == committed
    with walsvc.Producer(d) as producer:
        assert producer.put(b"after-restart", b"x").result(30) > written  # the cut LSNs are not reused
    assert writer.stop() == 0
    records = verify_log(d)
    assert [r.lsn for r in records][:-1] == list(range(1, committed + 1)) and records[-1].key == b"after-restart"
    assert stopped.load(d) is None
    assert list((d / "quarantine").iterdir()), "the cut bytes were not kept"


def test_cpus_the_kernel_refuses_are_a_config_error_and_no_log_is_made(tmp_path: Path, shim: Path) -> None:
    """`serve --cpus` when the kernel refuses the affinity (as a cgroup cpuset that allows none of the CPUs
    does, with EINVAL): one line naming the flag and the reason, exit 2, before any file of the log exists."""
    directory = tmp_path / "wal"
    env = {**python_env(), "LD_PRELOAD": str(shim), "WALSVC_FAULT": "call=setaffinity,errno=EINVAL"}
    proc = subprocess.run(walsvc_cmd("serve", "--dir", str(directory), "--cpus", "0"), cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert "walsvc_fault: sched_setaffinity" in proc.stderr, proc.stderr  # the fault really happened
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("walsvc: error:")]
    assert errors == ["walsvc: error: --cpus: cannot run the writer on CPUs 0: Invalid argument"], proc.stderr
    assert not directory.exists()


def test_a_head_whose_own_fsync_failed_is_what_the_stop_records(tmp_path: Path, writers, shim: Path) -> None:
    """HEAD is written (readers may read up to it) and then its fsync fails: that commit did not happen, but
    its frames were fsynced before HEAD was written.  The stop record takes HEAD's LSN, so the restart keeps
    what readers may have read.  Before, it took the last commit's, and the restart cut records that a
    reader could already have processed."""
    d = tmp_path / "wal"
    fault = Fault(Site("head-fsync", "shim", "fdatasync", "HEAD update", "HEAD", shim_options="path=HEAD"),
                  errno.EIO, True, tmp_path, shim)
    writer = writers(d, fsync="always", wrapper=fault.wrapper, env=fault.env).start()
    with walsvc.Producer(d, ack_timeout_s=30) as producer:
        assert producer.put(b"before", b"v").result(10) == 1
        fault.arm(writer.pid)
        with pytest.raises(LogStoppedError):
            for i in range(2000):  # HEAD is fsynced at most every 100 ms: one of these meets the fault
                producer.put(b"after", b"%d" % i).result(30)
                time.sleep(0.001)
        st = status(d)
        shown = H.load(d).committed_lsn  # the last HEAD written, still on the file while the writer runs
        assert "HEAD update" in st["stopped"]["operation"], st["stopped"]
        assert shown > st["committed_lsn"], (shown, st["committed_lsn"])
    assert writer.stop() == 0
    assert stopped.load(d).committed_lsn == shown
    writer.start(faulty=False)
    assert writer.ready_committed_lsn() == shown
    assert writer.stop() == 0
    assert [r.lsn for r in verify_log(d)] == list(range(1, shown + 1))


def test_a_frame_write_that_fails_in_an_embedded_log_commits_none_of_its_batch(tmp_path: Path, shim: Path) -> None:
    """Under `os` an embedded log commits each batch as soon as it is written, and only then: when the frame
    write fails, the committed LSN (in memory, in HEAD, in the stop record) stays at the batch before, and the
    next open reads exactly the batches written."""
    directory = tmp_path / "wal"
    code = (f"from walsvc import Log, Record\nfrom walsvc.errors import LogStoppedError\n"
            f"log = Log.open({str(directory)!r}, fsync='os')\n"
            "for _ in range(3):\n    log.append_batch([Record.put(b'k', b'v')] * 5)\n"
            "try:\n    log.append_batch([Record.put(b'k', b'v')] * 5)\nexcept LogStoppedError as exc:\n"
            "    print(log.committed_lsn, exc.operation.split()[0], exc.errno, flush=True)\n")
    env = {**python_env(), "LD_PRELOAD": str(shim),
           "WALSVC_FAULT": "call=pwritev,errno=EIO,after=3,path=.wal,mode=persistent"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert "walsvc_fault:" in done.stderr, done.stderr  # the fault was injected
    assert done.stdout.split() == ["15", "frame", str(errno.EIO)], (done.stdout, done.stderr)
    assert H.load(directory).committed_lsn == 15
    assert stopped.load(directory).committed_lsn == 15
    with Log.open(directory, fsync="os") as log:
        assert [r.lsn for r in log.read()] == list(range(1, 16))

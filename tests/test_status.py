"""`walsvc status` with no writer: the end of the log as the next open would find it, damage said plainly.

Real logs written with the embedded API, damaged on disk, then `python -m walsvc` processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import flip_bit, frame_offsets, rewind_head, zero_from
from helpers import run_all, run_cli

import walsvc
from walsvc.errors import ServiceUnavailableError
from walsvc import head as H
from walsvc import stopped


def six_batches(directory: Path) -> Path:
    """A closed log of six one-record batches (LSNs 1..6, one frame each); returns its segment file."""
    with walsvc.Log.open(directory, fsync="os") as log:
        for i in range(6):
            log.append(walsvc.Record.put(f"k{i}", f"v{i}"))
    return next(directory.glob("*.wal"))


def test_status_calls_a_corrupt_log_damaged_and_tail_raises_the_corruption(tmp_path: Path) -> None:
    """A flipped byte in frame 2 of 6, intact frames after it: serve would refuse the log and readers stop
    there.  Status used to say "committed up to LSN 1", exit 0, and tail --from 3 called LSN 3 past the end."""
    d = tmp_path / "wal"
    seg = six_batches(d)
    second = frame_offsets(seg)[1][0]
    flip_bit(seg, second)
    text, js, tail = run_all(["status", "--dir", d], ["status", "--dir", d, "--json"],
                             ["tail", "--dir", d, "--from", "3"])
    assert text.returncode == 1, (text.stdout, text.stderr)
    first = text.stdout.splitlines()[0]
    assert first.startswith("DAMAGED: ") and first.endswith("; run walsvc verify"), text.stdout
    assert f"segment {seg.name}, offset {second}, LSN 2" in first, first
    assert "committed up to LSN 1" not in text.stdout
    assert "HEAD says committed up to LSN 6" in text.stdout, text.stdout
    assert js.returncode == 1, js.stderr
    st = json.loads(js.stdout)
    assert f"offset {second}" in st["damage"] and st["head_committed_lsn"] == 6, st
    assert tail.returncode == 1, (tail.stdout, tail.stderr)
    assert "corruption: " in tail.stderr and "past the end" not in tail.stderr, tail.stderr
    assert f"offset {second}" in tail.stderr, tail.stderr


@pytest.mark.parametrize("tear", ["truncated", "zero-filled"])
def test_a_torn_tail_in_the_newest_segment_is_not_damage(tmp_path: Path, tear: str) -> None:
    """What a crash leaves (the last frame cut short) is cut silently by the next open: status says so and
    exits 0, and every record before it reads."""
    d = tmp_path / "wal"
    seg = six_batches(d)
    last = frame_offsets(seg)[-1][0]
    rewind_head(d, 5)  # the crash came while LSN 6 was being written
    if tear == "truncated":
        os.truncate(seg, last + 20)
    else:
        zero_from(seg, last + 20)
    text, js, tail = run_all(["status", "--dir", d], ["status", "--dir", d, "--json"],
                             ["tail", "--dir", d, "--from", "3"])
    assert text.returncode == 0, (text.stdout, text.stderr)
    assert "DAMAGED" not in text.stdout and "committed up to LSN 5" in text.stdout, text.stdout
    assert "torn tail: " in text.stdout and f"offset {last}); the next start cuts it" in text.stdout, text.stdout
    st = json.loads(js.stdout)
    assert (js.returncode, st["damage"], st["committed_lsn"]) == (0, None, 5), st
    assert [line.split("\t")[0] for line in tail.stdout.splitlines()] == ["3", "4", "5"], tail.stderr


def test_status_shows_a_log_that_stopped_on_an_error(tmp_path: Path) -> None:
    """A stopped log ends at the LSN it had committed (readers read no further, the next open cuts the rest),
    damage after that LSN included: a state to show, exit 0, not damage."""
    d = tmp_path / "wal"
    seg = six_batches(d)
    stopped.write(d, stopped.Stopped(4, "fdatasync failed on 00000000000000000001.wal (EIO)"))
    rewind_head(d, 4)  # a stopped log's HEAD never names more than its stop record
    flip_bit(seg, frame_offsets(seg)[4][0])  # LSN 5: written after the stop, never committed
    text, js, tail = run_all(["status", "--dir", d], ["status", "--dir", d, "--json"],
                             ["tail", "--dir", d, "--from", "6"])
    assert text.returncode == 0, (text.stdout, text.stderr)
    assert "DAMAGED" not in text.stdout and "committed up to LSN 4" in text.stdout, text.stdout
    assert ("stopped on an error at LSN 4: fdatasync failed on 00000000000000000001.wal (EIO); the next start "
            "cuts what was written after it") in text.stdout, text.stdout
    st = json.loads(js.stdout)
    assert st["stopped_at"] == {"committed_lsn": 4, "reason": "fdatasync failed on 00000000000000000001.wal (EIO)"}
    assert (st["damage"], st["committed_lsn"]) == (None, 4), st
    assert tail.returncode == 2 and "committed up to LSN 4" in tail.stderr, tail.stderr


def test_a_dead_writers_pid_held_by_another_process_is_no_writer(tmp_path: Path, writers) -> None:
    """After kill -9 the writer's PID stays in HEAD, LOCK and ENDPOINTS, and another process may get it (PIDs
    are few in a container).  Here a `sleep` child stands in for that process: HEAD and LOCK name its PID, LOCK
    with the dead writer's start time.  Status used to call the writer unresponsive, produce waited for acks
    from it, verify said it was running, and a Reader was not offline."""
    d = tmp_path / "wal"
    writer = writers(d, fsync="os").start()
    with walsvc.Producer(d) as producer:
        assert producer.put("k", "v").result(30) == 1
    writer.kill9()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        head = H.load(d)
        assert head.writer_pid == writer.pid and head.writer_alive() is False
        pid, *ticks = (d / "LOCK").read_text().split()  # "PID START NS": PID, start time, PID namespace
        assert pid == str(writer.pid)
        (d / "LOCK").write_text(" ".join([str(sleeper.pid), *ticks]) + "\n")  # its PID reused, not its start
        (d / "HEAD").write_bytes(H.encode(head._replace(writer_pid=sleeper.pid)))
        (d / "ENDPOINTS").write_text((d / "ENDPOINTS").read_text().replace(f'"pid": {writer.pid}',
                                                                           f'"pid": {sleeper.pid}'))
        with walsvc.Reader(d) as reader:
            assert reader.offline and [r.lsn for r in reader.poll(0.1)] == [1]
        started = time.monotonic()
        produce = run_cli("produce", "--dir", str(d), "--timeout", "30", input="x\n")
        assert time.monotonic() - started < 20, "produce waited for acks from a process that is no writer"
        text, js, verify = run_all(["status", "--dir", d], ["status", "--dir", d, "--json"],
                                   ["verify", "--dir", d, "--json"])
        assert text.returncode == 0 and text.stdout.startswith("writer: not running"), text.stdout
        assert json.loads(js.stdout)["writer"] == "offline", js.stdout
        assert produce.returncode == 1 and "no writer is running" in produce.stderr, produce.stderr
        assert verify.returncode == 0 and json.loads(verify.stdout)["live"] is False, verify.stdout
        with pytest.raises(ServiceUnavailableError, match="no writer is running"):
            walsvc.Producer(d)  # the Python API asks the same question

        # HEAD naming a live PID that LOCK does not name: a later writer took the lock, this one is gone.
        (d / "LOCK").write_text(" ".join([pid, *ticks]) + "\n")
        other = run_all(["status", "--dir", d, "--json"])[0]
        assert json.loads(other.stdout)["writer"] == "offline", other.stdout
        assert len(ticks) == 2, "LOCK does not record the writer's start time and PID namespace"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_writer_in_another_pid_namespace_is_taken_to_run(tmp_path: Path) -> None:
    """A writer in a container (often PID 1 there) records its namespace's PID: here, that PID names another
    process or none, so its liveness cannot be told, and it is taken to run (HEAD then bounds readers, which
    is safe).  Taking it for dead would let readers read past its commits.  LOCK names the namespace; a
    LOCK from this namespace is judged as before."""
    from walsvc.lock import WriterProbe, pid_namespace, start_ticks
    d = tmp_path / "wal"
    d.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    ours = pid_namespace()
    assert ours is not None
    (d / "LOCK").write_text(f"{dead.pid} 12345 {ours + 1}\n")
    assert WriterProbe(d).running(dead.pid) is True  # another namespace: cannot tell, so it runs
    assert WriterProbe(d).running(1) is True
    (d / "LOCK").write_text(f"{dead.pid} 12345 {ours}\n")
    assert WriterProbe(d).running(dead.pid) is False  # this namespace: the process is gone
    me = os.getpid()
    (d / "LOCK").write_text(f"{me} {start_ticks(me)} {ours}\n")
    assert WriterProbe(d).running(me) is True


def test_status_says_sealed_segments_are_left_to_verify(tmp_path: Path) -> None:
    """A flipped byte in a sealed segment: the next start trusts the seal, so status (which reads what recovery
    reads) exits 0; its text looked like a clean log's.  It now says what it checked, and verify finds it."""
    d = tmp_path / "wal"
    with walsvc.Log.open(d, fsync="os", segment_bytes=1 << 20) as log:
        for _ in range(3):
            log.append_batch([walsvc.Record.put(b"k", b"v" * 1000) for _ in range(500)])
    first = sorted(d.glob("*.wal"))[0]
    flip_bit(first, frame_offsets(first)[0][0] + 100)
    text, verify = run_all(["status", "--dir", d], ["verify", "--dir", d])
    assert text.returncode == 0, text.stdout + text.stderr
    assert "status checks the active segment only, `walsvc verify` every frame" in text.stdout, text.stdout
    assert verify.returncode == 1 and "PROBLEM" in verify.stdout and first.name in verify.stdout, verify.stdout

"""LogReader: bounded by the committed LSN, whole frames only, across segments, while the writer appends,
rotates and retention deletes; including a reader in another process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (MiB, check_records, fill, frame_offsets, python_env, rewind_head, segment_paths, value_for,
                      wait_line, zero_from)
from helpers import process_resources, settled_resources

import walsvc
from walsvc import Log, LogReader, Record
from walsvc import cursor
from walsvc import frame as F
from walsvc.errors import CorruptionError, LogClosedError, TruncatedError
from walsvc.segment import SCAN_CHUNK, read_seal


def _lsns(records) -> list[int]:
    return [r.lsn for r in records]


def _bases(directory: Path) -> list[int]:
    return [int(p.name[:20]) for p in segment_paths(directory)]


def _drain(reader: LogReader) -> list[Record]:
    out = []
    while batch := reader.read_batch():
        out.extend(batch)
    return out


def test_reader_without_writer_reads_all_valid_data(open_log, tmp_path):
    log = open_log(segment_bytes=MiB)
    lsns = fill(log, 2500, size=1000, per_batch=10)
    log.close()
    with LogReader(tmp_path / "wal") as reader:
        got = _drain(reader)
        assert _lsns(got) == lsns
        check_records(got, 1000)
        # Bounded memory: one scan chunk (or one frame) buffered, whatever the segment size.
        assert len(reader._seg.scanner._buf) <= SCAN_CHUNK
    with LogReader(tmp_path / "wal", "latest") as reader:
        assert reader.next_lsn == lsns[-1] + 1 and reader.read_batch() == []
    with pytest.raises(LogClosedError):
        reader.read_batch()


def test_reader_on_empty_or_missing_directory(tmp_path):
    with LogReader(tmp_path / "nothing") as reader:
        assert reader.next_lsn == 1 and reader.read_batch() == []


def test_batches_are_whole_frames_up_to_the_bound(open_log):
    log = open_log(segment_bytes=MiB)
    fill(log, 100, per_batch=10)
    bound = [30]  # a committed LSN is always the end of a batch
    reader = LogReader(log.directory, bound=lambda: bound[0])
    try:
        got = _drain(reader)
        assert _lsns(got) == list(range(1, 31))
        assert reader.read_batch() == []
        bound[0] = 70
        assert _lsns(reader.read_batch()) == list(range(31, 71))
        bound[0] = 100
        assert _lsns(_drain(reader)) == list(range(71, 101))
    finally:
        reader.close()


def test_committed_bound_beyond_data_is_corruption(open_log):
    """If the committed LSN says data exists that is not on disk, the reader says so instead of waiting."""
    log = open_log(segment_bytes=MiB)
    fill(log, 10)
    reader = LogReader(log.directory, bound=lambda: 50)
    try:
        assert _lsns(reader.read_batch()) == list(range(1, 11))  # the good records first
        with pytest.raises(CorruptionError) as info:
            reader.read_batch()
        assert "committed LSN 50" in str(info.value)
    finally:
        reader.close()


def test_a_frame_past_a_gap_above_the_bound_is_not_read(tmp_path):
    """The bound is checked against each frame's first LSN, not only against the LSN the reader expects next:
    after a gap in the LSNs (burned by a torn batch before skip markers existed), a bound inside the gap
    must not let the frame after it through."""
    directory = tmp_path / "wal"
    directory.mkdir()
    frames = [F.encode_frame(F.KIND_DATA, walsvc.record.encode_many([Record.put(b"k%d" % lsn, b"v")
                                                                      for lsn in range(base, base + 5)]),
                             5, base, 1000 + base) for base in (1, 11)]
    (directory / "00000000000000000001.wal").write_bytes(
        F.encode_segment_header(F.SegmentHeader(1, 1, 0)) + b"".join(frames))
    bound = [7]
    with LogReader(directory, bound=lambda: bound[0]) as reader:
        assert _lsns(_drain(reader)) == [1, 2, 3, 4, 5]
        bound[0] = 15
        assert _lsns(_drain(reader)) == [11, 12, 13, 14, 15]


def test_reader_skips_burned_lsns(tmp_path):
    directory = tmp_path / "wal"
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        fill(log, 5, per_batch=5)
        fill(log, 5, per_batch=5)
    (path,) = segment_paths(directory)
    off, h = frame_offsets(path)[-1]
    zero_from(path, off + F.FRAME_HEADER_SIZE + 3)  # torn with its header intact: LSNs 6..10 are burned
    rewind_head(directory, 5)  # the crash came while LSNs 6..10 were being written
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        assert log.append(Record.put(b"k00000011", value_for(11))) == 11
        assert _lsns(list(log.read())) == [1, 2, 3, 4, 5, 11]
        assert _lsns(list(log.read(start=7))) == [11]
        assert _lsns(list(log.read(start=5))) == [5, 11]
    with LogReader(directory) as reader:
        assert _lsns(_drain(reader)) == [1, 2, 3, 4, 5, 11]


def test_segments_deleted_before_the_reader_got_there_raise_truncated(open_log):
    log = open_log(segment_bytes=MiB, max_bytes=1)
    cursor.store(log.directory, "r", 0)
    fill(log, 3500, size=1000, per_batch=10)
    bases = _bases(log.directory)
    assert len(bases) >= 4
    reader = LogReader(log.directory, bound=lambda: log.committed_lsn)
    reader.BATCH_RECORDS = 100
    try:
        assert _lsns(reader.read_batch()) == list(range(1, 101))
        cursor.store(log.directory, "r", bases[2] - 1)
        assert len(log.apply_retention()) == 2  # the reader's segment and the next one
        got = []
        with pytest.raises(TruncatedError) as info:
            while batch := reader.read_batch():
                got.extend(batch)
        # What was in the open segment is delivered, then the gap is reported, never skipped silently.
        assert _lsns(got) == list(range(101, bases[1]))
        assert info.value.requested == bases[1] and info.value.oldest == bases[2]
        assert f"truncated by retention; oldest is {bases[2]}" in str(info.value)
    finally:
        reader.close()
    with LogReader(log.directory, bound=lambda: log.committed_lsn) as reader:
        assert _lsns(_drain(reader))[0] == bases[2]


@pytest.mark.parametrize("state", ["empty", "zeroed"])
def test_next_segment_without_header_yet_is_not_corruption(tmp_path, state):
    """The writer creates (and preallocates) the next segment before writing its header: a reader that sees
    the file in between must wait, not fail."""
    directory = tmp_path / "wal"
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        lsns = fill(log, 1500, size=1000, per_batch=10)
    paths = segment_paths(directory)
    assert len(paths) == 2
    pristine = paths[1].read_bytes()
    if state == "empty":
        paths[1].write_bytes(b"")
    else:
        zero_from(paths[1], 0)
    with LogReader(directory) as reader:
        got = _drain(reader)
        assert _lsns(got) == list(range(1, _bases(directory)[1]))
        assert reader.read_batch() == []
        paths[1].write_bytes(pristine)  # the header (and then data) arrive
        got += _drain(reader)
        assert _lsns(got) == lsns


def test_reader_follows_writer_across_rotations_and_retention(open_log):
    log = open_log(segment_bytes=MiB, max_bytes=4 * MiB)
    reader = LogReader(log.directory, bound=lambda: log.committed_lsn)
    seen: list[Record] = []
    try:
        for _ in range(40):
            fill(log, 200, size=1000, per_batch=20)
            seen.extend(_drain(reader))
        assert log.stats()["segments_deleted"] > 0
        assert _lsns(seen) == list(range(1, log.committed_lsn + 1))
        check_records(seen, 1000)
    finally:
        reader.close()


CHILD_READER = r"""
import json, sys, time
from pathlib import Path
from walsvc import LogReader
from walsvc.errors import TruncatedError
from walsvc.head import HeadReader

directory, target, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def value_for(lsn, size):
    seed = f"lsn={lsn};".encode()
    return (seed * (size // len(seed) + 1))[:size]

head = HeadReader(directory)
reader = LogReader(directory, "earliest", bound=lambda: head.read().committed_lsn)
seen, bad, errors, polls = [], [], [], 0
print("ready", flush=True)
deadline = time.monotonic() + 60
while (not seen or seen[-1] < target) and time.monotonic() < deadline:
    try:
        batch = reader.read_batch()
    except TruncatedError as exc:
        errors.append(str(exc))
        reader.close()
        reader = LogReader(directory, "earliest", bound=lambda: head.read().committed_lsn)
        continue
    polls += 1
    if not batch:
        time.sleep(0.001)
        continue
    for r in batch:
        seen.append(r.lsn)
        if r.key != b"k%08d" % r.lsn or r.value != value_for(r.lsn, len(r.value)) or len(r.value) != 400:
            bad.append(r.lsn)
Path(out).write_text(json.dumps({"seen": seen, "bad": bad, "errors": errors, "polls": polls}))
print("done", flush=True)
"""


def test_reader_in_another_process_tails_while_writer_rotates_and_deletes(tmp_path):
    directory = tmp_path / "wal"
    out = tmp_path / "seen.json"
    total = 24000  # ~10 MiB of 400-byte records through 1 MiB segments, retention keeping ~6 MiB
    log = Log.open(directory, segment_bytes=MiB, max_bytes=6 * MiB, fsync="batch", fsync_window_ms=5)
    try:
        proc = _spawn_reader(directory, total, out)
        wait_line(proc, "ready")
        lsn = 1
        started = time.monotonic()
        while lsn <= total:
            n = min(40, total - lsn + 1)
            got = log.append_batch([Record.put(b"k%08d" % (lsn + i), value_for(lsn + i, 400)) for i in range(n)])
            assert got[0] == lsn
            lsn += n
            if lsn % 400 == 1:
                time.sleep(0.002)  # let the reader run: the test is about concurrency, not a race to the end
        log.sync()
        wait_line(proc, "done", timeout=60)
        proc.wait(10)
        deleted = log.stats()["segments_deleted"]
    finally:
        log.close()
    result = json.loads(out.read_text())
    assert deleted > 0, "retention never deleted a segment: the test did not exercise deletion"
    assert result["errors"] == [], "the reader fell behind retention; the test should keep it up"
    assert result["bad"] == []  # no partial or mixed-up record
    seen = result["seen"]
    assert seen == list(range(1, total + 1))  # strictly increasing, no gaps, nothing past the end
    assert result["polls"] > 10  # it really tailed (many polls), not one read at the end
    assert time.monotonic() - started < 60


def _spawn_reader(directory: Path, total: int, out: Path):
    return subprocess.Popen([sys.executable, "-c", CHILD_READER, str(directory), str(total), str(out)],
                            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_damage_is_reported_on_every_retry_never_skipped(open_log, tmp_path):
    log = open_log(segment_bytes=MiB)
    fill(log, 2500, size=1000, per_batch=10)
    log.close()
    directory = tmp_path / "wal"
    second = segment_paths(directory)[1]
    with open(second, "r+b") as f:  # a damaged header on a segment that is not the newest
        f.write(b"\xff" * 8)
    with LogReader(directory) as reader:
        got = _drain_until_error(reader)
        assert _lsns(got) == list(range(1, _bases(directory)[1]))
        for _ in range(3):
            with pytest.raises(CorruptionError) as info:
                reader.read_batch()
            assert second.name in str(info.value)


def test_undecodable_batch_is_reported_on_every_retry(open_log):
    from walsvc.record import encode_many
    log = open_log(segment_bytes=MiB)
    fill(log, 5)
    # append_encoded trusts its caller: a frame whose header claims 3 records but holds 2.
    log.append_encoded(encode_many([Record.put(b"a", b"1"), Record.put(b"b", b"2")]), 3)
    fill(log, 5)
    reader = LogReader(log.directory, bound=lambda: log.committed_lsn)
    try:
        assert _lsns(reader.read_batch()) == [1, 2, 3, 4, 5]
        for _ in range(3):
            with pytest.raises(CorruptionError) as info:
                reader.read_batch()
            assert "undecodable batch" in str(info.value) and "LSN 6" in str(info.value)
    finally:
        reader.close()


def _drain_until_error(reader: LogReader) -> list[Record]:
    out = []
    while True:
        batch = reader.read_batch()
        if not batch:
            raise AssertionError("expected an error after the good records")
        out.extend(batch)
        if len(batch) < reader.BATCH_RECORDS:
            return out


def test_a_reader_whose_writer_died_reads_an_unsealed_segment_past_its_last_known_end(open_log, tmp_path):
    """A tailing reader knows the active segment only up to the written end HEAD named when it last read.
    When the writer then wrote more, switched segments and died before sealing the old one (kill -9 between
    the switch and the rotation thread's seal), the reader, now without a writer, must read that old segment
    to its real end and go on, not call the data beyond its stale end corruption."""
    directory = tmp_path / "wal"
    log = open_log(directory)
    fill(log, 100, size=1000)
    reader = walsvc.Reader(directory, start=1)
    seen = []
    while len(seen) < 100:
        seen += reader.poll(5)
    fill(log, 1200, size=1000)  # past the 1 MiB segment: the second segment starts
    total = log.next_lsn - 1
    log.close()  # HEAD now names no writer
    first = segment_paths(directory)[0]
    assert len(segment_paths(directory)) == 2
    with open(first, "r+b") as f:  # as if the writer died before its rotation thread sealed the first segment
        size = os.fstat(f.fileno()).st_size
        sealed = read_seal(f.fileno(), size)
        assert sealed is not None
        f.seek(sealed[1])
        f.write(bytes(size - sealed[1]))
    deadline = time.monotonic() + 10
    while len(seen) < total and time.monotonic() < deadline:
        seen += reader.poll(0.1)
    reader.close()
    assert [r.lsn for r in seen] == list(range(1, total + 1))


def test_a_reader_across_a_stop_and_a_restart_never_returns_a_cut_record(tmp_path: Path) -> None:
    """A reader tails a log that stops on an error (LSN 4 written, never committed), then keeps polling
    while a new writer's recovery cuts LSN 4 and appends 5-7 over those bytes.  It must return 1-3, then
    5-7.  Before, its buffer still held the old frame past the stop: it returned LSN 4 (b"NACKED") and then
    raised CorruptionError on the new bytes."""
    d = tmp_path / "wal"
    log = Log.open(d, fsync="batch", fsync_window_ms=1000)
    log.append_batch([Record.put(b"k%d" % i, b"committed") for i in range(3)])
    log.sync()
    log.append_encoded(walsvc.record.encode_many([Record.put(b"k3", b"NACKED")], 1 << 20), 1, wait=False)
    log.stop("fdatasync (on a test's behalf)", OSError(5, "Input/output error"))
    log.close()
    with walsvc.Reader(d, "earliest", recheck_s=0.01) as reader:
        seen = [(r.lsn, r.value) for r in reader.poll(0.2)]
        assert seen == [(1, b"committed"), (2, b"committed"), (3, b"committed")] and reader.offline
        assert reader.poll(0.05) == []
        with Log.open(d, fsync="always") as log:
            assert log.append_batch([Record.put(b"new%d" % i, b"after") for i in range(3)]) == [5, 6, 7]
            later: list[tuple[int, bytes]] = []
            deadline = time.monotonic() + 5
            while len(later) < 3 and time.monotonic() < deadline:
                later += [(r.lsn, r.value) for r in reader.poll(0.1)]
        assert later == [(5, b"after"), (6, b"after"), (7, b"after")]


def test_bytes_past_the_committed_bound_are_read_again_not_kept(tmp_path: Path) -> None:
    """A tailing reader stops at its bound with the next frame already in its buffer (written, not yet
    committed).  The log stops, and its reopen in the same process (the same PID in HEAD, so nothing tells
    the reader the writer changed) cuts that frame and writes 5-7 over its bytes.  The reader must return
    5-7, never the cut LSN 4 from its old buffer."""
    d = tmp_path / "wal"
    log = Log.open(d, fsync="always", fsync_thread=False)  # LSN 4 stays uncommitted: nobody syncs it
    log.append_batch([Record.put(b"k%d" % i, b"committed") for i in range(3)])
    log.sync()
    log.append_encoded(walsvc.record.encode_many([Record.put(b"k3", b"NACKED")], 1 << 20), 1, wait=False)
    bound = [3]
    reader = LogReader(d, 1, bound=lambda: bound[0])
    assert [(r.lsn, r.value) for r in reader] == [(1, b"committed"), (2, b"committed"), (3, b"committed")]
    log.stop("fdatasync (on a test's behalf)", OSError(5, "Input/output error"))
    log.close()
    with Log.open(d, fsync="always") as log:
        assert log.append_batch([Record.put(b"new%d" % i, b"after") for i in range(3)]) == [5, 6, 7]
        bound[0] = 7
        assert [(r.lsn, r.value) for r in reader] == [(5, b"after"), (6, b"after"), (7, b"after")]
    reader.close()


@pytest.mark.parametrize("kind", ["auto", "commit", "named", "group"])
def test_readers_dropped_without_close_free_their_resources(tmp_path: Path, writers, kind: str) -> None:
    """A reader garbage collected without close frees its files, inotify instance, ZeroMQ context and its
    cursor's lock (the same name opens again at once).  Before, each dropped reader kept its descriptors (an
    inotify instance each: the 129th fell back to COMMIT messages), a dropped COMMIT-woken or group reader
    hung the process in the collector (pyzmq's Context.__del__ waited for sockets nobody would close), and a
    dropped named reader kept its cursor busy."""
    d = tmp_path / "wal"
    writers(d).start()
    with walsvc.Producer(d) as producer:
        producer.put(b"k", b"v").result(10)

    def make() -> walsvc.Reader:
        if kind == "group":
            return walsvc.Reader(d, group="g", consumer="c")
        return walsvc.Reader(d, name="n" if kind == "named" else None, wake="commit" if kind == "commit" else "auto")

    make().close()
    baseline = process_resources()
    for _ in range(150):
        reader = make()
        reader.poll(0)
        if kind != "group":
            assert reader.woken_by == ("commit" if kind == "commit" else "head")
        del reader
    fds, threads = settled_resources(baseline, margin=10)
    assert fds <= baseline[0] + 10 and threads <= baseline[1] + 10, (baseline, (fds, threads))

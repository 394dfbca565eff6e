"""The Log: rotation, preallocation, restart after close and kill -9, seeking, fsync policies, the lock, config."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from conftest import (MiB, check_records, fill, frame_offsets, kill9, segment_paths, spawn, wait_line)
from walsvc import Log, LogReader, Record
from walsvc import frame as F
from walsvc.config import LogConfig
from walsvc.errors import ConfigError, LogClosedError, LogLockedError, RecordTooLargeError, TruncatedError
from walsvc.head import HeadReader
from walsvc.record import encode_many
from walsvc.segment import read_seal, segment_name


def _lsns(records) -> list[int]:
    return [r.lsn for r in records]


def _check_layout(directory: Path, segment_bytes: int, preallocated: bool, active_end: int | None = None) -> None:
    """Names are base LSNs in log order; sealed files end with their seal; the active one is preallocated."""
    paths = segment_paths(directory)
    bases = [int(p.name[:20]) for p in paths]
    assert bases[0] == 1 and bases == sorted(set(bases))
    assert [p.name for p in paths] == [segment_name(b) for b in bases]
    for i, path in enumerate(paths[:-1]):
        size = path.stat().st_size
        off, h = frame_offsets(path)[-1]
        assert h.kind == F.KIND_SEAL and off + h.size == size, path.name  # file size == seal end
        assert h.base_lsn == bases[i + 1]  # the seal's next LSN names the next file
        fd = os.open(path, os.O_RDONLY)
        try:
            seal, seal_off = read_seal(fd, size)
        finally:
            os.close(fd)
        assert seal_off == off and seal.last_lsn == bases[i + 1] - 1
        assert seal.record_count == bases[i + 1] - bases[i]
        assert seal.index and seal.index[0] == (bases[i], F.SEGMENT_HEADER_SIZE)
        # The sparse index: ascending, each entry names a frame that starts with that LSN, spaced out.
        frames = dict((o, fh) for o, fh in frame_offsets(path))
        assert [e[1] for e in seal.index] == sorted(e[1] for e in seal.index)
        for lsn, frame_off in seal.index:
            assert frames[frame_off].base_lsn == lsn
        assert all(b[1] - a[1] >= 64 * 1024 for a, b in zip(seal.index, seal.index[1:]))
        assert len(seal.index) >= off // (64 * 1024) - 1
        assert off <= segment_bytes  # data never pushed past segment_bytes (only the seal may follow)
    active = paths[-1]
    if preallocated:
        assert active.stat().st_size == segment_bytes
    elif active_end is not None:
        assert active.stat().st_size == active_end


@pytest.mark.parametrize("preallocate", [True, False])
def test_rotation_layout_and_clean_reopen(open_log, tmp_path, preallocate):
    log = open_log(segment_bytes=MiB, preallocate=preallocate)
    lsns = fill(log, 3500, size=1000, per_batch=10)
    assert len(segment_paths(log.directory)) >= 4
    assert log.stats()["segments"] == len(segment_paths(log.directory))
    _check_layout(log.directory, MiB, preallocate, log._active.end)
    log.close()
    _check_layout(log.directory, MiB, preallocate)
    log = open_log(segment_bytes=MiB, preallocate=preallocate)
    info = log.recovery
    assert not info.torn_tail and info.corruption is None and info.bytes_truncated == 0
    assert info.sealed_segments == len(segment_paths(log.directory)) - 1
    # Sealed segments are trusted from their seals: only the active segment's frames were scanned.
    assert 0 < info.bytes_scanned <= MiB
    assert info.segments_scanned == len(segment_paths(log.directory))
    assert log.committed_lsn == lsns[-1] and log.next_lsn == lsns[-1] + 1
    got = list(log.read())
    assert _lsns(got) == lsns
    check_records(got, 1000)
    assert log.append(Record.put(b"k", b"v")) == lsns[-1] + 1


def test_rotation_happens_when_the_next_batch_does_not_fit(open_log):
    log = open_log(segment_bytes=MiB)
    big = [Record.put(b"k", b"x" * 300_000)]
    log.append_batch(big)
    log.append_batch(big)
    log.append_batch(big)  # 3 x ~300 KB fits in 1 MiB
    assert len(segment_paths(log.directory)) == 1
    log.append_batch(big)  # the fourth does not: a new segment starts with it
    paths = segment_paths(log.directory)
    assert [p.name for p in paths] == [segment_name(1), segment_name(4)]
    # A batch larger than a segment still goes in (alone in its segment).
    huge = log.append_batch([Record.put(b"h", b"y" * 700_000), Record.put(b"h", b"z" * 700_000)])
    assert huge == [5, 6]
    assert [r.lsn for r in log.read(start=5)] == [5, 6]


def test_reopen_after_kill_9_of_writer_subprocess(tmp_path):
    directory = tmp_path / "wal"
    proc = spawn(f"""
import sys, time
from walsvc import Log, Record
log = Log.open({str(directory)!r}, segment_bytes=1 << 20, fsync="os")
for lsn in range(1, 2501):
    key = b"k%08d" % lsn
    seed = b"lsn=%d;" % lsn
    log.append(Record.put(key, (seed * (1000 // len(seed) + 1))[:1000]))
print("done", log.committed_lsn, flush=True)
time.sleep(60)
""")
    line = wait_line(proc, "done")
    assert line == "done 2500"
    kill9(proc)
    paths = segment_paths(directory)
    assert len(paths) >= 3
    assert paths[-1].stat().st_size == MiB  # the active segment, never sealed, still preallocated
    head = HeadReader(directory).read()
    assert head.committed_lsn == 2500 and head.writer_pid == proc.pid and not head.writer_alive()
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        info = log.recovery
        assert not info.torn_tail and info.corruption is None and info.bytes_truncated == 0
        got = list(log.read())
        assert _lsns(got) == list(range(1, 2501))
        check_records(got, 1000)
        assert log.append(Record.put(b"k", b"v")) == 2501


def test_kill_9_while_appending_recovers_a_prefix(tmp_path):
    directory = tmp_path / "wal"
    proc = spawn(f"""
from walsvc import Log, Record
log = Log.open({str(directory)!r}, segment_bytes=1 << 20, fsync="os")
print("ready", flush=True)
lsn = 1
while True:
    got = log.append_batch([Record.put(b"k%08d" % (lsn + i), ((b"lsn=%d;" % (lsn + i)) * 100)[:500])
                            for i in range(5)])
    lsn = got[-1] + 1
""")
    wait_line(proc, "ready")
    deadline = time.monotonic() + 10
    while len(segment_paths(directory)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    kill9(proc)
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        assert log.recovery.corruption is None
        got = list(log.read())
        bases = [int(p.name[:20]) for p in segment_paths(directory)]
        assert len(bases) >= 2 and len(got) >= bases[1] - 1  # everything up to the rotation at least
        assert len(got) % 5 == 0  # whole batches only
        assert _lsns(got) == list(range(1, len(got) + 1))
        check_records(got, 500)


# -- seeking ---------------------------------------------------------------------------------------------

def test_read_from_any_lsn(open_log):
    log = open_log(segment_bytes=MiB)
    lsns = fill(log, 3000, size=1000, per_batch=7)
    bases = [int(p.name[:20]) for p in segment_paths(log.directory)]
    assert len(bases) >= 3
    last = lsns[-1]
    starts = {1, 2, 7, 8, 9, 500, last - 1, last}
    for b in bases[1:]:
        starts |= {b - 1, b, b + 1}
    for start in sorted(starts):
        got = list(log.read(start=start))
        assert _lsns(got) == list(range(start, last + 1)), start
        check_records(got[:3], 1000)
    assert _lsns(list(log.read("earliest"))) == lsns
    assert list(log.read("latest")) == []
    assert list(log.read(start=last + 1)) == []
    assert list(log.read(start=last + 1000)) == []
    for bad in (0, -1, "middle", True, 1.5):
        with pytest.raises(ConfigError, match="^start: "):
            list(log.read(start=bad))


def test_latest_then_follow_new_appends(open_log):
    log = open_log(segment_bytes=MiB)
    fill(log, 100)
    reader = LogReader(log.directory, "latest", bound=lambda: log.committed_lsn)
    try:
        assert reader.next_lsn == 101 and reader.read_batch() == []
        new = fill(log, 2000, size=1000, per_batch=10)  # crosses a rotation
        seen = []
        while batch := reader.read_batch():
            seen.extend(batch)
        assert _lsns(seen) == new
        check_records(seen, 1000)
        assert reader.read_batch() == []
    finally:
        reader.close()


def test_reader_never_goes_past_committed_lsn(open_log):
    log = open_log(fsync="batch", fsync_window_ms=1000)
    first = fill(log, 1)
    assert log.sync() == 1  # an fsync just ended: under `batch` the next one waits a window (1 s)
    # The flusher may already have decided to fsync the first record and be waiting for the lock (held by
    # that sync, or by the rotation thread's fsync as it prepares the next segment after the open): such a
    # late fsync would cover what is written next.  Let it run first; it finds nothing to do.
    time.sleep(0.1)
    t0 = time.monotonic()
    lsns = fill(log, 10)
    visible = _lsns(list(log.read()))
    committed = log.committed_lsn
    if time.monotonic() - t0 < 0.5:  # well inside the window: the flusher has not synced again yet
        assert committed == 1
        assert visible == first  # the rest is written but not committed: invisible to readers
    assert visible == list(range(1, committed + 1))
    assert log.sync() == 11
    assert _lsns(list(log.read())) == first + lsns


# -- fsync policies --------------------------------------------------------------------------------------

def test_fsync_always_commits_before_append_returns(open_log):
    commits = []
    log = open_log(fsync="always", on_commit=commits.append)
    for _ in range(20):
        lsn = log.append(Record.put(b"k", b"v"))
        assert log.committed_lsn >= lsn
        assert HeadReader(log.directory).read().committed_lsn >= lsn
    assert log.stats()["fsyncs"] >= 1
    assert commits == sorted(commits) and commits[-1] == 20


def test_fsync_batch_commits_within_window_without_further_writes(open_log):
    log = open_log(fsync="batch", fsync_window_ms=50)
    fsyncs_before = log.stats()["fsyncs"]
    t0 = time.monotonic()
    lsn = log.append(Record.put(b"k", b"v"))
    deadline = t0 + 1.0
    while log.committed_lsn < lsn and time.monotonic() < deadline:
        time.sleep(0.005)
    elapsed = time.monotonic() - t0
    assert log.committed_lsn == lsn, "the batch flusher never committed the lone append"
    assert elapsed < 1.0
    assert log.stats()["fsyncs"] == fsyncs_before + 1
    # A burst: its last write is committed too, without another write following.
    lsns = fill(log, 50)
    deadline = time.monotonic() + 1.0
    while log.committed_lsn < lsns[-1] and time.monotonic() < deadline:
        time.sleep(0.005)
    assert log.committed_lsn == lsns[-1]
    assert HeadReader(log.directory).read().committed_lsn == lsns[-1]


def test_fsync_os_commits_immediately_without_fsync(open_log):
    log = open_log(fsync="os")
    for _ in range(10):
        lsn = log.append(Record.put(b"k", b"v"))
        assert log.committed_lsn == lsn
    assert log.stats()["fsyncs"] == 0


def test_group_commit_shares_fsyncs(open_log):
    log = open_log(fsync="always")
    threads, per_thread = 8, 40
    results: list[list[int]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads)

    def worker(i: int) -> None:
        barrier.wait()
        for j in range(per_thread):
            lsn = log.append(Record.put(f"t{i}".encode(), f"{j}".encode()))
            assert log.committed_lsn >= lsn
            results[i].append(lsn)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    all_lsns = sorted(lsn for r in results for lsn in r)
    assert all_lsns == list(range(1, threads * per_thread + 1))
    assert all(r == sorted(r) for r in results)
    fsyncs = log.stats()["fsyncs"]
    assert 1 <= fsyncs < threads * per_thread, fsyncs
    assert log.committed_lsn == threads * per_thread


def test_sync_and_wait_committed(open_log):
    log = open_log(fsync="batch", fsync_window_ms=1000)
    lsn = log.append(Record.put(b"k", b"v"))
    log.wait_committed(lsn)
    assert log.committed_lsn >= lsn
    lsn2 = log.append(Record.put(b"k", b"v"))
    assert log.sync() == lsn2 == log.committed_lsn


# -- config ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, key", [
    ({"segment_byte": MiB}, "segment_byte"),
    ({"segment_bytes": "1048576"}, "log.segment_bytes"),
    ({"segment_bytes": 1.0 * MiB}, "log.segment_bytes"),
    ({"segment_bytes": 1000}, "log.segment_bytes"),
    ({"fsync": "never"}, "log.fsync"),
    ({"fsync": True}, "log.fsync"),
    ({"fsync_window_ms": 0}, "log.fsync_window_ms"),
    ({"fsync_window_ms": True}, "log.fsync_window_ms"),
    ({"preallocate": 1}, "log.preallocate"),
    ({"on_corruption": "ignore"}, "log.on_corruption"),
    ({"max_record_bytes": 10}, "log.max_record_bytes"),
    ({"max_bytes": -1}, "retention.max_bytes"),
    ({"max_age_s": "1d"}, "retention.max_age_s"),
    ({"max_cursor_lag_bytes": -5}, "retention.max_cursor_lag_bytes"),
])
def test_config_errors_name_the_key(tmp_path, options, key):
    directory = tmp_path / "wal"
    with pytest.raises(ConfigError) as info:
        Log.open(directory, **options)
    assert info.value.key == key
    assert str(info.value).startswith(key)
    assert not directory.exists()  # checked before anything touches a file


def test_config_object_and_cross_field_check(tmp_path):
    with pytest.raises(ConfigError) as info:
        LogConfig(max_record_bytes=MiB, max_batch_bytes=MiB)
    assert info.value.key == "log.max_batch_bytes"
    with pytest.raises(ConfigError, match="either config= or keyword options"):
        Log.open(tmp_path / "wal", config=LogConfig(), fsync="os")
    with Log.open(tmp_path / "wal", config=LogConfig(segment_bytes=MiB, fsync="os")) as log:
        assert log.fsync_policy == "os"


# -- limits and lifecycle ---------------------------------------------------------------------------------

def test_too_large_records_and_batches_rejected(open_log):
    log = open_log(max_record_bytes=4096, max_batch_bytes=8192)
    with pytest.raises(RecordTooLargeError):
        log.append(Record.put(b"k", b"x" * 5000))
    with pytest.raises(RecordTooLargeError):
        log.append_batch([Record.put(b"k", b"x" * 3000)] * 3)
    assert log.append(Record.put(b"k", b"x" * 4000)) == 1  # nothing was consumed by the refusals
    assert log.append_batch([]) == []


def test_closed_log_refuses_writes_and_head_says_no_writer(open_log):
    log = open_log()
    fill(log, 3)
    head = HeadReader(log.directory).read()
    assert head.committed_lsn == 3 and head.writer_pid == os.getpid() and head.writer_alive()
    log.close()
    log.close()  # idempotent
    with pytest.raises(LogClosedError):
        log.append(Record.put(b"k", b"v"))
    head = HeadReader(log.directory).read()
    assert head.committed_lsn == 3 and head.writer_pid == 0 and not head.writer_alive()


# -- one writer per directory -----------------------------------------------------------------------------

def test_second_writer_refused_names_holder_pid(tmp_path):
    directory = tmp_path / "wal"
    proc = spawn(f"""
import os, time
from walsvc import Log, Record
log = Log.open({str(directory)!r}, segment_bytes=1 << 20, fsync="os")
log.append(Record.put(b"from", b"child"))
print("ready", os.getpid(), flush=True)
time.sleep(60)
""")
    try:
        line = wait_line(proc, "ready")
        assert line == f"ready {proc.pid}"
        with pytest.raises(LogLockedError) as info:
            Log.open(directory, segment_bytes=MiB, fsync="os")
        assert info.value.pid == proc.pid
        assert f"process {proc.pid}" in str(info.value)
        assert str(directory) in str(info.value)
        # Still refused on retry, and the refusal changed nothing on disk.
        with pytest.raises(LogLockedError):
            Log.open(directory, segment_bytes=MiB, fsync="os")
    finally:
        kill9(proc)
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        assert [(r.lsn, r.key, r.value) for r in log.read()] == [(1, b"from", b"child")]
        # And now this process holds it: a second open here is refused too, naming us.
        with pytest.raises(LogLockedError) as info:
            Log.open(directory, segment_bytes=MiB, fsync="os")
        assert info.value.pid == os.getpid()


def test_read_below_first_lsn_after_retention_raises_truncated(open_log):
    log = open_log(segment_bytes=MiB, max_bytes=2 * MiB)
    fill(log, 4000, size=1000, per_batch=10)
    first = log.first_lsn
    assert first > 1
    with pytest.raises(TruncatedError) as info:
        list(log.read(start=1))
    assert f"truncated by retention; oldest is {first}" in str(info.value)
    assert info.value.oldest == first and info.value.requested == 1
    assert _lsns(list(log.read()))[0] == first


def test_batch_flusher_never_strands_a_write_racing_its_fsync(tmp_path):
    """A write that lands while the flusher is between reading the written position and fsyncing must still
    be committed within the window, though no further write follows.  The interleaving is forced through
    the Syncer's own snapshot hook (a real file; nothing mocked)."""
    from walsvc.fsync import Syncer
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    commits: list[int] = []
    state = {"end": 2, "race": True}
    syncer: Syncer

    def snapshot() -> tuple[int, int, Path]:
        taken = (fd, state["end"], tmp_path / "f")
        if state["race"]:  # the writer appends right after the flusher took its snapshot
            state["race"] = False
            state["end"] = 3
            syncer.written(3)
        return taken

    syncer = Syncer("batch", 20, snapshot, commits.append, 1)
    try:
        syncer.written(2)
        deadline = time.monotonic() + 1.0
        while syncer.committed_end < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert commits[:1] == [2]
        assert syncer.committed_end == 3, "the racing write was never fsynced"
    finally:
        syncer.close()
        os.close(fd)


def test_a_commit_never_publishes_an_end_below_one_already_published() -> None:
    """Under `os` the writer's loop commits what it wrote while the rotation thread commits a sealed
    segment's end: whichever reaches the commit second must not publish a lower end after a higher one
    (HEAD, and every reader's bound, would step back).  Here the lower commit waits for the lock while the
    higher one is published."""
    from walsvc.fsync import Syncer
    published: list[int] = []
    syncer = Syncer("os", 0, lambda: (0, 0, None), lambda end: None, 1, publish=published.append, thread=False)
    with syncer._fail_lock:
        lower = threading.Thread(target=syncer._commit, args=(10,))
        lower.start()
        time.sleep(0.1)  # it has looked at the committed end and waits for the lock
        syncer._commit(20)  # the lock is reentrant: this thread holds it
    lower.join(5)
    assert published == [20] and syncer.committed_end == 20


def test_read_batches_gives_what_read_gives_a_list_at_a_time(tmp_path: Path) -> None:
    with Log.open(tmp_path, fsync="os") as log:
        for i in range(30):
            log.append_batch([Record.put(b"k%d-%d" % (i, j), b"v" * j) for j in range(7)])
        batches = list(log.read_batches(5))
        assert all(isinstance(b, list) and b for b in batches)
        flat = [r for b in batches for r in b]
        assert [(r.lsn, r.key, r.value) for r in flat] == [(r.lsn, r.key, r.value) for r in log.read(5)]
        assert [r.lsn for r in flat] == list(range(5, 211))


def test_read_steps_like_a_generator_and_closes_early(tmp_path: Path) -> None:
    """Log.read's iterator: next() and for-loops share one position, and close() releases the segment it
    holds open before the end, as a generator's close would."""
    with Log.open(tmp_path, fsync="os") as log:
        log.append_batch([Record.put(b"k%d" % i, b"v") for i in range(10)])
        records = log.read(3)
        assert next(records).lsn == 3 and next(records).lsn == 4
        assert [r.lsn for r in records] == list(range(5, 11))
        assert next(records, None) is None
        fds = len(os.listdir("/proc/self/fd"))
        early = log.read()
        assert next(early).lsn == 1
        assert len(os.listdir("/proc/self/fd")) == fds + 1  # the segment it reads
        early.close()
        assert len(os.listdir("/proc/self/fd")) == fds
        assert next(early, None) is None
        seen = []
        loop = log.read()
        for r in loop:  # closed inside its own for-loop: the loop ends there, mid-batch
            seen.append(r.lsn)
            if r.lsn == 2:
                loop.close()
        assert seen == [1, 2]


def test_producers_remembered_stay_within_max_producers_between_seals(open_log) -> None:
    """Producers that come and go are forgotten, least recently active first, as soon as a new one takes
    the table past `max_producers`, not at the next rotation.  Before, 300 one-batch producers in one
    segment left 300 remembered with max_producers = 50 (5,000 in a writer at the default 4,096)."""
    log = open_log(max_producers=50)
    payload = encode_many([Record.put(b"k", b"v")])
    for pid in range(1, 301):
        log.append_encoded(payload, 1, producer_id=pid, producer_seq=1)
    assert log.stats()["producers"] == 50
    assert log.producer_batches(300) is not None and log.producer_batches(250) is None
    assert sorted(log._producer_table()) == list(range(251, 301))

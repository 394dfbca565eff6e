"""Retention: by size, by age, protected by named cursors (unless they lag too far), never leaving a hole."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from conftest import MiB, check_records, fill, first_call, frame_offsets, fs_calls, segment_paths
from walsvc import Log, LogReader, Reader
from walsvc import cursor, retention
from walsvc import frame as F
from walsvc.errors import ConfigError, TruncatedError


def _lsns(records) -> list[int]:
    return [r.lsn for r in records]


def _bases(directory: Path) -> list[int]:
    return [int(p.name[:20]) for p in segment_paths(directory)]


def _assert_no_hole(directory: Path) -> None:
    """Every remaining sealed segment's seal names the next remaining file: only a prefix was deleted."""
    paths = segment_paths(directory)
    for path, nxt in zip(paths, paths[1:]):
        off, h = frame_offsets(path)[-1]
        assert h.kind == F.KIND_SEAL and h.base_lsn == int(nxt.name[:20]), path.name


def _disk_bytes(log: Log) -> int:
    paths = segment_paths(log.directory)
    return sum(p.stat().st_size for p in paths[:-1]) + log._active.end


def test_retention_by_size(open_log):
    log = open_log(segment_bytes=MiB, max_bytes=3 * MiB)
    lsns = fill(log, 8000, size=1000, per_batch=10)
    assert log.stats()["segments_deleted"] > 0
    assert log.first_lsn > 1 and log.first_lsn == _bases(log.directory)[0]
    # Retention runs at each rotation and deletes whole sealed segments, oldest first, until the log fits
    # max_bytes; the active segment then grows by at most segment_bytes until the next rotation.
    sealed_bytes = sum(p.stat().st_size for p in segment_paths(log.directory)[:-1])
    assert sealed_bytes <= 3 * MiB
    assert _disk_bytes(log) == log.total_bytes() <= 3 * MiB + MiB
    assert _disk_bytes(log) > 3 * MiB - MiB  # deletes only what it must
    _assert_no_hole(log.directory)
    got = list(log.read())
    assert _lsns(got) == list(range(log.first_lsn, lsns[-1] + 1))
    check_records(got, 1000)
    first = log.first_lsn
    log.close()
    # After a restart the log still starts at the oldest kept LSN and refuses reads below it.
    log = open_log(segment_bytes=MiB, max_bytes=3 * MiB)
    assert log.first_lsn == first and log.recovery.first_lsn == first
    with pytest.raises(TruncatedError) as info:
        LogReader(log.directory, start=first - 1)
    assert str(info.value) == f"LSN {first - 1} was truncated by retention; oldest is {first}"
    assert _lsns(list(log.read(start=first)))[:2] == [first, first + 1]


def test_no_retention_by_default(open_log):
    log = open_log(segment_bytes=MiB)
    fill(log, 5000, size=1000, per_batch=10)
    assert _bases(log.directory)[0] == 1 and log.stats()["segments_deleted"] == 0
    assert log.apply_retention() == []


def test_retention_by_age(open_log):
    log = open_log(segment_bytes=MiB, max_age_s=1)
    fill(log, 3500, size=1000, per_batch=10)
    sealed = segment_paths(log.directory)[:-1]
    assert len(sealed) >= 3
    assert log.apply_retention() == []  # sealed just now: younger than a second
    time.sleep(1.2)
    deleted = log.apply_retention()
    assert deleted == sealed
    assert segment_paths(log.directory) == [log._active.path]
    assert log.first_lsn == _bases(log.directory)[0]
    assert _lsns(list(log.read()))[0] == log.first_lsn


def test_retention_by_age_after_restart_uses_seal_time(open_log, tmp_path):
    log = open_log(segment_bytes=MiB)
    fill(log, 2500, size=1000, per_batch=10)
    sealed = segment_paths(log.directory)[:-1]
    log.close()
    time.sleep(1.2)
    log = open_log(segment_bytes=MiB, max_age_s=1)
    fill(log, 1)
    assert log.apply_retention() == sealed


def test_cursor_protects_segments(open_log):
    log = open_log(segment_bytes=MiB, max_bytes=2 * MiB)
    cursor.store(log.directory, "audit", 500)  # processed up to 500: the first segment is still needed
    lsns = fill(log, 6000, size=1000, per_batch=10)
    assert _bases(log.directory)[0] == 1 and log.stats()["segments_deleted"] == 0
    assert _disk_bytes(log) > 2 * MiB
    # The reader moves on past the second segment: those two go, the third (still needed) stays.
    bases = _bases(log.directory)
    cursor.store(log.directory, "audit", bases[2] - 1)
    deleted = log.apply_retention()
    assert [int(p.name[:20]) for p in deleted] == bases[:2]
    assert log.first_lsn == bases[2]
    _assert_no_hole(log.directory)
    # A cursor exactly at a segment's last LSN lets that segment go, not the one after.
    cursor.store(log.directory, "audit", bases[3] - 2)
    assert log.apply_retention() == []
    # Two cursors: the slowest one decides.
    cursor.store(log.directory, "fast", lsns[-1])
    assert log.apply_retention() == []
    cursor.store(log.directory, "audit", lsns[-1])
    assert log.apply_retention()
    assert _disk_bytes(log) <= 2 * MiB


def test_lagging_cursor_no_longer_protects(open_log):
    log = open_log(segment_bytes=MiB, max_bytes=2 * MiB, max_cursor_lag_bytes=4 * MiB)
    cursor.store(log.directory, "abandoned", 1)
    fill(log, 3000, size=1000, per_batch=10)  # about 3 MiB: within the lag limit, still protected
    assert _bases(log.directory)[0] == 1
    fill(log, 4000, size=1000, per_batch=10)  # now it lags by more than 4 MiB: retention by size resumes
    assert _bases(log.directory)[0] > 1
    assert _disk_bytes(log) <= 4 * MiB
    _assert_no_hole(log.directory)
    with pytest.raises(TruncatedError):
        list(log.read(start=2))


def test_a_cursor_lagging_by_exactly_the_limit_still_protects():
    """A cursor stops protecting only when it lags by *more* than max_cursor_lag_bytes (docs: an abandoned
    reader), so a reader exactly at the limit keeps its segments."""
    sealed = [retention.SealedSegment(1 + 100 * i, 100 * (i + 1), MiB, 0, Path(f"{i}.wal")) for i in range(4)]
    lag = retention.cursor_lag_bytes(50, sealed, 0)
    assert lag == 4 * MiB
    kept = retention.select(sealed, 0, 0, max_bytes=MiB, max_age_s=0, cursors={"slow": 50}, max_cursor_lag_bytes=lag)
    assert kept == []
    freed = retention.select(sealed, 0, 0, max_bytes=MiB, max_age_s=0, cursors={"slow": 50},
                             max_cursor_lag_bytes=lag - 1)
    assert freed == sealed[:3]


def test_a_cursor_store_makes_its_bytes_then_its_name_durable(tmp_path):
    """A stored cursor survives a power cut: its file is fsynced before the rename, and the cursors folder
    after it.  Without the folder's fsync the rename may be lost, and the reader processes records again."""
    d = (tmp_path / "wal").resolve()
    d.mkdir()
    cursor.store(d, "audit", 1)  # the folder exists: its own creation is not what is traced
    calls = fs_calls(f"from pathlib import Path\nfrom walsvc import cursor\ncursor.store(Path({str(d)!r}), 'audit', 7)",
                     tmp_path)
    cdir = str(d / "cursors")
    renamed = first_call(calls, ("rename", "renameat", "renameat2"), f"{cdir}/audit.cursor\"")
    assert renamed >= 0, calls
    assert 0 <= first_call(calls, ("fsync", "fdatasync"), ".audit.cursor.") < renamed, calls
    assert first_call(calls, ("fsync",), f"<{cdir}>", renamed) > renamed, calls
    assert cursor.load(d, "audit") == 7


def test_cursor_files(tmp_path):
    d = tmp_path / "wal"
    d.mkdir()
    assert cursor.load(d, "r") is None
    cursor.store(d, "r", 123)
    assert cursor.load(d, "r") == 123
    cursor.store(d, "r", 456)
    assert cursor.load(d, "r") == 456 and cursor.load_all(d) == {"r": 456}
    assert [p.name for p in (d / "cursors").iterdir()] == ["r.cursor"]  # no temp files left
    data = bytearray((d / "cursors" / "r.cursor").read_bytes())
    data[0] ^= 1
    (d / "cursors" / "r.cursor").write_bytes(bytes(data))
    assert cursor.load(d, "r") is None and cursor.load_all(d) == {}  # a damaged cursor protects nothing
    for bad in ("", ".hidden", "a/b", "x" * 101, "sp ace"):
        with pytest.raises(ConfigError):
            cursor.store(d, bad, 1)


def test_reader_keeps_reading_a_segment_deleted_under_it(open_log):
    log = open_log(segment_bytes=MiB, max_bytes=1)
    cursor.store(log.directory, "r", 0)  # protects everything for now
    lsns = fill(log, 2500, size=1000, per_batch=10)
    bases = _bases(log.directory)
    assert len(bases) >= 3
    reader = LogReader(log.directory, bound=lambda: log.committed_lsn)
    reader.BATCH_RECORDS = 100
    try:
        assert _lsns(reader.read_batch()) == list(range(1, 101))
        cursor.store(log.directory, "r", bases[1] - 1)
        first_file = segment_paths(log.directory)[0]
        assert log.apply_retention() == [first_file]  # exactly the reader's segment
        assert _bases(log.directory) == bases[1:]
        rest = []
        while batch := reader.read_batch():
            rest.extend(batch)
        assert _lsns(rest) == list(range(101, lsns[-1] + 1))  # the deleted file's rest, then on: no gap
        check_records(rest, 1000)
    finally:
        reader.close()


def _over_size(open_log) -> Log:
    """A log over max_bytes with nothing protecting its first segments: the next pass deletes some."""
    log = open_log(segment_bytes=MiB, max_bytes=2 * MiB)
    cursor.store(log.directory, "hold", 0)
    fill(log, 4000, size=1000, per_batch=10)
    assert cursor.delete_cursor(log.directory, "hold") and _bases(log.directory)[0] == 1
    return log


def _reset_earliest(log: Log) -> None:
    cursor.reset_cursor(log.directory, "late", "earliest")


def _first_commit(log: Log) -> None:
    with Reader(log.directory, "earliest", name="late") as reader:
        reader.commit(reader.poll(1)[0].lsn)


@pytest.mark.parametrize("store", [_reset_earliest, _first_commit], ids=["reset-earliest", "first-commit"])
def test_a_cursor_store_in_flight_holds_off_retention(open_log, monkeypatch, caplog, store):
    """The auditor's race (exp3): a cursor decided before a retention pass read the cursors and written after
    it did, then the deletes: the reader found its records gone.  Here the store pauses between its decision
    and its write; the pass waits for it, then skips, and the next pass sees the cursor."""
    log = _over_size(open_log)
    real = cursor.replace_file
    decided, resume = threading.Event(), threading.Event()

    def paused(path: Path, data: bytes) -> None:
        decided.set()
        assert resume.wait(10)
        real(path, data)

    monkeypatch.setattr(cursor, "replace_file", paused)
    storer = threading.Thread(target=store, args=(log,))
    storer.start()
    try:
        assert decided.wait(10)
        started = time.monotonic()
        assert log.apply_retention() == []
        assert time.monotonic() - started >= retention.LOCK_WAIT_S
        assert "retention skipped this pass" in caplog.text
    finally:
        resume.set()
        storer.join(10)
    assert log.apply_retention() == [] and _bases(log.directory)[0] == 1
    with Reader(log.directory, name="late") as reader:
        assert reader.poll(1)[0].lsn == cursor.load(log.directory, "late") + 1


def test_a_reset_to_earliest_waits_for_a_retention_pass(open_log, monkeypatch):
    """reset_cursor listed the segments for 'earliest' before anything stopped retention: a pass paused
    between its decision and its deletes (exp3's slow retention, here held by an event) let the reset store
    LSN 0, then deleted LSN 1 under it.  Now the reset waits for the pass and starts from what it left."""
    log = _over_size(open_log)
    real = retention.select
    decided, resume = threading.Event(), threading.Event()

    def paused(*args, **kwargs):
        doomed = real(*args, **kwargs)
        decided.set()
        assert resume.wait(10)
        return doomed

    monkeypatch.setattr(retention, "select", paused)
    passer = threading.Thread(target=log.apply_retention)
    passer.start()
    try:
        assert decided.wait(10)
        resetter = threading.Thread(target=_reset_earliest, args=(log,))
        resetter.start()
        resetter.join(0.5)
        assert resetter.is_alive(), "the reset stored its cursor in the middle of a retention pass"
    finally:
        resume.set()
        passer.join(10)
    resetter.join(10)
    first = _bases(log.directory)[0]
    assert first > 1 and cursor.load(log.directory, "late") == first - 1
    with Reader(log.directory, name="late") as reader:
        assert reader.poll(1)[0].lsn == first


def test_reset_to_a_deleted_lsn_is_refused(open_log):
    """Before, the reset stored it and the reader's next open raised TruncatedError instead."""
    log = open_log(segment_bytes=MiB, max_bytes=2 * MiB)
    fill(log, 4000, size=1000, per_batch=10)
    first = _bases(log.directory)[0]
    assert first > 1
    with pytest.raises(TruncatedError) as info:
        cursor.reset_cursor(log.directory, "r", first - 1)
    assert (info.value.requested, info.value.oldest) == (first - 1, first)
    assert cursor.load(log.directory, "r") is None
    assert cursor.reset_cursor(log.directory, "r", first) == first - 1

"""Recovery at open: torn tails at every byte, corruption in sealed and active segments, quarantine, LSNs.

What "LSNs are never reused" means here (asserted below):
- if the torn frame's header survived (the cut is at or past its 56-byte header), the torn batch's LSNs were
  handed out by the writer, so every later append gets an LSN above the torn batch's last LSN, also after
  further restarts;
- if the header did not survive, nothing on disk says which LSNs it had, so the next append continues right
  after the last intact batch (those LSNs never reached a reader or an acknowledged producer);
- unless HEAD called them committed: then they may have reached both, and the next append gets an LSN above
  HEAD's committed LSN (a loss refused as damage if HEAD says they were fsynced).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import (MiB, check_records, fill, first_call, flip_bit, frame_offsets, fs_calls, key_for, rewind_head,
                      segment_paths, value_for, zero_from)
from helpers import run_all
import walsvc
from walsvc import Log, LogReader, Record
from walsvc import frame as F
from walsvc.errors import CorruptionError
from walsvc.recovery import QUARANTINE


def _read_all(directory: Path) -> list[Record]:
    with LogReader(directory) as r:
        return list(r)


def _lsns(records: list[Record]) -> list[int]:
    return [r.lsn for r in records]


def _write_batches(directory: Path, batches: list[list[int]], **options) -> list[list[int]]:
    """Write batches of records (value sizes given) and close; returns the LSNs of each batch."""
    options.setdefault("segment_bytes", MiB)
    options.setdefault("fsync", "os")
    out = []
    with Log.open(directory, **options) as log:
        for sizes in batches:
            base = log.next_lsn
            out.append(log.append_batch([Record.put(key_for(base + i), value_for(base + i, s))
                                         for i, s in enumerate(sizes)]))
    return out


def _check_contents(records: list[Record]) -> None:
    for r in records:
        assert r.key == key_for(r.lsn)
        assert r.value == value_for(r.lsn, len(r.value))


# -- torn tails -----------------------------------------------------------------------------------------

def test_torn_tail_at_every_byte_of_last_batch(tmp_path):
    directory = tmp_path / "wal"
    lsns = _write_batches(directory, [[30, 40], [10], [50, 0, 20]])
    (path,) = segment_paths(directory)
    pristine = path.read_bytes()
    last_off, last_h = frame_offsets(path)[-1]
    assert last_h.base_lsn == 4 and last_h.count == 3
    previous = [lsn for batch in lsns[:-1] for lsn in batch]
    handed_out_end = lsns[-1][-1] + 1  # one past any LSN ever returned
    rewind_head(directory, previous[-1])  # the crash came while the last batch was being written
    head = (directory / "HEAD").read_bytes()
    for k in range(last_h.size + 1):
        path.write_bytes(pristine)
        (directory / "HEAD").write_bytes(head)
        zero_from(path, last_off + k)
        with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
            info = log.recovery
            cut = 0 < k < last_h.size
            assert info.torn_tail is cut, k
            assert info.corruption is None
            got = list(log.read())
            _check_contents(got)
            if k == last_h.size:
                assert _lsns(got) == previous + lsns[-1]
                assert log.committed_lsn == lsns[-1][-1]
                continue
            assert _lsns(got) == previous, k
            assert log.committed_lsn == previous[-1], k
            if cut:
                assert info.truncated_at == (path.name, last_off), k
                assert 0 < info.bytes_truncated <= k
            # The file is cut back to the last intact batch and re-reserved (still preallocated).
            assert path.stat().st_size == MiB
            tail = path.read_bytes()[last_off:last_off + last_h.size]
            if k >= F.FRAME_HEADER_SIZE:
                # The skip is kept on disk as an empty frame naming the next LSN to use.
                marker = F.decode_frame_header(tail)
                assert (marker.kind, marker.count, marker.base_lsn) == (F.KIND_DATA, 0, handed_out_end)
                assert tail[F.FRAME_HEADER_SIZE:] == bytes(last_h.size - F.FRAME_HEADER_SIZE)
            else:
                assert tail == bytes(last_h.size)
            new = log.append(Record.put(b"after", b"crash"))
            if k >= F.FRAME_HEADER_SIZE:
                assert new >= handed_out_end, k  # the torn batch's LSNs are burned
            else:
                assert new == previous[-1] + 1, k  # nothing on disk names the torn batch's LSNs
            assert log.committed_lsn == new
            assert _lsns(list(log.read()))[-1] == new
        # A second restart finds the same log: the appended record after the burned range.
        with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
            assert log.recovery.torn_tail is False and log.recovery.corruption is None
            assert _lsns(list(log.read())) == previous + [new]
            assert log.append(Record.put(b"x", b"y")) == new + 1


@pytest.mark.parametrize("keep", [F.FRAME_HEADER_SIZE, F.FRAME_HEADER_SIZE + 7])
def test_burned_lsns_survive_a_restart_without_appends(tmp_path, keep):
    """Torn batch with a surviving header: reopen, close without writing, reopen: LSNs still not reused."""
    directory = tmp_path / "wal"
    lsns = _write_batches(directory, [[10, 10], [10, 10, 10]])
    (path,) = segment_paths(directory)
    last_off, _ = frame_offsets(path)[-1]
    zero_from(path, last_off + keep)
    rewind_head(directory, lsns[0][-1])  # the crash came while the last batch was being written
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        assert log.recovery.torn_tail
        assert log.next_lsn == lsns[-1][-1] + 1
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        assert log.committed_lsn == lsns[0][-1]
        assert log.append(Record.put(b"k", b"v")) > lsns[-1][-1]
        assert _lsns(list(log.read())) == lsns[0] + [lsns[-1][-1] + 1]


def test_torn_tail_without_preallocation(tmp_path):
    directory = tmp_path / "wal"
    lsns = _write_batches(directory, [[30], [30, 30]], preallocate=False)
    (path,) = segment_paths(directory)
    last_off, last_h = frame_offsets(path)[-1]
    assert path.stat().st_size == last_off + last_h.size  # not preallocated: the file ends with the data
    pristine = path.read_bytes()
    rewind_head(directory, lsns[0][-1])  # the crash came while the last batch was being written
    for k in (1, 30, F.FRAME_HEADER_SIZE, last_h.size - 1):
        path.write_bytes(pristine[:last_off + k])
        with Log.open(directory, segment_bytes=MiB, fsync="os", preallocate=False) as log:
            assert log.recovery.torn_tail
            assert _lsns(list(log.read())) == lsns[0]
        # Cut back to the last intact batch (plus the empty frame that keeps the torn LSNs burned).
        assert path.stat().st_size == last_off + (F.FRAME_HEADER_SIZE if k >= F.FRAME_HEADER_SIZE else 0)


def test_append_batch_is_atomic(tmp_path):
    """A batch is one frame: cutting anywhere inside it loses all of its records, never some."""
    directory = tmp_path / "wal"
    lsns = _write_batches(directory, [[20], [20] * 10])
    (path,) = segment_paths(directory)
    frames = frame_offsets(path)
    assert len(frames) == 2 and frames[1][1].count == 10
    off, h = frames[1]
    rewind_head(directory, lsns[0][-1])  # the crash came while the second batch was being written
    pristine = path.read_bytes()
    for k in range(1, h.size, 17):
        path.write_bytes(pristine)
        zero_from(path, off + k)
        assert _lsns(_read_all(directory)) == lsns[0]  # a reader without a writer: none of the batch
        with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
            assert _lsns(list(log.read())) == lsns[0]


batch_sizes = st.lists(st.lists(st.integers(0, 200), min_size=1, max_size=6), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=batch_sizes, data=st.data())
def test_recovery_property_cut_inside_last_batch(tmp_path_factory, batches, data):
    directory = tmp_path_factory.mktemp("prop") / "wal"
    lsns = _write_batches(directory, batches)
    (path,) = segment_paths(directory)
    last_off, last_h = frame_offsets(path)[-1]
    k = data.draw(st.integers(0, last_h.size - 1), label="cut")
    zero_from(path, last_off + k)
    rewind_head(directory, lsns[-1][0] - 1)  # the crash came while the last batch was being written
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        expected = [lsn for batch in lsns[:-1] for lsn in batch]
        got = list(log.read())
        assert _lsns(got) == expected
        _check_contents(got)
        assert log.recovery.torn_tail is (k > 0)
        assert log.recovery.records_valid == len(expected)
        assert log.append(Record.put(b"n", b"v")) >= (lsns[-1][-1] + 1 if k >= F.FRAME_HEADER_SIZE
                                                      else len(expected) + 1)


# -- zero tails are not damage -----------------------------------------------------------------------------

def test_clean_reopen_is_not_torn_or_corrupt(open_log, tmp_path):
    log = open_log()
    fill(log, 50, per_batch=5)
    log.close()
    log = open_log()
    info = log.recovery
    assert not info.torn_tail and info.corruption is None and info.bytes_truncated == 0
    assert info.records_valid == 50 and info.last_lsn == 50 and info.first_lsn == 1
    assert info.segments_scanned == 1 and info.duration_s >= 0
    assert "50 records" in info.summary()
    assert log.next_lsn == 51 and log.committed_lsn == 50


def test_empty_log_starts_at_lsn_1(open_log):
    log = open_log()
    assert log.committed_lsn == 0 and log.next_lsn == 1 and list(log.read()) == []
    assert log.append(Record.put(b"a", b"b")) == 1
    assert log.committed_lsn == 1


def test_segment_whose_header_never_reached_disk_is_dropped(tmp_path, open_log):
    log = open_log(segment_bytes=MiB)
    fill(log, 3000, size=1000, per_batch=10)  # about three segments
    log.close()
    paths = segment_paths(tmp_path / "wal")
    assert len(paths) >= 3
    # A crash right after creating (and preallocating) the next segment but before its header was written.
    last = paths[-1]
    zero_from(last, 0)
    before = list(range(1, int(last.name[:20])))
    rewind_head(tmp_path / "wal", before[-1])
    log = open_log()
    assert not log.recovery.torn_tail and log.recovery.corruption is None
    assert _lsns(list(log.read())) == before
    lsn = log.append(Record.put(b"k", b"v"))
    assert lsn == before[-1] + 1
    # The re-created segment and every sealed one are accounted for (stats, retention).
    assert log.stats()["segments"] == len(segment_paths(tmp_path / "wal")) == len(paths)
    assert log.total_bytes() == sum(p.stat().st_size for p in paths[:-1]) + log._active.end


# -- corruption ------------------------------------------------------------------------------------------

def _multi_segment_log(directory: Path, records: int = 3000, size: int = 1000) -> list[int]:
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        lsns = fill(log, records, size=size, per_batch=10)
    assert len(segment_paths(directory)) >= 3
    return lsns


def test_flipped_bit_in_sealed_segment(tmp_path):
    directory = tmp_path / "wal"
    lsns = _multi_segment_log(directory)
    first = segment_paths(directory)[0]
    frames = frame_offsets(first)
    assert frames[-1][1].kind == F.KIND_SEAL
    bad_off, bad_h = frames[len(frames) // 2]
    flip_bit(first, bad_off + F.FRAME_HEADER_SIZE + 100, 3)

    with pytest.raises(CorruptionError) as info:
        Log.open(directory, segment_bytes=MiB, fsync="os", verify=True)
    assert first.name in str(info.value)
    # The failed open released the directory: a default open (no rescan of sealed segments) works.
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        assert log.recovery.corruption is None and not log.recovery.torn_tail
        assert log.committed_lsn == lsns[-1]
        got: list[Record] = []
        with pytest.raises(CorruptionError) as info:
            for r in log.read():
                got.append(r)
        assert _lsns(got) == list(range(1, bad_h.base_lsn))
        check_records(got, 1000)
        assert info.value.segment == first.name and info.value.offset == bad_off
        assert info.value.lsn == bad_h.base_lsn and f"LSN {bad_h.base_lsn}" in str(info.value)
        assert first.name in str(info.value) and f"offset {bad_off}" in str(info.value)
        # The damage stays in its segment: reading from the next segment on works.
        second_base = int(segment_paths(directory)[1].name[:20])
        after = list(log.read(start=second_base))
        assert _lsns(after) == list(range(second_base, lsns[-1] + 1))
    # A reader without a writer reports it too.
    with pytest.raises(CorruptionError):
        _read_all(directory)


@pytest.mark.parametrize("where", ["payload", "header"])
def test_flipped_bit_mid_active_segment_fails_open(tmp_path, where):
    directory = tmp_path / "wal"
    _write_batches(directory, [[100] * 3 for _ in range(20)])
    (path,) = segment_paths(directory)
    off, h = frame_offsets(path)[7]
    flip_bit(path, off + (F.FRAME_HEADER_SIZE + 40 if where == "payload" else 20))
    pristine = path.read_bytes()
    with pytest.raises(CorruptionError) as info:
        Log.open(directory, segment_bytes=MiB, fsync="os")
    msg = str(info.value)
    assert path.name in msg and f"offset {off}" in msg, msg
    assert info.value.segment == path.name and info.value.offset == off
    assert path.read_bytes() == pristine  # nothing was cut
    assert not (directory / QUARANTINE).exists()
    # Still refused on a second try: never silently truncated.
    with pytest.raises(CorruptionError):
        Log.open(directory, segment_bytes=MiB, fsync="os")


def test_damaged_last_batch_is_a_torn_tail(tmp_path):
    """A bad CRC in the last batch, with only zeros after it, is what a crash mid-write leaves: it is cut as
    a torn tail (not reported as corruption), and its LSNs stay burned."""
    directory = tmp_path / "wal"
    lsns = _write_batches(directory, [[100] * 3 for _ in range(5)])
    (path,) = segment_paths(directory)
    off, h = frame_offsets(path)[-1]
    flip_bit(path, off + F.FRAME_HEADER_SIZE + 5)
    rewind_head(directory, lsns[-2][-1])  # the crash came while the last batch was being written
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        assert log.recovery.torn_tail and log.recovery.corruption is None
        assert log.recovery.truncated_at == (path.name, off)
        assert _lsns(list(log.read())) == [lsn for b in lsns[:-1] for lsn in b]
        assert log.append(Record.put(b"k", b"v")) == lsns[-1][-1] + 1


def test_truncate_mode_in_active_segment_saves_cut_bytes_and_burns_lsns(tmp_path):
    directory = tmp_path / "wal"
    lsns = _write_batches(directory, [[100] * 3 for _ in range(20)])
    (path,) = segment_paths(directory)
    off, h = frame_offsets(path)[7]
    flip_bit(path, off + F.FRAME_HEADER_SIZE + 40)
    damaged = path.read_bytes()
    with Log.open(directory, segment_bytes=MiB, fsync="os", on_corruption="truncate") as log:
        info = log.recovery
        assert info.corruption and path.name in info.corruption and str(off) in info.corruption
        assert info.truncated_at == (path.name, off)
        saved = directory / QUARANTINE / f"{path.name}.from-{off}"
        assert str(saved) in info.quarantined
        assert saved.read_bytes() == damaged[off:]
        assert _lsns(list(log.read())) == list(range(1, h.base_lsn))
        new = log.append(Record.put(b"k", b"v"))
        assert new > lsns[-1][-1]
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        assert log.recovery.corruption is None
        assert _lsns(list(log.read())) == list(range(1, h.base_lsn)) + [new]


def test_truncate_mode_quarantines_later_segments(tmp_path):
    directory = tmp_path / "wal"
    lsns = _multi_segment_log(directory)
    paths = segment_paths(directory)
    second = paths[1]
    seal_off, seal_h = frame_offsets(second)[-1]
    assert seal_h.kind == F.KIND_SEAL
    flip_bit(second, seal_off + F.FRAME_HEADER_SIZE + 2)  # the seal is damaged: the segment looks unsealed
    damaged = second.read_bytes()
    with pytest.raises(CorruptionError) as info:
        Log.open(directory, segment_bytes=MiB, fsync="os")
    assert second.name in str(info.value) and f"offset {seal_off}" in str(info.value)
    assert segment_paths(directory) == paths

    with Log.open(directory, segment_bytes=MiB, fsync="os", on_corruption="truncate") as log:
        info = log.recovery
        qdir = directory / QUARANTINE
        assert segment_paths(directory) == paths[:2]
        for p in paths[2:]:
            assert (qdir / p.name).is_file() and str(qdir / p.name) in info.quarantined
        assert (qdir / f"{second.name}.from-{seal_off}").read_bytes() == damaged[seal_off:]
        assert _lsns(list(log.read())) == list(range(1, seal_h.base_lsn))
        new = log.append(Record.put(b"k", b"v"))
        assert new > lsns[-1]
        assert log.first_lsn == 1
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        assert _lsns(list(log.read())) == list(range(1, seal_h.base_lsn)) + [new]


def test_truncate_mode_lsns_not_reused_after_restart_without_appends(tmp_path):
    directory = tmp_path / "wal"
    lsns = _multi_segment_log(directory)
    second = segment_paths(directory)[1]
    seal_off, _ = frame_offsets(second)[-1]
    flip_bit(second, seal_off + F.FRAME_HEADER_SIZE + 2)
    with Log.open(directory, segment_bytes=MiB, fsync="os", on_corruption="truncate") as log:
        assert log.next_lsn > lsns[-1]
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        assert log.append(Record.put(b"k", b"v")) > lsns[-1]


def test_bad_segment_header_is_corruption(tmp_path):
    directory = tmp_path / "wal"
    _multi_segment_log(directory)
    first = segment_paths(directory)[0]
    flip_bit(first, 20)
    with pytest.raises(CorruptionError) as info:
        Log.open(directory, segment_bytes=MiB, fsync="os")
    assert first.name in str(info.value) and "offset 0" in str(info.value)


def test_missing_middle_segment_is_corruption(tmp_path):
    """Retention only ever deletes the oldest segments; a hole in the middle is damage, not a clean log."""
    directory = tmp_path / "wal"
    _multi_segment_log(directory)
    paths = segment_paths(directory)
    paths[1].unlink()
    with pytest.raises(CorruptionError) as info:
        Log.open(directory, segment_bytes=MiB, fsync="os")
    assert paths[2].name in str(info.value) and paths[1].name[:20].lstrip("0") in str(info.value)
    assert info.value.lsn == int(paths[1].name[:20])
    # Without the hole (the oldest ones gone, as retention leaves it) the log opens at its new first LSN.
    paths[0].unlink()
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        assert log.first_lsn == int(paths[2].name[:20])
        assert _lsns(list(log.read()))[0] == log.first_lsn


def test_verify_with_truncate_mode_cuts_a_damaged_sealed_segment(tmp_path):
    """verify=True finds a flipped bit inside a sealed segment; truncate mode cuts at that frame, keeps the
    cut bytes and every later segment in quarantine/, and hands out no LSN twice."""
    directory = tmp_path / "wal"
    lsns = _multi_segment_log(directory)
    paths = segment_paths(directory)
    first = paths[0]
    bad_off, bad_h = frame_offsets(first)[2]
    flip_bit(first, bad_off + F.FRAME_HEADER_SIZE + 10)
    with Log.open(directory, segment_bytes=MiB, fsync="os", verify=True, on_corruption="truncate") as log:
        info = log.recovery
        assert info.truncated_at == (first.name, bad_off) and first.name in info.corruption
        qdir = directory / QUARANTINE
        assert (qdir / f"{first.name}.from-{bad_off}").is_file()
        assert all((qdir / p.name).is_file() for p in paths[1:])
        assert _lsns(list(log.read())) == list(range(1, bad_h.base_lsn))
        assert log.append(Record.put(b"k", b"v")) > lsns[-1]


@pytest.mark.parametrize("where", ["active", "older"])
def test_a_stop_record_cuts_what_follows_its_lsn_across_segments(tmp_path: Path, where: str) -> None:
    """STOPPED names the committed LSN of a log that stopped on an error.  Readers with no writer stop there;
    the next open cuts the rest, in the segment holding that LSN and every later one (quarantined), writes
    a skip marker so no cut LSN is handed out again, and deletes the record.  Opening again cuts nothing
    more."""
    from walsvc import stopped
    d = tmp_path / "wal"
    with Log.open(d, segment_bytes=MiB, fsync="os") as log:
        for i in range(30):
            log.append_batch([Record.put(b"k%02d-%03d" % (i, j), b"v" * 1000) for j in range(100)])
    paths = segment_paths(d)
    assert len(paths) >= 3
    bases = [int(p.name[:20]) for p in paths]
    last = 3000
    # A batch boundary in the newest segment, or in the first one (two later segments to quarantine).
    keep = bases[-1] + 199 if where == "active" else 500
    stopped.write(d, stopped.Stopped(keep, "fdatasync failed on a test's behalf"))
    with LogReader(d) as reader:
        assert [r.lsn for r in reader] == list(range(1, keep + 1))
    with Log.open(d, segment_bytes=MiB, fsync="os") as log:
        assert log.recovery.cut_after_stop == keep
        assert log.recovery.skipped_lsns == (keep + 1, last + 1)
        assert log.committed_lsn == keep
    assert stopped.load(d) is None
    quarantined = sorted(p.name for p in (d / QUARANTINE).iterdir())
    moved = [p.name for p in paths if int(p.name[:20]) > keep + 1]
    assert set(moved) <= set(quarantined) and any(".from-" in n for n in quarantined), quarantined
    assert len(moved) == (0 if where == "active" else len(paths) - 1)
    # A crash after the cut, before the record was deleted: the same cut again, the same skip.
    stopped.write(d, stopped.Stopped(keep, "fdatasync failed on a test's behalf"))
    with Log.open(d, segment_bytes=MiB, fsync="os") as log:
        assert log.append_batch([Record.put(b"after", b"x")]) == [last + 1]
    with Log.open(d, segment_bytes=MiB, fsync="os") as log:
        assert [r.lsn for r in log.read()] == [*range(1, keep + 1), last + 1]
        assert log.recovery.cut_after_stop is None


def test_a_damaged_stop_record_is_refused_not_read_as_another_lsn(tmp_path: Path) -> None:
    """A bit flipped in STOPPED's committed LSN would make the next open cut committed records (or keep
    uncommitted ones): its CRC is checked, and open refuses, naming the file, without changing a byte."""
    from walsvc import stopped
    d = tmp_path / "wal"
    _write_batches(d, [[10] * 5, [10] * 5])
    stopped.write(d, stopped.Stopped(5, "fdatasync failed on a test's behalf"))
    flip_bit(d / stopped.NAME, 8, 1)  # the committed LSN's low byte: 5 becomes 7
    before = [p.read_bytes() for p in segment_paths(d)]
    with pytest.raises(CorruptionError) as info:
        stopped.load(d)
    assert stopped.NAME in str(info.value)
    with pytest.raises(CorruptionError):
        Log.open(d, segment_bytes=MiB, fsync="os")
    assert [p.read_bytes() for p in segment_paths(d)] == before


def test_a_stop_record_with_no_segment_left_to_cut_is_forgotten(tmp_path: Path) -> None:
    """The only segment lost its header (a power cut after a switch; retention had deleted the rest) or no
    segment exists: nothing to cut, and the record must go, or the next open would cut what the next writer
    acks.  Before, it stayed, and a later open cut five acked records."""
    from walsvc import stopped
    from walsvc.segment import segment_name
    d = tmp_path / "wal"
    with Log.open(d, fsync="always") as log:
        log.append_batch([Record.put(b"k%d" % i, b"v") for i in range(10)])
    only = segment_paths(d)[0]
    headerless = d / segment_name(11)
    os.rename(only, headerless)
    with open(headerless, "r+b") as f:
        f.write(b"\0" * F.SEGMENT_HEADER_SIZE)
    stopped.write(d, stopped.Stopped(10, "fdatasync failed on a test's behalf"))
    with Log.open(d, fsync="always") as log:
        assert stopped.load(d) is None
        acked = log.append_batch([Record.put(b"acked%d" % i, b"v") for i in range(5)])
    with Log.open(d, fsync="always") as log:
        assert [r.lsn for r in log.read()] == acked

    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    stopped.write(empty, stopped.Stopped(3, "fdatasync failed on a test's behalf"))
    with Log.open(empty, fsync="always") as log:
        assert stopped.load(empty) is None


def test_a_committed_skip_marker_right_after_the_stop_lsn_is_kept_and_the_rest_cut(tmp_path: Path) -> None:
    """`Log.skip_to(100)` commits through 99 with an empty frame based at 100; batches written after it and
    never committed are cut at the next open.  Before, the marker counted as uncommitted, recovery found
    the data ending below the stop LSN and cut nothing: the three never-committed records were kept."""
    from walsvc import stopped
    from walsvc.recovery import offline_end
    from walsvc.record import encode_many
    d = tmp_path / "wal"
    log = Log.open(d, fsync="batch", fsync_window_ms=1000)
    log.append_batch([Record.put(b"k%d" % i, b"v") for i in range(5)])
    log.sync()
    log.skip_to(100)
    assert log.committed_lsn == 99
    log.append_encoded(encode_many([Record.put(b"never", b"acked")] * 3, 1 << 20), 3, wait=False)
    log.stop("fdatasync (on a test's behalf)", OSError(5, "Input/output error"))
    log.close()
    assert stopped.load(d).committed_lsn == 99
    assert offline_end(d).committed_lsn == 99
    with Log.open(d, fsync="always") as log:
        assert log.recovery.cut_after_stop == 99 and log.recovery.skipped_lsns == (100, 103)
        assert [r.lsn for r in log.read()] == [1, 2, 3, 4, 5]
        assert log.append_batch([Record.put(b"next", b"v")]) == [103]  # the cut LSNs are never handed out


def test_cutting_again_after_a_crash_keeps_the_first_cuts_evidence(tmp_path: Path) -> None:
    """A crash after the cut, before the stop record was deleted: the repeated cut saves to a new name, and
    the bytes the first cut saved (the never-committed batch) stay.  Before, they were overwritten."""
    from walsvc import stopped
    from walsvc.record import encode_many
    d = tmp_path / "wal"
    log = Log.open(d, fsync="batch", fsync_window_ms=1000)
    log.append_batch([Record.put(b"k", b"v")])
    log.sync()
    log.append_encoded(encode_many([Record.put(b"never", b"NACKED-evidence")], 1 << 20), 1, wait=False)
    log.stop("fdatasync (on a test's behalf)", OSError(5, "Input/output error"))
    log.close()
    Log.open(d, fsync="always").close()
    stopped.write(d, stopped.Stopped(1, "the same stop, the record not yet deleted"))
    Log.open(d, fsync="always").close()
    saved = sorted((d / QUARANTINE).iterdir())
    assert len(saved) == 2 and b"NACKED-evidence" in saved[0].read_bytes(), saved


def _acked_then_lost(tmp_path: Path, writers, fsync: str, keep: int) -> Path:
    """Ten records acked by a writer under `fsync`, the writer killed, then the last frame's bytes from `keep`
    on gone from the file: what a crash of the OS leaves when that page never reached the disk."""
    d = tmp_path / "wal"
    writer = writers(d, fsync=fsync).start()
    with walsvc.Producer(d) as producer:
        assert [producer.put(b"k%d" % i, b"v" * 100).result(30) for i in range(10)] == list(range(1, 11))
    writer.kill9()
    path = segment_paths(d)[-1]
    offset, last = frame_offsets(path)[-1]
    assert last.base_lsn == 10
    zero_from(path, offset + keep)
    return d


@pytest.mark.parametrize("keep", [0, F.FRAME_HEADER_SIZE], ids=["frame lost", "header kept"])
def test_lsns_committed_under_os_and_lost_in_a_crash_are_never_handed_out_again(tmp_path: Path, writers,
                                                                                  keep: int) -> None:
    """Under `os` a commit is a write to the page cache: a crash of the OS may take it, as the policy allows.
    But LSN 10 was acked, and readers, cursors and a mirror may have it; the next writer must not give LSN 10
    to another record (a mirror would drop the new one as a duplicate of the old).  status and verify say
    what was lost and call the log healthy; the next open skips to LSN 11."""
    d = _acked_then_lost(tmp_path, writers, "os", keep)
    status, verify, status_json = run_all(["status", "--dir", str(d)],
                                          ["verify", "--dir", str(d)],
                                          ["status", "--dir", str(d), "--json"])
    assert status.returncode == 0 and "lost: LSNs 10 to 10 were committed" in status.stdout, status
    assert verify.returncode == 0, verify
    assert "LSNs 10..10 were committed (HEAD) but the log's data ends" in verify.stdout, verify.stdout
    assert json.loads(status_json.stdout)["lost"] == {"first_lsn": 10, "last_lsn": 10}
    with Log.open(d, fsync="os") as log:
        assert log.recovery.lost_lsns == (10, 11)
        assert log.append_batch([Record.put(b"after", b"crash")]) == [11]
    assert [r.lsn for r in LogReader(d)] == list(range(1, 10)) + [11]


@pytest.mark.parametrize("keep", [0, F.FRAME_HEADER_SIZE], ids=["frame lost", "header kept"])
def test_lsns_fsynced_and_then_missing_are_refused_as_damage(tmp_path: Path, writers, keep: int) -> None:
    """Under `always` HEAD says LSN 10 was fsynced, so its loss is not a crash but damage (a disk that lied,
    a file changed by hand): the open refuses and changes no byte, status says DAMAGED and verify reports it.
    on_corruption = "truncate" starts without it, and LSN 10 is not handed out again."""
    d = _acked_then_lost(tmp_path, writers, "always", keep)
    before = segment_paths(d)[-1].read_bytes()
    status, verify = run_all(["status", "--dir", str(d)], ["verify", "--dir", str(d)])
    assert status.returncode == 1 and "DAMAGED: LSNs 10..10 were committed and fsynced" in status.stdout, status
    assert verify.returncode == 1 and "committed records are missing" in verify.stdout, verify
    with pytest.raises(CorruptionError, match=r"LSNs 10\.\.10 were committed and fsynced") as info:
        Log.open(d, fsync="always")
    assert (info.value.segment, info.value.lsn) == (segment_paths(d)[-1].name, 10)
    assert segment_paths(d)[-1].read_bytes() == before
    with Log.open(d, fsync="always", on_corruption="truncate") as log:
        assert log.recovery.lost_lsns == (10, 11)
        assert log.append_batch([Record.put(b"after", b"damage")]) == [11]


# -- the order of writes and fsyncs that power-loss safety rests on ------------------------------------------

def _open_traced(directory: Path, work: Path, **options) -> list[tuple[str, str]]:
    """The file-system calls of one open (recovery) and close of `directory`, made in a child process."""
    return fs_calls(f"from walsvc import Log\nLog.open({str(directory)!r}, segment_bytes={MiB}, fsync='os', "
                    f"**{options!r}).close()", work)


def _pwrite_at(calls: list[tuple[str, str]], path: Path, offset: int) -> int:
    """Index of the first pwrite of `path` at `offset` (strace: `pwrite64(fd<path>, "...", size, offset)`)."""
    return next((i for i, (name, args) in enumerate(calls)
                 if name == "pwrite64" and args.startswith(tuple(f"{fd}<{path}>" for fd in range(3, 64)))
                 and f", {offset})" in args), -1)


def test_a_skip_marker_is_durable_before_the_torn_bytes_are_cut(tmp_path):
    """The marker that burns a torn batch's LSNs is fsynced before the cut: if a power cut kept the cut but
    lost the marker, the next open would hand those LSNs out again."""
    directory = (tmp_path / "wal").resolve()
    lsns = _write_batches(directory, [[10, 10], [10, 10, 10]])
    (path,) = segment_paths(directory)
    last_off, _ = frame_offsets(path)[-1]
    zero_from(path, last_off + F.FRAME_HEADER_SIZE + 3)  # torn with its header intact: its LSNs are burned
    rewind_head(directory, lsns[0][-1])  # the crash came while the last batch was being written
    calls = _open_traced(directory, tmp_path)
    marker = _pwrite_at(calls, path, last_off)
    assert marker >= 0, calls
    synced = first_call(calls, ("fdatasync", "fsync"), f"<{path}>", marker)
    cut = first_call(calls, ("ftruncate",), f"<{path}>", marker)
    assert marker < synced < cut, calls[marker:]
    with Log.open(directory, segment_bytes=MiB, fsync="os") as log:
        assert log.next_lsn == lsns[-1][-1] + 1


def test_segments_moved_to_quarantine_leave_the_log_directory_durably(tmp_path):
    """A truncate-mode repair moves later segments to quarantine/ and fsyncs both folders after: if a power
    cut brought a moved segment back, the log would hold a segment past a cut that burned its LSNs."""
    directory = (tmp_path / "wal").resolve()
    _multi_segment_log(directory)
    paths = segment_paths(directory)
    assert len(paths) >= 3
    seal_off, _ = frame_offsets(paths[1])[-1]
    flip_bit(paths[1], seal_off + F.FRAME_HEADER_SIZE + 2)  # the seal is damaged: later segments go
    calls = _open_traced(directory, tmp_path, on_corruption="truncate")
    moved = [first_call(calls, ("rename", "renameat", "renameat2"), f'"{p}"') for p in paths[2:]]
    assert min(moved) >= 0, calls
    last = max(moved)
    assert first_call(calls, ("fsync",), f"<{directory / QUARANTINE}>", last) > last, calls[last:]
    assert first_call(calls, ("fsync",), f"<{directory}>", last) > last, calls[last:]
    assert segment_paths(directory) == paths[:2]


def test_a_seal_written_by_recovery_follows_an_fsync_of_the_frames_it_vouches_for(tmp_path):
    """A crash between a rotation's switch and its seal: recovery seals the old segment, fsyncing its frames
    first (they may never have been fsynced), as a seal is trusted without a rescan: a power cut that kept
    the seal and lost a frame would leave a hole no open notices."""
    directory = (tmp_path / "wal").resolve()
    lsns = _multi_segment_log(directory)
    first = segment_paths(directory)[0]
    seal_off, seal_h = frame_offsets(first)[-1]
    assert seal_h.kind == F.KIND_SEAL
    zero_from(first, seal_off)  # the seal was never written
    calls = _open_traced(directory, tmp_path)
    seal = _pwrite_at(calls, first, seal_off)
    assert seal >= 0, calls
    assert 0 <= first_call(calls, ("fdatasync", "fsync"), f"<{first}>") < seal, calls[:seal + 1]
    assert _lsns(_read_all(directory)) == list(range(1, lsns[-1] + 1))

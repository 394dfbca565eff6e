"""Engine fault paths found in review: a rotation that fails stops the log, stray cursor files, a seal read
against a stale size, compressed values that do not decompress, an exception in the fsync thread."""

from __future__ import annotations

import errno
import os
import time

import pytest
import zstandard

from walsvc import Log, Record
from walsvc import record as R
from walsvc.errors import DecompressionError, LogStoppedError
from walsvc.segment import SPARE_NAME, list_segments, read_seal, segment_name

MiB = 1 << 20


def test_rotation_that_cannot_create_the_next_segment_stops_the_log(tmp_path):
    """A real fault: the file name the next segment needs is taken (a directory), so renaming the prepared
    spare file into place fails as a full disk would.  That append fails, every later one gets LogStoppedError (nothing is retried), and a
    restart finishes the rotation and keeps every record written before the failure."""
    batch = [Record.put(b"k", b"v" * 1000)] * 100
    written = 0
    with Log.open(tmp_path, segment_bytes=MiB, fsync="os") as log:
        while True:
            blocker = tmp_path / segment_name(log.next_lsn)  # where a rotation now would put the next segment
            blocked = not blocker.exists()
            if blocked:
                blocker.mkdir()
            try:
                log.append_batch(batch)
                written += 100
            except LogStoppedError as exc:
                assert (exc.operation, exc.errno, exc.path) == ("segment rename", errno.EISDIR, str(blocker))
                assert "during rotation" in exc.detail and "restart" in str(exc)
                break
            finally:
                if blocked:
                    blocker.rmdir()
            assert written < 10_000, "the log never rotated"
        with pytest.raises(LogStoppedError):
            log.append(Record.put(b"k", b"v"))
        assert log.stats()["stopped"]["operation"] == "segment rename"
        with pytest.raises(LogStoppedError):
            log.sync()
    assert (tmp_path / SPARE_NAME).exists()  # the spare it could not rename: the next open deletes it
    with Log.open(tmp_path, segment_bytes=MiB) as log:
        assert sum(1 for _ in log.read()) == written
        assert log.append(Record.put(b"after", b"restart")) == written + 1


def test_a_stray_file_in_cursors_does_not_break_rotation(tmp_path):
    (tmp_path / "cursors").mkdir()
    (tmp_path / "cursors" / "my reader.cursor").write_bytes(b"junk")
    with Log.open(tmp_path, segment_bytes=MiB, fsync="os", max_bytes=2 * MiB) as log:
        for _ in range(40):
            log.append_batch([Record.put(b"k", b"v" * 1000)] * 100)
        log._pipeline.drain()  # retention runs on the rotation thread
        assert log.stats()["segments_deleted"] > 0


def test_seal_read_against_a_stale_size_is_not_sealed(tmp_path):
    with Log.open(tmp_path, segment_bytes=MiB, fsync="os") as log:
        for _ in range(15):
            log.append_batch([Record.put(b"k", b"v" * 1000)] * 100)
    sealed = list_segments(tmp_path)[0][1]
    fd = os.open(sealed, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        assert read_seal(fd, size) is not None
        assert read_seal(fd, size + 4096) is None  # the size a reader saw before the writer cut the file
    finally:
        os.close(fd)


def test_ingest_check_rejects_a_compressed_value_that_does_not_decompress():
    good = R.encode(Record.put(b"k", b"x" * 1000, compression="zstd"))
    assert R.count_records(good, 0, len(good)) == 1
    body = bytes((1, 10, 2 << 2)) + b"k" + b"not zstd!!"
    bad = body + R._U32.pack(R.crc32c(body))
    with pytest.raises(DecompressionError):
        R.count_records(bad, 0, len(bad))
    bomb = zstandard.ZstdCompressor().compress(bytes(2 * MiB))
    body = R.encode_varint(1) + R.encode_varint(len(bomb)) + bytes((2 << 2,)) + b"k" + bomb
    big = body + R._U32.pack(R.crc32c(body))
    with pytest.raises(R.RecordTooLargeError):
        R.count_records(big, 0, len(big), max_record_bytes=MiB)


def test_an_exception_in_the_fsync_thread_stops_the_log(tmp_path):
    """No thread ends silently: a commit callback that raises in the fsync thread stops the log, and the
    reason names the thread and the exception (before, the thread died and nothing committed again)."""
    def callback(lsn: int) -> None:
        raise RuntimeError(f"callback bug at LSN {lsn}")

    with Log.open(tmp_path, fsync="batch", on_commit=callback) as log:
        log.append(Record.put(b"k", b"v"))
        deadline = time.monotonic() + 10
        while log.stop_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
        reason = log.stop_reason
        assert reason is not None, "the log did not stop"
        assert reason.operation == "fsync thread" and "RuntimeError: callback bug at LSN 1" in reason.detail
        with pytest.raises(LogStoppedError) as raised:
            log.append(Record.put(b"k", b"v"))
        assert raised.value is reason
    with Log.open(tmp_path) as log:
        assert [r.lsn for r in log.read()] == [1]

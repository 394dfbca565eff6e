"""walsvc.verify: verify and dump, on healthy, damaged, torn and live logs."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest
from crc32c import crc32c

from walsvc import Log, LogLockedError, Reader, Record
from walsvc import frame as F
from walsvc.errors import ConfigError, CorruptionError
from walsvc.verify import dump, verify
from walsvc.record import encode_many, encode_put
from walsvc.segment import list_segments

SEG = 1 << 20  # the smallest segment size the config allows: several segments from a few MB


def _records(i: int) -> list[Record]:
    """A mixed batch: plain put, non-UTF-8 value, tombstone, TTL + zstd."""
    return [Record.put(f"k{i}", f"value-{i}-" + "x" * 2500), Record.put(f"b{i}", bytes([0xFF, i % 256]) * 300),
            Record.delete(f"d{i}"), Record.put(f"z{i}", b"abc" * 400, ttl_ms=60_000 + i, compression="zstd")]


def _write(log: Log, batches: range) -> list[Record]:
    written = []
    for i in batches:
        if i % 10 == 3:  # some batches come from a "producer", as the writer service sends them
            recs = [Record.put(f"p{i}", f"from-producer-{i}")]
            log.append_encoded(encode_many(recs), 1, producer_id=77, producer_seq=i)
        else:
            recs = _records(i)
            log.append_batch(recs)
        written.extend(recs)
    return written


@pytest.fixture
def healthy(tmp_path: Path) -> tuple[Path, list[Record]]:
    d = tmp_path / "log"
    with Log.open(d, segment_bytes=SEG, fsync="os") as log:
        written = _write(log, range(1000))
    assert len(list_segments(d)) >= 3
    return d, written


def _frames(d: Path) -> list[dict]:
    return list(dump(d, frames=True))


def _flip(path: Path, offset: int, mask: int = 0x04) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# -- verify -----------------------------------------------------------------------------------------------

def test_verify_healthy_log(healthy):
    d, written = healthy
    segments = list_segments(d)
    report = verify(d)
    assert report.ok, report.problems
    assert report.problems == []
    assert report.segments == len(segments)
    assert report.sealed_segments == len(segments) - 1
    assert report.records == len(written)
    assert (report.first_lsn, report.last_lsn, report.next_lsn) == (1, len(written), len(written) + 1)
    assert report.tail == "end" and report.tail_segment == segments[-1][1].name
    assert report.gaps == []
    assert report.committed_lsn == len(written) and not report.live
    assert "OK" in report.summary() and f"LSN 1..{len(written)}" in report.summary()
    data = json.loads(json.dumps(report.as_dict()))
    assert data["ok"] is True and data["records"] == len(written)


def test_verify_empty_and_missing_directory(tmp_path):
    assert verify(tmp_path).ok and verify(tmp_path).records == 0
    report = verify(tmp_path / "nope")
    assert not report.ok and "not a directory" in report.problems[0]


def test_verify_reports_flipped_bit_in_sealed_segment(healthy):
    d, written = healthy
    first = list_segments(d)[0][1]
    victim = [f for f in _frames(d) if f["segment"] == first.name and f["kind"] == "data"][5]
    _flip(first, victim["offset"] + 56 + victim["payload_bytes"] // 2)
    report = verify(d)
    assert not report.ok
    text = "\n".join(report.problems)
    assert (f"segment {first.name}, offset {victim['offset']}, LSN {victim['base_lsn']}: "
            "frame payload CRC32C mismatch") in text
    assert any(first.name in p and "does not match the seal" in p for p in report.problems)
    # The rest of the log is still checked: only the damaged batch is missing from the count.
    assert report.records == len(written) - victim["count"]
    assert report.tail == "end"


def test_verify_reports_flipped_bit_in_sealed_segment_header(healthy):
    d, _ = healthy
    second = list_segments(d)[1][1]
    _flip(second, 30)
    report = verify(d)
    assert not report.ok
    assert any(p.startswith(f"segment {second.name}, offset 0: bad segment header") for p in report.problems)


def test_verify_reports_flipped_bit_mid_log_in_active_segment(healthy):
    d, _ = healthy
    active = list_segments(d)[-1][1]
    data_frames = [f for f in _frames(d) if f["segment"] == active.name and f["kind"] == "data"]
    assert len(data_frames) > 3
    victim = data_frames[len(data_frames) // 2]
    _flip(active, victim["offset"] + 56 + 10)
    report = verify(d)
    assert not report.ok
    assert report.tail == "corrupt" and report.tail_offset == victim["offset"]
    assert any(p.startswith(f"segment {active.name}, offset {victim['offset']}, LSN {victim['base_lsn']}") and
               "corruption, not a torn tail" in p for p in report.problems)
    # Recovery agrees: valid data follows the damage, so the log refuses to open.
    with pytest.raises(CorruptionError):
        Log.open(d, segment_bytes=SEG)


def test_verify_reports_flipped_bit_in_active_frame_header(healthy):
    d, _ = healthy
    active = list_segments(d)[-1][1]
    victim = [f for f in _frames(d) if f["segment"] == active.name][2]
    _flip(active, victim["offset"] + 20)  # inside the count field: the header CRC fails
    report = verify(d)
    assert report.tail == "corrupt"
    assert any(p.startswith(f"segment {active.name}, offset {victim['offset']}") and "header CRC32C" in p
               for p in report.problems)


def test_verify_torn_tail_is_not_corruption(healthy):
    d, written = healthy
    active = list_segments(d)[-1][1]
    end = verify(d).tail_offset
    frame = F.encode_frame(F.KIND_DATA, encode_put(b"torn", b"y" * 500), 1, len(written) + 1, 1)
    with open(active, "r+b") as f:  # the preallocated tail is zeros: half a frame reached the disk
        f.seek(end)
        f.write(frame[:len(frame) // 2])
    report = verify(d)
    assert report.ok, report.problems
    assert report.tail == "torn" and report.tail_offset == end
    assert report.records == len(written) and report.last_lsn == len(written)
    assert any("torn tail" in n and f"LSNs {len(written) + 1}..{len(written) + 1} will never be reused" in n
               for n in report.notes)
    assert "torn" in report.summary()
    # Recovery agrees: it cuts exactly there.
    with Log.open(d, segment_bytes=SEG) as log:
        assert log.recovery.torn_tail and log.recovery.truncated_at == (active.name, end)
    report = verify(d)
    assert report.ok and report.tail == "end"
    # Recovery kept the burned LSN as an empty marker frame, so a restart cannot hand it out again.
    assert report.gaps == [(len(written) + 1, len(written) + 2)] and report.next_lsn == len(written) + 2


def test_verify_reports_a_torn_tail_holding_a_committed_lsn(tmp_path):
    """A torn tail is what a crash leaves past the committed LSN; one that holds a committed LSN lost an
    acked record, down to the last one alone: that is a problem, not a note."""
    d = tmp_path / "log"
    with Log.open(d, segment_bytes=SEG, fsync="os") as log:
        _write(log, range(5))
        last = log.append(Record.put(b"last", b"acked"))  # a batch of one: its LSN is the committed one
        assert log.committed_lsn == last
    active = list_segments(d)[-1][1]
    with open(active, "r+b") as f:  # its payload lost (its header kept), nothing after it
        f.seek(verify(d).tail_offset - len(encode_put(b"last", b"acked")))
        f.write(bytes(len(encode_put(b"last", b"acked"))))
    report = verify(d)
    assert report.tail == "torn" and not report.ok
    assert any(f"HEAD says LSN {last} is committed" in p for p in report.problems), report.problems


def test_verify_torn_header_and_burned_lsn_gap(tmp_path):
    d = tmp_path / "log"
    with Log.open(d, segment_bytes=SEG, fsync="os") as log:
        _write(log, range(5))
        n = log.next_lsn - 1
    active = list_segments(d)[-1][1]
    end = verify(d).tail_offset
    frame = F.encode_frame(F.KIND_DATA, encode_many(_records(99)), 4, n + 1, 1)
    with open(active, "r+b") as f:
        f.seek(end)
        f.write(frame[:F.FRAME_HEADER_SIZE + 3])  # the header survived, the payload did not
    assert verify(d).tail == "torn"
    with Log.open(d, segment_bytes=SEG) as log:
        assert log.recovery.skipped_lsns == (n + 1, n + 5)
        assert log.append(Record.put(b"after", b"repair")) == n + 5
    report = verify(d)
    assert report.ok and report.gaps == [(n + 1, n + 5)]
    assert report.last_lsn == n + 5 and report.records == n + 1


def test_verify_missing_middle_segment(healthy):
    d, _ = healthy
    segments = list_segments(d)
    os.unlink(segments[1][1])
    report = verify(d)
    assert not report.ok
    gap = f"LSNs {segments[1][0]}..{segments[2][0] - 1} are missing"
    assert any(p.startswith(f"segment {segments[2][1].name}") and gap in p for p in report.problems)


def _crafted(d: Path, frames: list[bytes], seal: F.Seal | None = None, base: int = 1) -> Path:
    """A one-segment log written byte by byte with the engine's encoders (timestamps pinned)."""
    d.mkdir(exist_ok=True)
    body = F.encode_segment_header(F.SegmentHeader(1, base, 1)) + b"".join(frames)
    if seal is not None:
        body += F.encode_seal(seal, len(body), 2)
    path = d / f"{base:020d}.wal"
    path.write_bytes(body)
    return path


def test_verify_checks_records_inside_a_frame_with_a_good_crc(tmp_path):
    good = encode_put(b"a", b"1")
    bad = bytearray(encode_put(b"b", b"2"))
    bad[-1] ^= 0xFF  # the record's own CRC is wrong; the frame CRC is computed over it, so it matches
    frames = [F.encode_frame(F.KIND_DATA, good, 1, 1, 1),
              F.encode_frame(F.KIND_DATA, good + bytes(bad), 2, 2, 1),
              F.encode_frame(F.KIND_DATA, good, 3, 4, 1)]  # says 3 records, holds 1
    path = _crafted(tmp_path, frames)
    report = verify(tmp_path)
    second = 64 + len(frames[0])
    third = second + len(frames[1])
    assert any(p.startswith(f"segment {path.name}, offset {second + 56 + len(good)}, LSN 3: record 1 of the batch "
                            "does not decode: record CRC32C mismatch") for p in report.problems)
    assert (f"segment {path.name}, offset {third}, LSN 4: frame header says 3 records, its payload holds 1"
            in report.problems)


def test_verify_checks_seal_contents(tmp_path):
    frame = F.encode_frame(F.KIND_DATA, encode_put(b"user:1", b"alice"), 1, 1, 1)
    seal = F.Seal(last_lsn=1, next_lsn=2, record_count=2, data_crc=0x1234, index=[(1, 64), (1, 70)])
    path = _crafted(tmp_path, [frame], seal)
    report = verify(tmp_path)
    seal_at = 64 + len(frame)
    assert report.sealed_segments == 1
    assert f"segment {path.name}, offset {seal_at}: seal counts 2 records, the frames hold 1" in report.problems
    assert any(p.startswith(f"segment {path.name}, offset 70, LSN 1: seal index entry") for p in report.problems)
    assert any("does not match the seal's 0x00001234" in p for p in report.problems)


def test_verify_damaged_cursor(healthy):
    d, _ = healthy
    (d / "cursors").mkdir()
    (d / "cursors" / "good.cursor").write_bytes(b"")  # wrong size
    report = verify(d)
    assert not report.ok and any("cursors/good.cursor" in p and "damaged" in p for p in report.problems)


def test_verify_is_quiet_about_cursor_lock_files(healthy):
    """After a named reader ran, verify noted 'cursors/billing.lock is not a cursor file': a lock is normal."""
    d, _ = healthy
    with Reader(d, "earliest", name="billing") as reader:
        reader.commit(reader.poll(1)[-1].lsn)
    (d / "cursors" / "stray.txt").write_text("x")
    assert {p.name for p in (d / "cursors").iterdir()} == {"billing.cursor", "billing.lock", "stray.txt"}
    report = verify(d)
    assert report.ok, report.problems
    assert not any("billing" in n for n in report.notes), report.notes
    assert any("cursors/stray.txt is not a cursor file" in n for n in report.notes), report.notes


def test_verify_live_log_is_read_only_and_takes_no_lock(tmp_path, monkeypatch):
    d = tmp_path / "log"
    log = Log.open(d, segment_bytes=SEG, fsync="batch")
    try:
        written = _write(log, range(300))
        log.sync()
        before = _snapshot(d)
        import fcntl

        def no_locks(*args):
            raise AssertionError("verify/dump must not take a lock")
        monkeypatch.setattr(fcntl, "flock", no_locks)
        monkeypatch.setattr(fcntl, "lockf", no_locks)
        report = verify(d)
        assert report.ok, report.problems
        assert report.live and report.writer_pid == os.getpid()
        assert report.committed_lsn == log.committed_lsn == len(written)
        assert report.records == len(written)
        assert len(list(dump(d))) == len(written)
        assert _snapshot(d) == before  # no byte written, no file created
        monkeypatch.undo()
        with pytest.raises(LogLockedError):  # the writer still owns the directory
            Log.open(d)
        log.append(Record.put(b"still", b"writable"))
    finally:
        log.close()
    assert verify(d).ok


def test_verify_while_the_writer_writes(tmp_path):
    d = tmp_path / "log"
    log = Log.open(d, segment_bytes=SEG, fsync="os")
    done = threading.Event()

    def writer():
        try:
            for i in range(2500):  # about 8 MB: several rotations while verify runs
                log.append_batch([Record.put(f"k{i}.{j}", b"v" * 800) for j in range(4)])
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    reports = []
    try:
        while not done.is_set() or len(reports) < 3:
            reports.append(verify(d))
    finally:
        done.wait()
        t.join()
        log.close()
    for r in reports:
        assert r.ok, r.problems
        assert r.tail == "end"
        assert r.records == (r.last_lsn or 0)
    assert len(list_segments(d)) >= 5
    final = verify(d)
    assert final.ok and final.records == 10_000


def test_dump_records_while_uncommitted_data_is_hidden(tmp_path):
    d = tmp_path / "log"
    log = Log.open(d, segment_bytes=SEG, fsync="batch", fsync_window_ms=1000)
    try:
        log.append_batch([Record.put(b"a", b"1"), Record.put(b"b", b"2")])
        log.sync()
        log.append(Record.put(b"c", b"3"))  # written, not yet committed (the window is 1 s)
        if log.committed_lsn == 2:
            assert [x["key"] for x in dump(d)] == ["a", "b"]
    finally:
        log.close()
    assert [x["key"] for x in dump(d)] == ["a", "b", "c"]  # no writer: all valid data


# -- dump -------------------------------------------------------------------------------------------------

def test_dump_records(healthy):
    d, written = healthy
    items = list(dump(d))
    assert [x["lsn"] for x in items] == list(range(1, len(written) + 1))
    for item, rec in zip(items, written):
        assert item["key"] == rec.key.decode()
        if "value" in item:
            assert item["value"].encode() == rec.value
        else:
            import base64
            assert base64.b64decode(item["value_b64"]) == rec.value
        assert item["tombstone"] == rec.tombstone
        assert item["ttl_ms"] == rec.ttl_ms
        assert item["compression"] == rec.compression
        assert item["timestamp"] > 0
    json.dumps(items)  # what `walsvc dump` prints
    assert [x["lsn"] for x in dump(d, 1000)][:2] == [1000, 1001]
    assert list(dump(d, "latest")) == []
    with pytest.raises(ConfigError, match="^start: "):
        list(dump(d, 0))


def test_dump_frames(healthy):
    d, written = healthy
    frames = _frames(d)
    json.dumps(frames)
    segments = list_segments(d)
    data = [f for f in frames if f["kind"] == "data"]
    seals = [f for f in frames if f["kind"] == "seal"]
    assert len(seals) == len(segments) - 1
    assert sum(f["count"] for f in data) == len(written)
    assert data[0]["offset"] == 64 and data[0]["base_lsn"] == 1
    lsn = 1
    for f in data:
        assert f["base_lsn"] == lsn and f["frame_bytes"] == 56 + f["payload_bytes"]
        lsn += f["count"]
    for seal, (nxt_base, nxt) in zip(seals, segments[1:]):
        assert seal["next_lsn"] == seal["base_lsn"] == nxt_base and seal["count"] == 0
    produced = [f for f in data if f["producer_id"]]
    assert produced and all(f["producer_id"] == 77 and f["producer_seq"] % 10 == 3 for f in produced)
    later = list(dump(d, 1500, frames=True))
    assert later[0]["kind"] == "data" and later[0]["base_lsn"] <= 1500 < later[0]["base_lsn"] + later[0]["count"]


# -- the worked example of docs/FORMAT.md -----------------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"


def _doc_example_bytes() -> tuple[bytes, bytes, bytes]:
    """The bytes docs/FORMAT.md shows, built with the engine's own encoders and the doc's fixed values."""
    header = F.encode_segment_header(F.SegmentHeader(1, 1, 1_700_000_000_000_000))
    payload = encode_put(b"user:1", b"alice")
    data = F.encode_frame(F.KIND_DATA, payload, 1, 1, 1_700_000_000_123_456, 7, 1)
    seal = F.Seal(1, 2, 1, crc32c(data), [(1, 64)], {7: [F.Appended(1, 1, 1)]})
    seal_frame = F.encode_seal(seal, 64 + len(data), 1_700_000_001_000_000)
    return header, data, seal_frame


def _doc_hex(section: str) -> bytes:
    text = DOC.read_text()
    m = re.search(rf"<!-- hex:{section} -->\n```\n(.*?)```", text, re.S)
    assert m, f"no hex block {section} in {DOC}"
    out = bytearray()
    for line in m.group(1).splitlines():
        hexpart = line.split("|")[0].split(":", 1)[1] if ":" in line.split("|")[0] else ""
        out += bytes.fromhex(hexpart)
    return bytes(out)


def test_format_doc_example_is_what_the_code_writes(tmp_path):
    header, data, seal = _doc_example_bytes()
    assert _doc_hex("segment-header") == header
    assert _doc_hex("data-frame") == data
    assert _doc_hex("seal-frame") == seal
    # And it is a valid one-segment, sealed log.
    d = tmp_path / "example"
    d.mkdir()
    (d / "00000000000000000001.wal").write_bytes(header + data + seal)
    report = verify(d)
    assert report.ok, report.problems
    assert (report.records, report.sealed_segments, report.next_lsn) == (1, 1, 2)
    assert [(x["lsn"], x["key"], x["value"], x["timestamp"]) for x in dump(d)] == \
        [(1, "user:1", "alice", 1_700_000_000_123_456)]

"""nori-wal directories: `walsvc dump --nori`, `walsvc import-nori` and `walsvc.import_nori`.

The nori-wal directories are built here from the documented layout (nori-wal-notes §1), with an encoder
written for the tests (not walsvc's), the shared golden vectors, and LZ4/zstd values made the way the Rust
crate makes them (LZ4 block with a varint size prefix; zstd frames without a content size).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lz4.block
import pytest
import zstandard
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MiB
from helpers import REPO_ROOT, python_env, run_cli, run_with_terminal_stderr

import walsvc
from walsvc import frame as F
from walsvc.errors import LogLockedError, NoriDamageError, NoriFormatError, NoriImportRefusedError
from walsvc.verify import verify
from walsvc.nori import MARKER, NoriScanner, import_nori, list_nori_segments, load_imports
from walsvc.scan import LogReader
from walsvc.segment import list_segments

OPTIONS = {"segment_bytes": MiB, "fsync": "os", "max_record_bytes": 2 * MiB}  # "big" is above the 1 MiB default


# -- a nori-wal writer for the tests -------------------------------------------------------------------------

def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@dataclass
class Rec:
    key: bytes
    value: bytes = b""
    tombstone: bool = False
    ttl_ms: int | None = None
    compression: str | None = None
    version: tuple[int, int] | None = None
    raw: bytes = b""  # the encoded bytes


def nori(key: bytes, value: bytes = b"", *, tombstone: bool = False, ttl_ms: int | None = None,
         compression: str | None = None, version: tuple[int, int] | None = None, extra_flags: int = 0,
         klen: bytes | None = None, stored: bytes | None = None) -> Rec:
    """One nori-wal v1 record.  `extra_flags`, `klen` and `stored` forge records nori-wal accepts and walsvc
    does not (reserved bits, an over-long varint, a compression flag over a raw value)."""
    code = {None: 0, "lz4": 1, "zstd": 2}[compression]
    if stored is None:
        stored = value
        if compression == "lz4":
            stored = varint(len(value)) + lz4.block.compress(value, store_size=False)
        elif compression == "zstd":
            stored = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(value)
    flags = int(tombstone) | (0x02 if ttl_ms is not None else 0) | code << 2 | (0x10 if version else 0) | extra_flags
    body = (klen if klen is not None else varint(len(key))) + varint(len(stored)) + bytes((flags,))
    if ttl_ms is not None:
        body += varint(ttl_ms)
    if version:
        body += varint(version[0]) + varint(version[1])
    body += key + stored
    return Rec(key, value, tombstone, ttl_ms, compression, version, body + struct.pack("<I", crc32c(body)))


def golden(vectors: dict) -> list[Rec]:
    out = []
    for v in vectors["valid"]:
        rec = nori(bytes.fromhex(v["key_hex"]), bytes.fromhex(v["value_hex"]), tombstone=v["tombstone"],
                   ttl_ms=v["ttl_ms"])
        assert rec.raw.hex() == v["encoded_hex"], v["name"]  # our test encoder agrees with the shared vectors
        out.append(rec)
    return out


def write_segment(path: Path, records: list[Rec], zero_tail: int = 0, tail: bytes = b"") -> list[int]:
    """Records end to end from byte 0, then `tail` bytes, then `zero_tail` zeros; returns the offsets."""
    offsets, pos = [], 0
    for r in records:
        offsets.append(pos)
        pos += len(r.raw)
    path.write_bytes(b"".join(r.raw for r in records) + tail + bytes(zero_tail))
    return offsets


def build_source(src: Path, vectors: dict) -> dict[str, list[Rec]]:
    """Segments 0, 4, 9 (unpadded name) and 10, the newest, preallocated: ids sort 0 < 4 < 9 < 10 as numbers,
    not as names.  A .wal.tmp leftover and another file lie beside them."""
    src.mkdir()
    text = b"the quick brown fox jumps over the lazy dog " * 40
    segs = {
        "000000.wal": golden(vectors) + [nori(b"seg0-%d" % i, b"v%d" % i) for i in range(20)],
        "000004.wal": [nori(b"lz4", text, compression="lz4"), nori(b"zstd", text, compression="zstd"),
                       nori(b"gone"), nori(b"gone", tombstone=True), nori(b"ttl", b"t", ttl_ms=60_000),
                       nori(b"ver", b"v", version=(3, 42)),
                       nori(b"all", text, ttl_ms=5, version=(1, 2), compression="zstd"),
                       nori(b"raw-lz4-bigger", b"xy", compression="lz4"),  # nori-wal compresses even when it grows
                       nori(b"big", os.urandom(1100 * 1024))],  # crosses the 1 MiB read chunk
        "9.wal": [nori(b"nine-%d" % i, b"x" * i) for i in range(30)],
        "000010.wal": [nori(b"ten-%d" % i, b"y" * 300) for i in range(40)] + [nori(b"", b"")],
    }
    for name, recs in segs.items():
        write_segment(src / name, recs, zero_tail=64 * 1024 if name == "000010.wal" else 0)
    (src / "000004.wal.tmp").write_bytes(b"\x05garbage left by nori-wal's recovery")
    (src / "NOTES").write_text("not a segment")
    return segs


def all_records(segs: dict[str, list[Rec]]) -> list[Rec]:
    return [r for name in sorted(segs, key=lambda n: int(n[:-4])) for r in segs[name]]


def dst_records(dst: Path) -> list[walsvc.Record]:
    with LogReader(dst) as reader:
        return list(reader)


def dst_payload(dst: Path) -> bytes:
    """Every DATA frame's payload, in log order, parsed straight from the segment files."""
    out = []
    for _, path in list_segments(dst):
        data = path.read_bytes()
        pos = F.SEGMENT_HEADER_SIZE
        while pos + F.FRAME_HEADER_SIZE <= len(data) and data[pos:pos + 4] == F.FRAME_MAGIC:
            h = F.decode_frame_header(data, pos)
            if h.kind == F.KIND_DATA:
                out.append(data[pos + F.FRAME_HEADER_SIZE:pos + h.size])
            pos += h.size
    return b"".join(out)


def assert_same(got: list[walsvc.Record], expected: list[Rec], first_lsn: int = 1) -> None:
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.lsn == first_lsn + i
        assert (g.key, g.value, g.tombstone, g.ttl_ms, g.compression, g.version) == \
            (e.key, e.value, e.tombstone, e.ttl_ms, e.compression, e.version), (i, e.key)


def config_file(tmp_path: Path, **extra: object) -> Path:
    path = tmp_path / "cfg.toml"
    # The sources hold a 1.1 MiB record ("big"), above the default max_record_bytes (1 MiB).
    lines = ["[log]", f"segment_bytes = {MiB}", 'fsync = "os"', f"max_record_bytes = {2 * MiB}"] + \
        [f"{k} = {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the whole path, through the command line ----------------------------------------------------------------

def test_import_keeps_every_field_and_byte(tmp_path: Path, vectors: dict) -> None:
    src, dst = tmp_path / "nori", tmp_path / "wal"
    segs = build_source(src, vectors)
    expected = all_records(segs)
    cfg = config_file(tmp_path)

    run = run_cli("import-nori", str(src), "--dir", str(dst), "--config", str(cfg))
    assert run.returncode == 0, run.stderr
    assert f"imported 4 segments, {len(expected)} records, {sum(len(r.raw) for r in expected)} bytes" in run.stdout
    assert f"LSN 1..{len(expected)}" in run.stdout
    assert "zero tail: 65536" in run.stdout
    assert "000004.wal.tmp" in run.stdout and "NOTES" in run.stdout  # ignored, and said so
    assert run.stderr == ""  # no progress output when stderr is not a terminal

    assert_same(dst_records(dst), expected)
    # Stored bytes unchanged: compressed values stay compressed, records keep their CRCs.
    assert dst_payload(dst) == b"".join(r.raw for r in expected)
    assert len(list_segments(dst)) >= 2  # the 1.1 MiB record went to a segment of its own
    report = verify(dst)
    assert report.ok, report.summary()
    assert run_cli("verify", "--dir", str(dst)).returncode == 0

    entry, = load_imports(dst)
    assert entry["state"] == "done" and entry["source"] == str(src.resolve())
    assert (entry["first_lsn"], entry["last_lsn"], entry["records"]) == (1, len(expected), len(expected))

    again = run_cli("import-nori", str(src), "--dir", str(dst), "--config", str(cfg))
    assert again.returncode == 1
    assert "was not imported again" in again.stderr and f"LSN 1..{len(expected)}" in again.stderr
    # A copy of the same log elsewhere is recognised by its records too.
    shutil.copytree(src, tmp_path / "copy")
    with pytest.raises(NoriImportRefusedError, match="the same log"):
        import_nori(tmp_path / "copy", dst, **OPTIONS)
    assert len(dst_records(dst)) == len(expected)


def test_progress_on_a_terminal(tmp_path: Path) -> None:
    src, dst = tmp_path / "nori", tmp_path / "wal"
    src.mkdir()
    for i in range(3):
        write_segment(src / f"{i:06d}.wal", [nori(b"k%d" % j, b"v" * 1000) for j in range(1500)])
    rc, stdout, shown = run_with_terminal_stderr("import-nori", str(src), "--dir", str(dst), "--config",
                                                 str(config_file(tmp_path)))
    assert rc == 0
    assert "checking" in shown and "importing" in shown and "100%, 4500 records" in shown, shown
    assert "imported 3 segments, 4500 records" in stdout


def test_dump_nori_shows_records_by_segment_and_offset(tmp_path: Path, vectors: dict) -> None:
    src = tmp_path / "nori"
    segs = build_source(src, vectors)
    run = run_cli("dump", "--nori", str(src), "--config", str(config_file(tmp_path)))
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    expected = [(name, r) for name in sorted(segs, key=lambda n: int(n[:-4])) for r in segs[name]]
    assert len(lines) == len(expected)
    offsets: dict[str, int] = {}
    for line, (name, r) in zip(lines, expected):
        assert line["segment"] == name and line["offset"] == offsets.get(name, 0)
        offsets[name] = line["offset"] + line["bytes"]
        assert line["bytes"] == len(r.raw)
        assert (line["tombstone"], line["ttl_ms"], line["compression"]) == (r.tombstone, r.ttl_ms, r.compression)
        assert line["version"] == (list(r.version) if r.version else None)
        assert line.get("key", "").encode() == r.key or "key_b64" in line
        assert "lsn" not in line and "timestamp" not in line
    bad = run_cli("dump", "--nori", str(src), "--frames")
    assert bad.returncode == 2 and "--frames" in bad.stderr


# -- the end of the newest segment -------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["cut", "crc"])
def test_torn_last_record_is_reported_not_imported(tmp_path: Path, how: str) -> None:
    src, dst = tmp_path / "nori", tmp_path / "wal"
    src.mkdir()
    older = [nori(b"a%d" % i, b"v") for i in range(5)]
    write_segment(src / "000001.wal", older)
    newest = [nori(b"b%d" % i, b"w" * 50) for i in range(5)]
    last = nori(b"torn", b"z" * 100)
    if how == "cut":
        tail = last.raw[:40]  # the write stopped part way; the preallocated zeros follow
    else:
        tail = last.raw[:-1] + bytes((last.raw[-1] ^ 0xFF,))  # whole, but its CRC fails
    offsets = write_segment(src / "000002.wal", newest, zero_tail=4096, tail=tail)

    report = import_nori(src, dst, **OPTIONS)
    assert_same(dst_records(dst), older + newest)
    torn, = report.issues
    assert (torn.kind, torn.segment, torn.offset) == ("torn", "000002.wal", offsets[-1] + len(newest[-1].raw))
    assert torn.length == len(tail)
    assert "torn" in report.summary()
    assert verify(dst).ok


def test_damage_stops_the_import_with_segment_offset_and_reason(tmp_path: Path) -> None:
    src, dst = tmp_path / "nori", tmp_path / "wal"
    src.mkdir()
    older = [nori(b"a%d" % i, b"value-%d" % i) for i in range(10)]
    offsets = write_segment(src / "000001.wal", older)
    newest = [nori(b"b%d" % i, b"w") for i in range(10)]
    write_segment(src / "000002.wal", newest, zero_tail=1024)
    seg = src / "000001.wal"
    data = bytearray(seg.read_bytes())
    data[offsets[4] + 5] ^= 0x01  # a key byte of record 4: its CRC fails, its length is intact
    seg.write_bytes(data)

    run = run_cli("import-nori", str(src), "--dir", str(dst), "--config", str(config_file(tmp_path)))
    assert run.returncode == 1
    assert f"segment 000001.wal, offset {offsets[4]}" in run.stderr and "CRC32C" in run.stderr, run.stderr
    assert "nothing was imported" in run.stderr and "--skip-damaged" in run.stderr
    assert "Traceback" not in run.stderr
    assert not dst.exists()  # the source is checked before the log is touched
    dump = run_cli("dump", "--nori", str(src))
    assert dump.returncode == 1 and f"offset {offsets[4]}" in dump.stderr
    assert [json.loads(line)["key"] for line in dump.stdout.splitlines()] == ["a0", "a1", "a2", "a3"]
    dump = run_cli("dump", "--nori", str(src), "--skip-damaged")
    assert dump.returncode == 0 and len(dump.stdout.splitlines()) == 19
    assert f"walsvc: note: segment 000001.wal, offset {offsets[4]}: {len(older[4].raw)} damaged bytes" in dump.stderr

    report = import_nori(src, dst, skip_damaged=True, **OPTIONS)
    assert_same(dst_records(dst), older[:4] + older[5:] + newest)
    issue, = report.issues
    assert (issue.kind, issue.segment, issue.offset, issue.length) == \
        ("damaged", "000001.wal", offsets[4], len(older[4].raw))
    assert verify(dst).ok


def test_damaged_length_skips_to_the_next_record_found(tmp_path: Path) -> None:
    src = tmp_path / "nori"
    src.mkdir()
    recs = [nori(b"k%d" % i, b"v" * 20) for i in range(8)]
    offsets = write_segment(src / "000000.wal", recs, zero_tail=512)
    data = bytearray((src / "000000.wal").read_bytes())
    data[offsets[3]] = 0x7F  # klen 2 -> 127: the record seems to swallow the next ones
    (src / "000000.wal").write_bytes(data)

    with pytest.raises(NoriDamageError) as info:
        list(NoriScanner(src))
    assert (info.value.segment, info.value.offset) == ("000000.wal", offsets[3])  # newest segment, yet not torn
    scanner = NoriScanner(src, skip_damaged=True)
    got = list(scanner)
    assert [r.record.key for r in got] == [r.key for r in recs[:3] + recs[4:]]
    issue, = scanner.issues
    assert (issue.kind, issue.offset, issue.length) == ("damaged", offsets[3], offsets[4] - offsets[3])


def test_a_bad_length_swallows_no_record_and_a_nested_record_is_not_invented(tmp_path: Path) -> None:
    src = tmp_path / "nori"
    src.mkdir()
    recs = [nori(b"k%d" % i, b"v" * 20) for i in range(8)]
    size = len(recs[0].raw)
    offsets = write_segment(src / "000000.wal", recs)
    data = bytearray((src / "000000.wal").read_bytes())
    data[offsets[3]] += size  # klen: record 3 now ends exactly where record 5 starts
    (src / "000000.wal").write_bytes(data)
    scanner = NoriScanner(src, skip_damaged=True)
    assert [r.record.key for r in scanner] == [r.key for r in recs[:3] + recs[4:]]
    assert [(i.offset, i.length) for i in scanner.issues] == [(offsets[3], size)]

    inner = nori(b"inner", b"i")
    outer = bytearray(nori(b"outer", b"<" + inner.raw + b">").raw)
    outer[-6] ^= 0x01  # the '>' after the nested record: the outer CRC fails, its length is intact
    offsets = write_segment(src / "000000.wal", [recs[0], Rec(b"outer", raw=bytes(outer)), recs[1]])
    scanner = NoriScanner(src, skip_damaged=True)
    assert [r.record.key for r in scanner] == [recs[0].key, recs[1].key]
    assert [(i.offset, i.length) for i in scanner.issues] == [(offsets[1], len(outer))]


def test_record_after_damage_may_end_in_zero_bytes(tmp_path: Path) -> None:
    """A CRC whose high byte is 0 ends its record with a zero byte, which looks like the start of the zero tail:
    the record after a damaged one is still found, so the damage is not taken for a torn tail."""
    src = tmp_path / "nori"
    src.mkdir()
    last = next(r for r in (nori(b"z%d" % i, b"v") for i in range(10_000)) if r.raw[-1] == 0)
    damaged = bytearray(nori(b"bad", b"value").raw)
    damaged[4] ^= 0x40
    offsets = write_segment(src / "000000.wal", [nori(b"a"), Rec(b"bad", raw=bytes(damaged)), last], zero_tail=64)
    with pytest.raises(NoriDamageError):
        list(NoriScanner(src))
    scanner = NoriScanner(src, skip_damaged=True)
    assert [r.record.key for r in scanner] == [b"a", last.key]
    assert [(i.kind, i.offset, i.length) for i in scanner.issues] == [("damaged", offsets[1], len(damaged))]


def test_older_segment_with_zero_tail_is_damage(tmp_path: Path) -> None:
    src = tmp_path / "nori"
    src.mkdir()
    write_segment(src / "000000.wal", [nori(b"a")], zero_tail=100)
    write_segment(src / "000001.wal", [nori(b"b")])
    with pytest.raises(NoriDamageError, match="only zero bytes"):
        list(NoriScanner(src))
    scanner = NoriScanner(src, skip_damaged=True)
    assert [r.record.key for r in scanner] == [b"a", b"b"]
    assert [(i.kind, i.offset, i.length) for i in scanner.issues] == [("damaged", len(nori(b"a").raw), 100)]


def test_records_walsvc_does_not_store_are_reported(tmp_path: Path) -> None:
    src, dst = tmp_path / "nori", tmp_path / "wal"
    src.mkdir()
    good = [nori(b"g%d" % i, b"v") for i in range(4)]
    rejected = [
        nori(b"reserved", b"v", extra_flags=0x20),  # a reserved flag bit: nori-wal masks it off
        nori(b"k", b"v", klen=b"\x81\x00"),  # klen 1 as a two-byte varint
        nori(b"huge", b"h" * 2000),  # above max_record_bytes = 1024
        nori(b"raw", b"not compressed at all", compression="zstd", stored=b"not compressed at all"),  # nori-wal bug
    ]
    layout = [good[0], rejected[0], good[1], rejected[1], rejected[2], good[2], rejected[3], good[3]]
    offsets = write_segment(src / "000000.wal", layout)

    with pytest.raises(NoriDamageError, match="unknown flag bits 0x20"):
        import_nori(src, dst, **{**OPTIONS, "max_record_bytes": 1024})
    report = import_nori(src, dst, skip_damaged=True, **{**OPTIONS, "max_record_bytes": 1024})
    assert_same(dst_records(dst), good)
    issues = [(i.kind, i.offset, i.length) for i in report.issues]
    idx = [1, 3, 4, 6]
    assert issues[0] == ("rejected", offsets[1], len(layout[1].raw))
    assert issues[1] == ("rejected", offsets[3], len(layout[3].raw))
    assert issues[2][1] == offsets[4] and issues[2][1] + issues[2][2] == offsets[5]  # skipped exactly
    assert issues[3] == ("rejected", offsets[6], len(layout[6].raw))
    assert len(issues) == len(idx)
    assert "over-long" in report.issues[1].reason and "zstd value" in report.issues[3].reason
    assert verify(dst).ok


# -- runs that must not import twice --------------------------------------------------------------------------

KILL_AFTER_TWO_BATCHES = """
import os, sys
import walsvc
batches = 0
def progress(phase, done, total, records):
    global batches
    if phase == "importing":
        batches += 1
        if batches == 2:
            os.kill(os.getpid(), 9)
walsvc.import_nori(sys.argv[1], sys.argv[2], segment_bytes=1 << 20, fsync="os", progress=progress)
"""


def test_crash_mid_import_resumes_without_duplicates(tmp_path: Path) -> None:
    src, dst = tmp_path / "nori", tmp_path / "wal"
    src.mkdir()
    segs = {f"{i:06d}.wal": [nori(b"s%d-%d" % (i, j), b"v" * j) for j in range(50)] for i in range(4)}
    for name, recs in segs.items():
        write_segment(src / name, recs)
    expected = all_records(segs)

    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO_BATCHES, str(src), str(dst)], env=python_env(),
                          cwd=REPO_ROOT, capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    entry, = load_imports(dst)
    assert entry["state"] == "running"
    assert len(dst_records(dst)) == 100  # two segments' batches made it

    # Someone else wrote to a copy of the log meanwhile: that copy must not resume.
    shutil.copytree(dst, tmp_path / "other")
    with walsvc.Log.open(tmp_path / "other", **OPTIONS) as log:
        log.append(walsvc.Record.put(b"foreign", b"x"))
    with pytest.raises(NoriImportRefusedError, match="written to since"):
        import_nori(src, tmp_path / "other", **OPTIONS)
    # A walsvc log is not a nori-wal source; another nori-wal source must wait for the interrupted one.
    with pytest.raises(NoriFormatError, match="is a walsvc log, not a nori-wal directory"):
        import_nori(tmp_path / "other", tmp_path / "third", **OPTIONS)
    (tmp_path / "nori2").mkdir()
    write_segment(tmp_path / "nori2" / "000000.wal", [nori(b"x")])
    with pytest.raises(NoriImportRefusedError, match="was interrupted"):
        import_nori(tmp_path / "nori2", dst, **OPTIONS)

    run = run_cli("import-nori", str(src), "--dir", str(dst), "--config", str(config_file(tmp_path)))
    assert run.returncode == 0, run.stderr
    assert "resumed an interrupted import: 100 of these records were already there" in run.stdout
    assert f"LSN 1..{len(expected)}" in run.stdout
    assert_same(dst_records(dst), expected)
    assert verify(dst).ok
    assert load_imports(dst)[0]["state"] == "done"


def test_refused_while_a_writer_owns_the_log(tmp_path: Path) -> None:
    src, dst = tmp_path / "nori", tmp_path / "wal"
    src.mkdir()
    write_segment(src / "000000.wal", [nori(b"a", b"b")])
    with walsvc.Log.open(dst, **OPTIONS):
        with pytest.raises(LogLockedError, match="already open for writing"):
            import_nori(src, dst, **OPTIONS)
    assert not (dst / MARKER).exists()
    import_nori(src, dst, **OPTIONS)
    assert [r.key for r in dst_records(dst)] == [b"a"]


def test_import_appends_after_existing_records(tmp_path: Path) -> None:
    src, dst = tmp_path / "nori", tmp_path / "wal"
    src.mkdir()
    recs = [nori(b"n%d" % i, b"v") for i in range(3)]
    write_segment(src / "000000.wal", recs)
    with walsvc.Log.open(dst, **OPTIONS) as log:
        log.append_batch([walsvc.Record.put(b"old1", b"x"), walsvc.Record.put(b"old2", b"y")])
    report = import_nori(src, dst, **OPTIONS)
    assert (report.first_lsn, report.last_lsn) == (3, 5)
    assert_same(dst_records(dst)[2:], recs, first_lsn=3)


# -- the directory ---------------------------------------------------------------------------------------------

def test_segment_names(tmp_path: Path) -> None:
    d = tmp_path / "nori"
    d.mkdir()
    for name in ("000000.wal", "12.wal", "000003.wal", "000003.wal.tmp", "x.wal", ".wal", "wal",
                 "18446744073709551616.wal"):
        (d / name).write_bytes(b"")
    segs, ignored = list_nori_segments(d)
    assert [(s.id, s.path.name) for s in segs] == [(0, "000000.wal"), (3, "000003.wal"), (12, "12.wal")]
    assert sorted(ignored) == sorted([".wal", "000003.wal.tmp", "18446744073709551616.wal", "wal", "x.wal"])
    (d / "000012.wal").write_bytes(b"")
    with pytest.raises(NoriFormatError, match="both name nori-wal segment 12"):
        list_nori_segments(d)
    with pytest.raises(NoriFormatError, match="does not exist"):
        import_nori(tmp_path / "missing", tmp_path / "wal")
    with pytest.raises(NoriImportRefusedError, match="both the nori-wal source and the walsvc destination"):
        import_nori(d, d)


def test_a_source_without_nori_segments_is_an_error_before_dst_is_made(tmp_path: Path) -> None:
    """An empty directory (or one of other files) as SRC 'succeeded': it made a 16 MiB log at DST and recorded
    the import of nothing as done.  A SRC that does not exist was exit 1; both are bad arguments, exit 2."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    sources = [tmp_path / "empty", REPO_ROOT / "walsvc", tmp_path / "missing", tmp_path / "afile"]
    commands = [["import-nori", str(src), "--dir", str(tmp_path / f"dst{i}")] for i, src in enumerate(sources)]
    procs = [subprocess.Popen([sys.executable, "-m", "walsvc", *args], cwd=REPO_ROOT, env=python_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in commands + [["dump", "--nori", str(tmp_path / "empty")]]]
    words = ["not a nori-wal log", "not a nori-wal log", "does not exist", "not a directory", "not a nori-wal log"]
    for proc, word in zip(procs, words):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and len(err.splitlines()) == 1 and word in err, (proc.args, out, err)
        assert "SRC" in err or "--nori" in err, err
    assert not any((tmp_path / f"dst{i}").exists() for i in range(len(sources)))
    with pytest.raises(NoriFormatError, match="no nori-wal segment files"):
        import_nori(tmp_path / "empty", tmp_path / "api-dst")
    assert not (tmp_path / "api-dst").exists()


# -- property: whatever the records and the cut, the scanner returns exactly what was written ------------------

record_st = st.builds(
    lambda key, value, tomb, ttl, comp, ver: nori(key, value, tombstone=tomb, ttl_ms=ttl, compression=comp,
                                                  version=ver),
    st.binary(max_size=40), st.binary(max_size=300), st.booleans(), st.none() | st.integers(0, 2**64 - 1),
    st.sampled_from([None, "lz4", "zstd"]), st.none() | st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=st.lists(st.lists(record_st, max_size=6), min_size=1, max_size=4), zero_tail=st.integers(0, 300),
       cut=st.none() | st.floats(0.05, 0.95))
def test_scanner_returns_what_was_written(segments: list[list[Rec]], zero_tail: int, cut: float | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        torn = b""
        if cut is not None:
            extra = nori(b"torn-key", b"torn-value" * 5).raw
            torn = extra[:max(1, int(len(extra) * cut))]
        for i, recs in enumerate(segments):
            newest = i == len(segments) - 1
            write_segment(src / f"{i * 3:06d}.wal", recs, zero_tail=zero_tail if newest else 0,
                          tail=torn if newest else b"")
        scanner = NoriScanner(src)
        got = list(scanner)
        expected = [r for recs in segments for r in recs]
        assert [g.data for g in got] == [r.raw for r in expected]
        assert [(g.record.key, g.record.value, g.record.tombstone, g.record.ttl_ms, g.record.version)
                for g in got] == [(r.key, r.value, r.tombstone, r.ttl_ms, r.version) for r in expected]
        assert [i.kind for i in scanner.issues] == (["torn"] if torn.strip(b"\0") else [])

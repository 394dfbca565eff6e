"""nori-wal directories: read them (`walsvc dump --nori`) and import them into a walsvc log (`import-nori`).

A nori-wal log is one directory of segment files named `<u64>.wal` (`000000.wal`, `42.wal`; ids compared as
numbers, gaps allowed), each holding nori-wal v1 records end to end from byte 0 with no header or index.  The
newest segment may end in a preallocated run of zeros.  Those records are walsvc's record encoding byte for
byte, so importing appends each record's stored bytes unchanged (compressed values stay compressed) in
atomic batches, after walsvc's own decoder accepted them.

nori-wal cannot tell a torn tail from damage (it cuts the segment at the first bad byte, every segment on
its own).  Here, as in walsvc's recovery: only zeros after the last record of the newest segment are its
end; an incomplete or failing record there, with nothing decodable after it, is a torn tail (reported, not
imported); any other bad byte is damage, which stops the import unless `skip_damaged`, and then is skipped up
to the next offset where a whole record with a matching CRC starts, reported, never silent.  A record that
nori-wal accepts but walsvc does not (reserved flag bits, over-long varints, above max_record_bytes, a
compressed value that does not decompress) is handled as damage too, skipped exactly.

An import first checks the whole source (nothing is written if it is damaged), then appends under the
destination's LOCK.  `DST/nori-imports.json` records each source: written durably before the first batch
("running", with the first LSN it gets) and after the last batch is durable ("done").  A finished source is
refused; an interrupted one resumes: the records already in DST from that first LSN must equal the source's
records one for one, and only the rest are appended.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from crc32c import crc32c

from .access import replace_file
from .config import LogConfig, directory_path
from .errors import (CompressionUnavailableError, ConfigError, Location, NoriDamageError, NoriFormatError,
                     NoriImportRefusedError, RecordError)
from .frame import SEGMENT_MAGIC
from .log import Log
from .record import DEFAULT_MAX_RECORD_BYTES, Record, decode
from .segment import data_end

SUFFIX = ".wal"
MARKER = "nori-imports.json"
MAX_MARKER_BYTES = 1 << 20
CHUNK = 1 << 20  # bytes read per pread while scanning
AHEAD = 64 << 10  # decode only with at least this much (or the end of the file) in memory
BATCH_BYTES = 1 << 20  # target payload of one imported batch
FINGERPRINT_BYTES = 1 << 20  # record bytes hashed to recognise a source that was copied elsewhere
# The most a record adds to klen + vlen: 5 varints of at most 10 bytes, flags, CRC.
RECORD_OVERHEAD = 5 * 10 + 1 + 4

_STEM = re.compile(r"\+?[0-9]+", re.ASCII)  # what Rust's u64::from_str accepts
_MAX_U64 = (1 << 64) - 1
_U32 = struct.Struct("<I")

Progress = Callable[[str, int, int, int], None]  # (phase, bytes done, bytes total, records)


# -- the directory ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NoriSegment:
    id: int
    path: Path


def list_nori_segments(directory: Path) -> tuple[list[NoriSegment], list[str]]:
    """nori-wal's discovery rule: every `<u64>.wal` entry is a segment, in numeric order of its stem.

    Returns the segments and the names of the other entries (ignored, e.g. `000003.wal.tmp` leftovers of
    nori-wal's recovery).  Two names with one id (`7.wal`, `000007.wal`) are refused: which one holds the
    data is not written down anywhere.
    """
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        raise NoriFormatError(f"nori-wal directory {directory} does not exist") from None
    except NotADirectoryError:
        raise NoriFormatError(f"{directory} is not a directory") from None
    found: dict[int, str] = {}
    ignored = []
    for name in names:
        stem, dot, ext = name.rpartition(".")
        if not (dot and ext == "wal" and _STEM.fullmatch(stem) and int(stem) <= _MAX_U64):
            ignored.append(name)
            continue
        sid = int(stem)
        if sid in found:
            raise NoriFormatError(f"{found[sid]} and {name} in {directory} both name nori-wal segment {sid}; "
                                  "move the one that does not belong out of the directory")
        if not (directory / name).is_file():
            raise NoriFormatError(f"{directory / name} is named like a nori-wal segment but is not a file")
        found[sid] = name
    return [NoriSegment(i, directory / found[i]) for i in sorted(found)], ignored


# -- nori-wal's own reading of one record ----------------------------------------------------------------

OK, INCOMPLETE, BAD = 0, 1, 2


def _lax_varint(buf: bytes, pos: int, end: int) -> tuple[int | None, int]:
    """nori-wal's varint: over-long forms accepted, bits past 64 dropped.  None: the bytes end; -1: > 10 bytes."""
    result = shift = 0
    for _ in range(10):
        if pos >= end:
            return None, pos
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _MAX_U64, pos
        shift += 7
    return -1, pos


def probe(buf: bytes, pos: int, end: int) -> tuple[int, int, str]:
    """Read the record at buf[pos:end] as nori-wal does: (status, declared end or -1, reason).

    OK: a whole record with a matching CRC (nori-wal would accept it).  INCOMPLETE: the bytes end first (the
    declared end is -1 when they end inside the header).  BAD: the CRC does not match, compression code 3, or
    a varint of more than 10 bytes.  Pure; walsvc's stricter rules are `record.decode`'s.
    """
    kl, p = _lax_varint(buf, pos, end)
    if kl is None:
        return INCOMPLETE, -1, "the bytes end inside a record header"
    vl, p = _lax_varint(buf, p, end) if kl >= 0 else (-1, p)
    if vl is None:
        return INCOMPLETE, -1, "the bytes end inside a record header"
    if kl < 0 or vl < 0:
        return BAD, -1, "a length varint longer than 10 bytes"
    if p >= end:
        return INCOMPLETE, -1, "the bytes end inside a record header"
    flags = buf[p]
    p += 1
    if flags & 0x0C == 0x0C:
        return BAD, -1, "compression code 3 (invalid)"
    for _ in range((1 if flags & 0x02 else 0) + (2 if flags & 0x10 else 0)):
        n, p = _lax_varint(buf, p, end)
        if n is None:
            return INCOMPLETE, -1, "the bytes end inside a record header"
        if n < 0:
            return BAD, -1, "a TTL or version varint longer than 10 bytes"
    rend = p + kl + vl + 4
    if rend > end:
        return INCOMPLETE, rend, f"the record needs {rend - pos} bytes, only {end - pos} follow"
    if crc32c(buf[pos:rend - 4]) != _U32.unpack_from(buf, rend - 4)[0]:
        return BAD, rend, "record CRC32C mismatch"
    return OK, rend, ""


# -- scanning a directory --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NoriIssue:
    """Bytes that were not imported.  kind: "torn" (the newest segment's torn tail), "damaged" (bytes that
    are no record) or "rejected" (a whole record walsvc does not store)."""
    kind: str
    segment: str
    offset: int
    length: int
    reason: str

    def __str__(self) -> str:
        return f"{Location(self.segment, self.offset)}: {self.length} {self.kind} bytes ({self.reason})"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "segment": self.segment, "offset": self.offset, "length": self.length,
                "reason": self.reason}


@dataclass(frozen=True, slots=True)
class NoriRecord:
    segment: str
    offset: int
    data: bytes  # the stored bytes, exactly as in the segment
    record: Record


class _Window:
    """A bounded window of one file: records decode from memory, the file is read CHUNK bytes at a time."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.base = 0
        self.buf = b""
        self.data_end: int | None = None

    def at(self, pos: int, need: int = 0) -> tuple[bytes, int]:
        """(buf, i): buf[i:] starts at file offset `pos` and holds max(need, AHEAD) bytes, or up to the end."""
        want = min(self.size, pos + max(need, AHEAD))
        if pos < self.base or want > self.base + len(self.buf):
            self.buf = os.pread(self.fd, max(CHUNK, need), pos)
            self.base = pos
        return self.buf, pos - self.base

    def to_eof(self) -> bool:
        return self.base + len(self.buf) >= self.size


class NoriScanner:
    """The records of a nori-wal directory in segment order; iterate once.

    Damage raises NoriDamageError unless `skip_damaged`; what is skipped or torn lands in `issues` (and is
    passed to `on_issue` as it is found).
    `bytes_done`/`bytes_total` (file bytes) and `records` measure progress.
    """

    def __init__(self, directory: str | os.PathLike, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                 skip_damaged: bool = False, on_issue: Callable[[NoriIssue], None] | None = None) -> None:
        self.directory = Path(directory)
        self.max_record_bytes = max_record_bytes
        self.skip_damaged = skip_damaged
        self.on_issue = on_issue
        self.segments, self.ignored = list_nori_segments(self.directory)
        self.issues: list[NoriIssue] = []
        self.records = 0
        self.zero_tail_bytes = 0
        self.bytes_total = sum(s.path.stat().st_size for s in self.segments)
        self.bytes_done = 0
        self._limit = max_record_bytes + RECORD_OVERHEAD

    def __iter__(self) -> Iterator[NoriRecord]:
        for i, seg in enumerate(self.segments):
            yield from self._segment(seg, newest=i == len(self.segments) - 1)

    def _issue(self, kind: str, name: str, offset: int, length: int, reason: str) -> None:
        if kind != "torn" and not self.skip_damaged:
            raise NoriDamageError(f"{length} {kind} bytes in a nori-wal segment: {reason}; --skip-damaged skips "
                                  "them and reports it", segment=name, offset=offset, length=length)
        issue = NoriIssue(kind, name, offset, length, reason)
        self.issues.append(issue)
        if self.on_issue is not None:
            self.on_issue(issue)

    def _segment(self, seg: NoriSegment, newest: bool) -> Iterator[NoriRecord]:
        name = seg.path.name
        fd = os.open(seg.path, os.O_RDONLY)
        done_before = self.bytes_done
        try:
            size = os.fstat(fd).st_size
            win = _Window(fd, size)
            pos = 0
            if size and win.at(0)[0].startswith(SEGMENT_MAGIC):  # never a nori-wal record (compression 3)
                raise NoriFormatError(f"{seg.path} is a walsvc segment: {self.directory} is a walsvc log, not a "
                                      "nori-wal directory")
            while pos < size:
                self.bytes_done = done_before + pos
                buf, i = win.at(pos)
                try:
                    record, end = decode(buf, i, len(buf), max_record_bytes=self.max_record_bytes)
                except CompressionUnavailableError as exc:
                    raise exc.located(segment=name, offset=pos) from None
                except RecordError as exc:
                    status, rend, why = probe(buf, i, len(buf))
                    if status == INCOMPLETE and not win.to_eof() and (rend < 0 or rend - i <= self._limit):
                        win.at(pos, need=rend - i if rend > 0 else AHEAD + CHUNK)  # read on, then decode again
                        continue
                    if status == OK:  # a whole record nori-wal accepts and walsvc does not store
                        self._issue("rejected", name, pos, rend - i, exc.detail)
                        pos += rend - i
                        continue
                    pos = self._damage(win, name, pos, pos + rend - i if rend > 0 else None, newest,
                                       why if status == BAD else exc.detail)
                    continue
                yield NoriRecord(name, pos, buf[i:end], record)
                self.records += 1
                pos += end - i
            self.bytes_done = done_before + size
        finally:
            os.close(fd)

    def _damage(self, win: _Window, name: str, pos: int, declared: int | None, newest: bool, reason: str) -> int:
        """Classify the bad bytes at `pos`; returns where scanning goes on (the file size: nowhere)."""
        size = win.size
        if win.data_end is None:  # where the file's trailing zeros begin, found once per segment
            win.data_end = data_end(win.fd, 0, size)
        zeros_from = max(pos, win.data_end)
        if newest:
            if zeros_from == pos:  # the preallocated tail: the end of the data
                self.zero_tail_bytes += size - pos
                return size
            nxt = self._resync(win, pos, zeros_from, declared)  # a CRC may end in zero bytes: ends may pass it
            if nxt is None:
                if declared is not None and declared > zeros_from:
                    reason = f"the record needs {declared - pos} bytes, only {zeros_from - pos} precede the zeros"
                self._issue("torn", name, pos, zeros_from - pos, f"torn tail: {reason}; nothing after it decodes")
                self.zero_tail_bytes += size - zeros_from
                return size
        else:
            if zeros_from == pos:
                reason = f"only zero bytes from here to the end of the file ({reason})"
                nxt = None
            else:
                nxt = self._resync(win, pos, size, declared)
        end = size if nxt is None else nxt
        self._issue("damaged", name, pos, end - pos,
                    reason + ("" if nxt is not None else "; no record follows in this segment"))
        return end

    def _resync(self, win: _Window, pos: int, limit: int, declared: int | None) -> int | None:
        """Where the next record starts after damage at `pos`: an offset in (pos, limit) where nori-wal would
        read a whole record (ending in the file), or None.

        When a record starts at the damaged record's declared end, its length survived, unless a chain of
        whole records runs from an earlier offset exactly to that end: then the length was damaged and
        those records are real (a record nested in the damaged value would not end its chain there).  So
        intact records are not swallowed by a bad length, and a record inside a value is not invented.
        """
        if declared is not None and pos < declared < limit and self._whole_record_at(win, declared):
            for p in range(pos + 1, declared):
                if self._whole_record_at(win, p):
                    return p if self._chain_end(win, p, declared) == declared else declared
            return declared
        for p in range(pos + 1, limit):
            if self._whole_record_at(win, p):
                return p
        return None

    def _chain_end(self, win: _Window, p: int, stop: int) -> int:
        """Follow whole records from `p` while they start before `stop`; where the last one ends."""
        while p < stop:
            buf, i = win.at(p)
            status, rend, _ = probe(buf, i, len(buf))
            if status == INCOMPLETE and 0 < rend - i <= self._limit and not win.to_eof():
                buf, i = win.at(p, need=rend - i)
                status, rend, _ = probe(buf, i, len(buf))
            if status != OK:
                return p
            p += rend - i
        return p

    def _whole_record_at(self, win: _Window, p: int) -> bool:
        return self._chain_end(win, p, p + 1) > p


def dump_nori(directory: str | os.PathLike, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
              skip_damaged: bool = False, on_issue: Callable[[NoriIssue], None] | None = None
              ) -> Iterator[dict[str, Any]]:
    """The records of a nori-wal directory as JSON-ready dicts: segment, offset, bytes (stored size), then the
    fields `walsvc dump` shows (tombstone, ttl_ms, compression, version, key/value text or base64)."""
    from .record import record_dict
    for item in NoriScanner(directory, max_record_bytes=max_record_bytes, skip_damaged=skip_damaged,
                            on_issue=on_issue):
        out: dict[str, Any] = {"segment": item.segment, "offset": item.offset, "bytes": len(item.data)}
        fields = record_dict(item.record)
        del fields["lsn"], fields["timestamp"]  # nori-wal records have neither
        out.update(fields)
        yield out


# -- the import marker -----------------------------------------------------------------------------------

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def load_imports(dst: Path) -> list[dict[str, Any]]:
    """The entries of `DST/nori-imports.json` (none if it does not exist)."""
    path = dst / MARKER
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MARKER_BYTES + 1)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise NoriImportRefusedError(f"{dst} is not a directory") from None
    try:
        if len(data) > MAX_MARKER_BYTES:
            raise ValueError(f"larger than {MAX_MARKER_BYTES} bytes")
        entries = json.loads(data)["imports"]
        if not all(isinstance(e, dict) and isinstance(e.get("source"), str) and e.get("state") in ("running", "done")
                   and isinstance(e.get("first_lsn"), int) for e in entries):
            raise ValueError("an entry lacks source, state or first_lsn")
    except (ValueError, KeyError, TypeError) as exc:
        raise NoriImportRefusedError(f"{path} is damaged ({exc}), so what was imported is unknown; repair or "
                                     "remove it by hand") from None
    return entries


def _store_imports(dst: Path, entries: list[dict[str, Any]]) -> None:
    """Replace the marker atomically and durably: temp file, fsync, rename, fsync the directory."""
    replace_file(dst / MARKER, json.dumps({"format": 1, "imports": entries}, indent=1).encode() + b"\n")


def _match(entries: list[dict[str, Any]], source: str, fingerprint: str | None) -> dict[str, Any] | None:
    for e in entries:
        if e["source"] == source or (fingerprint is not None and e.get("fingerprint") == fingerprint):
            return e
    return None


def _entry_for(entries: list[dict[str, Any]], src: Path, dst: Path, fingerprint: str | None
               ) -> dict[str, Any] | None:
    """The interrupted import of `src` to resume, or None for a new one; refuses a finished source, and any
    other source while an import is interrupted (its resume check needs the log's end to be its own)."""
    entry = _match(entries, str(src), fingerprint)
    if entry is not None and entry["state"] == "done":
        raise _refuse_done(entry, src, dst)
    for other in entries:
        if other["state"] == "running" and other is not entry:
            raise NoriImportRefusedError(
                f"an import of {other['source']} into {dst} was interrupted; run walsvc import-nori "
                f"{other['source']} --dir {dst} again to finish it before importing {src}")
    return entry


def _refuse_done(entry: dict[str, Any], src: Path, dst: Path) -> NoriImportRefusedError:
    same = "it" if entry["source"] == str(src) else f"the same log (from {entry['source']})"
    lsns = (f"as LSN {entry['first_lsn']}..{entry['last_lsn']}" if entry.get("last_lsn") is not None
            else "with no records")
    return NoriImportRefusedError(
        f"{src} was not imported again: {same} was imported into {dst} on {entry.get('finished')} {lsns} "
        f"({entry.get('records')} records); to import it once more anyway, remove its entry from {dst / MARKER}")


# -- the import ------------------------------------------------------------------------------------------

@dataclass
class NoriImportReport:
    """What `import_nori` read and where it went."""
    source: str
    destination: str
    segments: int = 0
    records: int = 0  # records of this source now in DST (resumed ones included)
    resumed: int = 0  # of those, records an interrupted run had already appended
    bytes: int = 0  # stored record bytes read from the source (zero tails and skipped bytes excluded)
    first_lsn: int | None = None
    last_lsn: int | None = None
    zero_tail_bytes: int = 0
    issues: list[NoriIssue] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lsns = f"LSN {self.first_lsn}..{self.last_lsn}" if self.first_lsn is not None else "no LSNs"
        lines = [f"imported {self.segments} segments, {self.records} records, {self.bytes} bytes from "
                 f"{self.source} into {self.destination}: {lsns}"]
        if self.resumed:
            lines.append(f"resumed an interrupted import: {self.resumed} of these records were already there")
        if self.first_lsn is not None and self.last_lsn - self.first_lsn + 1 != self.records:
            lines.append("LSN gaps: a crash during an earlier run tore a batch; its LSNs are never reused")
        if self.zero_tail_bytes:
            lines.append(f"zero tail: {self.zero_tail_bytes} preallocated bytes after the last record, not data")
        lines.extend(f"{i.kind}: {i}" for i in self.issues)
        if self.ignored:
            lines.append(f"ignored (not segments): {', '.join(self.ignored)}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "issues"}
        out["issues"] = [i.as_dict() for i in self.issues]
        return out


def _check(src: Path, max_record_bytes: int, skip_damaged: bool, progress: Progress | None) -> str | None:
    """Read the whole source once, writing nothing, so that damage is found before the log is touched.
    Returns the source's fingerprint (None if it holds no record)."""
    scanner = NoriScanner(src, max_record_bytes=max_record_bytes, skip_damaged=skip_damaged)
    digest = hashlib.sha256()
    hashed = shown = 0
    try:
        for item in scanner:
            if hashed < FINGERPRINT_BYTES:
                digest.update(item.data)
                hashed += len(item.data)
            if progress is not None and scanner.bytes_done - shown >= CHUNK:
                shown = scanner.bytes_done
                progress("checking", shown, scanner.bytes_total, scanner.records)
    except NoriDamageError as exc:
        raise NoriDamageError(f"{exc.detail}; nothing was imported", segment=exc.segment, offset=exc.offset,
                              length=exc.length) from None
    if progress is not None:
        progress("checking", scanner.bytes_total, scanner.bytes_total, scanner.records)
    return "sha256:" + digest.hexdigest() if hashed else None


def import_nori(src: str | os.PathLike, dst: str | os.PathLike, *, config: LogConfig | None = None,
                skip_damaged: bool = False, progress: Progress | None = None, **options: Any) -> NoriImportReport:
    """Append every record of the nori-wal directory `src` to the walsvc log at `dst` (new, or existing with no
    writer running), in order, in atomic batches; returns what was done.

    `config` (or keyword options, as for `Log.open`) configures DST; its max_record_bytes bounds source records.
    Raises NoriDamageError at damage (nothing imported) unless `skip_damaged`, NoriImportRefusedError if `src`
    was imported into `dst` already, LogLockedError while a writer owns `dst`.  `progress(phase, bytes done,
    bytes total, records)` is called now and then, phase "checking" then "importing".
    """
    if config is None:
        config = LogConfig.from_options(options)
    elif options:
        raise ConfigError("config", "pass either config= or keyword options, not both")
    src, dst = directory_path(src, "src").resolve(), directory_path(dst, "dst").resolve()
    if src == dst:
        raise NoriImportRefusedError(f"{src} is both the nori-wal source and the walsvc destination")
    if not list_nori_segments(src)[0]:  # a missing source fails there, a directory of no nori-wal log here
        raise NoriFormatError(f"{src} holds no nori-wal segment files (<number>.wal): nothing to import, and an "
                              "import of nothing must not be recorded as done")
    if dst.is_dir():  # refuse at once what will be refused anyway (checked again under the lock)
        _entry_for(load_imports(dst), src, dst, None)
    fingerprint = _check(src, config.max_record_bytes, skip_damaged, progress)
    with Log.open(dst, config=config) as log:
        entries = load_imports(dst)
        entry = _entry_for(entries, src, dst, fingerprint)
        if entry is None:
            entry = {"source": str(src), "fingerprint": fingerprint, "state": "running",
                     "first_lsn": log.next_lsn, "started": _now()}
            entries.append(entry)
            _store_imports(dst, entries)  # durable before any batch: a crash from here on resumes
        elif entry["first_lsn"] < log.first_lsn:
            raise NoriImportRefusedError(
                f"cannot resume the interrupted import of {src}: retention deleted LSNs below {log.first_lsn} of "
                f"{dst}, and the import began at LSN {entry['first_lsn']}")
        report = _append_all(log, src, dst, entry, config, skip_damaged, progress)
        log.sync()
        entry.update(state="done", fingerprint=entry.get("fingerprint") or fingerprint,
                     last_lsn=report.last_lsn, records=report.records, segments=report.segments,
                     bytes=report.bytes, skipped=[i.as_dict() for i in report.issues], finished=_now())
        _store_imports(dst, entries)
    return report


def _append_all(log: Log, src: Path, dst: Path, entry: dict[str, Any], config: LogConfig, skip_damaged: bool,
                progress: Progress | None) -> NoriImportReport:
    """Append the source's records, after checking those an interrupted run already appended."""
    report = NoriImportReport(str(src), str(dst))
    scanner = NoriScanner(src, max_record_bytes=config.max_record_bytes, skip_damaged=skip_damaged)
    target = min(BATCH_BYTES, config.max_batch_bytes)
    already = log.read(entry["first_lsn"])
    checking = True
    batch: list[bytes] = []
    size = 0
    segment = None

    def flush() -> None:
        nonlocal size
        if batch:
            base = log.append_encoded(b"".join(batch), len(batch))
            report.first_lsn = base if report.first_lsn is None else report.first_lsn
            report.last_lsn = base + len(batch) - 1
            batch.clear()
            size = 0
            if progress is not None:
                progress("importing", scanner.bytes_done, scanner.bytes_total, report.records)

    try:
        for item in scanner:
            report.records += 1
            report.bytes += len(item.data)
            if checking:
                have = next(already, None)
                if have is not None:
                    if have != item.record:
                        raise NoriImportRefusedError(
                            f"cannot resume the interrupted import of {src}: LSN {have.lsn} of {dst} is not the "
                            f"record at {Location(item.segment, item.offset)}; {dst} was written to since")
                    report.resumed += 1
                    report.first_lsn = have.lsn if report.first_lsn is None else report.first_lsn
                    report.last_lsn = have.lsn
                    continue
                checking = False
                already.close()
            if batch and (item.segment != segment or size + len(item.data) > target):
                flush()
            segment = item.segment
            batch.append(item.data)
            size += len(item.data)
        flush()
        if checking:
            extra = next(already, None)
            if extra is not None:
                raise NoriImportRefusedError(
                    f"cannot finish the interrupted import of {src}: {dst} holds LSN {extra.lsn} after the source's "
                    f"last record; it was written to since")
    finally:
        already.close()
    report.segments = len(scanner.segments)
    report.zero_tail_bytes = scanner.zero_tail_bytes
    report.issues = scanner.issues
    report.ignored = scanner.ignored
    return report


__all__ = ["NoriImportReport", "NoriIssue", "NoriRecord", "NoriScanner", "dump_nori", "import_nori",
           "list_nori_segments", "load_imports", "probe"]

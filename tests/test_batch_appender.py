"""The writer's compiled store of a producer's next batch (`_writer_c.BatchAppender`) against the Python it
stands in for (`Writer._handle`: `IngestSession.decide`, `Log.append_encoded` and the bookkeeping).

Two writers in this process (real logs in tmp dirs, real sockets that nobody connects to) take the same
messages, one with the twin and one without.  After each turn their counters, refusals, pending acks and
log state must agree, except for what depends on the clock (frame timestamps, so data CRCs).  At the end both
logs must hold the same records under the same LSNs, and `walsvc.verify` must find every frame, seal and
index entry of the twin's log sound: its running data CRC is what the seals record.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from walsvc import protocol as P, record as R
from walsvc.config import LogConfig, load
from walsvc.errors import LogStoppedError
from walsvc.record import Record
from walsvc.verify import verify
from walsvc.writer import Writer, _writer_c

pytestmark = pytest.mark.skipif(_writer_c is None and not os.environ.get("CI"),
                                reason="the writer's compiled store is not built here (no C compiler?)")

MAX_RECORD = 64 * 1024


def _writer(directory, fsync: str, compiled: bool) -> Writer:
    cfg = load(directory=directory)
    log = dataclasses.replace(LogConfig(), fsync=fsync, segment_bytes=1 << 20, max_record_bytes=MAX_RECORD,
                              max_batch_bytes=256 * 1024, producer_window=4, index_interval_bytes=4096)
    w = Writer(dataclasses.replace(cfg, log=log))
    if not compiled:
        w._store_next = None
    return w


def _state(w: Writer) -> dict:
    """What must agree between the two writers after each turn (not timestamps, so not data CRCs)."""
    log, seg = w.log, w.log._active
    return {
        "counters": dict(w.metrics.counters), "rejected": dict(w.metrics.rejected),
        "events": dict(w.metrics.events),
        "pending": [(last, reply) for last, _, reply in w._pending],
        "next_lsn": log.next_lsn, "records": log.records_appended, "bytes": log.bytes_appended,
        "written": (log._written[1], log._written[2].name),
        "segment": (seg.path.name, seg.end, seg.record_count, seg.last_lsn, list(seg.index), seg.next_index_at),
        "windows": {pid: list(q) for pid, q in log._producers.items()},
        "pipelined": (w._pipelining.turn_pipelined, dict(w._pipelining._until)),
        "stopped": log.stop_reason is not None,
    }


def _turn(w: Writer, msgs: list[bytes]) -> None:
    """One loop turn of `Writer.serve` over `msgs`, without its sockets: each batch handled, then committed."""
    w._pipelining.new_turn()
    for msg in msgs:
        w._handle(msg)
    w._sync_appended()


records = st.lists(st.tuples(st.binary(max_size=8), st.integers(0, 40_000)), min_size=1, max_size=3)


@st.composite
def messages(draw) -> list[list[bytes]]:
    """Turns of APPENDs from three producers: mostly each one's next batch, with resends (inside and beyond
    the dedup window), gaps, damaged bytes, wrong counts, records over the limit and compressed values."""
    next_seq = {1: 1, 2: 1, 0xFEED: 1}
    turns = []
    for _ in range(draw(st.integers(1, 25))):
        turn = []
        for _ in range(draw(st.integers(1, 4))):
            pid = draw(st.sampled_from(sorted(next_seq)))
            recs = [Record.put(k, bytes([len(k)]) * n) for k, n in draw(records)]
            how = draw(st.sampled_from(["next"] * 8 + ["resend", "old", "gap", "damaged", "count", "huge",
                                                       "squeezed"]))
            seq = next_seq[pid]
            if how == "resend":
                seq = max(1, seq - 1)
            elif how == "old":
                seq = max(1, seq - 6)
            elif how == "gap":
                seq += 2
            elif how == "huge":
                recs = [Record.put(b"big", b"x" * (MAX_RECORD + 1))]
            elif how == "squeezed":
                recs = [Record.put(b"z", b"a" * 3000, compression="zstd")]
            payload = R.encode_many(recs)
            msg = P.encode_append(pid, seq, len(recs) + (how == "count"), payload)
            if how == "damaged":
                i = draw(st.integers(0, len(msg) - 1))
                msg = msg[:i] + bytes([msg[i] ^ 0x40]) + msg[i + 1:]
            if how in ("next", "squeezed"):
                next_seq[pid] += 1
            turn.append(msg)
        turns.append(turn)
    return turns


def _run_both(tmp_path_factory, turns: list[list[bytes]], fsync: str) -> Writer:
    """Feed `turns` to a writer with the twin and one without, comparing them after each turn and at the
    end; returns the closed writer with the twin, whose log `verify` then found sound."""
    fast = _writer(tmp_path_factory.mktemp("fast"), fsync, compiled=True)
    slow = _writer(tmp_path_factory.mktemp("slow"), fsync, compiled=False)
    try:
        for turn in turns:
            _turn(fast, turn)
            _turn(slow, turn)
            assert _state(fast) == _state(slow)
        fast.log.sync()  # under `always` a pipelining turn's fsync runs on the fsync thread, in its own time
        slow.log.sync()
        fast_records = [(r.lsn, r.key, r.value) for r in fast.log.read()]
        assert fast_records == [(r.lsn, r.key, r.value) for r in slow.log.read()]
    finally:
        fast.close()
        slow.close()
    report = verify(fast.directory)
    assert report.ok, report.problems
    return fast


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(turns=messages(), fsync=st.sampled_from(["os", "always"]))
def test_the_compiled_store_does_what_the_python_does(tmp_path_factory, turns, fsync) -> None:
    _run_both(tmp_path_factory, turns, fsync)


@pytest.mark.parametrize("fsync", ["os", "always"])
def test_the_compiled_store_across_rotations(tmp_path_factory, fsync) -> None:
    """Segments fill up: the twin declines a batch that does not fit, the Python rotates, and the twin goes
    on in the new segment.  The seals (written by the rotation thread from the running data CRC the twin
    kept) must check, as must the index entries the twin added."""
    batch = R.encode_many([Record.put(b"k", b"x" * 40_000)])
    turns = [[P.encode_append(pid, seq, 1, batch) for pid in (5, 6)] for seq in range(1, 40)]
    fast = _run_both(tmp_path_factory, turns, fsync)
    assert len(list(fast.directory.glob("*.wal"))) >= 3
    assert fast.metrics.counters["batches"] == 78


def test_the_compiled_store_takes_a_producers_next_batches_and_declines_the_rest(tmp_path) -> None:
    """The twin is really used: a producer's first batch goes to the Python (it is announced), its next
    ones to the twin, a resend back to the Python, which answers it as a duplicate."""
    w = _writer(tmp_path, "os", compiled=True)
    store = w._store_next
    try:
        batch = R.encode_many([Record.put(b"k", b"v")])
        assert store(P.encode_append(7, 1, 1, batch)) is False  # first batch: the Python announces it
        w._handle(P.encode_append(7, 1, 1, batch))
        assert w.metrics.events["producer_connected"] == 1
        assert store(P.encode_append(7, 2, 1, batch)) is True
        assert store(P.encode_append(7, 2, 1, batch)) is False  # a resend
        assert store(P.encode_append(7, 4, 1, batch)) is False  # a gap
        assert store(b"WS\x01\x01garbage") is False
        assert [reply for _, _, reply in w._pending] == [P.encode_ack(7, 1, 1, 1), P.encode_ack(7, 2, 2, 1)]
        assert w.log.next_lsn == 3 and w.metrics.counters["batches"] == 2
        assert w.status()["batch_store"] == "C"
    finally:
        w.close()


def test_a_failed_write_in_the_compiled_store_stops_the_log(tmp_path) -> None:
    """A write that fails stops the log with the frame write named, as the Python's does.  The failure is
    real: the active segment's descriptor is swapped for a read-only one, so the kernel refuses the write
    with EBADF."""
    w = _writer(tmp_path, "os", compiled=True)
    try:
        batch = R.encode_many([Record.put(b"k", b"v")])
        w._handle(P.encode_append(7, 1, 1, batch))
        seg = w.log._active
        writable, seg.fd = seg.fd, os.open(seg.path, os.O_RDONLY)
        try:
            with pytest.raises(LogStoppedError, match=r"frame write at offset \d+") as stopped:
                w._store_next(P.encode_append(7, 2, 1, batch))
            assert isinstance(stopped.value.__cause__, OSError)
            assert w.log.stop_reason is stopped.value
            assert w.log.next_lsn == 2  # nothing was counted as appended
            w._handle(P.encode_append(7, 2, 1, batch))  # the writer's path: refused, the log stays stopped
            assert w.metrics.rejected[P.LOG_STOPPED] == 1
        finally:
            os.close(seg.fd)
            seg.fd = writable
    finally:
        w.close()

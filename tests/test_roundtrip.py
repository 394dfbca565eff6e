"""The round trip of one record in flight (issue 9): the writer fsyncs in its own loop under `always` (group
commit without a thread hand-off), a producer's caller receives its own reply, and a reader woken by a
commit message takes the committed LSN it carries as its bound.  Real processes, sockets and files.
"""

from __future__ import annotations

import time
from pathlib import Path

from helpers import check_acked_exactly_once, collect_acks, finish, spawn_producer, status, verify_log

from walsvc.record import encode_put


def test_log_without_fsync_thread_commits_only_on_sync(open_log) -> None:
    """`fsync_thread=False` under `always`: appends that do not wait stay uncommitted until the owner's
    sync(), and one fsync then commits all of them (the writer service's loop relies on both)."""
    log = open_log(fsync="always", fsync_thread=False)
    for i in range(10):
        log.append_encoded(encode_put(b"k%d" % i, b"v"), 1, wait=False)
    time.sleep(0.2)  # a background fsync thread, if one ran, would have committed them by now
    assert log.committed_lsn == 0
    assert log.stats()["fsyncs"] == 0
    assert log.sync() == 10
    assert log.committed_lsn == 10
    assert log.stats()["fsyncs"] == 1


def test_writer_loop_group_commits_four_producer_processes(tmp_path: Path, writers) -> None:
    """Four producer processes, one record in flight each, under `always`: every record is acked exactly once
    and durable, and the writer loop's fsyncs each covered several producers' batches (fewer fsyncs than
    batches)."""
    d = tmp_path / "wal"
    writer = writers(d, fsync="always").start()
    per_producer = 150
    outs = [tmp_path / f"p{i}.acks" for i in range(4)]
    procs = [spawn_producer(d, i, out, count=per_producer, batch=1, pause_s=0, in_flight_one=True,
                            ack_timeout_s=30.0) for i, out in enumerate(outs)]
    for i, proc in enumerate(procs):
        finish(proc, 120, f"producer {i}")
    st = status(d)
    batches = st["counters"]["batches"]
    assert batches == 4 * per_producer  # one record per batch: each producer waited for every ack
    assert st["committed_lsn"] == 4 * per_producer
    assert 0 < st["fsyncs"] < batches, f"{st['fsyncs']} fsyncs for {batches} batches: no group commit"
    assert writer.stop() == 0
    check_acked_exactly_once(verify_log(d), collect_acks(outs))

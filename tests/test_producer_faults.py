"""A real log_stopped reaches a Producer: the writer's log stops (the next segment's file name is taken, so
rotation fails as on a full disk), the affected records fail at once with LogStoppedError, not after the
5 s ack timeout, and after a restart the same Producer goes on under a new producer id."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import walsvc
from walsvc import logid
from walsvc.errors import LogStoppedError, ProducerIdError
from walsvc.segment import segment_name

from helpers import read_log, status, verify_log


def test_log_stopped_fails_promptly_and_the_producer_goes_on_after_a_restart(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    config = tmp_path / "small.toml"
    config.write_text(f'[log]\ndir = "{d}"\nfsync = "os"\nsegment_bytes = {1 << 20}\n')
    writer = writers(d, config=config).start()
    value = b"v" * 1000
    with walsvc.Producer(d, ack_timeout_s=5.0) as producer:
        assert producer.put(b"first", value).result(10) == 1
        blockers = [d / segment_name(lsn) for lsn in range(2, 3000)]
        for b in blockers:
            b.mkdir()
        start = time.monotonic()
        futures = [(b"k%d" % i, producer.put(b"k%d" % i, value)) for i in range(2500)]
        results = []
        for key, f in futures:
            try:
                results.append((key, f.result(10)))
            except LogStoppedError as exc:
                results.append((key, exc))
        took = time.monotonic() - start
        failed = [r for _, r in results if isinstance(r, LogStoppedError)]
        acked = {k: r for k, r in results if not isinstance(r, LogStoppedError)}
        assert failed and acked, "the log should stop part-way"
        assert took < 4.0, f"{took:.1f} s: the failures waited for the ack timeout"
        assert "stopped its log" in str(failed[0]) and "rotation" in str(failed[0])
        first_failure = next(i for i, (_, r) in enumerate(results) if isinstance(r, LogStoppedError))
        assert all(isinstance(r, LogStoppedError) for _, r in results[first_failure:])
        assert status(d)["stopped"]

        writer.kill9()
        for b in blockers:
            b.rmdir()
        writer.start()
        after = producer.put(b"after", b"restart").result(10)
        assert after == len(acked) + 2
    records = {r.key: r.lsn for r in verify_log(d)}
    assert all(records[k] == lsn for k, lsn in acked.items())
    assert records[b"after"] == after


def test_a_new_log_at_the_same_place_never_acks_records_it_does_not_hold(tmp_path: Path, writers, caplog) -> None:
    """While a producer streams, its writer is killed, the log moved away and a fresh writer started at the
    same directory.  Every record acked has an LSN and is at that LSN in one of the two logs; the rest fail
    with ProducerIdError (or LogStoppedError, never here).  Before, records the fresh writer never stored were
    acked "stored, LSNs unknown" (result None) and were in neither log.  The producer's `log_id` names the
    log its acks come from (the writer's READY says), and the change is logged."""
    d, old = tmp_path / "wal", tmp_path / "wal.old"
    writer = writers(d, fsync="os").start()
    futures: list[tuple[bytes, walsvc.RecordFuture]] = []
    streaming = threading.Event()
    streaming.set()

    def stream() -> None:
        i = 0
        while streaming.is_set():
            futures.append((b"k%d" % i, producer.put(b"k%d" % i, b"v" * 20)))
            i += 1
            if i % 100 == 0:
                time.sleep(0.002)

    with walsvc.Producer(d, linger_ms=2) as producer:
        assert producer.put(b"first", b"v").result(10) == 1
        old_id = logid.load(d)
        assert producer.log_id == old_id is not None
        thread = threading.Thread(target=stream)
        thread.start()
        time.sleep(0.5)
        writer.kill9()
        d.rename(old)
        writer.start()
        time.sleep(0.5)
        streaming.clear()
        thread.join()
        producer.flush(30)
        new_id = logid.load(d)
        assert producer.log_id == new_id != old_id
        assert f"now serves log {new_id}, not {old_id}" in caplog.text
        outcomes: dict[bytes, int | None | BaseException] = {}
        for key, f in futures:
            try:
                outcomes[key] = f.result(0)
            except ProducerIdError as exc:
                outcomes[key] = exc
    logs = [{r.lsn: r.key for r in read_log(where)} for where in (old, d)]
    acked = {k: v for k, v in outcomes.items() if not isinstance(v, BaseException)}
    assert acked and None not in acked.values()
    assert [k for k, lsn in acked.items() if k not in (logs[0].get(lsn), logs[1].get(lsn))] == []

"""A real log_stopped reaches a Producer: the writer's log stops (the next segment's file name is taken, so
rotation fails as on a full disk), the affected records fail at once with LogStoppedError, not after the
5 s ack timeout, and after a restart the same Producer goes on under a new producer id."""

from __future__ import annotations

import time
from pathlib import Path

import walsvc
from walsvc.errors import LogStoppedError
from walsvc.segment import segment_name

from helpers import status, verify_log


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

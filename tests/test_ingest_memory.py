"""The writer's memory stays bounded with the default config while hostile clients flood its ingest socket.

Two hostile processes with four connections each send, as fast as ZeroMQ takes them, messages of the
largest size the writer accepts (random bytes, and APPENDs of valid records with one bad CRC), messages one
byte longer, multipart messages and garbage (tests/ingest_flood.py), while a legitimate producer process
keeps appending.  Its acks keep flowing, the writer's peak RSS stays under 150 MiB, every acked record is in
the log at its LSN, and `walsvc verify` is clean.  With the defaults before issue 7 (1000 x 64 MiB queued per
connection, 16 MiB records) the same flood took the writer to 744 MiB.  scripts/ingest_flood.py runs longer
floods, with any config.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import status
from ingest_flood import MiB, run
import walsvc
from walsvc import config
from walsvc.errors import ConfigError, RecordTooLargeError

MEMORY_LIMIT = 150 * MiB


def test_hostile_flood_with_the_default_config_keeps_memory_bounded(tmp_path: Path) -> None:
    result = run(tmp_path, processes=2, connections=4, seconds=6.0)
    print(result.describe())
    assert result.max_message == config.load().max_message_bytes == 1024 * 1024 + 64 * 1024  # the defaults ran
    assert result.hostile_messages > 200, result.describe()  # the flood really happened
    assert result.rejected.get("malformed", 0) > 100, result.describe()  # and reached the writer
    assert result.legit_acks_during > 0, result.describe()
    assert result.peak_hwm < MEMORY_LIMIT, result.describe()


def test_max_message_bytes_must_hold_a_record_of_the_maximum_size(tmp_path: Path) -> None:
    """A longer message would be dropped by ZeroMQ unanswered, and its producer would resend it for ever.
    By default the limit follows max_record_bytes."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[log]\nmax_record_bytes = 2097152\n")
    assert config.load(cfg).max_message_bytes == 2 * MiB + 64 * 1024
    cfg.write_text("[log]\nmax_record_bytes = 2097152\n[service]\nmax_message_bytes = 2097279\n")
    with pytest.raises(ConfigError, match="service.max_message_bytes.*at least 2097280"):
        config.load(cfg)
    cfg.write_text("[log]\nmax_record_bytes = 2097152\n[service]\nmax_message_bytes = 2097280\n")
    assert config.load(cfg).max_message_bytes == 2097280


def test_producer_keeps_within_the_writers_limits(tmp_path: Path, writers) -> None:
    """The writer records its limits in ENDPOINTS: the producer refuses a record above the writer's
    max_record_bytes at once, and never builds a batch ZeroMQ would drop, whatever batch_bytes it was given:
    here a batch of 900 KB still open (the writer is paused, so earlier batches await their acks), then a
    record of the maximum size.  Sent together they would be dropped, and resent for ever."""
    d = tmp_path / "wal"
    writer = writers(d).start()
    max_message = config.load().max_message_bytes
    with walsvc.Producer(d, batch_bytes=64 * MiB, linger_ms=10_000) as producer:
        assert producer.batch_bytes < max_message
        with pytest.raises(RecordTooLargeError, match="1048576-byte"):
            producer.put(b"k", b"x" * (2 * MiB))
        writer.pause()
        try:
            futures = [producer.put(f"s{i}", b"s" * 1000) for i in range(908)]
            futures.append(producer.put(b"big", b"b" * (MiB - 16)))
        finally:
            writer.resume()
        producer.flush(60)
        lsns = [f.result(0) for f in futures]
    assert lsns == list(range(1, 910))
    assert not status(d)["rejected"].get("too_large")

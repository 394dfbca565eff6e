"""Issue 13: a producer's first ack comes within 200 ms of its first put on a freshly started writer, and
within 1 s of a restarted writer being ready after kill -9, with two other processes keeping both cores
busy.  (Replies used to ride plain PUB, which dropped them until the subscription was applied: 2 of 12
fresh starts took 5 s, the ack timeout.)  scripts/first_ack.py runs the full 50 starts per fsync policy and
requires every one within 200 ms.  Here, on a machine that may carry other load besides the two busy loops
(where a scheduling stall alone can cost a few hundred ms), one start per policy may miss 200 ms, none may
take 1 s: the bug's signature is 5 s."""

from __future__ import annotations

from pathlib import Path

import pytest

from first_ack import busy_cores, describe, fresh_start_first_ack, restart_first_acks
from helpers import verify_log

STARTS_PER_POLICY = 5


@pytest.mark.parametrize("fsync", ["always", "batch", "os"])
def test_first_ack_on_a_fresh_writer_within_200ms(tmp_path: Path, fsync: str) -> None:
    with busy_cores(2):
        firsts = [fresh_start_first_ack(tmp_path / f"wal{i}", fsync, tmp_path / f"logs{i}")
                  for i in range(STARTS_PER_POLICY)]
    print(f"first ack, fresh writer, fsync={fsync}: {describe(firsts)}")
    assert max(firsts) < 1.0 and sum(f >= 0.2 for f in firsts) <= 1, describe(firsts)


def test_first_ack_after_kill9_within_1s_of_the_writer_being_ready(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    with busy_cores(2):
        delays, acked = restart_first_acks(d, "batch", tmp_path / "logs", producers=3, restarts=2)
    print(f"first ack after kill -9 and restart, from ready: {describe(delays)}")
    assert len(delays) == 6 and max(delays) < 1.0, describe(delays)
    stored = {r.key: r.lsn for r in verify_log(d)}
    assert all(stored.get(k) == lsn for k, lsn in acked.items()), "an acked record is missing or moved"

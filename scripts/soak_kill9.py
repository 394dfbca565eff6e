#!/usr/bin/env python3
"""Soak test: kill -9 the walsvc writer over and over under load, then check nothing acked was lost.

Producer processes append all the time (keys `p<index>-<counter>`, each records the LSN of every acked record)
and a reader process tails the log across every crash.  Each cycle waits a random 0.2-0.6 s, kills the
writer with SIGKILL and restarts it.  At the end the producers flush, the reader catches up, and the script
checks that every acked record is in the log exactly once at the LSN it was acked with, that no LSN was
reused, that what each restart recovered never went backwards, and that the reader saw exactly the log.

    python scripts/soak_kill9.py --cycles 200            # or --minutes 10; --keep to keep the files
    python scripts/soak_kill9.py --cycles 1000           # nightly: about 20 minutes, a few hundred MB of log
    python scripts/soak_kill9.py --cycles 200 --unwatched   # producers that look at no record until the end

It prints how many acked records were lost, stored twice, or found with their LSN holding another record
(all three must be 0).

Exit status 0 when every check passes, 1 otherwise.  Not collected by pytest (tests/test_faults.py runs a
20-cycle version of the same check).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import (WriterProcess, check_acked_exactly_once, collect_acks, control, finish, read_acks,  # noqa: E402
                     read_seen, spawn_producer, spawn_reader, verify_log, wait_for, wait_ready)


def loss_counts(records: list, acked: dict[str, int | None]) -> tuple[int, int, int]:
    """(acked records missing from the log, records stored more than once, acked LSNs that now hold a
    different record): the three numbers a soak run reports, all 0 when it passes."""
    at = {r.lsn: r.key.decode() for r in records}
    keys = [r.key.decode() for r in records]
    stored = set(keys)
    lost = sum(1 for k in acked if k not in stored)
    duplicates = len(keys) - len(stored)
    reused = sum(1 for k, lsn in acked.items() if lsn is not None and k in stored and at.get(lsn) != k)
    return lost, duplicates, reused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=0, help="kill/restart cycles (default 100 if no --minutes)")
    parser.add_argument("--minutes", type=float, default=0.0, help="run for this long instead of a cycle count")
    parser.add_argument("--producers", type=int, default=3)
    parser.add_argument("--fsync", choices=["always", "batch", "os"], default="batch")
    parser.add_argument("--min-gap", type=float, default=0.2, help="shortest writer life between kills (s)")
    parser.add_argument("--max-gap", type=float, default=0.6, help="longest writer life between kills (s)")
    parser.add_argument("--segment-bytes", type=int, default=1 << 20,
                        help="segment size (default 1 MiB, the minimum, so rotations happen under the kills)")
    parser.add_argument("--unwatched", action="store_true",
                        help="producers look at no record until they flush at the end (acks taken in bulk)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dir", help="work directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if not args.cycles and not args.minutes:
        args.cycles = 100
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="walsvc-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    d = work / "wal"
    print(f"soak: dir {work}, seed {seed}, {args.producers} producers"
          + (" (unwatched)" if args.unwatched else "") + f", fsync={args.fsync}, "
          + (f"{args.cycles} cycles" if args.cycles else f"{args.minutes} minutes"), flush=True)
    config = work / "walsvc.toml"
    config.write_text(f"[log]\nsegment_bytes = {args.segment_bytes}\n")
    writer = WriterProcess(d, fsync=args.fsync, config=config, logs=work / "logs")
    stop, until = work / "stop", work / "until"
    outs = [work / f"producer{i}.txt" for i in range(args.producers)]
    producers = []
    reader = None
    started = time.monotonic()
    ok = False
    try:
        writer.start()
        reader = spawn_reader(d, work / "reader.txt", until_file=until)
        wait_ready(reader)
        producers = [spawn_producer(d, i, out, stop_file=stop, batch=10, pause_s=0.01, ack_timeout_s=1.0,
                                    unwatched=args.unwatched)
                     for i, out in enumerate(outs)]
        if args.unwatched:  # their acks are written down only at the end
            wait_for(lambda: read_seen(work / "reader.txt"), 60, "first records from the producers")
        else:
            wait_for(lambda: all(read_acks(o) for o in outs), 60, "first acks from every producer")
        recovered = [writer.ready_committed_lsn()]
        cycle = 0
        deadline = started + args.minutes * 60 if args.minutes else None
        while (cycle < args.cycles) if not deadline else (time.monotonic() < deadline):
            time.sleep(rng.uniform(args.min_gap, args.max_gap))
            writer.kill9()
            writer.start(timeout=60)
            cycle += 1
            recovered.append(writer.ready_committed_lsn())
            dead = [i for i, p in enumerate(producers) if p.poll() is not None]
            if dead or reader.poll() is not None:
                raise AssertionError(f"processes died: producers {dead}, reader rc {reader.poll()}")
            if cycle % (10 if args.cycles <= 200 else 50) == 0:
                progress = (f"read {len(read_seen(work / 'reader.txt')):,}" if args.unwatched  # acks come at the end
                            else f"acked {sum(len(read_acks(o)) for o in outs):,}")
                print(f"  cycle {cycle:5d}  {time.monotonic() - started:7.1f} s  recovered LSN {recovered[-1]:,}  "
                      f"{progress}", flush=True)

        stop.touch()
        for i, p in enumerate(producers):
            finish(p, 120, f"producer {i}")
        committed = control(d, "committed")["committed_lsn"]
        until.write_text(str(committed))
        finish(reader, 120, "reader")
        rc = writer.stop()
        assert rc == 0, f"writer exited {rc} on SIGTERM"

        assert recovered == sorted(recovered), "a restart recovered a lower committed LSN than the one before"
        records = verify_log(d)
        acked = collect_acks(outs)
        lost, duplicates, reused = loss_counts(records, acked)
        print(f"soak: {len(acked):,} acked records: {lost} lost, {duplicates} duplicates, {reused} LSNs reused",
              flush=True)
        check_acked_exactly_once(records, acked)
        unknown = sum(1 for lsn in acked.values() if lsn is None)
        assert {r.key.decode() for r in records} == set(acked), "the log holds records nobody got an ack for"
        seen = [(lsn, key) for lsn, key, _ in read_seen(work / "reader.txt")]
        assert seen == [(r.lsn, r.key.decode()) for r in records], "the reader's view differs from the log"
        gaps = sum(b.lsn - a.lsn - 1 for a, b in zip(records, records[1:]))
        segments = len(list(d.glob("*.wal")))
        ok = True
        elapsed = time.monotonic() - started
        print(f"soak: PASS  {cycle} kill -9 cycles in {elapsed:.1f} s; {len(records):,} records in the log, "
              f"all {len(acked):,} acked records present exactly once ({unknown} acked without LSN); "
              f"LSNs strictly increasing, last {records[-1].lsn:,}, {gaps} LSNs skipped for torn batches; "
              f"reader saw the whole log in order; {segments} segments", flush=True)
        return 0
    except AssertionError as exc:
        print(f"soak: FAIL  {exc}", flush=True)
        print(f"soak: files kept in {work}", flush=True)
        return 1
    finally:
        for p in producers + ([reader] if reader else []):
            if p.poll() is None:
                p.kill()
                p.wait(10)
        writer.cleanup()
        if ok and not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

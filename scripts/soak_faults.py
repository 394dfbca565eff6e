#!/usr/bin/env python3
"""Soak test: random I/O faults on the writer's write path, cycle after cycle on one log directory.

Each cycle starts the writer under libfiu (`fiu-run -x`) with a random fsync policy, lets two producer
processes append, then enables one write-path failure point at random through `fiu-ctrl enable_random`
(fdatasync, fsync, pwrite, ftruncate or unlink, with a random probability and EIO or ENOSPC), or makes the
frame write fail after a random number of calls through the LD_PRELOAD shim (tests/faults/walsvc_fault.c).
It then checks what tests/test_write_faults.py checks once per case: the log stops with a reason, the
producers end on their own (their unacked records nacked log_stopped), SIGTERM exits 0, and the restart in
the next cycle recovers every record acked in any cycle so far, at its LSN.

    python scripts/soak_faults.py --cycles 50          # --seed N to replay; --keep to keep the files

Exit status 0 when every check passes, 1 otherwise.  Needs fiu-utils and gcc.  Not collected by pytest.
"""

from __future__ import annotations

import argparse
import errno
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import (WriterProcess, check_acked_exactly_once, collect_acks, finish, read_acks,  # noqa: E402
                     read_stopped, spawn_producer, status, verify_log, wait_for)

# Failure point -> probabilities to pick from: calls made at every commit get rarer failures than calls made
# once per rotation (the directory fsync, the seal's truncate, the retention delete).
FIU_POINTS = {"posix/io/sync/fdatasync": [0.01, 0.1, 1.0], "posix/io/rw/pwrite": [0.001, 0.01, 0.1, 1.0],
              "posix/io/sync/fsync": [0.2, 1.0], "posix/io/rw/ftruncate": [0.2, 1.0],
              "posix/io/dir/unlink": [0.2, 1.0]}
SHIM = Path(__file__).resolve().parents[1] / "tests" / "faults" / "walsvc_fault.c"


def cycle(n: int, rng: random.Random, base: Path, d: Path, so: Path, outs: list[Path]) -> str:
    policy = rng.choice(["always", "batch", "os"])
    err = rng.choice([errno.EIO, errno.ENOSPC])
    config = base / "walsvc.toml"
    config.write_text("[log]\nsegment_bytes = 1048576\n[retention]\nmax_bytes = 3145728\n")
    fifo = str(base / f"fiu{n}")
    use_shim = rng.random() < 0.25
    if use_shim:
        spec = f"call=pwritev,errno={errno.errorcode[err]},after={rng.randint(200, 3000)},path=.wal"
        writer = WriterProcess(d, fsync=policy, config=config, logs=base / f"logs{n}",
                               env={"LD_PRELOAD": str(so), "WALSVC_FAULT": spec})
        what = f"shim {spec}"
    else:
        writer = WriterProcess(d, fsync=policy, config=config, logs=base / f"logs{n}",
                               wrapper=["fiu-run", "-x", "-f", fifo])
    writer.start()
    new_outs = [base / f"producer{n}-{i}.txt" for i in range(2)]
    producers = [spawn_producer(d, n * 10 + i, out, batch=20, pause_s=0.002, ack_timeout_s=1, value_bytes=500,
                                until_stopped=True, stop_file=base / "never") for i, out in enumerate(new_outs)]
    outs.extend(new_outs)
    try:
        wait_for(lambda: all(read_acks(o) or read_stopped(o) for o in new_outs), 30, "first answers")
        if not use_shim:
            point = rng.choice(sorted(FIU_POINTS))
            probability = rng.choice(FIU_POINTS[point])
            command = f"enable_random name={point},probability={probability},failinfo={err}"
            subprocess.run(["fiu-ctrl", "-f", fifo, "-c", command, str(writer.pid)], check=True, timeout=30)
            what = f"libfiu {command}"
        stopped = wait_for(lambda: status(d)["stopped"], 120, f"the log to stop ({what})")
        stopped_at = status(d)["committed_lsn"]
        for i, p in enumerate(producers):
            finish(p, 30, f"producer {i}")
        assert all(read_stopped(o) for o in new_outs), "a producer saw no LogStoppedError"
    finally:
        for p in producers:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    rc = writer.stop()
    assert rc == 0, f"writer exited {rc}: {writer.stderr()[-2000:]}"
    writer.start(faulty=False)  # recovery
    assert writer.stop() == 0
    records = verify_log(d)
    acked = {k: lsn for k, lsn in collect_acks(outs).items() if lsn is not None and lsn >= records[0].lsn}
    check_acked_exactly_once(records, acked)
    where = {r.key.decode(): r.lsn for r in records}
    nacked = [k for o in new_outs for k in read_stopped(o) if k in where and where[k] <= stopped_at]
    assert not nacked, f"committed before the stop (LSN <= {stopped_at}) but nacked: {nacked[:5]}"
    return f"{policy:6} {what}: stopped at {stopped['operation']} ({stopped['errno_name']}), {len(acked)} acked kept"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="walsvc-soak-faults-"))
    so = base / "walsvc_fault.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(so), str(SHIM), "-ldl"], check=True)
    d, outs = base / "wal", []
    print(f"seed {seed}, files in {base}")
    start = time.monotonic()
    try:
        for n in range(args.cycles):
            print(f"cycle {n + 1}: {cycle(n, rng, base, d, so, outs)}", flush=True)
    except AssertionError as exc:
        print(f"FAILED (seed {seed}, files kept in {base}): {exc}")
        return 1
    print(f"all {args.cycles} cycles passed in {time.monotonic() - start:.0f} s")
    if not args.keep:
        shutil.rmtree(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())

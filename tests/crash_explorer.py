"""Power-loss crash states, in the spirit of ALICE (Pillai et al., OSDI 2014).

1. `record` runs a real writer (an embedded `Log`, producer threads, any fsync policy) under
   strace, which logs every file-system call the writer makes with the bytes it wrote.  Each producer thread
   marks an ack in the same trace with a stat() of a path that cannot exist (`/WALSVC-ACK/FIRST/LAST`).
2. `parse` turns the trace into an ordered list of operations on the files of the log directory.
3. `crash_states` builds what a power cut at each point could leave on disk: for each file, everything
   up to its last completed fdatasync/fsync, then a prefix of its later operations (the last one possibly
   torn), or all of them but one (the file system kept a later write and lost an earlier one).  A file
   created after the last fsync of its directory may be missing altogether.
4. `check_state` materializes one state into a directory, reads it with an offline `LogReader`, opens it
   with `Log.open` (default on_corruption="fail"), and checks: every record acked before the cut is there
   at its LSN, every record that reads is the one the writer wrote at that LSN (nothing invented), and the
   log either opens or refuses with CorruptionError (never another error).  The offline reader must agree
   with recovery: it raises exactly when the open refuses, and otherwise reads the LSNs recovery keeps.

A sync covers the writes that completed before the sync call began, and takes effect when it returns.
Files are tracked as inodes (a name may be reused: the spare segment file), and a rename (the spare becoming
a segment) survives if a directory fsync began after it; else "unsynced names lost" keeps the old name.
Directory entries persist in order, so that state loses every later create and rename too.
Not modelled: unlink (the workload stores no cursor and retention deletes nothing), and writes torn other
than as a prefix.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from walsvc import Log, LogReader
from walsvc.errors import CorruptionError

REPO = Path(__file__).resolve().parents[1]
SYSCALLS = "openat,write,pwrite64,pwritev,pwritev2,fsync,fdatasync,ftruncate,fallocate,newfstatat,rename,renameat,renameat2"
ACK = "/WALSVC-ACK/"

_WORKLOAD = r"""
import os, sys, threading
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from walsvc import Log, Record
from crash_explorer import value_of
directory, policy, threads, batches = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
log = Log.open(directory, segment_bytes=1 << 20, fsync=policy, fsync_window_ms=20)
written = {}
def producer(t):
    for i in range(batches):
        keys = [b"t%d-%d-%d" % (t, i, j) for j in range(1 + (i + t) % 3)]
        lsns = log.append_batch([Record.put(k, value_of(k)) for k in keys])
        written.update(zip(lsns, keys))
        if policy != "os":  # under os an ack waits for nothing (wait_committed would fsync)
            log.wait_committed(lsns[-1])
        try:
            os.stat("%s%d/%d" % (sys.argv[6], lsns[0], lsns[-1]))
        except OSError:
            pass
workers = [threading.Thread(target=producer, args=(t,)) for t in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
log.close()
with open(sys.argv[7], "w") as out:
    for lsn in sorted(written):
        out.write("%d %s\n" % (lsn, written[lsn].decode()))
"""


def value_of(key: bytes) -> bytes:
    """The value the workload stores under `key`: a function of the key, so a record cannot be invented
    unnoticed, and incompressible (hash output), so segments fill and rotate."""
    size = 200 + int.from_bytes(hashlib.sha256(key).digest()[:2], "little") % 6000
    return b"".join(hashlib.sha256(key + bytes((n,))).digest() for n in range(size // 32 + 1))[:size]


@dataclass
class Op:
    kind: str  # "write", "trunc", "alloc", "sync", "create", "rename", "dirsync", "ack"
    path: str = ""  # the file's inode key: the name it was created with (+ "#n", n the op's index, when reused)
    target: str = ""  # rename: the new name
    offset: int = 0
    data: bytes = b""
    size: int = 0  # write: bytes written; trunc, alloc: the file size after
    start: int = 0  # index of the event when the call began (a sync covers what completed before it)
    lsns: tuple[int, int] = (0, 0)


@dataclass
class Trace:
    ops: list[Op]
    written: dict[int, bytes]  # LSN -> key, as the real run wrote it
    directory: str


def record(work: Path, *, policy: str = "batch", threads: int = 3, batches: int = 80) -> Trace:
    """Run the workload under strace; returns the parsed trace.  Needs strace on PATH."""
    directory = work / "wal"
    trace_file, written_file = work / "strace.txt", work / "written.txt"
    shutil.rmtree(directory, ignore_errors=True)  # the trace must show every byte the log holds
    cmd = ["strace", "-f", "-y", "-X", "raw", "-qq", "-e", f"trace={SYSCALLS}", "-e", "write=all",
           "-o", str(trace_file), sys.executable, "-c", _WORKLOAD, str(REPO), str(directory), policy, str(threads),
           str(batches), ACK, str(written_file)]
    subprocess.run(cmd, check=True, timeout=300, stdout=subprocess.DEVNULL)
    written = {}
    for line in written_file.read_text().splitlines():
        lsn, key = line.split(" ", 1)
        written[int(lsn)] = key.encode()
    return Trace(parse(trace_file.read_text(), str(directory)), written, str(directory))


_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")
_FD = re.compile(r"^-?\d+<([^>]*)>")
_RET = re.compile(r"\)\s+=\s+(-?\d+)")


def parse(text: str, directory: str) -> list[Op]:
    """Operations on files in `directory` (and ack marks), in completion order, from strace output."""
    ops: list[Op] = []
    pending: dict[str, tuple[str, str, int]] = {}  # pid -> (syscall, args so far, start index)
    last_write: Op | None = None
    prefix = directory.rstrip("/") + "/"
    inode_of: dict[str, str] = {}  # current name -> inode key
    seen: set[str] = set()  # every name a file was created with
    position: dict[str, int] = {}  # inode -> file offset of plain write()s (files written that way: log-id)
    for line in text.splitlines():
        if line.startswith(" | "):
            if last_write is not None:
                hexpart = line[3:].split("  ", 1)[1][:49]
                last_write.data += bytes.fromhex(hexpart.replace(" ", ""))
            continue
        if line.startswith(" * "):
            continue
        m = _RESUMED.match(line)
        if m:
            pid, name, rest = m.groups()
            if pid not in pending:
                continue
            name, args, start = pending.pop(pid)
            args += rest
        else:
            m = _CALL.match(line)
            if not m:
                continue
            pid, name, args = m.groups()
            start = len(ops)
            if args.endswith("<unfinished ...>"):
                pending[pid] = (name, args[:-len("<unfinished ...>")].rstrip(), start)
                last_write = None
                continue
        last_write = None
        ret = _RET.search(args)
        if ret is None or int(ret.group(1)) < 0:
            if name == "newfstatat" and ACK in args:
                first, last = args.split(ACK, 1)[1].split('"', 1)[0].split("/")
                ops.append(Op("ack", start=start, lsns=(int(first), int(last))))
            continue
        fd = _FD.match(args)
        path = fd.group(1) if fd else ""
        if name == "openat":
            target = re.search(r'= \d+<([^>]*)>', args)
            fm = re.match(r'[^,]*, "[^"]*", (0x[0-9a-f]+|\d+)', args)
            flags = int(fm.group(1), 0) if fm else 0
            name = target.group(1) if target else ""
            if name.startswith(prefix) and flags & 0x40 and (name not in inode_of or flags & 0x80):  # O_CREAT, O_EXCL
                key = name if name not in seen else f"{name}#{len(ops)}"  # unique: every spare reuses a name
                seen.add(name)
                inode_of[name] = key
                ops.append(Op("create", key, start=start))
            continue
        if name in ("rename", "renameat", "renameat2"):
            old, new = re.findall(r'"([^"]*)"', args)[:2]
            if old in inode_of and new.startswith(prefix):
                key = inode_of.pop(old)
                inode_of[new] = key
                ops.append(Op("rename", key, target=new, start=start))
            continue
        if path == directory.rstrip("/") and name in ("fsync", "fdatasync"):
            ops.append(Op("dirsync", path, start=start))
            continue
        if not path.startswith(prefix):
            continue
        path = inode_of.get(path, path)
        if name == "write":
            offset = position.get(path, 0)
            position[path] = offset + int(ret.group(1))
            last_write = Op("write", path, offset=offset, size=int(ret.group(1)), start=start)
            ops.append(last_write)
        elif name in ("pwrite64", "pwritev", "pwritev2"):
            numbers = re.search(r"((?:, \d+)+)\)\s+= \d+$", args).group(1).split(", ")
            offset = int(numbers[-2] if name == "pwritev2" else numbers[-1])  # pwritev2 ends with its flags
            last_write = Op("write", path, offset=offset, size=int(ret.group(1)), start=start)
            ops.append(last_write)
        elif name in ("fsync", "fdatasync"):
            ops.append(Op("sync", path, start=start))
        elif name == "ftruncate":
            ops.append(Op("trunc", path, size=int(re.search(r", (\d+)\)", args).group(1)), start=start))
        elif name == "fallocate":
            off, length = (int(x) for x in re.search(r", \d+, (\d+), (\d+)\)", args).groups())
            ops.append(Op("alloc", path, offset=off, size=off + length, start=start))
    for op in ops:
        if op.kind == "write" and len(op.data) != op.size:
            raise ValueError(f"strace showed {len(op.data)} of the {op.size} bytes written to {op.path}")
    return ops


@dataclass
class State:
    cut: int  # crash after this many operations
    files: dict[str, list[Op]]  # what each surviving file holds, as operations applied to an empty file
    acked: list[tuple[int, int]]  # (first, last) LSN of each batch acked before the cut
    label: str = ""


def _apply(ops: list[Op]) -> bytes:
    buf = bytearray()
    for op in ops:
        if op.kind == "write":
            end = op.offset + len(op.data)
            if len(buf) < end:
                buf.extend(bytes(end - len(buf)))
            buf[op.offset:end] = op.data
        elif op.kind == "trunc":
            del buf[op.size:]
            buf.extend(bytes(op.size - len(buf)))
        elif op.kind == "alloc" and len(buf) < op.size:
            buf.extend(bytes(op.size - len(buf)))
    return bytes(buf)


def crash_states(ops: list[Op], cuts: list[int], rng: random.Random, per_cut: int = 6,
                 thorough: frozenset[int] = frozenset()) -> list[State]:
    """The crash states at each cut point (see the module docstring), up to `per_cut` per point, all of
    them at the points in `thorough`."""
    states: list[State] = []
    for cut in cuts:
        done = ops[:cut]
        acked = [op.lsns for op in done if op.kind == "ack"]
        file_ops: dict[str, list[tuple[int, Op]]] = {}
        durable_upto: dict[str, int] = {}  # per file: ops with index below this are durable
        created: dict[str, int] = {}
        renamed: dict[str, tuple[int, str]] = {}  # inode -> (index, new name) of its last rename
        dir_synced_before = -1
        for i, op in enumerate(done):
            if op.kind == "create":
                created[op.path] = i
            elif op.kind == "rename":
                renamed[op.path] = (i, op.target)
            elif op.kind == "dirsync":
                dir_synced_before = op.start
            elif op.kind == "sync":
                durable_upto[op.path] = max(durable_upto.get(op.path, 0), op.start)
            elif op.kind in ("write", "trunc", "alloc"):
                file_ops.setdefault(op.path, []).append((i, op))
        base: dict[str, list[Op]] = {}
        later: dict[str, list[Op]] = {}
        for path, items in file_ops.items():
            base[path] = [op for i, op in items if i < durable_upto.get(path, 0)]
            later[path] = [op for i, op in items if i >= durable_upto.get(path, 0)]
        # Directory entries persist in order: losing the unsynced ones loses every create and rename after
        # the last directory fsync (a renamed file keeps its old name).
        volatile_names = {p for p, i in created.items() if i >= dir_synced_before}
        durable_name = {p: (renamed[p][1] if p in renamed and renamed[p][0] < dir_synced_before else p.split("#")[0])
                        for p in created}
        final_name = {p: renamed[p][1] if p in renamed else p.split("#")[0] for p in created}
        choices: list[tuple[str, dict[str, list[Op]], set[str]]] = []
        everything = {p: base.get(p, []) + later.get(p, []) for p in created}
        choices.append(("all written", everything, set()))
        choices.append(("only synced", {p: base.get(p, []) for p in created}, set()))
        if volatile_names:
            choices.append(("unsynced names lost", everything, volatile_names))
        for path, rest in later.items():
            if not rest or not final_name.get(path, path).endswith((".wal", "/HEAD")):  # LOCK: the writer's PID
                continue
            others = {p: base.get(p, []) for p in created}
            name, synced = Path(final_name.get(path, path)).name, base.get(path, [])
            lose = range(len(rest) - 1) if len(rest) <= 8 else [rng.randrange(len(rest) - 1)]
            for j in lose:
                choices.append((f"{name}: op {j} of {len(rest)} lost, later kept",
                                {**everything, path: synced + rest[:j] + rest[j + 1:]}, set()))
            writes = [j for j, op in enumerate(rest) if op.kind == "write" and len(op.data) > 1]
            if writes:
                j = rng.choice(writes)
                torn = Op("write", path, offset=rest[j].offset, data=rest[j].data[:rng.randrange(1, len(rest[j].data))])
                choices.append((f"{name}: op {j} of {len(rest)} torn", {**everything, path: synced + rest[:j] + [torn]},
                                set()))
            for k in sorted({rng.randrange(len(rest) + 1) for _ in range(2)}):
                choices.append((f"{name}: {k} of {len(rest)} unsynced ops", {**others, path: synced + rest[:k]}, set()))
        names_lost = [c for c in choices if c[0] == "unsynced names lost"]
        choices = [c for c in choices if c[0] != "unsynced names lost"] + names_lost
        for label, files, lost in (choices if cut in thorough else choices[:per_cut]):
            names = durable_name if lost else final_name
            states.append(State(cut, {names[p]: o for p, o in files.items() if p not in lost}, acked, label))
    return states


@dataclass
class Outcome:
    opened: bool
    refused: str | None
    acked_checked: int
    records: int


class CrashCheckFailed(AssertionError):
    pass


def check_state(state: State, trace: Trace, target: Path, check_acked: bool = True) -> Outcome:
    """Materialize `state` under `target` and check the promises (raises CrashCheckFailed).  `check_acked`
    is False for the `os` policy, whose acks do not promise survival of a power cut."""
    if target.exists():
        shutil.rmtree(target)
    # With the modes the writer gave them (a private log: walsvc refuses to open one others can read),
    # whatever the umask of the process that runs the explorer.
    target.mkdir(parents=True)
    target.chmod(0o700)
    for path, ops in state.files.items():
        fd = os.open(target / Path(path).name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_apply(ops))

    def check_records(records: list, where: str) -> None:
        previous = 0
        for r in records:
            if r.lsn <= previous:
                raise CrashCheckFailed(f"{where}: LSN {r.lsn} after {previous} ({state.label}, cut {state.cut})")
            previous = r.lsn
            if trace.written.get(r.lsn) != r.key or r.value != value_of(r.key):
                raise CrashCheckFailed(f"{where}: LSN {r.lsn} holds {r.key!r}, the writer wrote "
                                       f"{trace.written.get(r.lsn)!r} there ({state.label}, cut {state.cut})")

    offline: list | None
    try:
        with LogReader(target) as reader:
            offline = list(reader)
        check_records(offline, "offline reader")
    except CorruptionError as exc:
        offline, offline_error = None, exc
    try:
        log = Log.open(target, segment_bytes=1 << 20, fsync="always")
    except CorruptionError as exc:
        if offline is not None:
            raise CrashCheckFailed(f"open refused ({exc}) but the offline reader read the log "
                                   f"({state.label}, cut {state.cut})") from None
        return Outcome(False, str(exc), 0, 0)
    with log:
        try:
            records = list(log.read())
        except CorruptionError as exc:
            raise CrashCheckFailed(f"recovery opened a log that its own reader cannot read ({exc}) "
                                   f"({state.label}, cut {state.cut})") from None
    if offline is None:
        raise CrashCheckFailed(f"the offline reader raised ({offline_error}) on a log that recovery opened "
                               f"({state.label}, cut {state.cut})")
    check_records(records, "after recovery")
    have = {r.lsn for r in records}
    checked = 0
    for first, last in state.acked if check_acked else ():
        for lsn in range(first, last + 1):
            if lsn not in have:
                raise CrashCheckFailed(f"acked LSN {lsn} is missing after recovery ({state.label}, cut {state.cut})")
            checked += 1
    if offline is not None and [r.lsn for r in offline] != [r.lsn for r in records]:
        raise CrashCheckFailed(f"the offline reader read LSNs up to {offline[-1].lsn if offline else 0}, recovery "
                               f"kept up to {records[-1].lsn if records else 0} ({state.label}, cut {state.cut})")
    return Outcome(True, None, checked, len(records))


def explore(work: Path, *, policy: str = "batch", threads: int = 3, batches: int = 80, cuts: int = 80,
            per_cut: int = 6, seed: int = 1, scratch: Path | None = None) -> dict[str, int | list[str]]:
    """Record, build states at `cuts` random cut points (at most `per_cut` each) plus every point near a
    segment's creation, rename or seal (all states there), check each; returns the counts (and, under
    "refusals", why each refused state was refused).  States are
    materialized under `scratch` (default: /dev/shm when it exists, where recovery's fsyncs cost nothing)."""
    rng = random.Random(seed)
    trace = record(work, policy=policy, threads=threads, batches=batches)
    rotation = [i for i, op in enumerate(trace.ops)
                if op.kind == "rename" or (op.kind in ("create", "trunc") and ".wal" in op.path)]
    near = {i + d for i in rotation for d in range(-3, 6) if 0 < i + d <= len(trace.ops)}
    chosen = sorted(near | set(rng.sample(range(1, len(trace.ops) + 1), min(cuts, len(trace.ops)))))
    counts = {"operations": len(trace.ops), "cut_points": len(chosen), "states": 0, "opened": 0, "refused": 0,
              "acked_records_checked": 0, "records_read": 0, "states_with_lost_then_kept_write": 0}
    if scratch is None:
        scratch = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    target = Path(tempfile.mkdtemp(prefix="walsvc-crash-", dir=scratch))
    try:
        for state in crash_states(trace.ops, chosen, rng, per_cut, frozenset(near)):
            outcome = check_state(state, trace, target / "state", check_acked=policy != "os")
            if not outcome.opened:
                counts.setdefault("refusals", []).append(f"{state.label}, cut {state.cut}: {outcome.refused}")
            counts["states"] += 1
            counts["opened" if outcome.opened else "refused"] += 1
            counts["acked_records_checked"] += outcome.acked_checked
            counts["records_read"] += outcome.records
            counts["states_with_lost_then_kept_write"] += "lost, later kept" in state.label
    finally:
        shutil.rmtree(target, ignore_errors=True)
    return counts

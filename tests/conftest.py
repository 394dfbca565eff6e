"""Shared helpers for the storage-engine tests: real files in tmp dirs, real subprocesses, no mocks."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _build_record_codec() -> str | None:
    """Compile the C twins (walsvc/_record_c.c, walsvc/_writer_c.c) beside their sources, so the tests (which
    import the source tree, not the installed package) run them too; None on success, else the compiler's
    output."""
    package = REPO_ROOT / "walsvc"
    newest = max(p.stat().st_mtime for p in [package / "_record_c.c", package / "_writer_c.c", package / "_c_core.h"])
    built = [sorted(package.glob(f"{name}.*.so")) for name in ("_record_c", "_writer_c")]
    if all(built) and all(found[0].stat().st_mtime >= newest for found in built):
        return None
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else proc.stdout + proc.stderr


CODEC_BUILD_ERROR = _build_record_codec()

from walsvc import Log, Record  # noqa: E402
from walsvc import frame as F  # noqa: E402
from walsvc import head as H  # noqa: E402
from walsvc.segment import list_segments  # noqa: E402

# The suite runs under umask 077, as a careful operator's shell would: a file a test puts into a log directory
# (a stray or damaged file) must not open the log to others, or the writer rightly refuses it (access.py).
# test_access.py runs walsvc under umask 0 to show that walsvc's own modes never depend on the umask.
os.umask(0o077)

MiB = 1024 * 1024
VECTORS_NAME = "nori-v1-records.json"


def vectors_path() -> Path:
    """The shared vectors (../shared beside the repo in CI, /work/shared here), else our copy: never skip."""
    for candidate in (Path(__file__).resolve().parents[2] / "shared/vectors" / VECTORS_NAME,
                      Path("/work/shared/vectors") / VECTORS_NAME,
                      Path(__file__).resolve().parent / "vectors" / VECTORS_NAME):
        if candidate.is_file():
            return candidate
    raise AssertionError(f"{VECTORS_NAME} not found (tests/vectors/ should always hold a copy)")


@pytest.fixture(scope="module", params=["python", "c"])
def codec(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a module's tests once on the pure-Python codecs and once on their compiled twins (the record
    codec's, and those of frame headers, HEAD, REPLY, the writer's APPEND check and a reader's whole-frame
    step, each module holding its `_c`).

    CI must have the twin (a C compiler is there): a missing one fails there, and is skipped elsewhere.
    """
    from walsvc import frame, head, ingest, protocol, record, segment
    modules = (record, frame, head, ingest, protocol, segment)
    saved = record._c
    if request.param == "python":
        for module in modules:
            module._c = None
    elif saved is None:
        if os.environ.get("CI"):
            pytest.fail(f"the compiled record codec is missing in CI: {CODEC_BUILD_ERROR}")
        pytest.skip(f"the compiled record codec is not built here: {CODEC_BUILD_ERROR}")
    try:
        yield request.param
    finally:
        for module in modules:
            module._c = saved


@pytest.fixture(scope="session")
def vectors() -> dict:
    return json.loads(vectors_path().read_text())


def value_for(lsn: int, size: int = 100) -> bytes:
    """A deterministic value for `lsn`, so any reader can check a record's content from its LSN alone."""
    seed = f"lsn={lsn};".encode()
    return (seed * (size // len(seed) + 1))[:size]


def key_for(lsn: int) -> bytes:
    return f"k{lsn:08d}".encode()


@pytest.fixture
def open_log(tmp_path: Path) -> Iterator[Callable[..., Log]]:
    """Log.open with test-friendly defaults (1 MiB segments, fsync=os); every log opened is closed."""
    opened: list[Log] = []

    def _open(directory: Path | None = None, **options: Any) -> Log:
        options.setdefault("segment_bytes", MiB)
        options.setdefault("fsync", "os")
        log = Log.open(directory or tmp_path / "wal", **options)
        opened.append(log)
        return log

    yield _open
    for log in opened:
        log.close()


def fill(log: Log, count: int, size: int = 100, per_batch: int = 1) -> list[int]:
    """Append `count` records whose key and value derive from the LSN they will get; then wait for the
    rotation thread (seals, retention), so the caller sees the directory as it settles."""
    lsns: list[int] = []
    while len(lsns) < count:
        n = min(per_batch, count - len(lsns))
        base = log.next_lsn
        got = log.append_batch([Record.put(key_for(base + i), value_for(base + i, size)) for i in range(n)])
        assert got == list(range(base, base + n))
        lsns.extend(got)
    log._pipeline.drain()
    return lsns


def check_records(records: list[Record], size: int = 100) -> None:
    for r in records:
        assert r.key == key_for(r.lsn), r
        assert r.value == value_for(r.lsn, size), r


def segment_paths(directory: Path) -> list[Path]:
    return [p for _, p in list_segments(directory)]


def frame_offsets(path: Path) -> list[tuple[int, F.FrameHeader]]:
    """(offset, header) of every frame in a segment file, parsed independently of the scanner."""
    data = path.read_bytes()
    out = []
    pos = F.SEGMENT_HEADER_SIZE
    while pos + F.FRAME_HEADER_SIZE <= len(data) and data[pos:pos + 4] == F.FRAME_MAGIC:
        h = F.decode_frame_header(data, pos)
        out.append((pos, h))
        pos += h.size
    return out


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes((b ^ (1 << bit),)))


def zero_from(path: Path, offset: int) -> None:
    """Zero-fill from `offset` to the end of the file, as a preallocated file looks after a torn write."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * (size - offset))


def rewind_head(directory: Path, committed_lsn: int) -> None:
    """Make HEAD say what it said when `committed_lsn` was the last commit (committed and durable), with no
    writer: the HEAD a crash leaves while later batches are still being written.  A test that tears those
    batches needs it, since no crash leaves a HEAD that calls torn batches committed and fsynced."""
    head = H.load(directory)
    assert head is not None and head.committed_lsn >= committed_lsn
    with open(directory / H.NAME, "r+b") as f:
        f.write(H.encode(H.Head(committed_lsn, 0, head.active_base_lsn, head.active_end,
                                min(head.durable_lsn, committed_lsn))))


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def spawn(code: str, **kwargs: Any) -> subprocess.Popen:
    """Run `code` in a fresh Python with walsvc importable; stdout is a pipe."""
    return subprocess.Popen([sys.executable, "-c", code], env=python_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_line(proc: subprocess.Popen, expected: str, timeout: float = 20.0) -> str:
    """Read stdout lines until one starts with `expected` (the child signals readiness this way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(expected):
            return line.strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"child never printed {expected!r}; stderr: {proc.stderr.read()}")


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.fixture
def writers(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Make writer processes (tests/helpers.py WriterProcess) for the test; none outlives it."""
    from helpers import WriterProcess
    made: list[WriterProcess] = []

    def make(directory: Path | None = None, **kwargs) -> WriterProcess:
        w = WriterProcess(directory or tmp_path / "wal", logs=tmp_path / f"logs{len(made)}", **kwargs)
        made.append(w)
        return w

    yield make
    for w in made:
        w.cleanup()


FS_CALLS = "openat,pwrite64,pwritev,pwritev2,write,fsync,fdatasync,ftruncate,rename,renameat,renameat2,unlink"
_SYSCALL = re.compile(r"^(?:\d+\s+)?(\w+)\((.*)$")


def fs_calls(code: str, work: Path) -> list[tuple[str, str]]:
    """The file-system calls `code` makes in a fresh Python, in the order they started, as (name, arguments)
    with descriptors shown as their paths (strace -y: `fsync(3</tmp/x/wal>)`).  For checking the order of
    writes, fsyncs and renames that power-loss safety rests on, where no crash test can look."""
    if shutil.which("strace") is None:
        pytest.skip("needs strace (.ci/run installs it)")
    trace = work / "strace.txt"
    subprocess.run(["strace", "-f", "-y", "-qq", "-e", f"trace={FS_CALLS}", "-o", str(trace), sys.executable,
                    "-c", code], check=True, timeout=120, env=python_env(), stdout=subprocess.DEVNULL)
    calls = []
    for line in trace.read_text().splitlines():
        m = _SYSCALL.match(line)
        if m is not None and "resumed>" not in line:
            calls.append((m.group(1), m.group(2)))
    return calls


def first_call(calls: list[tuple[str, str]], names: tuple[str, ...], needle: str, start: int = 0) -> int:
    """Index of the first call at or after `start` named one of `names` whose arguments contain `needle`; -1."""
    return next((i for i in range(start, len(calls)) if calls[i][0] in names and needle in calls[i][1]), -1)

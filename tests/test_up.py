"""`walsvc up` always ends and takes its children with it: every way a user stops it, checked by pid and lock.

Each test runs the real command (`python -m walsvc up`), stops it the way a user would (Ctrl-C once or
twice, SIGTERM, `| head`, --seconds, kill -9) and then checks that no child it started is alive and that the
log lock is free.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from helpers import REPO_ROOT, python_env, read_log, wait_for, walsvc_cmd

import pytest

UP = ["--producers", "1", "--consumers", "1", "--fsync", "os"]


def children_of(pid: int) -> set[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def lock_free(directory: Path) -> bool:
    fd = os.open(directory / "LOCK", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


class Up:
    """A running `walsvc up` with its stdout on a pipe; `children` = the pids it printed plus its /proc children."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.directory = directory
        self.proc = subprocess.Popen(walsvc_cmd("up", "--dir", str(directory), *UP, *extra), cwd=REPO_ROOT,
                                     env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        self.first = self.proc.stdout.readline()
        pids = re.findall(r"\d+", self.first.partition(";")[0])
        assert pids, f"no pid line: {self.first!r} {self.proc.stderr.read() if self.proc.poll() is not None else ''}"
        self.children = set(map(int, pids)) | children_of(self.proc.pid)
        assert len(self.children) == 3, (self.first, self.children)

    def progress(self) -> str:
        """Wait for one throughput line (the workers are running)."""
        line = self.proc.stdout.readline()
        assert line.startswith("["), line
        return line

    def finish(self, timeout: float) -> tuple[int, str, str, float]:
        started = time.monotonic()
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"walsvc up still running {timeout} s after it was told to stop")
        return self.proc.returncode, out, err, time.monotonic() - started

    def assert_nothing_left(self) -> None:
        wait_for(lambda: not any(alive(p) for p in self.children), 10,
                 f"every child of walsvc up to exit ({[p for p in self.children if alive(p)]} alive)")
        wait_for(lambda: lock_free(self.directory), 10, "the log lock to be free after walsvc up ended")

    def kill(self) -> None:
        for pid in [self.proc.pid, *self.children]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


@pytest.fixture
def up(tmp_path: Path):
    made: list[Up] = []

    def start(*extra: str) -> Up:
        u = Up(tmp_path / "wal", *extra)
        made.append(u)
        return u

    yield start
    for u in made:
        if u.proc.poll() is None or any(alive(p) for p in u.children):
            u.kill()


def test_seconds_is_a_hard_bound_and_the_summary_says_what_happened(up, tmp_path: Path) -> None:
    started = time.monotonic()
    u = up("--seconds", "2")
    code, out, err, _ = u.finish(60)
    took = time.monotonic() - started
    assert code == 0, out + err
    u.assert_nothing_left()
    assert took < 2 + 20, took  # the orderly stop has bounded steps (a few seconds at most)
    assert "stopped by: --seconds 2" in out, out
    done = re.search(r"done; ([\d,]+) records acknowledged, consumed \[([\d,]+)\]", out)
    acked = int(done.group(1).replace(",", ""))
    assert acked > 0 and int(done.group(2).replace(",", "")) == acked, out
    # Each rate over its own span (before, both over the 2 s: consumers that caught up for seconds after the
    # stop showed the producers' rate, and records acked after the stop inflated it).
    spans = re.search(r"producers until their last ack ([\d.]+) s, consumers until they caught up ([\d.]+) s", out)
    assert spans, out
    produced_for, consumed_for = float(spans.group(1)), float(spans.group(2))
    assert 2 <= produced_for <= consumed_for, out
    rates = re.search(r"rates: produced ([\d,]+) rec/s, consumed \[([\d,]+)\] rec/s", out)
    assert rates, out
    for rate, span in ((rates.group(1), produced_for), (rates.group(2), consumed_for)):
        assert abs(int(rate.replace(",", "")) * span - acked) <= acked * 0.06 + 100, out  # spans print rounded
    assert "final lag: [0] records" in out, out
    assert f"data: {(tmp_path / 'wal').resolve()}: " in out and " MB on disk" in out, out
    assert len(read_log(tmp_path / "wal")) == acked


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_one_signal_stops_everything_in_order(up, sig: int) -> None:
    u = up()
    u.progress()
    os.kill(u.proc.pid, sig)
    code, out, err, took = u.finish(40)
    assert code == 0, out + err
    assert f"stopped by: {signal.Signals(sig).name}" in out, out
    assert "writer exit code 0" in out and "Traceback" not in err, out + err
    u.assert_nothing_left()


def test_second_ctrl_c_kills_everything_at_once_even_when_the_writer_hangs(up) -> None:
    u = up()
    u.progress()
    writer = int(re.search(r"writer pid (\d+)", u.first).group(1))
    os.kill(writer, signal.SIGSTOP)  # a stuck writer: the orderly stop would wait out every bound
    os.kill(u.proc.pid, signal.SIGINT)
    time.sleep(0.5)
    os.kill(u.proc.pid, signal.SIGINT)
    code, out, err, took = u.finish(40)
    assert code == 130, out + err
    assert took < 10, f"the second Ctrl-C took {took:.1f} s to end walsvc up"
    assert "forced" in out + err and "Traceback" not in err, out + err
    u.assert_nothing_left()


def test_closed_stdout_stops_it(up) -> None:
    u = up("--seconds", "120")
    u.progress()
    u.proc.stdout.close()  # `walsvc up | head -2`: head has its two lines and exits
    started = time.monotonic()
    try:
        u.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError("walsvc up kept running after its stdout was closed")
    err = u.proc.stderr.read()
    assert time.monotonic() - started < 30 and "Traceback" not in err, err
    assert u.proc.returncode == 0, err
    assert "stopped by: stdout closed" in err, err  # the summary moves to stderr
    u.assert_nothing_left()


def test_kill_9_of_up_takes_its_children_along(up) -> None:
    u = up()
    u.progress()
    os.kill(u.proc.pid, signal.SIGKILL)
    u.proc.wait(10)
    u.assert_nothing_left()  # PR_SET_PDEATHSIG: the writer drains and exits, workers are killed


def test_a_log_owned_by_another_writer_is_one_line_at_once(tmp_path: Path, writers) -> None:
    d = tmp_path / "wal"
    w = writers(d, fsync="os").start()
    started = time.monotonic()
    result = subprocess.run(walsvc_cmd("up", "--dir", str(d), *UP, "--seconds", "30"), cwd=REPO_ROOT,
                            env=python_env(), capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert took < 10, took
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"process {w.pid}" in lines[0], result.stderr
    assert w.running()


def _cpus_of_every_thread(pid: int) -> set[str]:
    return {re.search(r"^Cpus_allowed_list:\s*(\S+)$", (task / "status").read_text(), re.M).group(1)
            for task in Path(f"/proc/{pid}/task").iterdir()}


def test_cpus_puts_the_writer_on_its_cpu_and_the_workers_on_the_others(up) -> None:
    """`up --cpus N`: every thread of the writer on CPU N, every thread of each worker on the other CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs: one for the writer, one for the workers")
    cpu = allowed[-1]
    u = up("--cpus", str(cpu), "--seconds", "20")
    u.progress()  # the workers run
    writer, producer, consumer = (int(n) for n in re.findall(r"\d+", u.first.partition(";")[0]))
    others = ",".join(map(str, allowed[:-1])) if len(allowed) == 2 else None
    assert _cpus_of_every_thread(writer) == {str(cpu)}
    for worker in (producer, consumer):
        found = _cpus_of_every_thread(worker)
        assert len(found) == 1 and str(cpu) not in found.pop().split(","), (worker, found)
        if others is not None:
            assert _cpus_of_every_thread(worker) == {others}
    os.kill(u.proc.pid, signal.SIGTERM)
    code, _, err, _ = u.finish(30)
    assert code == 0, err
    u.assert_nothing_left()
